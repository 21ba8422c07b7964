"""The priority gate (shared/priority.py): routine work waits while safety work waits or
runs, resumes when it is done, and never waits without bound."""

import asyncio

from shared import priority
from shared.priority import PriorityGate


async def test_routine_work_passes_when_no_safety_work_is_in_flight() -> None:
    gate = PriorityGate(max_wait_seconds=60)
    async with asyncio.timeout(1):
        await gate.routine()


async def test_routine_work_waits_for_safety_work_then_goes_on() -> None:
    gate = PriorityGate(max_wait_seconds=60)
    order: list[str] = []
    release, started = asyncio.Event(), asyncio.Event()

    async def safety() -> None:
        async with gate.urgent():
            order.append("safety started")
            started.set()
            await release.wait()
            order.append("safety done")

    safety_task = asyncio.create_task(safety())
    await started.wait()
    routine_task = asyncio.create_task(gate.routine())
    await asyncio.sleep(0)
    assert not routine_task.done()  # held while the safety work runs
    release.set()
    async with asyncio.timeout(1):
        await routine_task
        await safety_task
    assert order == ["safety started", "safety done"]


async def test_nested_safety_work_keeps_the_gate_closed_until_the_last_ends() -> None:
    gate = PriorityGate(max_wait_seconds=60)
    async with gate.urgent():
        async with gate.urgent():
            pass
        routine_task = asyncio.create_task(gate.routine())
        await asyncio.sleep(0)
        assert not routine_task.done()
    async with asyncio.timeout(1):
        await routine_task


async def test_routine_work_is_never_starved() -> None:
    gate = PriorityGate(max_wait_seconds=0.05)
    async with gate.urgent():  # safety work that does not end while routine work waits
        async with asyncio.timeout(5):
            await gate.routine()  # returns after its bounded wait


async def test_work_that_plans_for_later_waits_for_every_routine_batch_under_way() -> None:
    gate = PriorityGate()
    async with asyncio.timeout(1):
        assert await gate.after_routine_batches()  # none under way: at once
    first, second = gate.routine_batch(), gate.routine_batch()
    first.__enter__()
    second.__enter__()
    later = asyncio.create_task(gate.after_routine_batches())
    await asyncio.sleep(0)
    assert gate.later_waiting == 1
    first.__exit__(None, None, None)
    await asyncio.sleep(0)
    assert not later.done()  # the other batch is still under way
    second.__exit__(None, None, None)
    async with asyncio.timeout(1):
        assert await later
    assert gate.later_waiting == 0


async def test_work_that_plans_for_later_is_never_starved(monkeypatch) -> None:
    monkeypatch.setattr(priority, "LATER_MAX_WAIT_SECONDS", 0.05)
    gate = PriorityGate()
    with gate.routine_batch():
        async with asyncio.timeout(1):
            assert not await gate.after_routine_batches()  # waited its longest, and goes on
    assert gate.later_waiting == 0
