"""The database pool's line (shared/priority.py, SafetyFirstPool) on real SQLite engines
made by shared.db.create_engine: one connection, given back to the safety work waiting
for it before any routine work, else to whoever has waited longest, never to a caller
who came by later; a caller that gives up loses no connection."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, exc, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from iopnet.testing import eventually
from shared import priority
from shared.db import create_engine
from shared.priority import Line, SafetyFirstPool, SafetyFirstQueue, finishing_work, first_in_line, later_work


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}")
    yield engine
    await engine.dispose()


def line(engine: AsyncEngine) -> SafetyFirstQueue:
    queue = engine.sync_engine.pool._pool  # type: ignore[attr-defined]
    assert isinstance(queue, SafetyFirstQueue)
    return queue


async def transaction(engine: AsyncEngine, name: str, order: list[str]) -> None:
    async with engine.connect() as connection:
        order.append(name)
        await connection.execute(text("SELECT 1"))


async def transaction_in(engine: AsyncEngine, name: str, order: list[str], *lines: Callable[[], Any]) -> None:
    """`transaction`, waiting for the connection in the lines given (entered in order, as
    work nested in other work enters them)."""
    with contextlib.ExitStack() as stack:
        for enter in lines:
            stack.enter_context(enter())
        await transaction(engine, name, order)


async def queued(engine: AsyncEngine, count: int) -> None:
    async def all_waiting() -> bool:
        return line(engine).waiting() == count

    await eventually(all_waiting, what=f"{count} callers waiting for the connection")


async def test_a_connection_given_back_goes_to_safety_work_first_then_in_order_of_arrival(engine) -> None:
    order: list[str] = []
    async with engine.connect() as holder:
        await holder.execute(text("SELECT 1"))  # the one connection is taken
        tasks = []
        for name in ("routine 1", "routine 2", "routine 3"):
            tasks.append(asyncio.create_task(transaction(engine, name, order)))
            await queued(engine, len(tasks))

        async def safety() -> None:
            with first_in_line():
                await transaction(engine, "safety", order)

        tasks.append(asyncio.create_task(safety()))
        await queued(engine, 4)
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)
    assert order == ["safety", "routine 1", "routine 2", "routine 3"]


async def test_work_that_plans_for_later_goes_after_routine_work_and_safety_inside_it_first(engine) -> None:
    """Notifications applying scheduling's events (reminders a day ahead) waits behind
    the consumers planning a welcome; safety work inside it keeps its place."""
    order: list[str] = []
    async with engine.connect() as holder:
        await holder.execute(text("SELECT 1"))
        tasks = []
        for work in (
            transaction_in(engine, "later", order, later_work),
            transaction(engine, "routine", order),
            transaction_in(engine, "safety", order, later_work, first_in_line, later_work),
        ):
            tasks.append(asyncio.create_task(work))
            await queued(engine, len(tasks))
        assert [line(engine).waiting_in(kind) for kind in (Line.SAFETY, Line.ROUTINE, Line.LATER)] == [1, 1, 1]
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)
    assert order == ["safety", "routine", "later"]


async def test_work_that_plans_for_later_joins_the_routine_line_when_it_has_waited_long(engine, monkeypatch) -> None:
    """A wave of routine work delays it and never starves it: after
    LATER_MAX_WAIT_SECONDS it goes before routine work that came after that."""
    monkeypatch.setattr(priority, "LATER_MAX_WAIT_SECONDS", 0.05)
    order: list[str] = []
    async with engine.connect() as holder:
        await holder.execute(text("SELECT 1"))
        tasks = [asyncio.create_task(transaction_in(engine, "later", order, later_work))]

        async def joined() -> bool:
            return line(engine).waiting_in(Line.ROUTINE) == 1 and line(engine).waiting_in(Line.LATER) == 0

        await eventually(joined, what="the late waiter in the routine line")
        tasks.append(asyncio.create_task(transaction(engine, "routine", order)))
        await queued(engine, 2)
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)
    assert order == ["later", "routine"]


async def test_work_that_finishes_what_is_under_way_goes_after_safety_and_before_routine(engine) -> None:
    """The dispatcher's routine rounds (finishing work: a welcome that is due) go before
    the consumers' batches that start new work, and after safety work; safety work inside
    finishing work stays first."""
    order: list[str] = []

    def finishing(name: str) -> Coroutine[Any, Any, None]:
        return transaction_in(engine, name, order, finishing_work)

    def safety_within_finishing() -> Coroutine[Any, Any, None]:
        return transaction_in(engine, "safety", order, finishing_work, first_in_line, finishing_work)

    async with engine.connect() as holder:
        await holder.execute(text("SELECT 1"))
        tasks = []
        for work in (
            transaction(engine, "routine 1", order),
            finishing("finishing 1"),
            transaction(engine, "routine 2", order),
            safety_within_finishing(),
            finishing("finishing 2"),
        ):
            tasks.append(asyncio.create_task(work))
            await queued(engine, len(tasks))
        assert line(engine).waiting(safety_work=True) == 1
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)
    assert order == ["safety", "finishing 1", "finishing 2", "routine 1", "routine 2"]


async def test_a_caller_that_comes_by_as_the_connection_is_given_back_waits_its_turn(engine) -> None:
    """With SQLAlchemy's default (an asyncio.Queue) the connection given back wakes the
    first waiter, but a caller that runs before the woken one takes it, and the woken one
    goes to the back of the line: under load, waits of over a second for 10 ms work."""
    order: list[str] = []
    came_by: list[asyncio.Task[None]] = []
    async with engine.connect() as holder:
        await holder.execute(text("SELECT 1"))
        waiter = asyncio.create_task(transaction(engine, "waiting", order))
        await queued(engine, 1)

        def come_by(*_: object) -> None:
            # Starts as the connection is given back, before the woken waiter runs.
            came_by.append(asyncio.ensure_future(transaction(engine, "came by", order)))

        event.listen(engine.sync_engine.pool, "checkin", come_by, once=True)
    async with asyncio.timeout(10):
        await asyncio.gather(waiter, *came_by)
    assert order == ["waiting", "came by"]


async def test_a_caller_that_times_out_leaves_the_line_and_the_connection_goes_on(tmp_path: Path) -> None:
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'timeout.db'}",
        poolclass=SafetyFirstPool, pool_size=1, max_overflow=0, pool_timeout=0.2,
    )  # fmt: skip
    order: list[str] = []
    try:
        async with engine.connect() as holder:
            await holder.execute(text("SELECT 1"))
            with pytest.raises(exc.TimeoutError):
                await transaction(engine, "gave up", order)
            later = asyncio.create_task(transaction(engine, "later", order))
            await queued(engine, 1)
        async with asyncio.timeout(10):
            await later
        assert order == ["later"]
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_a_caller_cancelled_as_it_is_handed_the_connection_passes_it_on(engine) -> None:
    order: list[str] = []
    async with engine.connect() as holder:
        await holder.execute(text("SELECT 1"))
        first = asyncio.create_task(transaction(engine, "cancelled", order))
        await queued(engine, 1)
        second = asyncio.create_task(transaction(engine, "next", order))
        await queued(engine, 2)

        def cancel_first_as_it_is_handed_the_connection(*_: object) -> None:
            # Runs as the connection is given back, before `first` could take it.
            asyncio.get_running_loop().call_soon(first.cancel)

        event.listen(engine.sync_engine.pool, "checkin", cancel_first_as_it_is_handed_the_connection, once=True)
    async with asyncio.timeout(10):
        await second
    with pytest.raises(asyncio.CancelledError):
        await first
    assert order == ["next"]
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert line(engine).qsize() == 1  # the one connection is back, idle
