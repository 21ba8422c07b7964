"""Notifications when events of one patient, booking or session arrive out of order,
against a real nats-server and a real database (SQLite and PostgreSQL).

After a consumer restart, messages it had fetched and not acked come back only after
ack_wait, behind later ones. Each pair below arrives in the wrong order on its stream,
and the late event must not undo the early one: no welcome after a discharge or a
transfer, no reminder for a cancelled booking or session, no message after a
revocation; while a later re-booking of the same booking still gets its reminders."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import select

from services.notifications import store
from services.notifications.app import create_app
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import (
    ConsentRevoked,
    PatientBooked,
    PatientTransferred,
    SessionCancelled,
    SessionScheduled,
)
from tests.conftest import make_settings, running
from tests.integration.test_notifications_delivery import (
    SITE,
    Patient,
    publish_and_settle,
    register_site,
    rows,
)


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    settings = make_settings(nats_server.url, tmp_path, notifications_database_url=database_url)
    return create_app(settings)


async def episode(app, patient: Patient) -> dict:
    async with app.state.runtime.sessions() as session:
        found = await store.get_enrollment(session, str(patient.enrollment_id))
    assert found is not None
    return found


def soon(days: int = 3) -> datetime:
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)


def stamped(envelope: Envelope, seconds: int) -> Envelope:
    """The same event as if scheduling had published it `seconds` later (occurred_at)."""
    return envelope.model_copy(update={"occurred_at": envelope.occurred_at + timedelta(seconds=seconds)})


async def test_no_welcome_after_a_discharge_that_arrived_first(app, nats_server) -> None:
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await publish_and_settle(app, nats_server.url, patient.contact, patient.consent)
        await publish_and_settle(app, nats_server.url, patient.discharged(), patient.enrolled)
        assert (await episode(app, patient))["status"] == "discharged"
        assert await rows(app, patient_id=patient.id) == []  # no welcome, planned or sent


async def test_no_welcome_after_a_transfer_that_arrived_first(app, nats_server) -> None:
    patient = Patient()
    moved = PatientTransferred(
        patient_id=patient.patient_id, enrollment_id=patient.enrollment_id, from_site_id=SITE,
        to_site_id="dayton-north", to_program_id="dayton-adult", effective_on=datetime.now(UTC).date(),
    )  # fmt: skip
    async with running(app):
        await register_site(app, nats_server.url)
        await publish_and_settle(app, nats_server.url, patient.contact, patient.consent)
        copies = [new_envelope(moved, site_id=site) for site in (SITE, "dayton-north")]
        await publish_and_settle(app, nats_server.url, *copies, patient.enrolled)
        assert (await episode(app, patient))["status"] == "transferred"
        assert await rows(app, patient_id=patient.id) == []


async def test_a_booking_cancelled_before_it_arrived_gets_no_reminders(app, nats_server) -> None:
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await publish_and_settle(app, nats_server.url, patient.contact, patient.enrolled, patient.consent)
        booked = patient.booked(soon())
        cancelled = stamped(patient.cancelled(booked), 1)
        await publish_and_settle(app, nats_server.url, cancelled, booked)
        async with app.state.runtime.sessions() as session:
            booking = await store.get_booking(session, booked.data["booking_id"])
        assert booking is not None and booking["status"] == "cancelled"
        assert await rows(app, booking_id=booked.data["booking_id"]) == []


async def test_a_later_rebooking_of_the_same_booking_still_applies(app, nats_server) -> None:
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await publish_and_settle(app, nats_server.url, patient.contact, patient.enrolled, patient.consent)
        first = patient.booked(soon())
        cancelled = stamped(patient.cancelled(first), 1)
        again = stamped(new_envelope(PatientBooked.model_validate(first.data), site_id=SITE), 2)
        # Booked, cancelled, booked again (same booking id) — delivered last-first.
        await publish_and_settle(app, nats_server.url, again, first, cancelled)
        reminders = await rows(app, booking_id=first.data["booking_id"])
        assert sorted(r["template"] for r in reminders) == ["reminder_24h", "reminder_2h"]
        assert {r["status"] for r in reminders} == {"pending"}
        assert {r["cause_event_id"] for r in reminders} == {str(again.event_id)}


async def test_a_session_cancelled_before_it_was_scheduled_stays_cancelled(app, nats_server) -> None:
    patient = Patient()
    session_id = uuid4()
    starts = soon()
    fields = dict(session_id=session_id, program_id="adult-iop", kind="group_therapy", title="Group",
                  starts_at=starts, ends_at=starts + timedelta(minutes=90), capacity=12)  # fmt: skip
    async with running(app):
        await register_site(app, nats_server.url)
        await publish_and_settle(app, nats_server.url, patient.contact, patient.enrolled, patient.consent)
        scheduled = new_envelope(SessionScheduled(**fields), site_id=SITE)
        cancelled = new_envelope(SessionCancelled(**fields), site_id=SITE)
        # A booking announced before the cancellation reached us comes after it here.
        await publish_and_settle(
            app, nats_server.url, cancelled, scheduled, patient.booked(starts, session_id=session_id)
        )
        async with app.state.runtime.sessions() as session:
            target = await store.get_session(session, str(session_id))
        assert target is not None and target["status"] == "cancelled"
        assert await rows(app, session_id=str(session_id)) == []


async def test_a_revocation_before_its_grant_keeps_the_consent_revoked(app, nats_server) -> None:
    patient = Patient()
    data = patient.consent.data
    revoked = new_envelope(
        ConsentRevoked(consent_id=data["consent_id"], patient_id=patient.patient_id, recipient=data["recipient"],
                       purpose=data["purpose"], expires_on=None),
        site_id=SITE,
    )  # fmt: skip
    async with running(app):
        await register_site(app, nats_server.url)
        await publish_and_settle(app, nats_server.url, patient.contact, revoked, patient.consent, patient.enrolled)
        async with app.state.runtime.sessions() as session:
            [consent] = await store.patient_consents(session, patient.id)
            sent = (
                await session.execute(select(store.notifications).where(store.notifications.c.status == "sent"))
            ).all()
        assert consent["revoked"] is True
        [welcome] = await rows(app, patient_id=patient.id)
        assert (welcome["status"], welcome["status_reason"]) == ("cancelled", "consent_revoked")
        assert sent == []


async def test_a_discharge_first_also_stops_reminders_of_a_late_booking(app, nats_server) -> None:
    """The discharge is on intake's stream, the booking on scheduling's: with the
    enrollment not yet known, the remembered end still says the episode is over."""
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await publish_and_settle(app, nats_server.url, patient.contact, patient.consent, patient.discharged())
        booked = patient.booked(soon())
        await publish_and_settle(app, nats_server.url, booked)
        assert await rows(app, booking_id=booked.data["booking_id"]) == []
        async with app.state.runtime.sessions() as session:
            end = await store.get_end(session, str(patient.enrollment_id))
        assert end is not None and end["status"] == "discharged"
