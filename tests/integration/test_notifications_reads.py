"""Notifications reads a patient's contact, consents and enrollments once per transaction
(a consumer's batch brings a patient's events together), on SQLite and PostgreSQL: a
second read in the transaction sends no statement, a write in it is seen by the next read,
a caller changing what it got changes nothing kept, and the next transaction reads again."""

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.notifications import store
from shared.db import create_engine, migrate, session_factory
from tests.conftest import Statements

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url)
    await migrate(engine, store.MIGRATIONS)
    yield session_factory(engine)
    await engine.dispose()


async def _contact(session: AsyncSession, patient_id: str, email: str, at: datetime) -> None:
    await store.upsert_contact(
        session, patient_id, at, site_id="north", phone=None, email=email, preferred_channel="email", language="en"
    )


async def test_a_contact_is_read_once_and_a_write_is_seen(sessions) -> None:
    async with sessions.begin() as session:
        await _contact(session, "p-1", "one@example.org", T0)
        async with Statements(session) as statements:
            first = await store.get_contact(session, "p-1")
            assert first is not None and first["email"] == "one@example.org"
            first["email"] = "changed by a caller"
            again = await store.get_contact(session, "p-1")
            assert again is not None and again["email"] == "one@example.org"
            assert await store.get_contact(session, "p-2") is None
            assert await store.get_contact(session, "p-2") is None
            assert statements.reads("contacts") == 1  # p-2 (absent) once; p-1 as it was written
            await _contact(session, "p-1", "two@example.org", T0 + timedelta(minutes=1))
            await store.move_contact(session, "p-1", "south")
            moved = await store.get_contact(session, "p-1")
            assert moved is not None and (moved["email"], moved["site_id"]) == ("two@example.org", "south")
    async with sessions.begin() as session, Statements(session) as statements:
        assert (await store.get_contact(session, "p-1")) == moved
        assert statements.reads("contacts") == 1, "another transaction reads again"


async def test_a_contact_written_is_one_statement_and_an_older_change_never_wins(sessions) -> None:
    """Issue 10: a contact change is one upsert (no read of the stored change time first),
    and what it wrote is this transaction's read of the contact (the welcome planned next
    reads it), the same as a new transaction reads. An older change arriving late changes
    nothing, and the contact is read again."""
    async with sessions.begin() as session, Statements(session) as statements:
        await _contact(session, "p-1", "one@example.org", T0)
        await _contact(session, "p-1", "two@example.org", T0 + timedelta(minutes=2))
        assert len(statements.sent) == 2 and statements.reads("contacts") == 0
        written = await store.get_contact(session, "p-1")
        assert statements.reads("contacts") == 0
        await _contact(session, "p-1", "late@example.org", T0 + timedelta(minutes=1))
        kept = await store.get_contact(session, "p-1")
        assert statements.reads("contacts") == 1
    assert written == kept
    assert kept is not None and (kept["email"], kept["changed_at"]) == ("two@example.org", T0 + timedelta(minutes=2))
    async with sessions.begin() as session:
        assert await store.get_contact(session, "p-1") == written


async def test_patients_read_ahead_are_read_once_for_all_and_as_read_one_by_one(sessions) -> None:
    """Issue 10: a group of claimed messages reads its patients' contacts, consents and
    enrollments in one statement per table; each patient's rows are then what a read of
    that patient alone finds (none for an unknown patient), with no read more."""
    episode = {"site_id": "north", "correlation_id": "x-1", "start_date": date(2026, 11, 2)}
    grant = {"site_id": "north", "recipient": "patient", "purpose": "reminders"}
    async with sessions.begin() as session:
        for number in (1, 2):
            await _contact(session, f"p-{number}", f"p{number}@example.org", T0)
            await store.upsert_consent(session, f"c-{number}", patient_id=f"p-{number}", **grant, revoked=False)
        for enrollment, start in (("e-2", date(2026, 11, 9)), ("e-1", date(2026, 11, 2))):
            values = {**episode, "start_date": start}
            await store.add_enrollment(
                session, enrollment_id=enrollment, patient_id="p-1", enrolled_event_id=f"v-{enrollment}", **values
            )
    patients = ["p-1", "p-2", "p-3"]

    async def everything(session: AsyncSession) -> list[object]:
        return [
            [await store.get_contact(session, p) for p in patients],
            [await store.patient_consents(session, p) for p in patients],
            [await store.patient_enrollments(session, p) for p in patients],
        ]

    async with sessions.begin() as session:
        one_by_one = await everything(session)
    async with sessions.begin() as session, Statements(session) as statements:
        await store.read_patients_ahead(session, patients, enrollments_too=patients)
        assert len(statements.sent) == 3
        ahead = await everything(session)
        assert len(statements.sent) == 3
    assert ahead == one_by_one
    assert [e["enrollment_id"] for e in one_by_one[2][0]] == ["e-1", "e-2"] and one_by_one[0][2] is None


async def test_consents_are_read_once_and_a_write_is_seen(sessions) -> None:
    grant = {"patient_id": "p-1", "site_id": "north", "recipient": "patient", "purpose": "reminders"}
    async with sessions.begin() as session, Statements(session) as statements:
        assert await store.patient_consents(session, "p-1") == []
        await store.upsert_consent(session, "c-1", **grant, revoked=False, expires_event="end_of_treatment")
        [granted] = await store.patient_consents(session, "p-1")
        assert granted["consent_id"] == "c-1" and not granted["revoked"]
        assert len(await store.patient_consents(session, "p-1")) == 1
        assert statements.reads("consents") == 2  # before the grant and after it
        await store.end_treatment_consents(session, "p-1", date(2026, 12, 1))
        [ended] = await store.patient_consents(session, "p-1")
        assert ended["expires_on"] == date(2026, 12, 1)
        await store.upsert_consent(session, "c-1", **grant, revoked=True)
        [revoked] = await store.patient_consents(session, "p-1")
        assert revoked["revoked"]


async def test_enrollments_are_read_once_and_a_write_is_seen(sessions) -> None:
    episode = {"patient_id": "p-1", "site_id": "north", "correlation_id": "x-1"}
    async with sessions.begin() as session, Statements(session) as statements:
        assert await store.patient_enrollments(session, "p-1") == []
        await store.add_enrollment(
            session, enrollment_id="e-2", start_date=date(2026, 11, 9), enrolled_event_id="v-2", **episode
        )
        await store.add_enrollment(
            session, enrollment_id="e-1", start_date=date(2026, 11, 2), enrolled_event_id="v-1", **episode
        )
        assert len(statements.sent) == 3  # the read before, then one INSERT per enrollment
        again = await store.add_enrollment(
            session, enrollment_id="e-1", start_date=date(2026, 12, 1), enrolled_event_id="v-9", **episode
        )
        assert again is False and len(statements.sent) == 4  # known already: nothing changed
        listed = await store.patient_enrollments(session, "p-1")
        assert [e["enrollment_id"] for e in listed] == ["e-1", "e-2"]  # by start date
        assert listed[0]["start_date"] == date(2026, 11, 2)
        listed[0]["status"] = "changed by a caller"
        assert [e["status"] for e in await store.patient_enrollments(session, "p-1")] == ["active", "active"]
        await store.update_enrollment(session, "e-1", status="discharged", discharged_on=date(2026, 11, 8))
        assert [e["status"] for e in await store.patient_enrollments(session, "p-1")] == ["discharged", "active"]
        patient_reads = sum("FROM enrollments WHERE enrollments.patient_id" in s for s in statements.sent)
        assert patient_reads == 3  # before, after the enrollments, after the discharge


async def test_episode_statuses_at_a_site_in_one_statement(sessions) -> None:
    """Enrolled episodes, and ends whose enrollment has not arrived yet; an enrollment's own
    status wins over its end's; other sites' and other patients' episodes are not counted."""

    async def enrolled(session: AsyncSession, enrollment_id: str, site_id: str, status: str = "active") -> None:
        await store.add_enrollment(
            session, enrollment_id=enrollment_id, patient_id="p-1", site_id=site_id, start_date=date(2026, 11, 2),
            enrolled_event_id=f"v-{enrollment_id}", correlation_id="x-1", status=status,
        )  # fmt: skip

    async def ended(session: AsyncSession, enrollment_id: str, site_id: str, patient_id: str = "p-1") -> None:
        await store.remember_end(
            session, enrollment_id, patient_id=patient_id, site_id=site_id, status="discharged",
            ended_on=date(2026, 11, 20), event_id=f"d-{enrollment_id}",
        )  # fmt: skip

    async with sessions.begin() as session:
        assert await store.episode_statuses(session, "p-1", "north") == []
        await ended(session, "e-1", "north")  # its PatientEnrolled comes later
        await ended(session, "e-9", "north", patient_id="p-2")
        await enrolled(session, "e-3", "south")
        assert await store.episode_statuses(session, "p-1", "north") == ["discharged"]
        await enrolled(session, "e-2", "north")
        assert sorted(await store.episode_statuses(session, "p-1", "north")) == ["active", "discharged"]
        await enrolled(session, "e-1", "north", status="transferred")
        async with Statements(session) as statements:
            assert sorted(await store.episode_statuses(session, "p-1", "north")) == ["active", "transferred"]
        assert len(statements.sent) == 1
        assert await store.episode_statuses(session, "p-1", "south") == ["active"]


async def test_a_site_is_read_once_and_a_change_is_seen(sessions) -> None:
    """The site projection (shared.projections.SiteDirectory, kept by notifications and
    scheduling alike) is read once per transaction; SiteRegistered applied in it is seen."""
    async with sessions.begin() as session:
        await store.upsert_site(session, "north", "North", "America/New_York")
    async with sessions.begin() as session:
        async with Statements(session) as statements:
            first = await store.get_site(session, "north")
            assert first is not None and first["name"] == "North"
            first["name"] = "changed by a caller"
            again = await store.get_site(session, "north")
        assert statements.reads("sites") == 1 and again is not None and again["name"] == "North"
        await store.upsert_site(session, "north", "North Campus", "America/Chicago")
        renamed = await store.get_site(session, "north")
        assert renamed is not None and (renamed["name"], renamed["timezone"]) == ("North Campus", "America/Chicago")
        assert await store.get_site(session, "south") is None


async def test_sites_read_ahead_are_read_once_for_all_and_as_read_one_by_one(sessions) -> None:
    """A batch's (or a dispatcher round's) sites and their settings, one statement each;
    each site's rows are then what a read of it alone finds, with no read more."""
    async with sessions.begin() as session:
        for site_id in ("north", "south"):
            await store.upsert_site(session, site_id, site_id.title(), "America/New_York")
        await store.put_site_settings(session, "north", "staff-1", reminder_offsets=[1440, 60], quiet_start="21:00")
    sites = ["north", "south", "east"]

    async def everything(session: AsyncSession) -> list[object]:
        return [
            [await store.get_site(session, s) for s in sites],
            [await store.get_site_settings(session, s) for s in sites],
        ]

    async with sessions.begin() as session:
        one_by_one = await everything(session)
    async with sessions.begin() as session, Statements(session) as statements:
        await store.read_sites_ahead(session, sites)
        assert len(statements.sent) == 2
        ahead = await everything(session)
        assert len(statements.sent) == 2
    assert ahead == one_by_one
    assert one_by_one[1][0] is not None and one_by_one[1][0]["reminder_offsets"] == [1440, 60]
    assert one_by_one[0][2] is None and one_by_one[1][1] is None
