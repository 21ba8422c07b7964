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
anything routine (`SafetyFirstPool`). Safety work marks itself with `first_in_line()`."""

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar

from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.util.concurrency import await_
from sqlalchemy.util.queue import Empty, Full, QueueCommon

# Set for the duration of safety work in the task doing it; the pool's queue reads it
# when that task has to wait for a connection.
_first_in_line: ContextVar[bool] = ContextVar("iopnet_first_in_line", default=False)


class PriorityGate:
    def __init__(self, max_wait_seconds: float = 0.25) -> None:
        # Routine work waits at most this long: under a sustained flood of safety work
        # it still moves (the dispatcher's claims include the care team's urgent messages).
        self.max_wait_seconds = max_wait_seconds
        self._urgent = 0
        self._safety_work = 0
        self._clear = asyncio.Event()
        self._clear.set()

    @asynccontextmanager
    async def urgent(self) -> AsyncIterator[None]:
        self._urgent += 1
        self._clear.clear()
        try:
            yield
        finally:
            self._urgent -= 1
            if self._urgent == 0:
                self._clear.set()

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

    @property
    def safety_work_under_way(self) -> bool:
        return self._safety_work > 0

    @property
    def pressing(self) -> bool:
        """Safety work is waiting or running: routine work should yield at its next step."""
        return not self._clear.is_set()

    async def routine(self) -> None:
        """Returns at once unless safety work is waiting or running; then when it is
        done, or after `max_wait_seconds` at most."""
        if self._clear.is_set():
            return
        try:
            async with asyncio.timeout(self.max_wait_seconds):
                await self._clear.wait()
        except TimeoutError:
            pass


@contextmanager
def first_in_line() -> Iterator[None]:
    """Safety work: this task's waits for a database connection go before routine ones."""
    token = _first_in_line.set(True)
    try:
        yield
    finally:
        _first_in_line.reset(token)


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
        self.use_lifo = use_lifo  # read when the pool is recreated; idle ones go out in order
        self._idle: deque[ConnectionPoolEntry] = deque()
        self._safety: deque[asyncio.Future[ConnectionPoolEntry]] = deque()
        self._routine: deque[asyncio.Future[ConnectionPoolEntry]] = deque()

    def empty(self) -> bool:
        return not self._idle

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._idle)

    def qsize(self) -> int:
        return len(self._idle)

    def waiting(self, *, safety_work: bool | None = None) -> int:
        """Callers waiting for a connection now (those doing safety work, or routine work)."""
        lines = {True: [self._safety], False: [self._routine], None: [self._safety, self._routine]}[safety_work]
        return sum(not waiter.done() for waiters in lines for waiter in waiters)

    def put(self, item: ConnectionPoolEntry, block: bool = True, timeout: float | None = None) -> None:
        self.put_nowait(item)  # never blocks: a waiter takes it, or it goes idle

    def put_nowait(self, item: ConnectionPoolEntry) -> None:
        for waiters in (self._safety, self._routine):
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
        return self._idle.popleft()

    def get(self, block: bool = True, timeout: float | None = None) -> ConnectionPoolEntry:
        if self._idle or not block:
            return self.get_nowait()
        return await_(self._wait(timeout))

    async def _wait(self, timeout: float | None) -> ConnectionPoolEntry:
        waiter: asyncio.Future[ConnectionPoolEntry] = asyncio.get_running_loop().create_future()
        (self._safety if _first_in_line.get() else self._routine).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except BaseException as gave_up:
            if waiter.done() and not waiter.cancelled():
                # Handed a connection in the instant it gave up (timeout, cancel): pass it on.
                self.put_nowait(waiter.result())
            waiter.cancel()
            if isinstance(gave_up, TimeoutError):
                raise Empty() from None
            raise


class SafetyFirstPool(AsyncAdaptedQueuePool):
    """SQLAlchemy's async queue pool with the `SafetyFirstQueue` of idle connections."""

    _queue_class = SafetyFirstQueue
