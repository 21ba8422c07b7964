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
from tests.conftest import connected_broker, outbox_alone, stream_count
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
