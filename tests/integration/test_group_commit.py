"""The dispatcher's group commit (services/notifications/delivery.py), on a real SQLite
database: deliveries that claim (or record) together share one transaction, each gets
its own answer, and one that fails costs the others nothing."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifications.delivery import GroupCommit
from shared.db import create_engine, session_factory

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
