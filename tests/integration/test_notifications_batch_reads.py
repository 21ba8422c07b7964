"""A routine batch of notifications reads what its events need once (issue 10), on SQLite
and PostgreSQL: its patients are locked in one statement, and their contacts, consents,
enrollments and episode ends, and the batch's bookings and sessions, are read in one
statement per table before the first event is applied. What it plans is what applying the
same events one at a time plans."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import pytest

from services.notifications import usecases
from services.notifications.app import create_app
from services.notifications.handlers import Handlers
from shared.contracts import Envelope
from shared.messaging import Subscription
from shared.settings import Settings
from tests.conftest import Statements, make_settings, running
from tests.integration.test_notifications_delivery import Patient, onboard, publish_and_settle, register_site, rows


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, notifications_database_url=database_url))


def lane(stream: str) -> Subscription:
    """The routine subscription of the stream, as the service builds it."""
    subscriptions = Handlers(usecases.Policy.from_settings(Settings())).subscriptions()
    return next(s for s in subscriptions if s.stream == stream and s.lane is None)


async def apply(app, lane: Subscription, envelopes: list[Envelope], *, read_ahead: bool) -> Statements:
    """The events in one transaction, as the consumer applies a batch (inbox aside)."""
    async with app.state.runtime.sessions() as session, session.begin(), Statements(session) as statements:
        if read_ahead:
            assert lane.read_ahead is not None
            await lane.read_ahead(session, envelopes)
        for envelope in envelopes:
            event = envelope.event()
            handler = lane.handler_for(event)
            assert handler is not None
            await handler(session, envelope, event)
    return statements


def locks(statements: Statements) -> int:
    return sum(s.startswith("INSERT INTO patients") for s in statements.sent)


async def reminders(app, booked: Envelope) -> list[tuple[str, str]]:
    found = await rows(app, booking_id=str(booked.data["booking_id"]))
    return sorted((r["template"], r["status"]) for r in found)


async def test_a_batch_of_bookings_reads_each_table_once(app, nats_server) -> None:
    starts = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    sessions = [(uuid4(), starts + timedelta(days=day)) for day in range(3)]
    scheduling = lane("IOP_SCHEDULING")
    async with running(app):
        await register_site(app, nats_server.url)
        patients = [Patient() for _ in range(4)]
        for patient in patients:
            await onboard(app, nats_server.url, patient)
        *batched, alone = patients
        batch = [p.booked(at, session_id=s) for p in batched for s, at in sessions]
        statements = await apply(app, scheduling, batch, read_ahead=True)
        one_by_one = [alone.booked(at, session_id=s) for s, at in sessions]
        for booked in one_by_one:
            await apply(app, scheduling, [booked], read_ahead=False)
        planned = [await reminders(app, booked) for booked in batch]
        control = [await reminders(app, booked) for booked in one_by_one]
    # Nine bookings of three patients: a read per table for the batch, not per booking.
    for table in ("bookings", "sessions", "episode_ends", "enrollments", "contacts", "consents"):
        assert statements.reads(table) == 1, table
    assert locks(statements) == 1
    assert all(planned), "every booking got its reminders"
    assert planned == control * len(batched), "the same reminders as one event at a time"


async def test_a_batch_of_enrollments_at_several_sites_reads_each_table_once(app, nats_server) -> None:
    """Enrollments whose contacts are known: each plans its welcome from the enrollments
    read ahead (a new one joins them, not read again), and the sites without a webhook
    subscription are found in one statement."""
    intake = lane("IOP_INTAKE")
    async with running(app):
        for site in ("north", "south"):
            await register_site(app, nats_server.url, site)
        patients = [Patient(site_id=site) for site in ("north", "south", "north", "south")]
        for patient in patients:
            await publish_and_settle(app, nats_server.url, patient.contact, patient.consent)
        *batched, alone = patients
        statements = await apply(app, intake, [p.enrolled for p in batched], read_ahead=True)
        await apply(app, intake, [alone.enrolled], read_ahead=False)
        welcomes = [await rows(app, patient_id=p.id, template="welcome") for p in patients]
    for table in ("enrollments", "episode_ends", "contacts", "consents", "subscriptions", "sites", "site_settings"):
        assert statements.reads(table) == 1, table
    assert locks(statements) == 1
    assert [len(found) for found in welcomes] == [1] * len(patients)
    assert {found[0]["status"] for found in welcomes} == {"pending"}
