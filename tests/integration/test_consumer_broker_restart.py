"""The broker restarts under a consumer at work: every event is still applied once and
in stream order.

A publisher keeps publishing while nats-server is stopped (SIGTERM, or kill -9) and
started again, several times. Messages in flight when it went down (delivered to the
consumer's pull request but never received, or fetched across the reconnect) are still
counted as the consumer's by the restarted broker; the consumer gathers them back before
anything newer (shared/messaging/consumer.py, `_recover`)."""

import asyncio
import contextlib

import nats
import pytest
from sqlalchemy import MetaData, select
from sqlalchemy.ext.asyncio import AsyncSession

from iopnet.natsd import NatsServer
from iopnet.testing import eventually
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import Event, SiteRegistered
from shared.db import create_engine, session_factory
from shared.messaging import Consumer, Inbox, Subscription
from shared.messaging.broker import close
from shared.messaging.streams import STREAMS, ensure_streams
from tests.conftest import connected_broker

RESTARTS = 6


@pytest.fixture
def nats_server(own_nats_server: NatsServer) -> NatsServer:
    return own_nats_server  # this test stops and starts it


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "kill9"])
async def test_every_event_applied_once_and_in_order_across_broker_restarts(
    nats_server: NatsServer, database_url: str, kill: bool
) -> None:
    metadata = MetaData()
    inbox = Inbox(metadata)
    engine = create_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    sessions = session_factory(engine)

    async def handler(session: AsyncSession, envelope: Envelope, event: Event) -> None:
        await asyncio.sleep(0.002)  # some work: the consumer is now behind, now caught up

    async def applied() -> list[str]:
        async with sessions() as session:
            query = select(inbox.table.c.event_id).order_by(inbox.table.c.received_at)
            return [str(r) for r in (await session.execute(query)).scalars()]

    options = {"reconnect_time_wait": 0.2, "max_reconnect_attempts": -1}
    nc = await nats.connect(nats_server.url, **options)
    broker = await connected_broker(nats_server.url)
    publisher = await nats.connect(nats_server.url, **options)
    await ensure_streams(nc.jetstream(), [STREAMS["IOP_INTAKE"]], 120)
    consumer = Consumer(
        "restarts", Subscription("IOP_INTAKE", {SiteRegistered: handler}), sessions, inbox, broker,
        ack_wait_seconds=2,
    )  # fmt: skip
    published: list[Envelope] = []
    publishing = True

    async def publish_continuously() -> None:
        js = publisher.jetstream()
        while publishing:
            index = len(published)
            envelope = new_envelope(SiteRegistered(name=f"Site {index}", timezone="UTC"), site_id=f"s-{index % 50:02d}")
            with contextlib.suppress(Exception):  # the broker is down: the next one is tried
                await js.publish(
                    envelope.subject, envelope.to_bytes(), headers={"Nats-Msg-Id": str(envelope.event_id)}, timeout=1
                )
                published.append(envelope)
            await asyncio.sleep(0.003)  # a steady load, about as fast as the consumer

    task = asyncio.create_task(consumer.run())
    load = asyncio.create_task(publish_continuously())
    try:
        for _ in range(RESTARTS):
            # Mid-stream: after the consumer has applied more since the last restart.
            target = consumer.stats.applied + 60

            async def progressed(target: int = target) -> bool:
                return consumer.stats.applied >= target

            await eventually(progressed, timeout=30, what="the consumer to make progress")
            await asyncio.to_thread(nats_server.stop, kill)
            await asyncio.to_thread(nats_server.start)
        publishing = False
        await load
        stored = (await nc.jetstream().stream_info("IOP_INTAKE")).state.messages

        async def all_applied() -> bool:
            return len(await applied()) >= stored

        await eventually(all_applied, timeout=30, what="every stored event applied")
    finally:
        publishing = False
        consumer.request_stop()
        await task
        load.cancel()
        await publisher.close()

    stream = nc.jetstream()
    state = (await stream.stream_info("IOP_INTAKE")).state
    sequence = {}
    for seq in range(state.first_seq, state.last_seq + 1):
        message = await stream.get_msg("IOP_INTAKE", seq)
        sequence[str(Envelope.from_bytes(message.data or b"").event_id)] = seq
    await nc.close()
    await close(broker)
    order = [sequence[event_id] for event_id in await applied()]
    await engine.dispose()
    assert set(sequence) >= {str(e.event_id) for e in published}
    assert len(order) == len(sequence)  # every stored event applied, each once
    late, highest = [], 0
    for seq in order:
        if seq < highest:
            late.append((seq, highest))
        highest = max(highest, seq)
    assert not late, f"applied after a later one (seq, highest before): {late[:5]}"
