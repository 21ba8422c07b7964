"""Leases: a consumer keeps the messages it works on, and gets back in order the ones a
dead consumer left unacknowledged.

Against a real nats-server and database, with a short ack_wait:
- a batch that works for several times ack_wait is not redelivered meanwhile (its
  leases are renewed with in_progress());
- messages a killed consumer had fetched and never acked are applied before any later
  message, when their lease ends, not behind the later ones."""

import asyncio
from datetime import date
from uuid import uuid4

import nats
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from iopnet.testing import eventually
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import Event, PatientEnrolled
from shared.messaging import Consumer, Subscription
from shared.messaging.broker import close
from tests.conftest import applied_in_order, connected_broker, publish

ACK_WAIT = 1.0


def enrolled(program_id: str) -> Envelope:
    event = PatientEnrolled(
        patient_id=uuid4(), enrollment_id=uuid4(), program_id=program_id, level_of_care="2.1",
        cohort="adult", start_date=date(2026, 12, 1), referral_source="self",
    )  # fmt: skip
    return new_envelope(event, site_id="columbus-east")


async def test_a_batch_longer_than_ack_wait_is_not_redelivered(nats_server, inbox_db) -> None:
    inbox, sessions = inbox_db

    async def slow(session: AsyncSession, envelope: Envelope, event: Event) -> None:
        await asyncio.sleep(0.4)  # the work itself: 7 of these make a batch of 2.8 s

    events = [enrolled(f"p{i}") for i in range(8)]
    await publish(nats_server.url, *events)
    nc = await nats.connect(nats_server.url)
    broker = await connected_broker(nats_server.url)
    # No time budget: the batch is meant to run past ack_wait, with its leases renewed.
    consumer = Consumer("leaser", Subscription("IOP_INTAKE", {PatientEnrolled: slow}), sessions, inbox,
                        broker, ack_wait_seconds=ACK_WAIT, transaction_budget_seconds=60)  # fmt: skip
    task = asyncio.create_task(consumer.run())
    try:

        async def all_applied() -> bool:
            return consumer.stats.applied == len(events)

        await eventually(all_applied, timeout=15, what="the slow batch applied")
        info = await nc.jetstream().consumer_info("IOP_INTAKE", "leaser-IOP_INTAKE")
    finally:
        consumer.request_stop()
        await task
        await nc.close()
        await close(broker)
    assert consumer.stats.transactions == 2  # the first message alone, then one batch of 7
    assert info.delivered.consumer_seq == len(events)  # not one redelivery
    assert consumer.stats.redelivered == 0 and consumer.stats.skipped_duplicates == 0
    assert await applied_in_order(sessions, inbox) == [str(e.event_id) for e in events]


@pytest.mark.parametrize("held", [2, 150])
async def test_what_a_killed_consumer_held_is_applied_before_later_messages(nats_server, inbox_db, held: int) -> None:
    """`held` 150: more than one fetch brings back (the batch is 64), so the restarted
    consumer must keep gathering until the broker counts none outstanding."""
    inbox, sessions = inbox_db

    async def handler(session: AsyncSession, envelope: Envelope, event: Event) -> None:
        return None

    events = [enrolled(f"p{i}") for i in range(held + 5)]
    subscription = Subscription("IOP_INTAKE", {PatientEnrolled: handler})
    nc = await nats.connect(nats_server.url)
    broker = await connected_broker(nats_server.url)
    try:
        # A first run creates the durable and applies e0.
        await publish(nats_server.url, events[0])
        first = Consumer("crasher", subscription, sessions, inbox, broker, ack_wait_seconds=ACK_WAIT * 2)
        task = asyncio.create_task(first.run())

        async def first_applied() -> bool:
            return first.stats.applied == 1

        await eventually(first_applied, what="e0 applied")
        first.request_stop()
        await task

        # A process takes the next `held` events from the durable and dies without a
        # word (kill -9).
        await publish(nats_server.url, *events[1 : held + 2])
        doomed = await nats.connect(nats_server.url)
        pull = await doomed.jetstream().pull_subscribe_bind("crasher-IOP_INTAKE", "IOP_INTAKE")
        taken = await pull.fetch(held, timeout=5)
        assert [Envelope.from_bytes(m.data).event_id for m in taken] == [e.event_id for e in events[1 : held + 1]]
        await doomed.close()
        await publish(nats_server.url, *events[held + 2 :])

        # The restarted consumer is handed the later events at once, but must not apply
        # them before the held ones, which the broker gives out again only when their
        # lease ends.
        restarted = Consumer("crasher", subscription, sessions, inbox, broker, ack_wait_seconds=ACK_WAIT * 2)
        task = asyncio.create_task(restarted.run())
        try:

            async def all_applied() -> bool:
                return len(await applied_in_order(sessions, inbox)) == len(events)

            await eventually(all_applied, timeout=15, what="every event applied")
        finally:
            restarted.request_stop()
            await task
    finally:
        await nc.close()
        await close(broker)
    assert await applied_in_order(sessions, inbox) == [str(e.event_id) for e in events]
    assert restarted.stats.recovered == held
