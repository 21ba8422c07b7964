"""Replicas share one PostgreSQL outbox (DESIGN: several processes per service): each
relay locks the rows it read (FOR UPDATE SKIP LOCKED) while it publishes them, so the
other relay neither waits for them nor publishes them too: it goes on with the rows
committed since. Real nats-server and PostgreSQL; two relays, each with its own engine,
as two replicas would have."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from faststream.nats import NatsBroker
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from iopnet.testing import cancelled, eventually
from shared.contracts import Envelope
from shared.messaging import Outbox, OutboxRelay
from shared.messaging.broker import close, jetstream
from shared.messaging.streams import STREAMS, ensure_streams
from tests.conftest import connected_broker, fresh_postgres_database, outbox_alone, stream_count
from tests.integration.test_outbox_express import SITE, enrolled

pytestmark = pytest.mark.postgres


@dataclass
class Replica:
    outbox: Outbox
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    relay: OutboxRelay


@pytest.fixture
async def two_replicas(nats_server) -> AsyncIterator[tuple[Replica, Replica]]:
    broker: NatsBroker = await connected_broker(nats_server.url)
    await ensure_streams(jetstream(broker), [STREAMS["IOP_INTAKE"]], 120)
    async with fresh_postgres_database() as url:
        replicas = []
        for _ in range(2):
            outbox, engine, sessions = await outbox_alone(url)
            replicas.append(Replica(outbox, engine, sessions, OutboxRelay(outbox, sessions, lambda: broker)))
        try:
            yield replicas[0], replicas[1]
        finally:
            for replica in replicas:
                await replica.engine.dispose()
            await close(broker)


async def staged(replica: Replica) -> Envelope:
    async with replica.sessions() as session, session.begin():
        return await replica.outbox.emit(session, enrolled(), SITE)


async def unsent(replica: Replica) -> set[str]:
    table = replica.outbox.table
    async with replica.sessions() as session:
        query = select(table.c.event_id).where(table.c.sent_at.is_(None))
        return {str(event_id) for event_id in (await session.execute(query)).scalars()}


async def test_a_relay_skips_the_rows_another_replica_is_publishing(nats_server, two_replicas) -> None:
    first, second = two_replicas
    publishing, may_finish = asyncio.Event(), asyncio.Event()
    publish = first.relay._publish

    async def held_publish(publisher: Any, rows: list[Any]) -> tuple[int, str | None]:
        publishing.set()  # its rows read and locked
        await may_finish.wait()
        return await publish(publisher, rows)

    first.relay._publish = held_publish  # type: ignore[method-assign]
    first_running = asyncio.create_task(first.relay.run())
    second_running: asyncio.Task[None] | None = None
    try:
        held = await staged(first)
        await asyncio.wait_for(publishing.wait(), timeout=10)
        # Started once the first holds its row: started before, its first pass could take
        # that row itself, and the first never published (a CI run: 1 in 3 locally).
        second_running = asyncio.create_task(second.relay.run())
        await staged(second)

        async def only_the_held_one_left() -> bool:
            return await unsent(first) == {str(held.event_id)}

        # The second relay publishes the row committed since, not waiting on the lock...
        await eventually(only_the_held_one_left, what="the second replica's row sent while the first holds its own")
        assert await stream_count(nats_server.url, "IOP_INTAKE") == 1
        may_finish.set()

        async def all_sent() -> bool:
            return not await unsent(first)

        await eventually(all_sent, what="the first replica's row sent once it may publish")
    finally:
        may_finish.set()
        await cancelled(first_running)
        if second_running is not None:
            await cancelled(second_running)
    # ...and neither published the other's row: each event once on the stream, by one relay.
    assert await stream_count(nats_server.url, "IOP_INTAKE") == 2
    assert first.relay.published_by_event == {"patient_enrolled": 1}
    assert second.relay.published_by_event == {"patient_enrolled": 1}
