"""Notifications' dispatcher on shutdown, against a real nats-server and a real database
(SQLite and PostgreSQL): a send under way when the service stops finishes and is
recorded (sent, its attempt, NotificationSent) before the process exits, instead of
staying `sending` until its lease ends and going out a second time; no new message is
taken once stopping; and a send that does not finish in the grace period is cut short.

The channel here is a stand-in whose send waits for the test to let it finish: the
test decides when the send completes relative to the shutdown."""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import select

from iopnet.testing import BusRecorder, eventually
from services.notifications import delivery, store, usecases
from services.notifications.app import create_app
from services.notifications.channels import OutboundMessage
from shared import clock
from shared.db import create_engine, session_factory
from tests.conftest import make_settings, running
from tests.integration.test_notifications_delivery import SITE, Patient, publish_and_settle, register_site


class HeldChannel:
    """A channel whose sends wait until `release` is set (or are cancelled)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.delivered: list[str] = []
        self.cut_short = 0

    async def send(self, message: OutboundMessage) -> str:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cut_short += 1
            raise
        self.delivered.append(message.notification_id)
        return f"held-{message.notification_id}"


@pytest.fixture
def settings(nats_server, database_url: str, tmp_path: Path):
    return make_settings(nats_server.url, tmp_path, notifications_database_url=database_url)


def held_app(settings) -> tuple[Any, HeldChannel]:
    app = create_app(settings)
    channel = HeldChannel()
    app.state.notifier.dispatcher.channels["console"] = channel
    return app, channel


@asynccontextmanager
async def started(app) -> AsyncIterator[Any]:
    """The app's lifespan entered; the caller exits it (the shutdown) when it wants."""
    context = app.router.lifespan_context(app)
    await context.__aenter__()
    try:
        yield context
    finally:
        if app.state.runtime.engine is not None and not _stopped(app):
            await context.__aexit__(None, None, None)


def _stopped(app) -> bool:
    return all(task.done() for task in app.state.runtime._tasks)


async def a_send_under_way(app, nats_url: str, channel: HeldChannel) -> Patient:
    patient = Patient()
    await register_site(app, nats_url)
    await publish_and_settle(app, nats_url, patient.contact, patient.enrolled, patient.consent)

    async def sending() -> bool:
        return channel.started.is_set()

    await eventually(sending, what="the welcome handed to the channel")
    return patient


async def stored(database_url: str, table, **where: Any) -> list[dict[str, Any]]:
    """Rows read after the service stopped (its own engine is disposed by then)."""
    engine = create_engine(database_url)
    try:
        async with session_factory(engine)() as session:
            query = select(table).where(*(table.c[name] == value for name, value in where.items()))
            return [dict(r) for r in (await session.execute(query)).mappings()]
    finally:
        await engine.dispose()


def dispatcher_task() -> asyncio.Task:
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == "dispatcher"]
    return task


async def test_a_send_under_way_at_shutdown_is_recorded_before_exit(
    settings, database_url: str, nats_server, bus: BusRecorder
) -> None:
    app, channel = held_app(settings)
    async with started(app) as lifespan:
        patient = await a_send_under_way(app, nats_server.url, channel)
        task = dispatcher_task()
        shutdown = asyncio.ensure_future(lifespan.__aexit__(None, None, None))

        async def cancelled() -> bool:
            return task.cancelling() > 0 or task.done()

        await eventually(cancelled, what="the shutdown under way")
        channel.release.set()  # the provider answers only now
        await shutdown
    [row] = await stored(database_url, store.notifications, patient_id=patient.id)
    assert (row["status"], row["attempts"], row["provider_id"]) == ("sent", 1, f"held-{row['notification_id']}")
    assert (channel.delivered, channel.cut_short) == ([row["notification_id"]], 0)
    [attempt] = await stored(database_url, store.delivery_attempts, notification_id=row["notification_id"])
    assert attempt["outcome"] == "sent"
    # NotificationSent committed with the record; the relay publishes it on the next start.
    assert bus.events("NotificationSent") == []
    again, _ = held_app(settings)
    async with running(again):
        [sent] = await bus.wait_for_event("NotificationSent")
        assert sent.envelope()["data"]["notification_id"] == row["notification_id"]
    assert channel.delivered == [row["notification_id"]]


async def test_stop_takes_no_new_message_and_waits_for_the_one_under_way(
    settings, database_url: str, nats_server
) -> None:
    app, channel = held_app(settings)
    dispatcher = app.state.notifier.dispatcher
    async with started(app):
        patient = await a_send_under_way(app, nats_server.url, channel)
        loop = dispatcher_task()
        stopping = asyncio.ensure_future(dispatcher.stop())

        async def stop_begun() -> bool:
            return dispatcher.stopping

        await eventually(stop_begun, what="stop() begun")
        # A message due now, committed while the dispatcher stops: it is not taken.
        async with app.state.runtime.sessions() as session, session.begin():
            await usecases.plan_patient_message(
                session, app.state.notifier.policy, usecases.PatientMessage("missed_you", str(uuid4()), str(uuid4())),
                patient_id=patient.id, site_id=SITE, now=datetime.now(UTC),
            )  # fmt: skip
            dispatcher.wake_after_commit(session)
        assert not stopping.done()  # waits for the send under way
        channel.release.set()
        await stopping
        assert loop.done() and not loop.cancelled()  # stop() ended the dispatch loops too, and waited for them
    by_template = {r["template"]: r for r in await stored(database_url, store.notifications, patient_id=patient.id)}
    assert (by_template["welcome"]["status"], by_template["welcome"]["attempts"]) == ("sent", 1)
    assert (by_template["missed_you"]["status"], by_template["missed_you"]["attempts"]) == ("pending", 0)
    assert channel.delivered == [by_template["welcome"]["notification_id"]]


async def test_a_send_past_the_grace_period_is_cut_short(settings, database_url: str, nats_server) -> None:
    app, channel = held_app(settings)
    dispatcher = app.state.notifier.dispatcher
    dispatcher.stop_grace_seconds = 0.3
    async with started(app):
        patient = await a_send_under_way(app, nats_server.url, channel)
        began = time.monotonic()
        await dispatcher.stop()  # the provider never answers
        assert time.monotonic() - began < 3.0
    assert channel.cut_short == 1
    # Unknown whether it reached the provider: `sending` until its lease ends, then sent
    # again with the same idempotency key (at least once).
    [row] = await stored(database_url, store.notifications, patient_id=patient.id)
    assert (row["status"], row["attempts"]) == ("sending", 0)


async def test_a_claim_whose_lease_ran_out_waiting_for_a_send_slot_is_not_sent(
    settings, database_url: str, nats_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the sends are bounded (delivery.CONCURRENCY), not a round's claims: a message
    holds its claim while it waits for a slot. If slow sends ahead of it outlast its
    lease, another dispatcher may have claimed it since: it is not sent, and it is left
    due as it stands (no write that could undo another dispatcher's claim)."""
    monkeypatch.setattr(delivery, "CONCURRENCY", 1)
    app, channel = held_app(settings)
    async with started(app):
        await app.state.notifier.dispatcher.stop()  # the test drives a dispatcher of its own
        patients = [Patient(), Patient()]
        await register_site(app, nats_server.url)
        await publish_and_settle(
            app, nats_server.url, *[e for p in patients for e in (p.contact, p.enrolled, p.consent)]
        )
        dispatcher = delivery.Dispatcher(app.state.runtime.settings, app.state.notifier.policy)
        dispatcher.channels["console"] = channel
        sessions = app.state.runtime.sessions
        first_round = asyncio.ensure_future(dispatcher.dispatch_due(sessions))

        async def sending() -> bool:
            return channel.started.is_set()

        await eventually(sending, what="the first welcome handed to the channel")
        # The provider takes longer than the lease before it answers the first send.
        lease = timedelta(seconds=3 * settings.notify_send_timeout_seconds + 5)
        later = datetime.now(UTC) + lease
        monkeypatch.setattr(clock, "now", lambda: later)
        channel.release.set()
        assert await first_round == 2
        [sent_first] = channel.delivered
        rows = {r["notification_id"]: r for r in await welcomes(sessions)}
        [waited] = [r for r in rows.values() if r["notification_id"] != sent_first]
        assert (rows[sent_first]["status"], waited["status"], waited["attempts"]) == ("sent", "sending", 0)
        assert waited["due_at"] <= later  # its lease has ended: due again, for any dispatcher
        assert await dispatcher.dispatch_due(sessions) == 1
        assert channel.delivered == [sent_first, waited["notification_id"]]
        assert {r["status"] for r in await welcomes(sessions)} == {"sent"}


async def welcomes(sessions) -> list[dict[str, Any]]:
    async with sessions() as session:
        query = select(store.notifications).where(store.notifications.c.template == "welcome")
        return [dict(r) for r in (await session.execute(query)).mappings()]
