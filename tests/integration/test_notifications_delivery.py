"""Notifications on live channels against a real nats-server, a real database (SQLite and
PostgreSQL), a real SMTP server (aiosmtpd) and a real HTTP server standing in for the SMS
provider: the consent gate, reminders in site time (planned, cancelled, deferred by quiet
hours, never after the start), retries with backoff, NotificationFailed, and one message
per cause however often it is delivered.

Clock-dependent rules run with the site's quiet hours set around the current local time,
or through the use cases with an explicit `now`."""

import asyncio
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import select, text

from iopnet.testing import BusRecorder, eventually
from services.notifications import domain, store, usecases
from services.notifications.app import create_app
from services.notifications.delivery import Claim, Dispatcher
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import (
    AttendanceRecorded,
    BookingCancelled,
    ConsentGranted,
    ConsentRevoked,
    IntegrationRegistered,
    PatientBooked,
    PatientContactChanged,
    PatientDischarged,
    PatientEnrolled,
    PatientTransferred,
    SessionCancelled,
    SessionScheduled,
    SiteRegistered,
)
from shared.messaging import Interest
from shared.priority import finishing_work
from tests.conftest import (
    Checkouts,
    HttpPeer,
    SmtpSink,
    auth,
    make_settings,
    publish,
    routine_transaction,
    running,
)

SITE = "columbus-east"
TZ = "America/New_York"
ADMIN = auth("site_admin", [SITE])
STAFF = auth("front_desk", [SITE])


def live_settings(nats_url: str, tmp_path: Path, database_url: str, smtp: SmtpSink, peer: HttpPeer, **overrides: Any):
    """Live channels pointed at the test's own SMTP and HTTP servers. Quiet hours and
    business hours are off unless a test sets them (the suite runs at any hour)."""
    values: dict[str, Any] = {
        "notifications_database_url": database_url,
        "notify_live_channels": True,
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp.port,
        "smtp_from": "iopnet <no-reply@iopnet.test>",
        "sms_api_url": peer.url("/sms"),
        "sms_api_key": "test-api-key",
        "notify_quiet_start": "00:00",
        "notify_quiet_end": "00:00",
        "notify_business_start": "00:00",
        "notify_business_end": "00:00",
        "notify_business_days": [1, 2, 3, 4, 5, 6, 7],
        "notify_retry_base_seconds": 0.05,
        "notify_retry_max_seconds": 0.2,
        "notify_max_attempts": 3,
        "notify_escalation_check_seconds": 3600.0,  # tests drive escalation with an explicit `now`
        "notify_dispatch_tick_seconds": 0.2,
    }
    values.update(overrides)
    return make_settings(nats_url, tmp_path, **values)


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path, smtp_sink: SmtpSink, http_peer: HttpPeer):
    return create_app(live_settings(nats_server.url, tmp_path, database_url, smtp_sink, http_peer))


# --- helpers shared with test_notifications_alerts.py -------------------------------------------


def handled(app) -> int:
    return sum(
        c.stats.applied + c.stats.skipped_duplicates + c.stats.dead_lettered for c in app.state.runtime.consumers
    )


async def publish_and_settle(app, nats_url: str, *envelopes: Envelope, msg_id_prefix: str = "") -> None:
    """Publish, then wait until the consumers have taken every one of them that they read:
    a type read for webhooks only is not read at a site without a subscription to it."""
    before = handled(app)
    await publish(nats_url, *envelopes, msg_id_prefix=msg_id_prefix)
    consumers = app.state.runtime.consumers
    target = before + sum(reads(c, e.subject) for c in consumers for e in envelopes)

    async def done() -> bool:
        return handled(app) >= target

    await eventually(done, what=f"{len(envelopes)} event(s) handled")


def reads(consumer, subject: str) -> bool:
    # Not bound yet (starting, or its stream not declared yet): it will read what it needs
    # itself, and the webhook-only types only once a subscription asks for them.
    subjects = consumer.bound_subjects if consumer.bound.is_set() else consumer.subscription.filter_subjects(Interest())
    return any(_matches(f.split("."), subject.split(".")) for f in subjects)


def _matches(pattern: list[str], tokens: list[str]) -> bool:
    """NATS subject matching: `*` one token, `>` the rest."""
    for index, part in enumerate(pattern):
        if part == ">":
            return len(tokens) > index
        if index >= len(tokens) or part not in ("*", tokens[index]):
            return False
    return len(pattern) == len(tokens)


async def register_site(app, nats_url: str, site_id: str = SITE, timezone: str = TZ) -> None:
    await publish_and_settle(
        app, nats_url, new_envelope(SiteRegistered(name=site_id.title(), timezone=timezone), site_id=site_id)
    )


async def register_integration(
    app,
    nats_url: str,
    sites: list[str],
    integration_id: str = "tester",
    basis: str = "qsoa",
    purpose: str | None = None,
) -> None:
    """Intake registered this integration (the test tokens' `sub`): its webhooks may subscribe."""
    event = IntegrationRegistered(integration_id=integration_id, sites=sites, basis=basis, purpose=purpose)
    await publish_and_settle(app, nats_url, *(new_envelope(event, site_id=site) for site in sites))


def consent_event(patient_id: UUID, site_id: str = SITE, **overrides: Any) -> Envelope:
    values: dict[str, Any] = {
        "consent_id": uuid4(),
        "patient_id": patient_id,
        "recipient": "org:iopnet-notifications",
        "purpose": "appointment_reminders",
        "expires_on": None,
    }
    values.update(overrides)
    return new_envelope(ConsentGranted(**values), site_id=site_id)


class Patient:
    """A patient's events as intake would publish them."""

    def __init__(self, site_id: str = SITE, preferred: str = "email", language: str = "en") -> None:
        self.site_id = site_id
        self.patient_id = uuid4()
        self.enrollment_id = uuid4()
        self.email = f"p{self.patient_id.hex[:8]}@example.org"
        self.phone = "+1614555" + str(self.patient_id.int)[-4:]
        self.contact = new_envelope(
            PatientContactChanged(
                patient_id=self.patient_id, phone=self.phone, email=self.email,
                preferred_channel=preferred, language=language,
            ),
            site_id=site_id,
        )  # fmt: skip
        self.enrolled = new_envelope(
            PatientEnrolled(
                patient_id=self.patient_id, enrollment_id=self.enrollment_id, program_id="adult-iop",
                level_of_care="2.1", cohort="adult", start_date=date(2026, 12, 1), referral_source="self",
            ),
            site_id=site_id,
        )  # fmt: skip
        self.consent = consent_event(self.patient_id, site_id)

    @property
    def id(self) -> str:
        return str(self.patient_id)

    def booked(self, starts_at: datetime, session_id: UUID | None = None, booking_id: UUID | None = None) -> Envelope:
        event = PatientBooked(
            booking_id=booking_id or uuid4(), session_id=session_id or uuid4(), patient_id=self.patient_id,
            starts_at=starts_at,
        )  # fmt: skip
        return new_envelope(event, site_id=self.site_id)

    def cancelled(self, booked: Envelope) -> Envelope:
        data = booked.data
        event = BookingCancelled(
            booking_id=data["booking_id"], session_id=data["session_id"], patient_id=self.patient_id,
            starts_at=data["starts_at"], reason="patient_request",
        )  # fmt: skip
        return new_envelope(event, site_id=self.site_id)

    def discharged(self) -> Envelope:
        event = PatientDischarged(
            patient_id=self.patient_id, enrollment_id=self.enrollment_id, reason="completed",
            discharged_on=date.today(),
        )  # fmt: skip
        return new_envelope(event, site_id=self.site_id)

    def attended(self, session_id: UUID, status: str) -> Envelope:
        event = AttendanceRecorded(session_id=session_id, patient_id=self.patient_id, status=status, minutes=0)
        return new_envelope(event, site_id=self.site_id)


async def onboard(app, nats_url: str, patient: Patient, *, consent: bool = True) -> None:
    events = [patient.contact, patient.enrolled] + ([patient.consent] if consent else [])
    await publish_and_settle(app, nats_url, *events)


async def rows(app, **where: Any) -> list[dict[str, Any]]:
    async with app.state.runtime.sessions() as session:
        query = select(store.notifications).order_by(store.notifications.c.due_at)
        for name, value in where.items():
            query = query.where(store.notifications.c[name] == value)
        return [dict(r) for r in (await session.execute(query)).mappings()]


async def wait_rows(app, predicate, what: str, timeout: float = 10.0, **where: Any) -> list[dict[str, Any]]:
    async def probe():
        found = await rows(app, **where)
        return found if predicate(found) else None

    return await eventually(probe, what=what, timeout=timeout)


async def wait_mail(sink: SmtpSink, address: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
    async def probe():
        found = sink.to(address)
        return found if len(found) >= count else None

    return await eventually(probe, what=f"{count} mail(s) to the test address", timeout=timeout)


def session_at(day_offset: int, hour: int, minute: int = 0, zone: str = TZ) -> datetime:
    day = datetime.now(ZoneInfo(zone)).date() + timedelta(days=day_offset)
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=ZoneInfo(zone)).astimezone(UTC)


def forbidden_in(text: str) -> list[str]:
    import re

    return [w for w in domain.FORBIDDEN_WORDS if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, re.IGNORECASE)]


# --- the consent gate ----------------------------------------------------------------------------


async def test_patient_messages_wait_for_a_covering_consent(
    app, nats_server, bus: BusRecorder, smtp_sink: SmtpSink
) -> None:
    patient = Patient(language="es")
    async with running(app) as client:
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient, consent=False)
        [welcome] = await rows(app, patient_id=patient.id)
        assert (welcome["status"], welcome["status_reason"]) == ("held", "awaiting_consent")

        # Consents that do not cover patient messages change nothing.
        await publish_and_settle(
            app,
            nats_server.url,
            consent_event(patient.patient_id, purpose="payment"),
            consent_event(patient.patient_id, recipient="org:acme-employer"),
            consent_event(patient.patient_id, expires_on=date.today() - timedelta(days=2)),
        )
        assert (await rows(app, patient_id=patient.id))[0]["status"] == "held"
        assert smtp_sink.mails == []

        await publish_and_settle(app, nats_server.url, patient.consent)
        [mail] = await wait_mail(smtp_sink, patient.email)
        assert mail["subject"] == domain.SUBJECTS["patient"]["es"]
        assert "2026-12-01" in mail["text"] and "Hola" in mail["text"]
        assert forbidden_in(mail["subject"] + " " + mail["text"]) == []
        [sent] = await bus.wait_for_event("NotificationSent")
        assert sent.envelope()["data"]["channel"] == "email"
        assert patient.email not in sent.data.decode()
        [row] = await wait_rows(app, lambda r: r[0]["status"] == "sent", "welcome sent", patient_id=patient.id)
        assert row["provider_id"] == mail["headers"]["Message-ID"]

        listed = await client.get(f"/patients/{patient.id}/notifications", headers=STAFF)
        assert listed.status_code == 200
        [out] = listed.json()
        assert out["status"] == "sent" and out["deliveries"][0]["outcome"] == "sent"
        assert patient.email not in listed.text


async def test_revocation_cancels_pending_reminders_at_once(app, nats_server, smtp_sink: SmtpSink) -> None:
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        await wait_mail(smtp_sink, patient.email)  # the welcome
        await publish_and_settle(app, nats_server.url, patient.booked(session_at(3, 10)))
        reminders = await rows(app, patient_id=patient.id, status="pending")
        assert sorted(r["template"] for r in reminders) == ["reminder_24h", "reminder_2h"]

        revoked = ConsentRevoked(**{**patient.consent.data, "expires_on": None})
        await publish_and_settle(app, nats_server.url, new_envelope(revoked, site_id=SITE))
        after = {r["notification_id"]: r for r in await rows(app, patient_id=patient.id)}
        for reminder in reminders:
            assert after[reminder["notification_id"]]["status"] == "cancelled"
            assert after[reminder["notification_id"]]["status_reason"] == "consent_revoked"

        # A booking after the refusal plans nothing that could go out.
        await publish_and_settle(app, nats_server.url, patient.booked(session_at(5, 10)))
        assert not await rows(app, patient_id=patient.id, status="pending")
        assert len(smtp_sink.mails) == 1


# --- reminders ------------------------------------------------------------------------------------


async def test_reminders_from_bookings_cancelled_by_cancellation_discharge_and_closure(app, nats_server) -> None:
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        starts = session_at(3, 10)
        first = patient.booked(starts)
        await publish_and_settle(app, nats_server.url, first)
        planned = await rows(app, booking_id=first.data["booking_id"])
        assert {r["template"]: r["due_at"] for r in planned} == {
            "reminder_24h": starts - timedelta(hours=24),
            "reminder_2h": starts - timedelta(hours=2),
        }
        assert all(r["status"] == "pending" and r["expires_at"] == starts for r in planned)
        assert {r["cause_event_id"] for r in planned} == {str(first.event_id)}

        await publish_and_settle(app, nats_server.url, patient.cancelled(first))
        assert {(r["status"], r["status_reason"]) for r in await rows(app, booking_id=first.data["booking_id"])} == {
            ("cancelled", "booking_cancelled")
        }

        session_id = uuid4()
        scheduled = SessionScheduled(
            session_id=session_id, program_id="p", kind="check_in_group", title="Morning", capacity=12,
            starts_at=session_at(4, 9), ends_at=session_at(4, 10),
        )  # fmt: skip
        closed = SessionCancelled(**scheduled.model_dump())
        second = patient.booked(session_at(4, 9), session_id=session_id)
        await publish_and_settle(app, nats_server.url, new_envelope(scheduled, site_id=SITE), second)
        assert len(await rows(app, booking_id=second.data["booking_id"], status="pending")) == 2
        await publish_and_settle(app, nats_server.url, new_envelope(closed, site_id=SITE))
        assert {r["status_reason"] for r in await rows(app, booking_id=second.data["booking_id"])} == {
            "session_cancelled"
        }

        third = patient.booked(session_at(6, 10))
        await publish_and_settle(app, nats_server.url, third)
        assert len(await rows(app, booking_id=third.data["booking_id"], status="pending")) == 2
        await publish_and_settle(app, nats_server.url, patient.discharged())
        assert {r["status_reason"] for r in await rows(app, booking_id=third.data["booking_id"])} == {"discharged"}

        # A booking event that arrives after the discharge plans nothing.
        late = patient.booked(session_at(7, 10))
        await publish_and_settle(app, nats_server.url, late)
        assert await rows(app, booking_id=late.data["booking_id"]) == []


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Tokyo"])
async def test_quiet_hours_defer_reminders_in_the_sites_timezone(app, nats_server, zone: str) -> None:
    site_id = "site-" + zone.split("/")[1].lower().replace("_", "-")
    patient = Patient(site_id=site_id)
    async with running(app) as client:
        await register_site(app, nats_server.url, site_id, zone)
        admin = auth("site_admin", [site_id])
        body = {"quiet_start": "21:00", "quiet_end": "08:00", "reminder_offsets_minutes": [1440, 120]}
        put = await client.put(f"/sites/{site_id}/notification-settings", json=body, headers=admin)
        assert put.status_code == 200, put.text
        assert put.json()["timezone"] == zone
        await onboard(app, nats_server.url, patient)
        starts = session_at(3, 9, zone=zone)  # 2 h before is 07:00 local: quiet
        booked = patient.booked(starts)
        await publish_and_settle(app, nats_server.url, booked)
        planned = {r["template"]: r for r in await rows(app, booking_id=booked.data["booking_id"])}
        local = {t: r["due_at"].astimezone(ZoneInfo(zone)) for t, r in planned.items()}
        assert (local["reminder_2h"].hour, local["reminder_2h"].minute) == (8, 0)
        assert local["reminder_2h"].date() == starts.astimezone(ZoneInfo(zone)).date()
        assert planned["reminder_24h"]["due_at"] == starts - timedelta(hours=24)  # 09:00 the day before, unless DST
        assert planned["reminder_2h"]["due_at"] == starts - timedelta(hours=1)


async def test_a_message_due_in_quiet_hours_waits_for_their_end(app, nats_server, smtp_sink: SmtpSink) -> None:
    patient = Patient()
    async with running(app) as client:
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        await wait_mail(smtp_sink, patient.email)  # the welcome, before the quiet hours begin
        # Quiet hours from an hour ago to two hours from now, in the site's time.
        wall = datetime.now(ZoneInfo(TZ))
        quiet = {
            "quiet_start": (wall - timedelta(hours=1)).strftime("%H:%M"),
            "quiet_end": (wall + timedelta(hours=2)).strftime("%H:%M"),
        }
        assert (await client.put(f"/sites/{SITE}/notification-settings", json=quiet, headers=ADMIN)).status_code == 200
        await publish_and_settle(app, nats_server.url, patient.attended(uuid4(), "absent"))
        [missed] = await rows(app, patient_id=patient.id, template="missed_you")
        assert missed["status"] == "pending"
        end = missed["due_at"].astimezone(ZoneInfo(TZ))
        assert end.strftime("%H:%M") == quiet["quiet_end"]
        assert missed["due_at"] > datetime.now(UTC) + timedelta(minutes=100)
        assert len(smtp_sink.mails) == 1


async def test_reminders_never_go_out_after_the_session_started(app, nats_server, smtp_sink: SmtpSink) -> None:
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        await wait_mail(smtp_sink, patient.email)
        # Booked 30 minutes before the start: both reminder times have passed.
        late = patient.booked(datetime.now(UTC) + timedelta(minutes=30))
        await publish_and_settle(app, nats_server.url, late)
        assert await rows(app, booking_id=late.data["booking_id"]) == []

        # Reminders planned while the session was ahead, found due after it started (a
        # service that was down): the dispatcher cancels them, it never sends them.
        now = datetime.now(UTC)
        booking = {
            "booking_id": str(uuid4()), "session_id": str(uuid4()), "patient_id": patient.id, "site_id": SITE,
            "starts_at": now - timedelta(minutes=1),
        }  # fmt: skip
        async with app.state.runtime.sessions() as session, session.begin():
            fields = {k: v for k, v in booking.items() if k != "booking_id"}
            await store.upsert_booking(session, booking["booking_id"], **fields, status="booked")
            cause = patient.booked(booking["starts_at"])
            policy = app.state.notifier.policy
            planned = await usecases.plan_reminders(session, policy, booking, cause, now - timedelta(hours=25))
            app.state.notifier.dispatcher.wake_after_commit(session)
        assert planned == 2
        stale = await wait_rows(
            app, lambda r: r and all(x["status"] == "cancelled" for x in r), "stale reminders cancelled",
            booking_id=booking["booking_id"],
        )  # fmt: skip
        assert {r["status_reason"] for r in stale} == {"expired"}
        assert len(smtp_sink.mails) == 1


async def test_a_bookings_reminders_read_the_patient_once_and_are_planned_once(app, nats_server) -> None:
    """Issue 10: the reminders of a booking read the site's rules, the contact and the
    consents once for all of them, and are one multi-row INSERT (the unique constraint
    keeps each to one): five statements for two reminders, six with an INSERT each,
    fourteen before. Planned again, the same booking adds nothing."""
    patient = Patient()
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    async with running(app):
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        now = datetime.now(UTC)
        booking = {
            "booking_id": str(uuid4()), "session_id": str(uuid4()), "patient_id": patient.id, "site_id": SITE,
            "starts_at": now + timedelta(days=3),
        }  # fmt: skip
        cause = patient.booked(booking["starts_at"])
        policy = app.state.notifier.policy
        planned = []
        for _ in range(2):
            async with app.state.runtime.sessions() as session, session.begin():
                ours = (await session.connection()).sync_connection  # not the dispatcher's
                sqlalchemy_event.listen(ours, "before_cursor_execute", count)
                try:
                    planned.append(await usecases.plan_reminders(session, policy, booking, cause, now))
                finally:
                    sqlalchemy_event.remove(ours, "before_cursor_execute", count)
        reminders = await rows(app, booking_id=booking["booking_id"])
    assert planned == [2, 0]
    assert sorted(r["template"] for r in reminders) == ["reminder_24h", "reminder_2h"]
    assert len(statements) <= 2 * 5, "\n".join(s.split("\n")[0][:90] for s in statements)


async def test_a_batch_of_bookings_locks_the_patient_and_reads_the_site_once(app, nats_server) -> None:
    """Issue 10: the bookings of one patient applied in one transaction (a consumer's
    batch) take the patient's lock once and read the site and its settings once; the
    booking just written is not read back."""
    patient = Patient()
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(" ".join(statement.split()))

    async with running(app):
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        now = datetime.now(UTC)
        booked = [patient.booked(now + timedelta(days=days)) for days in (2, 4, 6)]
        policy = app.state.notifier.policy
        async with app.state.runtime.sessions() as session, session.begin():
            ours = (await session.connection()).sync_connection  # not the dispatcher's
            sqlalchemy_event.listen(ours, "before_cursor_execute", count)
            try:
                planned = []
                for envelope in booked:  # as Handlers.on_patient_booked does
                    await store.lock_patient(session, patient.id)
                    planned.append(await usecases.booking_announced(session, policy, envelope, envelope.event(), now))
            finally:
                sqlalchemy_event.remove(ours, "before_cursor_execute", count)
        reminders = await rows(app, patient_id=patient.id, template="reminder_24h")
    assert planned == [2, 2, 2] and len(reminders) == 3

    def times(prefix: str) -> int:
        return sum(s.startswith(prefix) for s in statements)

    assert times("INSERT INTO patients") == 1
    assert times("SELECT sites.") == 1 and times("SELECT site_settings.") == 1
    assert times("SELECT bookings.") == 3  # whether each booking is known already; never read back
    assert times("SELECT notifications.") == 0  # bookings first heard of have no reminders yet
    listing = "\n".join(s[:90] for s in statements)
    assert len(statements) <= 20, listing  # 42 on SQLite, 45 on PostgreSQL before; 33 and 34 last; 20 on both now


async def test_a_booking_announced_again_under_a_new_event_plans_nothing_more(app, nats_server) -> None:
    """A booking this service has heard of asks whether its reminders are planned (one
    heard of for the first time cannot have any): announced again under a new event id,
    it plans nothing more."""
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        now = datetime.now(UTC)
        first = patient.booked(now + timedelta(days=3))
        again = patient.booked(
            first.event().starts_at, session_id=first.event().session_id, booking_id=first.event().booking_id
        )
        assert again.event_id != first.event_id
        policy = app.state.notifier.policy
        planned = []
        for envelope in (first, again):
            async with app.state.runtime.sessions() as session, session.begin():
                await store.lock_patient(session, patient.id)
                planned.append(await usecases.booking_announced(session, policy, envelope, envelope.event(), now))
        reminders = await rows(app, booking_id=str(first.event().booking_id))
    assert planned == [2, 0]
    assert sorted(r["template"] for r in reminders) == ["reminder_24h", "reminder_2h"]


async def test_deliveries_due_together_are_claimed_and_recorded_together(app, nats_server, smtp_sink: SmtpSink) -> None:
    """Issue 10: the messages of a round claim in shared transactions, and record in
    shared transactions (a transaction is, on SQLite, a turn on the one connection and an
    fsync; under load each turn waits for the consumers'). Only the sends are bounded
    (8 at a time): bounding claim, send and record together took a claim and a record
    transaction per 8 messages. Thirty welcomes due at once, each goes out once. A record
    transaction writes its messages in one statement per table, not three per message."""
    patients = [Patient() for _ in range(30)]
    recorded: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        first = " ".join(statement.split())
        if first.startswith(("UPDATE notifications SET", "INSERT INTO delivery_attempts", "INSERT INTO outbox")):
            recorded.append(first[:70])
        for table in ("contacts", "consents", "enrollments"):
            if first.startswith("SELECT") and f"FROM {table} " in f"{first} ":
                recorded.append(f"read {table}")

    async with running(app):
        await register_site(app, nats_server.url)
        await app.state.notifier.dispatcher.stop()  # the welcomes stay pending, all due
        await publish_and_settle(
            app, nats_server.url, *[e for p in patients for e in (p.contact, p.enrolled, p.consent)]
        )
        pending = await rows(app, template="welcome", status="pending")
        assert len(pending) == len(patients)
        dispatcher = Dispatcher(app.state.runtime.settings, app.state.notifier.policy)
        engine = app.state.runtime.engine.sync_engine
        sqlalchemy_event.listen(engine, "before_cursor_execute", count)
        try:
            assert await dispatcher.dispatch_due(app.state.runtime.sessions) == len(patients)
        finally:
            sqlalchemy_event.remove(engine, "before_cursor_execute", count)
        sent = await rows(app, template="welcome", status="sent")
    assert len(sent) == len(patients)
    assert sorted(m["to"] for m in smtp_sink.mails) == sorted([p.email] for p in patients)
    assert dispatcher._claims and dispatcher._records
    routine = False  # the dispatcher's routine lane (not urgent)
    transactions = {
        "claims": dispatcher._claims[routine].transactions,
        "records": dispatcher._records[routine].transactions,
    }
    # Before: 11 claims and 13 records. The claims are taken together (2); the records
    # group whatever sends ended while the one before was written, so how many there are
    # depends on the sends' timing (5-6 when a record wrote each message in turn, 9-16
    # since it writes them all at once and is quicker), never more than one per message.
    assert transactions["claims"] <= 3, transactions
    assert transactions["records"] <= len(patients), transactions
    listing = "\n".join(recorded)
    # The claims' UPDATE (to `sending`) and the records' are one per transaction, each.
    updates = sum(s.startswith("UPDATE notifications SET") for s in recorded)
    assert updates == transactions["claims"] + transactions["records"], listing
    assert sum(s.startswith("INSERT INTO delivery_attempts") for s in recorded) == transactions["records"], listing
    assert sum(s.startswith("INSERT INTO outbox") for s in recorded) == transactions["records"], listing
    # Preparing the claimed welcomes reads their patients' rows once per claim transaction.
    for table in ("contacts", "consents", "enrollments"):
        assert recorded.count(f"read {table}") <= transactions["claims"], listing


async def test_a_message_claimed_twice_in_one_group_is_taken_once(app, nats_server) -> None:
    """Claims made together are taken in one statement: a message two claims name (two
    rounds that overlap) goes to the first of them, and one not due any more to neither."""
    patients = [Patient() for _ in range(2)]
    async with running(app):
        await register_site(app, nats_server.url)
        await app.state.notifier.dispatcher.stop()  # the welcomes stay pending, all due
        await publish_and_settle(
            app, nats_server.url, *[e for p in patients for e in (p.contact, p.enrolled, p.consent)]
        )
        first, later = await rows(app, template="welcome", status="pending")
        async with app.state.runtime.sessions() as session, session.begin():
            await store.mark_notification(
                session, later["notification_id"], due_at=datetime.now(UTC) + timedelta(hours=1)
            )
        dispatcher = Dispatcher(app.state.runtime.settings, app.state.notifier.policy)
        now = datetime.now(UTC)
        async with app.state.runtime.sessions() as session, session.begin():
            taken = await dispatcher._take_all(session, [Claim(first, now), Claim(first, now), Claim(later, now)])
        assert [claimed is not None for claimed in taken] == [True, False, False]
        assert [r["status"] for r in await rows(app, template="welcome", notification_id=first["notification_id"])] == [
            "sending"
        ]


async def test_a_round_of_due_messages_goes_before_the_consumers_waiting_for_the_database(
    nats_server, tmp_path: Path, smtp_sink: SmtpSink, http_peer: HttpPeer
) -> None:
    """On SQLite a service has one connection. The dispatcher's round finishes work the
    consumers planned (a welcome that is due): it takes the connection before the routine
    transactions that were waiting already (shared/priority.py, finishing work), instead
    of each of its turns waiting behind all of them."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'notifications.db'}"  # PostgreSQL has a pool: no line
    app = create_app(live_settings(nats_server.url, tmp_path, database, smtp_sink, http_peer))
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await app.state.notifier.dispatcher.stop()  # the welcome stays pending, due
        await onboard(app, nats_server.url, patient)
        runtime = app.state.runtime
        pool = runtime.engine.sync_engine.pool
        dispatcher = Dispatcher(runtime.settings, app.state.notifier.policy)
        checkouts = Checkouts(pool)
        async with runtime.sessions() as holder, holder.begin():
            await holder.execute(text("SELECT 1"))  # the one connection is taken
            routine = [
                asyncio.create_task(routine_transaction(runtime.sessions), name=f"routine {n}") for n in range(3)
            ]

            async def waiting(count: int) -> bool:
                return pool._pool.waiting() >= count  # the service's own loops may wait too

            await eventually(lambda: waiting(len(routine)), what="routine transactions waiting for the connection")
            before = pool._pool.waiting()
            round_ = asyncio.create_task(dispatcher.dispatch_due(runtime.sessions), name="round")
            await eventually(lambda: waiting(before + 1), what="the round waiting for the connection")
            checkouts.start()
        async with asyncio.timeout(10):
            assert await round_ == 1
            await asyncio.gather(*routine)
        checkouts.stop()
    # Before every routine transaction that was waiting (the relay, finishing work too,
    # may take its turn among the first as well).
    routine_turns = [checkouts.names.index(task.get_name()) for task in routine]
    assert checkouts.names.index("round") < min(routine_turns), checkouts.names
    assert dispatcher.sent == 1


async def test_a_look_only_the_tick_woke_waits_in_finishing_works_place_not_first_in_line(
    nats_server, tmp_path: Path, smtp_sink: SmtpSink, http_peer: HttpPeer
) -> None:
    """The urgent lane also looks for due messages at every tick. A look that only the
    tick woke (nothing committed, nothing known to fall due) takes finishing work's place
    in the connection's line, not the safety consumers' place at its head, where it went
    at every tick to find nothing in almost all of them."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'notifications.db'}"  # PostgreSQL has a pool: no line
    # The relay's retry tick off: the only waiters for the connection are the test's own.
    app = create_app(
        live_settings(nats_server.url, tmp_path, database, smtp_sink, http_peer, outbox_retry_seconds=3600)
    )
    async with running(app):
        await register_site(app, nats_server.url)
        await app.state.notifier.dispatcher.stop()
        runtime = app.state.runtime
        pool = runtime.engine.sync_engine.pool
        queue = pool._pool
        dispatcher = Dispatcher(runtime.settings, app.state.notifier.policy)
        checkouts = Checkouts(pool)
        async with runtime.sessions() as holder, holder.begin():
            await holder.execute(text("SELECT 1"))  # the one connection is taken

            async def finishing() -> None:
                with finishing_work():
                    await routine_transaction(runtime.sessions)

            async def queued(count: int) -> bool:
                return queue.waiting() >= count

            work = {
                "finishing": finishing,
                "look": lambda: dispatcher.dispatch_due(runtime.sessions, urgent=True, polled=True),
                "routine": lambda: routine_transaction(runtime.sessions),
            }
            tasks = []
            for name, start in work.items():  # in this order
                tasks.append(asyncio.create_task(start(), name=name))
                await eventually(lambda: queued(len(tasks)), what=f"{name} waiting for the connection")
            assert queue.waiting(safety_work=True) == 0  # the look is not at the head of the line
            checkouts.start()
        async with asyncio.timeout(10):
            finished = await asyncio.gather(*tasks)
        checkouts.stop()
    assert finished[1] == 0  # nothing was due
    # In line after the finishing work that was waiting before it, before the routine work.
    turns = [name for name in checkouts.names if name in ("finishing", "look", "routine")]
    assert turns[:3] == ["finishing", "look", "routine"], checkouts.names


# --- once per cause ----------------------------------------------------------------------------------


async def test_redelivery_never_sends_twice(app, nats_server, bus: BusRecorder, smtp_sink: SmtpSink) -> None:
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        await wait_mail(smtp_sink, patient.email)
        booked = patient.booked(session_at(3, 10))
        await publish_and_settle(app, nats_server.url, booked)
        # The same events again past the duplicate window (new Nats-Msg-Id), and the same
        # booking announced under a new event id.
        await publish_and_settle(app, nats_server.url, patient.enrolled, patient.contact, booked, msg_id_prefix="r1-")
        again = new_envelope(PatientBooked.model_validate(booked.data), site_id=SITE)
        await publish_and_settle(app, nats_server.url, again)
        await publish_and_settle(app, nats_server.url, patient.consent, msg_id_prefix="r2-")
        assert sum(c.stats.skipped_duplicates for c in app.state.runtime.consumers) == 4
        everything = await rows(app, patient_id=patient.id)
        assert sorted(r["template"] for r in everything) == ["reminder_24h", "reminder_2h", "welcome"]
        await bus.wait_for_event("NotificationSent")
        assert len(smtp_sink.to(patient.email)) == 1
        assert len(bus.events("NotificationSent")) == 1


# --- channels: retries, backoff, NotificationFailed -----------------------------------------------------


async def test_sms_is_retried_after_500s_then_delivered(
    app, nats_server, bus: BusRecorder, http_peer: HttpPeer
) -> None:
    http_peer.fail["/sms"] = 2
    patient = Patient(preferred="sms")
    async with running(app) as client:
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        [sent] = await bus.wait_for_event("NotificationSent")
        assert sent.envelope()["data"]["attempts"] == 3
        assert sent.envelope()["data"]["channel"] == "sms"
        posts = http_peer.posts("/sms")
        assert [p["status"] for p in posts] == [500, 500, 200]
        import json

        document = json.loads(posts[-1]["body"])
        assert document["to"] == patient.phone and "2026-12-01" in document["body"]
        assert posts[-1]["headers"]["Authorization"] == "Bearer test-api-key"
        assert forbidden_in(document["body"]) == []
        [row] = await wait_rows(app, lambda r: r[0]["status"] == "sent", "sms sent", patient_id=patient.id)
        assert (row["attempts"], row["provider_id"], row["last_error"]) == (3, "peer-3", None)
        # One identity on every attempt, for the provider to drop a copy sent again.
        keys = {(p["headers"]["Idempotency-Key"], p["headers"]["X-Iopnet-Delivery-Id"]) for p in posts}
        assert keys == {(row["notification_id"], row["notification_id"])}
        listed = (await client.get(f"/patients/{patient.id}/notifications", headers=STAFF)).json()
        assert [d["outcome"] for d in listed[0]["deliveries"]] == ["retry", "retry", "sent"]
        assert [d["error"] for d in listed[0]["deliveries"]] == ["HTTP 500", "HTTP 500", None]


async def test_notification_failed_after_the_last_attempt(
    app, nats_server, bus: BusRecorder, http_peer: HttpPeer
) -> None:
    http_peer.fail["/sms"] = 1000
    patient = Patient(preferred="sms")
    async with running(app):
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        [failed] = await bus.wait_for_event("NotificationFailed")
        data = failed.envelope()["data"]
        assert (data["attempts"], data["channel"], data["template"]) == (3, "sms", "welcome")
        assert patient.phone not in failed.data.decode()
        assert len(http_peer.posts("/sms")) == 3
        [row] = await rows(app, patient_id=patient.id)
        assert (row["status"], row["status_reason"], row["last_error"]) == ("failed", "gave_up", "HTTP 500")
        assert bus.events("NotificationSent") == []


async def test_email_is_retried_after_a_temporary_smtp_refusal(app, nats_server, smtp_sink: SmtpSink) -> None:
    smtp_sink.refuse = 1
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        [mail] = await wait_mail(smtp_sink, patient.email)
        [row] = await wait_rows(app, lambda r: r[0]["status"] == "sent", "email sent", patient_id=patient.id)
        assert row["attempts"] == 2
        # The Message-ID is the notification's, the same on every attempt: a resent copy
        # (after a crash between send and record) can be dropped by the mail system.
        assert mail["headers"]["Message-ID"] == f"<{row['notification_id']}@iopnet.invalid>"
        assert mail["headers"]["X-Iopnet-Delivery-Id"] == row["notification_id"]
        assert row["provider_id"] == mail["headers"]["Message-ID"]


async def test_an_unknown_patient_gets_no_message_and_reads_are_scoped(app, nats_server) -> None:
    patient = Patient()
    async with running(app) as client:
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        assert (await client.get(f"/patients/{uuid4()}/notifications", headers=STAFF)).status_code == 404
        other = auth("clinician", ["dayton-north"])
        assert (await client.get(f"/patients/{patient.id}/notifications", headers=other)).status_code == 404
        assert (await client.get(f"/patients/{patient.id}/notifications")).status_code == 401
        assert (await client.get(f"/patients/{patient.id}/notifications", headers=STAFF)).status_code == 200
        async with app.state.runtime.sessions() as session:
            audit = (await session.execute(select(store.audit))).mappings().all()
        # The other site's attempt is audited too (DESIGN B5), against the patient's site.
        assert [(a["action"], a["patient_id"], a["site_id"], a["role"]) for a in audit] == [
            ("notifications.read.denied", patient.id, SITE, "clinician"),
            ("notifications.read", patient.id, SITE, "front_desk"),
        ]


async def test_a_message_waits_for_the_contact_it_goes_to(app, nats_server, smtp_sink: SmtpSink) -> None:
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await publish_and_settle(app, nats_server.url, patient.enrolled, patient.consent)
        await publish_and_settle(app, nats_server.url, patient.attended(uuid4(), "absent"))
        [held] = await wait_rows(
            app, lambda r: r and r[0]["status"] == "held", "missed-you held", patient_id=patient.id
        )
        assert (held["template"], held["status_reason"]) == ("missed_you", "awaiting_contact")
        await publish_and_settle(app, nats_server.url, patient.contact)
        mails = await wait_mail(smtp_sink, patient.email, count=2)
        assert sorted(m["text"].split()[0] for m in mails) == ["Hello!", "We"]


async def test_a_message_claimed_by_a_dispatcher_that_died_is_sent_when_its_lease_ends(
    app, nats_server, smtp_sink: SmtpSink
) -> None:
    patient = Patient()
    async with running(app):
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient)
        await wait_mail(smtp_sink, patient.email)
        # A missed-you claimed for sending by a process that then died: its lease has run out.
        # Planned and claimed in one transaction: planned alone, this dispatcher could send
        # it before the test marked it claimed (a CI run: sent twice, attempts 2).
        async with app.state.runtime.sessions() as session, session.begin():
            await usecases.plan_patient_message(
                session, app.state.notifier.policy, usecases.PatientMessage("missed_you", str(uuid4()), str(uuid4())),
                patient_id=patient.id, site_id=SITE, now=datetime.now(UTC),
            )  # fmt: skip
            query = select(store.notifications.c.notification_id).where(store.notifications.c.template == "missed_you")
            notification_id = (await session.execute(query)).scalar_one()
            await store.mark_notification(
                session, notification_id, status="sending", due_at=datetime.now(UTC) - timedelta(seconds=1)
            )
            app.state.notifier.dispatcher.wake_after_commit(session)
        await wait_mail(smtp_sink, patient.email, count=2)
        [sent] = await wait_rows(app, lambda r: r[0]["status"] == "sent", "sent after the lease", template="missed_you")
        assert sent["attempts"] == 1


async def test_a_consent_until_end_of_treatment_ends_with_the_discharge(app, nats_server) -> None:
    patient = Patient()
    until_discharge = consent_event(patient.patient_id, expires_event="end_of_treatment")
    async with running(app):
        await register_site(app, nats_server.url)
        await publish_and_settle(app, nats_server.url, patient.contact, patient.enrolled, until_discharge)
        discharge = patient.discharged()
        await publish_and_settle(app, nats_server.url, discharge)
        async with app.state.runtime.sessions() as session:
            [consent] = await store.patient_consents(session, str(patient.patient_id))
    assert consent["expires_event"] == "end_of_treatment"
    assert consent["expires_on"] == discharge.event().discharged_on
    gate = domain.Consent(consent["recipient"], consent["purpose"], consent["expires_on"], consent["revoked"])
    assert gate.active_on(discharge.event().discharged_on)
    assert not gate.active_on(discharge.event().discharged_on + timedelta(days=1))


async def test_a_transferred_patient_belongs_to_the_receiving_site(app, nats_server) -> None:
    patient = Patient()
    async with running(app) as client:
        await register_site(app, nats_server.url)
        await register_site(app, nats_server.url, "dayton-north", TZ)
        await onboard(app, nats_server.url, patient)
        path = f"/patients/{patient.patient_id}/notifications"
        assert (await client.get(path, headers=auth("front_desk", [SITE]))).status_code == 200
        moved = PatientTransferred(
            patient_id=patient.patient_id, enrollment_id=patient.enrollment_id, from_site_id=SITE,
            to_site_id="dayton-north", to_program_id="dayton-adult", effective_on=date.today(),
        )  # fmt: skip
        for site_id in (SITE, "dayton-north"):  # intake publishes it under both sites' subjects
            await publish_and_settle(app, nats_server.url, new_envelope(moved, site_id=site_id))
        assert (await client.get(path, headers=auth("front_desk", ["dayton-north"]))).status_code == 200
        assert (await client.get(path, headers=auth("front_desk", [SITE]))).status_code == 404
        async with app.state.runtime.sessions() as session:
            [episode] = await store.patient_enrollments(session, str(patient.patient_id))
        assert episode["status"] == "transferred"
