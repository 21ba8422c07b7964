"""Notifications against a real nats-server and a real database: the welcome message
from enrollment + contact (either order), NotificationSent with the chain's ids, and
one message however often the cause is delivered."""

from datetime import date
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import func, select

from iopnet.testing import BusRecorder, eventually
from services.notifications import store
from services.notifications.app import create_app
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import PatientContactChanged, PatientEnrolled
from tests.conftest import auth, make_settings, publish, running

STAFF = auth("front_desk", ["columbus-east"])


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, notifications_database_url=database_url))


def patient_events(preferred: str = "email") -> tuple[Envelope, Envelope]:
    patient_id = uuid4()
    contact = PatientContactChanged(
        patient_id=patient_id, phone="+16145550100", email="pat@example.org", preferred_channel=preferred, language="es"
    )
    enrollment = PatientEnrolled(
        patient_id=patient_id,
        enrollment_id=uuid4(),
        program_id="adult-iop-am",
        level_of_care="2.1",
        cohort="adult",
        start_date=date(2026, 12, 1),
        referral_source="self",
    )
    return new_envelope(contact, site_id="columbus-east"), new_envelope(enrollment, site_id="columbus-east")


async def notification_rows(app) -> list[dict]:
    async with app.state.runtime.sessions() as session:
        return [dict(r) for r in (await session.execute(select(store.notifications))).mappings()]


@pytest.mark.parametrize("contact_first", [True, False])
async def test_welcome_is_sent_once_in_either_order(app, nats_server, bus: BusRecorder, contact_first: bool) -> None:
    contact, enrolled = patient_events()
    ordered = (contact, enrolled) if contact_first else (enrolled, contact)
    async with running(app) as client:
        await publish(nats_server.url, *ordered)
        [sent] = await bus.wait_for_event("NotificationSent")
        envelope = sent.envelope()
        assert sent.subject == "iop.notifications.notification_sent.columbus-east"
        assert envelope["correlation_id"] == str(enrolled.correlation_id)
        assert envelope["causation_id"] == str(enrolled.event_id)
        assert envelope["data"]["cause_event_id"] == str(enrolled.event_id)
        assert envelope["data"]["template"] == "welcome"
        assert envelope["data"]["channel"] == "console"
        assert "pat@example.org" not in sent.data.decode()

        patient_id = enrolled.data["patient_id"]
        listed = await client.get(f"/patients/{patient_id}/notifications", headers=STAFF)
        assert listed.status_code == 200
        [row] = listed.json()
        assert row["status"] == "sent"
        assert row["attempts"] == 1
        assert (
            await client.get(f"/patients/{patient_id}/notifications", headers=auth("clinician", ["x1"]))
        ).status_code == 404
        assert (
            await client.get(f"/patients/{patient_id}/notifications", headers=auth("patient", [], patient_id))
        ).status_code == 403


async def test_redelivered_enrollment_sends_no_second_message(app, nats_server, bus: BusRecorder) -> None:
    contact, enrolled = patient_events()
    async with running(app):
        await publish(nats_server.url, contact, enrolled)
        await bus.wait_for_event("NotificationSent")
        await publish(nats_server.url, enrolled, msg_id_prefix="replay-1-")
        await publish(nats_server.url, contact, enrolled, msg_id_prefix="replay-2-")
        consumers = app.state.runtime.consumers

        async def all_seen() -> bool:
            return sum(c.stats.skipped_duplicates for c in consumers) == 3

        await eventually(all_seen, what="three redeliveries skipped")
        assert len(await notification_rows(app)) == 1
        assert len(bus.events("NotificationSent")) == 1


async def test_patient_who_wants_no_messages_gets_none(app, nats_server, bus: BusRecorder) -> None:
    contact, enrolled = patient_events(preferred="none")
    async with running(app):
        await publish(nats_server.url, contact, enrolled)

        async def recorded():
            found = await notification_rows(app)
            return found or None

        [row] = await eventually(recorded, what="a suppressed notification row")
        assert row["status"] == "suppressed"
        async with app.state.runtime.sessions() as session:
            pending = await store.outbox.pending_count(session)
            total = (await session.execute(select(func.count()).select_from(store.outbox.table))).scalar_one()
        assert pending == 0
        assert total == 0  # no NotificationSent for a message never sent
