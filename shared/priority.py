"""Safety work first, inside one service process.

SQLite has one writer at a time. A transaction of the safety lane (an urgent check-in)
would otherwise wait behind every routine transaction queued for the database (a wave
of bookings, reminders, relay batches). While a safety transaction waits or runs, the
routine consumers, the routine HTTP requests and the dispatcher's claims start no new
transaction (for a bounded time), and a routine consumer's batch in progress commits what
it has applied at its next event and lets the rest wait (`pressing`); then the safety
work has the database. The outbox relay is not held: it carries the safety events out,
and publishes them before other pending rows. On PostgreSQL the gate changes little.

The gate only stops routine work from *starting*. Transactions already waiting for the
connection would still go first, one after another, so the pool's queue of waiters is
ordered too: a connection given back goes to the longest-waiting safety work before
anything routine (`SafetyFirstPool`). Safety work marks itself with `first_in_line()`.

Between the two, work that finishes what is already under way (the dispatcher sending
routine messages that are due: a welcome, a reminder; on SQLite the outbox relay putting
committed events on the bus) marks itself with `finishing_work()`: it goes after safety
work and before routine work that starts something new (a consumer's batch, whose events
fan out into more). Finishing work is finite (each round sends what the consumers
planned, the relay publishes what they committed), so it cannot keep the consumers
from the database; without it, each of a round's turns waited behind every consumer's
transaction queued meanwhile (`docs/performance.md`, the welcome's path).

Behind routine work, work that plans for later (`later_work()`: notifications applying
scheduling's events, whose reminders are due a day ahead) lets the routine work that plans
a message due now (a welcome) have the connection first, for `LATER_MAX_WAIT_SECONDS` at
most: then it joins the routine line, so a wave of enrollments delays it and never starves
it."""

import asyncio
import enum
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from contextvars import ContextVar

from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.util.concurrency import await_
from sqlalchemy.util.queue import Empty, Full, QueueCommon


class Line(enum.IntEnum):
    """Where a task waiting for a database connection stands: lower goes first."""

    SAFETY = 0
    FINISHING = 1
    ROUTINE = 2
    LATER = 3


# How long work in the LATER line waits behind routine work before it joins the routine line.
LATER_MAX_WAIT_SECONDS = 1.0


# Set for the duration of safety (or finishing) work in the task doing it; the pool's
# queue reads it when that task has to wait for a connection.
_line: ContextVar[Line] = ContextVar("iopnet_line", default=Line.ROUTINE)


class _UnderWay:
    """How many pieces of one kind of work are under way, and a wait for there to be none."""

    def __init__(self) -> None:
        self.count = 0
        self._none = asyncio.Event()
        self._none.set()

    @property
    def none(self) -> bool:
        return self._none.is_set()

    @contextmanager
    def one(self) -> Iterator[None]:
        self.count += 1
        self._none.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._none.set()

    async def none_within(self, seconds: float) -> bool:
        """True once none is under way; False if some still is after `seconds`."""
        if self._none.is_set():
            return True
        try:
            async with asyncio.timeout(seconds):
                await self._none.wait()
        except TimeoutError:
            return False
        return True


class PriorityGate:
    def __init__(self, max_wait_seconds: float = 0.25) -> None:
        # Routine work waits at most this long: under a sustained flood of safety work
        # it still moves (the dispatcher's claims include the care team's urgent messages).
        self.max_wait_seconds = max_wait_seconds
        self._urgent = _UnderWay()
        self._safety_work = 0
        self._routine_batches = _UnderWay()
        self.later_waiting = 0  # batches of work that plans for later, waiting for them

    @asynccontextmanager
    async def urgent(self) -> AsyncIterator[None]:
        with self._urgent.one():
            yield

    @contextmanager
    def safety_work(self) -> Iterator[None]:
        """Any work of the safety lane waiting or running, a low-risk check-in too. It holds
        nothing back (`urgent` does), but routine transactions keep short meanwhile
        (shared/messaging/consumer.py): a low-risk check-in waiting behind a long routine
        transaction delays the urgent one fetched after it."""
        self._safety_work += 1
        try:
            yield
        finally:
            self._safety_work -= 1

    def routine_batch(self) -> AbstractContextManager[None]:
        """A routine consumer's batch, from its wait for the database to its commit: work
        that plans for later waits for it (`after_routine_batches`)."""
        return self._routine_batches.one()

    async def after_routine_batches(self) -> bool:
        """Returns once no routine batch of this process is under way (True), or after
        `LATER_MAX_WAIT_SECONDS` (False): a wave delays work that plans for later and
        never starves it.

        The pool's line does this for a shared connection (SQLite); with a connection each
        (PostgreSQL), work that plans for later still took the process's turns and the
        patients' row locks while the welcome's batches waited for them."""
        if self._routine_batches.none:
            return True
        self.later_waiting += 1
        try:
            return await self._routine_batches.none_within(LATER_MAX_WAIT_SECONDS)
        finally:
            self.later_waiting -= 1

    @property
    def safety_work_under_way(self) -> bool:
        return self._safety_work > 0

    @property
    def pressing(self) -> bool:
        """Safety work is waiting or running: routine work should yield at its next step."""
        return not self._urgent.none

    async def routine(self) -> None:
        """Returns at once unless safety work is waiting or running; then when it is
        done, or after `max_wait_seconds` at most."""
        await self._urgent.none_within(self.max_wait_seconds)


@contextmanager
def first_in_line() -> Iterator[None]:
    """Safety work: this task's waits for a database connection go before all others."""
    with _in_line(Line.SAFETY):
        yield


@contextmanager
def finishing_work() -> Iterator[None]:
    """Work that finishes what is under way: its waits go after safety work and before
    routine work that starts something new. Safety work inside it stays first."""
    with _in_line(min(_line.get(), Line.FINISHING)):
        yield


@contextmanager
def later_work() -> Iterator[None]:
    """Routine work that plans for later: its waits go after the other routine work's, for
    `LATER_MAX_WAIT_SECONDS` at most. Work of an earlier line inside it keeps its place."""
    current = _line.get()
    with _in_line(Line.LATER if current is Line.ROUTINE else current):
        yield


@contextmanager
def _in_line(line: Line) -> Iterator[None]:
    token = _line.set(line)
    try:
        yield
    finally:
        _line.reset(token)


class SafetyFirstQueue(QueueCommon[ConnectionPoolEntry]):
    """A pool's idle connections, handed out safety work first, then first come first served.

    SQLAlchemy's async pool keeps them in an asyncio.Queue, which is not fair either way:
    a connection given back wakes the first waiter, but any task that asks before the woken
    one runs takes it, and the woken one goes to the back of the line (under load, waits
    of over a second for 10 ms transactions). Here a connection given back is handed
    straight to the waiter whose turn it is. Plugged in through the pool's `_queue_class`,
    the attribute SQLAlchemy's own pools use to choose their queue."""

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        self.maxsize = maxsize
        self.use_lifo = use_lifo
        self._idle: deque[ConnectionPoolEntry] = deque()
        # One line of waiters per `Line`, served in that order, each first come first served.
        self._lines: tuple[deque[asyncio.Future[ConnectionPoolEntry]], ...] = tuple(deque() for _ in Line)

    def empty(self) -> bool:
        return not self._idle

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._idle)

    def qsize(self) -> int:
        return len(self._idle)

    def waiting(self, *, safety_work: bool | None = None) -> int:
        """Callers waiting for a connection now (those doing safety work, or the others)."""
        lines = [line for line in Line if safety_work is None or (line is Line.SAFETY) == safety_work]
        return sum(not waiter.done() for line in lines for waiter in self._lines[line])

    def waiting_in(self, line: Line) -> int:
        """Callers waiting for a connection in one line now."""
        return sum(not waiter.done() for waiter in self._lines[line])

    def put(self, item: ConnectionPoolEntry, block: bool = True, timeout: float | None = None) -> None:
        self.put_nowait(item)  # never blocks: a waiter takes it, or it goes idle

    def put_nowait(self, item: ConnectionPoolEntry) -> None:
        for waiters in self._lines:
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():  # a waiter that gave up (timeout, cancel) is skipped
                    waiter.set_result(item)
                    return
        if self.full():
            raise Full()
        self._idle.append(item)

    def get_nowait(self) -> ConnectionPoolEntry:
        if not self._idle:
            raise Empty()
        return self._idle.pop() if self.use_lifo else self._idle.popleft()

    def get(self, block: bool = True, timeout: float | None = None) -> ConnectionPoolEntry:
        if self._idle or not block:
            return self.get_nowait()
        return await_(self._wait(timeout))

    async def _wait(self, timeout: float | None) -> ConnectionPoolEntry:
        waiter: asyncio.Future[ConnectionPoolEntry] = asyncio.get_running_loop().create_future()
        line = _line.get()
        self._lines[line].append(waiter)
        try:
            async with asyncio.timeout(timeout):
                if line is Line.LATER:
                    await self._join_routine_line_when_late(waiter)
                return await waiter
        except BaseException as gave_up:
            if waiter.done() and not waiter.cancelled():
                # Handed a connection in the instant it gave up (timeout, cancel): pass it on.
                self.put_nowait(waiter.result())
            waiter.cancel()
            if isinstance(gave_up, TimeoutError):
                raise Empty() from None
            raise

    async def _join_routine_line_when_late(self, waiter: asyncio.Future[ConnectionPoolEntry]) -> None:
        await asyncio.wait({waiter}, timeout=LATER_MAX_WAIT_SECONDS)  # the waiter itself goes on
        if not waiter.done():
            self._lines[Line.LATER].remove(waiter)
            self._lines[Line.ROUTINE].append(waiter)


class SafetyFirstPool(AsyncAdaptedQueuePool):
    """SQLAlchemy's async queue pool with the `SafetyFirstQueue` of idle connections."""

    _queue_class = SafetyFirstQueue
