"""The SQLite engine's driver (shared/sqlite_driver.py): one trip to aiosqlite's worker
thread per statement, with everything SQLAlchemy reads from a cursor intact, against a
real SQLite file."""

from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from shared.db import create_engine, session_factory
from shared.sqlite_driver import OneTripConnection

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("name", String(20), nullable=False, unique=True),
)


@pytest.fixture
async def engine(tmp_path: Path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def test_a_statement_costs_one_trip_to_the_worker_thread(engine, monkeypatch) -> None:
    trips: list[str] = []
    original = OneTripConnection._execute

    async def counted(self, fn, *args, **kwargs):
        trips.append(getattr(fn, "__name__", repr(fn)))
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(OneTripConnection, "_execute", counted)
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        await session.execute(insert(items).values(name="warm-up"))  # BEGIN and the first statement
        trips.clear()
        rows = (await session.execute(select(items.c.name))).scalars().all()
        assert trips == ["_run"]  # aiosqlite's own cursor: four (open, execute, fetch, close)
        trips.clear()
        await session.execute(update(items).values(name="renamed"))
        assert trips == ["_run"]
    assert rows == ["warm-up"]


async def test_rows_counts_ids_and_errors_reach_sqlalchemy(engine) -> None:
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        first = await session.execute(insert(items).values(name="a"))
        assert first.inserted_primary_key == (1,)  # lastrowid, read in the same trip
        await session.execute(insert(items), [{"name": "b"}, {"name": "c"}, {"name": "d"}])
        changed = await session.execute(update(items).where(items.c.seq > 2).values(name=items.c.name + "!"))
        assert changed.rowcount == 2
        returned = await session.execute(text("UPDATE items SET name = name || '?' WHERE seq = 1 RETURNING name"))
        assert returned.scalars().all() == ["a?"]
        result = await session.execute(select(items.c.name).order_by(items.c.seq))
        assert result.fetchone() == ("a?",)
        assert result.fetchmany(2) == [("b",), ("c!",)]
        assert result.fetchall() == [("d!",)]
    async with sessions() as session:
        await session.begin()
        await session.execute(insert(items).values(name="e"))
        with pytest.raises(IntegrityError):
            await session.execute(insert(items).values(name="b"))  # unique
        await session.rollback()
    async with sessions() as session:
        names = (await session.execute(select(items.c.name).order_by(items.c.seq))).scalars().all()
    assert names == ["a?", "b", "c!", "d!"]  # "e" went with the rollback
