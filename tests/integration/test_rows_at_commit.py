"""shared.db.insert_at_commit, on SQLite and PostgreSQL: rows nothing reads back in the
transaction that writes them (audit rows, events staged in the outbox) are written as it
commits. On PostgreSQL the small groups of several tables go in one statement (issue 10:
a round trip fewer per table for each request). A rollback drops them with the rest."""

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared.db import UtcDateTime, create_engine, insert_at_commit, is_sqlite, session_factory, transaction
from shared.domain_errors import DomainError

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("body", String(40), nullable=False),
)
marks = Table("marks", metadata, Column("mark_id", String(36), primary_key=True), Column("at", UtcDateTime))
AT = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)


@contextmanager
def writes(engine: AsyncEngine) -> Iterator[list[str]]:
    """The INSERT statements sent while the block runs."""
    sent: list[str] = []

    def record(_connection: object, _cursor: object, statement: str, *_: object) -> None:
        if "INSERT" in statement:
            sent.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def bodies(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    async with sessions() as session:
        return list((await session.execute(select(notes.c.body).order_by(notes.c.id))).scalars())


async def count(session: AsyncSession, table: Table) -> int:
    return int((await session.execute(select(func.count()).select_from(table))).scalar_one())


async def test_rows_are_written_as_the_transaction_commits_in_the_order_staged(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    with writes(engine) as sent:
        async with sessions() as session, session.begin():
            await insert_at_commit(session, notes, [{"body": "a"}, {"body": "b"}])
            await insert_at_commit(session, marks, [{"mark_id": "m-1", "at": AT}])
            await insert_at_commit(session, notes, [{"body": "c"}])
            assert await count(session, notes) == 0 and await count(session, marks) == 0
            assert sent == []
    assert await bodies(sessions) == ["a", "b", "c"]
    # PostgreSQL: both tables in one statement; SQLite has no data-modifying WITH.
    assert len(sent) == (2 if is_sqlite(str(engine.url)) else 1), sent
    # The same shape again (the statement is built once per shape): its own values are written.
    async with sessions() as session, session.begin():
        await insert_at_commit(session, notes, [{"body": "d"}, {"body": "e"}, {"body": "f"}])
        await insert_at_commit(session, marks, [{"mark_id": "m-9", "at": AT.replace(hour=10)}])
    assert await bodies(sessions) == ["a", "b", "c", "d", "e", "f"]
    async with sessions() as session:
        stored = (await session.execute(select(marks.c.mark_id, marks.c.at).order_by(marks.c.mark_id))).all()
    assert stored == [("m-1", AT), ("m-9", AT.replace(hour=10))]


stamped = Table(
    "stamped",
    metadata,
    Column("stamp_id", String(36), primary_key=True),
    Column("source", String(20), nullable=False, default=lambda: "at-commit"),
)


async def test_a_joined_statement_is_compiled_once_for_its_shape(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """SQLAlchemy gives a multi-row VALUES no cache key: the joined statement, compiled at
    every commit, took 6-7% of intake's CPU (issue 10). Its second commit is a cache hit."""
    hits: list[bool] = []

    def record(_conn: object, _cursor: object, statement: str, _params: object, context: Any, _many: bool) -> None:
        if "INSERT" in statement:
            hits.append(context.cache_hit == context.dialect.CACHE_HIT)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        for number in range(3):
            async with sessions() as session, session.begin():
                await insert_at_commit(session, notes, [{"body": f"b-{number}"}, {"body": f"c-{number}"}])
                await insert_at_commit(session, marks, [{"mark_id": f"m-{number}", "at": AT}])
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
    assert await bodies(sessions) == ["b-0", "c-0", "b-1", "c-1", "b-2", "c-2"]
    # PostgreSQL: one statement per commit; SQLite: one per table, each cached as well.
    per_commit = 2 if is_sqlite(str(engine.url)) else 1
    assert len(hits) == 3 * per_commit and all(hits[per_commit:]), hits


async def test_a_column_default_filled_per_row_is_written_in_a_joined_statement(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """A default SQLAlchemy computes per row (not a server default) is filled by the
    table's own INSERT: a joined statement's VALUES would leave it null."""
    async with sessions() as session, session.begin():
        await insert_at_commit(session, stamped, [{"stamp_id": "s-1"}, {"stamp_id": "s-2"}])
        await insert_at_commit(session, marks, [{"mark_id": "m-3", "at": AT}])
    async with sessions() as session:
        stored = (
            await session.execute(select(stamped.c.stamp_id, stamped.c.source).order_by(stamped.c.stamp_id))
        ).all()
    assert stored == [("s-1", "at-commit"), ("s-2", "at-commit")]


async def test_a_large_group_keeps_a_statement_of_its_own(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """A consumer's batch: its many rows keep one multi-row INSERT whose text is fixed."""
    many = [{"body": f"n-{n:02}"} for n in range(12)]
    with writes(engine) as sent:
        async with sessions() as session, session.begin():
            await insert_at_commit(session, notes, many)
            await insert_at_commit(session, marks, [{"mark_id": "m-2", "at": AT}])
    assert await bodies(sessions) == [row["body"] for row in many]
    assert len(sent) == 2 and sum(s.lstrip().startswith("INSERT INTO notes") for s in sent) == 1, sent


async def test_a_rollback_drops_them(sessions: async_sessionmaker[AsyncSession]) -> None:
    async def failing() -> None:
        async with sessions() as session, session.begin():
            await insert_at_commit(session, notes, [{"body": "never"}])
            raise RuntimeError("the work failed")

    with pytest.raises(RuntimeError):
        await failing()
    async with sessions() as session, session.begin():
        await insert_at_commit(session, notes, [{"body": "next"}])
    assert await bodies(sessions) == ["next"]


async def test_a_refusal_that_keeps_its_audit_row_commits_it(sessions: async_sessionmaker[AsyncSession]) -> None:
    async def refused() -> None:
        async with sessions() as session, transaction(session):
            await insert_at_commit(session, notes, [{"body": "refused, and recorded"}])
            raise DomainError("conflict", "a likely duplicate, named to the caller", keeps_audit=True)

    with pytest.raises(DomainError):
        await refused()
    assert await bodies(sessions) == ["refused, and recorded"]


async def test_a_session_without_the_commit_hook_inserts_at_once(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await insert_at_commit(session, notes, [{"body": "now"}])
        assert await count(session, notes) == 1
