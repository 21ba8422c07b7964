"""The SQLite engine's driver (shared/sqlite_driver.py): one trip to aiosqlite's worker
thread per statement, with everything SQLAlchemy reads from a cursor intact, against a
real SQLite file."""

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from iopnet.testing import eventually
from shared import sqlite_driver
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


@pytest.fixture
def trips(monkeypatch) -> list[str]:
    """What went to aiosqlite's worker thread, in order."""
    seen: list[str] = []
    original = OneTripConnection._execute

    async def counted(self, fn, *args, **kwargs):
        work = args[0] if args else fn
        seen.append(getattr(getattr(work, "func", work), "__name__", repr(work)))
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(OneTripConnection, "_execute", counted)
    return seen


async def test_reads_and_inserts_run_in_the_event_loops_thread_and_the_rest_take_one_trip(engine, trips) -> None:
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        await session.execute(insert(items).values(name="first"))
        await session.execute(insert(items), [{"name": f"n{i}"} for i in range(3)])
        rows = (await session.execute(select(items.c.name).order_by(items.c.seq))).scalars().all()
        assert trips == []  # aiosqlite's own cursor: four trips for each (open, execute, fetch, close)
        await session.execute(update(items).where(items.c.name == "n0").values(name="renamed"))
        assert trips == ["_run"]  # its work depends on the rows it finds
        await session.execute(insert(items), [{"name": f"m{i}"} for i in range(sqlite_driver.INLINE_MAX_ROWS + 1)])
        assert trips == ["_run", "_run"]  # more rows than an inline insert may carry
        trips.clear()
    assert trips == ["commit"]  # the commit waits for the disk: never in the loop's thread
    assert rows == ["first", "n0", "n1", "n2"]


async def test_a_read_over_its_budget_runs_again_in_the_worker_thread_and_its_transaction_is_intact(
    engine, trips, monkeypatch
) -> None:
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        await session.execute(insert(items), [{"name": f"n{i}"} for i in range(40)])
    monkeypatch.setattr(sqlite_driver, "INLINE_BUDGET_SECONDS", 0.0)
    a, b, c = items.alias("a"), items.alias("b"), items.alias("c")
    heavy = select(func.count()).select_from(a.join(b, a.c.seq != b.c.seq).join(c, b.c.seq != c.c.seq))
    async with sessions() as session, session.begin():
        await session.execute(insert(items).values(name="kept"))
        trips.clear()
        counted = (await session.execute(heavy)).scalar_one()
        assert trips == ["_run"]  # tried here, interrupted at the budget, run again there
        assert counted == 41 * 40 * 40
        assert (await session.execute(heavy)).scalar_one() == counted
        assert trips == ["_run", "_run"]
        connection = (await (await session.connection()).get_raw_connection()).driver_connection
        assert connection.inline_statements == 2  # the insert and the warm-up's: not the heavy read
    async with sessions() as session:
        names = (await session.execute(select(items.c.name))).scalars().all()
    assert "kept" in names  # the interruption did not roll back the insert before it


async def test_a_statement_that_finds_the_file_locked_waits_in_the_worker_thread_not_the_event_loop(
    engine, tmp_path: Path, trips
) -> None:
    other = sqlite3.connect(tmp_path / "driver.db", isolation_level=None)  # another process's writer
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO items (name) VALUES ('other')")
    sessions = session_factory(engine)
    heartbeats = 0

    async def heartbeat() -> None:
        nonlocal heartbeats
        while True:
            heartbeats += 1
            await asyncio.sleep(0.005)  # a probe of the loop's liveness, not a wait for the insert

    async def write() -> None:
        async with sessions() as session, session.begin():
            await session.execute(insert(items).values(name="mine"))

    beating = asyncio.create_task(heartbeat())
    writing = asyncio.create_task(write())

    async def gone_to_the_thread() -> bool:
        return "_run" in trips

    await eventually(gone_to_the_thread, timeout=5, what="the insert to give up the loop's thread")
    before = heartbeats

    async def loop_went_on() -> bool:
        return heartbeats >= before + 10

    await eventually(loop_went_on, timeout=5, what="the event loop to go on while the insert waits")
    assert not writing.done()  # still waiting for the lock, in the worker thread
    other.execute("COMMIT")
    await asyncio.wait_for(writing, timeout=10)
    beating.cancel()
    other.close()
    async with sessions() as session:
        names = (await session.execute(select(items.c.name).order_by(items.c.seq))).scalars().all()
    assert names == ["other", "mine"]


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


async def test_a_transaction_cancelled_while_it_waits_in_the_worker_thread_is_rolled_back_before_the_next_runs(
    engine, tmp_path: Path, trips
) -> None:
    other = sqlite3.connect(tmp_path / "driver.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO items (name) VALUES ('other')")
    sessions = session_factory(engine)

    async def write(name: str) -> None:
        async with sessions() as session, session.begin():
            await session.execute(select(items.c.seq))  # a read first: in the loop's thread
            await session.execute(insert(items).values(name=name))

    cancelled = asyncio.create_task(write("cancelled"))

    async def waiting_for_the_lock() -> bool:
        return "_run" in trips

    await eventually(waiting_for_the_lock, timeout=5, what="the insert to wait in the worker thread")
    cancelled.cancel()  # its rollback queues behind its insert, in the worker thread
    following = asyncio.create_task(write("following"))
    other.execute("COMMIT")
    await asyncio.wait_for(asyncio.gather(following, cancelled, return_exceptions=True), timeout=10)
    assert cancelled.cancelled()
    other.close()
    async with sessions() as session:
        names = (await session.execute(select(items.c.name).order_by(items.c.seq))).scalars().all()
    assert names == ["other", "following"]  # the cancelled insert was rolled back, not committed


async def test_nothing_runs_in_the_loops_thread_while_the_worker_thread_has_work_of_the_connection(
    engine, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "driver.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    connection = await sqlite_driver.connector(f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}", timeout=30)()
    waiting = asyncio.create_task(connection.run_in_thread("INSERT INTO items (name) VALUES ('mine')", None, False))

    async def busy() -> bool:
        return connection.busy_in_thread

    await eventually(busy, timeout=5, what="the insert to wait for the lock in the worker thread")
    assert connection.run_inline("SELECT name FROM items", None, False) is None  # it queues behind
    other.execute("COMMIT")
    await asyncio.wait_for(waiting, timeout=10)
    assert not connection.busy_in_thread
    _, _, _, rows = connection.run_inline("SELECT name FROM items", None, False) or (None, 0, None, [])
    assert rows == [("mine",)]
    await connection.rollback()
    await connection.close()
    other.close()


@pytest.mark.parametrize("every", [0.0, 60.0])
async def test_a_long_run_of_inline_statements_gives_the_event_loop_turns(engine, monkeypatch, every: float) -> None:
    monkeypatch.setattr(sqlite_driver, "LOOP_TURN_EVERY_SECONDS", every)
    beats = 0

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            beats += 1
            await asyncio.sleep(0)

    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        await session.execute(insert(items).values(name="one"))
        beating = asyncio.create_task(heartbeat())
        seen = []
        for _ in range(20):
            await session.execute(select(items.c.name))
            seen.append(beats)
        beating.cancel()
    if every == 0.0:
        assert seen[-1] >= 10  # a turn before each statement: the heartbeat went on between them
    else:
        assert seen[-1] == 0  # (and without the turns, the run held the loop throughout)


async def test_a_call_refused_on_a_closed_connection_leaves_nothing_counted_as_in_the_worker_thread(
    tmp_path: Path,
) -> None:
    connection = await sqlite_driver.connector(f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}", timeout=30)()
    await connection.close()
    with pytest.raises(ValueError, match="Connection closed"):
        await connection.run_in_thread("SELECT 1", None, False)
    assert not connection.busy_in_thread, "a refused call is not work in the worker thread"


async def test_a_failing_statement_in_the_worker_thread_is_counted_down_once(tmp_path: Path) -> None:
    connection = await sqlite_driver.connector(f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}", timeout=30)()
    try:
        with pytest.raises(sqlite3.OperationalError):
            await connection.run_in_thread("INSERT INTO no_such_table VALUES (1)", None, False)
        assert connection._thread_work == 0
    finally:
        await connection.close()
