"""Group commit (shared/group_commit.py), on a real SQLite database: callers that write
together share one transaction, each gets its own answer, and one that fails costs the
others nothing. Used by notifications' dispatcher (claims, records) and, set-based, by
intake's check-ins."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import create_engine, session_factory
from shared.group_commit import GroupCommit

metadata = MetaData()
claims = Table("claims", metadata, Column("item", Integer, primary_key=True), Column("by", String(20)))


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'group.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield session_factory(engine)
    await engine.dispose()


async def claim(session: AsyncSession, item: int) -> str:
    if item == 13:
        raise ValueError("a broken row")
    await session.execute(insert(claims).values(item=item, by=f"claim {item}"))
    return f"claimed {item}"


async def test_deliveries_claiming_together_share_one_transaction_and_each_gets_its_answer(sessions) -> None:
    group: GroupCommit[int, str] = GroupCommit(sessions, claim)
    async with asyncio.timeout(10):
        answers = await asyncio.gather(*(group.record(item) for item in range(8)))
    assert answers == [f"claimed {item}" for item in range(8)]
    # The first takes the turn alone; the seven that asked meanwhile go in one transaction.
    assert group.transactions == 2
    async with sessions() as session:
        assert (await session.execute(select(claims.c.item).order_by(claims.c.item))).scalars().all() == list(range(8))


async def test_one_that_fails_costs_the_others_nothing(sessions) -> None:
    group: GroupCommit[int, str] = GroupCommit(sessions, claim)
    async with asyncio.timeout(10):
        answers = await asyncio.gather(*(group.record(item) for item in (1, 13, 2, 3)), return_exceptions=True)
    assert answers[0] == "claimed 1" and answers[2:] == ["claimed 2", "claimed 3"]
    assert isinstance(answers[1], ValueError)
    async with sessions() as session:
        assert (await session.execute(select(claims.c.item).order_by(claims.c.item))).scalars().all() == [1, 2, 3]
    await group.idle()


async def claim_all(session: AsyncSession, items: list[int]) -> list[str | Exception]:
    """Set-based: one multi-row INSERT for the group; 13 is refused, not failed."""
    accepted = [item for item in items if item != 13]
    await session.execute(insert(claims), [{"item": item, "by": "group"} for item in accepted])
    return [ValueError("refused") if item == 13 else f"claimed {item}" for item in items]


async def test_set_based_a_refusal_is_answered_and_the_group_commits(sessions) -> None:
    group: GroupCommit[int, str] = GroupCommit.set_based(sessions, claim_all)
    async with asyncio.timeout(10):
        answers = await asyncio.gather(*(group.record(item) for item in (1, 2, 13, 3)), return_exceptions=True)
    assert answers[:2] == ["claimed 1", "claimed 2"] and answers[3] == "claimed 3"
    assert isinstance(answers[2], ValueError)
    assert group.transactions == 2  # the refusal rolled nothing back: no transaction per item
    async with sessions() as session:
        assert (await session.execute(select(claims.c.item).order_by(claims.c.item))).scalars().all() == [1, 2, 3]


async def test_a_group_is_bounded_and_the_rest_go_next(sessions) -> None:
    group: GroupCommit[int, str] = GroupCommit.set_based(sessions, claim_all, max_group=3)
    async with asyncio.timeout(10):
        answers = await asyncio.gather(*(group.record(item) for item in range(10)))
    assert answers == [f"claimed {item}" for item in range(10)]
    assert group.largest_group == 3
    assert group.transactions == 4  # 1 alone, then the nine that queued meanwhile, three at a time
    await group.idle()
