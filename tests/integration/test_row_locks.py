"""shared.db.lock_row on PostgreSQL: handlers of different streams working on the same
entity take its row lock first, so the second waits for the first to commit. One
statement takes it, whether the row exists yet or not."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Column, MetaData, String, Table, event, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from iopnet.testing import eventually
from shared.db import create_engine, lock_row, lock_rows, session_factory
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.postgres

metadata = MetaData()
people = Table("people", metadata, Column("person_id", String(36), primary_key=True))


@pytest.fixture
async def engine() -> AsyncIterator[AsyncEngine]:
    async with fresh_postgres_database() as url:
        engine = create_engine(url)
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        try:
            yield engine
        finally:
            await engine.dispose()


_WAITING_FOR_A_LOCK = text(
    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
)


async def _waiting_for_a_lock(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(_WAITING_FOR_A_LOCK)).scalar_one())


@pytest.mark.parametrize("exists", [False, True], ids=["new row", "existing row"])
async def test_the_second_locker_waits_for_the_first_to_commit(engine: AsyncEngine, exists: bool) -> None:
    sessions = session_factory(engine)
    if exists:
        async with sessions.begin() as session:
            await lock_row(session, people, person_id="p-1")
    order: list[str] = []
    async with sessions() as first:
        await first.begin()
        await lock_row(first, people, person_id="p-1")

        async def second() -> None:
            async with sessions.begin() as session:
                await lock_row(session, people, person_id="p-1")
                order.append("second locked")

        waiting = asyncio.create_task(second())
        await eventually(lambda: _waiting_for_a_lock(engine), timeout=10, what="the second locker to wait")
        assert not waiting.done()
        order.append("first commits")
        await first.commit()
        await asyncio.wait_for(waiting, timeout=10)
    assert order == ["first commits", "second locked"]
    async with sessions() as session:
        assert (await session.execute(select(people.c.person_id))).scalars().all() == ["p-1"]


async def test_a_lock_is_one_statement(engine: AsyncEngine) -> None:
    statements: list[str] = []
    async with session_factory(engine).begin() as session:
        connection = (await session.connection()).sync_connection
        assert connection is not None
        event.listen(connection, "before_cursor_execute", lambda *args: statements.append(args[2]))
        await lock_row(session, people, person_id="p-2")
        await lock_row(session, people, person_id="p-2")
    assert len(statements) == 2 and all(s.startswith("INSERT INTO people") for s in statements)


async def test_a_lock_takes_the_whole_key(engine: AsyncEngine) -> None:
    async with session_factory(engine).begin() as session:
        with pytest.raises(ValueError, match="whole primary key"):
            await lock_row(session, people, person="p-3")


async def _locked(engine: AsyncEngine, person_id: str) -> bool:
    """Whether another transaction holds the row's lock (a NOWAIT lock attempt fails)."""
    async with engine.connect() as connection:
        try:
            query = text("SELECT person_id FROM people WHERE person_id = :id FOR UPDATE NOWAIT")
            await connection.execute(query, {"id": person_id})
        except DBAPIError as exc:  # asyncpg's LockNotAvailableError, wrapped by SQLAlchemy
            if "could not obtain lock" not in str(exc):
                raise
            return True
        finally:
            await connection.rollback()
        return False


async def test_several_locks_are_taken_in_key_order_in_one_statement(engine: AsyncEngine) -> None:
    """A consumer's batch locks its patients at once (lock_rows): in key order, whatever
    order they come in, so two batches sharing rows wait for each other instead of each
    holding a row the other waits for (a deadlock PostgreSQL breaks by failing one)."""
    sessions = session_factory(engine)
    async with sessions.begin() as session:
        await lock_rows(session, people, [{"person_id": p} for p in ("p-1", "p-2", "p-3")])
    statements: list[str] = []
    async with sessions() as first:
        await first.begin()
        await lock_row(first, people, person_id="p-2")

        async def batch() -> None:
            async with sessions.begin() as session:
                connection = (await session.connection()).sync_connection
                assert connection is not None
                event.listen(connection, "before_cursor_execute", lambda *args: statements.append(args[2]))
                await lock_rows(session, people, [{"person_id": p} for p in ("p-3", "p-1", "p-2", "p-1")])

        waiting = asyncio.create_task(batch())
        await eventually(lambda: _waiting_for_a_lock(engine), timeout=10, what="the batch to wait for p-2")
        # Waiting at p-2: it holds p-1, and has not taken p-3 (it comes after p-2).
        assert await _locked(engine, "p-1")
        assert not await _locked(engine, "p-3")
        await first.commit()
        await asyncio.wait_for(waiting, timeout=10)
    assert len(statements) == 1 and statements[0].startswith("INSERT INTO people")
