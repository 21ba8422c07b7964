"""CommitSignal (shared/messaging/outbox.py) on a real SQLite session: it wakes its worker
after a transaction that marked it commits, and tells the worker whether that is why it
woke, or whether only the tick passed (the dispatcher's urgent lane looks in a lower place
in the connection's line when only the tick woke it)."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db import create_engine, session_factory
from shared.messaging.outbox import CommitSignal

TICK = 0.05


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'signal.db'}")
    yield session_factory(engine)
    await engine.dispose()


async def marked_transaction(sessions: async_sessionmaker[AsyncSession], signal: CommitSignal, *, commit: bool) -> None:
    async with sessions() as session:
        await session.execute(text("SELECT 1"))
        signal.mark(session)
        await (session.commit() if commit else session.rollback())


async def test_a_wait_says_whether_a_commit_or_the_tick_woke_it(sessions: async_sessionmaker[AsyncSession]) -> None:
    signal = CommitSignal(sessions, "test")
    assert await signal.wait(tick=TICK) is True  # the first: drain what an earlier run left
    assert await signal.wait(tick=TICK) is False  # nothing committed: the tick
    await marked_transaction(sessions, signal, commit=False)
    assert await signal.wait(tick=TICK) is False  # rolled back: wakes nobody
    await marked_transaction(sessions, signal, commit=True)
    assert await signal.wait(tick=3600) is True  # committed: at once, not at the tick
    assert await signal.wait(tick=TICK) is False  # and once only
