"""While the bus cannot take the outbox's events (connected, but no stream answers: a
stream's leader being elected), the relay backs off instead of retrying at every commit
that wakes it, says so once, and publishes everything once the stream is back. Real
nats-server, SQLite and PostgreSQL."""

import asyncio
import logging

import pytest
from sqlalchemy import func, select

from iopnet.testing import cancelled, eventually
from shared.messaging import OutboxRelay
from shared.messaging.broker import close, jetstream
from shared.messaging.streams import STREAMS, ensure_streams
from tests.conftest import Checkouts, connected_broker, outbox_alone, routine_transaction, stream_count
from tests.integration.test_outbox_express import SITE, enrolled

COMMITS = 60


async def test_the_relay_backs_off_while_no_stream_takes_its_events(
    nats_server, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    outbox, engine, sessions = await outbox_alone(database_url)
    broker = await connected_broker(nats_server.url)  # no stream yet: every publish fails
    relay = OutboxRelay(outbox, sessions, lambda: broker)
    passes = 0
    relay_batch = relay.relay_batch

    async def counted() -> int:
        nonlocal passes
        passes += 1
        return await relay_batch()

    relay.relay_batch = counted  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="iopnet.outbox")
    running = asyncio.create_task(relay.run())
    try:
        for _ in range(COMMITS):  # each commit wakes the relay
            async with sessions() as session, session.begin():
                await outbox.emit(session, enrolled(), SITE)
        tried_during_outage = passes
        await ensure_streams(jetstream(broker), [STREAMS["IOP_INTAKE"]], 120)

        async def all_sent() -> bool:
            async with sessions() as session:
                unsent = select(func.count()).where(outbox.table.c.sent_at.is_(None))
                return (await session.execute(unsent)).scalar_one() == 0

        await eventually(all_sent, what="every row sent once the stream is back")
    finally:
        await cancelled(running)
        await close(broker)
        await engine.dispose()
    assert await stream_count(nats_server.url, "IOP_INTAKE") == COMMITS
    # Backing off, not one pass per commit (without it: about one each).
    assert 1 <= tried_during_outage <= COMMITS // 4, tried_during_outage
    messages = [record.getMessage() for record in caplog.records if record.name == "iopnet.outbox"]
    assert messages.count("outbox relay paused") == 1
    assert messages.count("outbox relay resumed") == 1


async def test_on_sqlite_the_relays_turns_go_before_routine_work_waiting_for_the_database(
    nats_server, tmp_path
) -> None:
    """Putting committed events on the bus finishes work: on SQLite's one connection the
    relay's turns go before routine transactions that were waiting already
    (shared/priority.py), instead of every event's lag growing with the queue."""
    outbox, engine, sessions = await outbox_alone(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}")
    broker = await connected_broker(nats_server.url)
    await ensure_streams(jetstream(broker), [STREAMS["IOP_INTAKE"]], 120)
    relay = OutboxRelay(outbox, sessions, lambda: broker)
    queue = engine.sync_engine.pool._pool  # type: ignore[attr-defined]
    checkouts = Checkouts(engine.sync_engine.pool)

    async def waiting(count: int) -> bool:
        return queue.waiting() == count

    async def on_the_bus(count: int) -> bool:
        async with sessions() as session:
            sent = select(func.count()).where(outbox.table.c.sent_at.is_not(None))
            return (await session.execute(sent)).scalar_one() == count  # published and recorded

    running = asyncio.create_task(relay.run(), name="relay")
    try:
        async with sessions() as session, session.begin():
            await outbox.emit(session, enrolled(), SITE)
        await eventually(lambda: on_the_bus(1), what="a first event sent: the relay is idle")
        async with sessions() as holder, holder.begin():
            await outbox.emit(holder, enrolled(), SITE)  # written as the transaction commits
            await holder.connection()  # the one connection is taken
            routine = [asyncio.create_task(routine_transaction(sessions), name=f"routine {n}") for n in range(3)]
            await eventually(lambda: waiting(len(routine)), what="routine transactions waiting")
            relay.wake()
            await eventually(lambda: waiting(len(routine) + 1), what="the relay waiting")
            checkouts.start()
        async with asyncio.timeout(10):
            await asyncio.gather(*routine)
        await eventually(lambda: on_the_bus(2), what="the second event sent")
    finally:
        checkouts.stop()
        await cancelled(running)
        await close(broker)
        await engine.dispose()
    assert checkouts.names[0] == "relay", checkouts.names
    assert await stream_count(nats_server.url, "IOP_INTAKE") == 2
