"""SQLite for the async engine: a statement runs in the event loop's thread when it
cannot wait, and in one trip to aiosqlite's worker thread when it can.

SQLAlchemy's aiosqlite adapter sends four requests to aiosqlite's worker thread for
every statement: open a cursor, execute, fetch the rows, close the cursor. Each is a
queue put, a wake-up of the event loop through its self-pipe when the answer is ready,
and a hand-over of the GIL, which the busy event loop gives up only at the
interpreter's switch interval. Under the enrollment wave of `make bench` (issue 10) a
service's single SQLite connection spent most of its time in those trips, and every
consumer, request and the dispatcher queued behind it.

The cursor here makes at most one trip: the statement runs and its rows are read
together, and the cursor answers SQLAlchemy from memory. It reaches SQLAlchemy through
`create_async_engine(async_creator=...)`, the documented way to hand the aiosqlite
dialect its own driver connection; the connection is aiosqlite's own class with
`cursor()`, `commit()` and `rollback()` replaced. Server-side cursors are not used here
(no `stream_results`): every result is read whole. It leans on two of aiosqlite's
internals, `Connection._execute` (queue a call for the worker thread) and
`Connection._conn` (the sqlite3 connection), as SQLAlchemy's own adapter does; aiosqlite
is pinned in requirements/dev.txt, and tests/integration/test_sqlite_driver.py fails if
either changes.

Even one trip cost a primary-key SELECT about 0.3 ms of CPU on this 2-core machine,
against 0.075 ms run where it was asked (and 0.004 ms in sqlite3 alone): the wake-up
and the GIL hand-over, not SQLite, were most of it. So a statement that cannot wait
runs in the event loop's own thread, and only what can wait takes the trip:
- a SELECT runs there within a budget of `INLINE_BUDGET_SECONDS`, kept by SQLite's
  progress handler; one that runs over is interrupted (an interrupted SELECT leaves its
  transaction as it was) and runs again in the worker thread, as every later run of the
  same SQL does;
- an INSERT of given values (not INSERT ... SELECT, at most `INLINE_MAX_ROWS` rows)
  runs there too: its work is bounded by its rows;
- UPDATE, DELETE and everything else, whose work depends on the rows it finds, and
  COMMIT, which waits for the disk (`synchronous=FULL`), take the trip.
A transaction that now never suspends could hold the event loop for its whole length,
and the safety lane's message would wait unread on its socket meanwhile: a statement
gives the loop a turn first when this connection has not given one for
`LOOP_TURN_EVERY_SECONDS`.
Nothing run in the loop's thread ever waits for a lock: the connection's busy timeout
is 0 there, and a statement that finds the file locked (another process holds it)
runs again in the worker thread, which waits up to the engine's timeout. The
connection is one SQLAlchemy connection's at a time (the pool) and its statements are
awaited one by one, and while the worker thread still has work of it (a call whose
awaiting task was cancelled) every statement queues behind that work: the two threads
never use it at once, and statements run in the order they were asked.
"""

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiosqlite
from sqlalchemy import make_url
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite

_Outcome = tuple[Any, int, int | None, list[Any]]

INLINE_BUDGET_SECONDS = 0.002
INLINE_MAX_ROWS = 64
LOOP_TURN_EVERY_SECONDS = 0.0005  # a turn costs tens of microseconds; 2 ms let the safety lane wait longer
_PROGRESS_STEP = 1_000  # SQLite VM instructions between two looks at the budget
_SELECT = re.compile(r"\s*SELECT\b", re.IGNORECASE)
_INSERT_VALUES = re.compile(r"\s*INSERT\b(?!.*\bSELECT\b)", re.IGNORECASE | re.DOTALL)
_WAITED_FOR = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_INTERRUPT}


def _run(connection: aiosqlite.Connection, operation: str, parameters: Any, many: bool) -> _Outcome:
    """The statement, its rows, and what the cursor reports."""
    cursor = connection._conn.cursor()  # the sqlite3 connection aiosqlite opened in its thread
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return description, cursor.rowcount, cursor.lastrowid, rows
    finally:
        cursor.close()


class OneTripCursor:
    """The subset of aiosqlite's cursor SQLAlchemy's adapter uses, each call answered
    from the one run `execute` made."""

    def __init__(self, connection: "OneTripConnection") -> None:
        self._connection = connection
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self.arraysize = 1
        self._rows: list[Any] = []

    async def __aenter__(self) -> "OneTripCursor":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def execute(self, operation: str, parameters: Any = None) -> "OneTripCursor":
        return await self._trip(operation, parameters, many=False)

    async def executemany(self, operation: str, parameters: Sequence[Any]) -> "OneTripCursor":
        return await self._trip(operation, parameters, many=True)

    async def _trip(self, operation: str, parameters: Any, *, many: bool) -> "OneTripCursor":
        connection = self._connection
        if time.perf_counter() - connection.resumed_at > LOOP_TURN_EVERY_SECONDS:
            await asyncio.sleep(0)
            connection.resumed_at = time.perf_counter()
        outcome = connection.run_inline(operation, parameters, many)
        if outcome is None:
            outcome = await connection.run_in_thread(operation, parameters, many)
            connection.resumed_at = time.perf_counter()
        self.description, self.rowcount, self.lastrowid, self._rows = outcome
        return self

    async def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    async def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        count = size or self.arraysize
        rows, self._rows = self._rows[:count], self._rows[count:]
        return rows

    async def close(self) -> None:
        self._rows = []


@dataclass
class _Work:
    """A call for the worker thread; `taken` once the thread has started it."""

    call: Callable[[], Any]
    taken: bool = False


class OneTripConnection(aiosqlite.Connection):
    def __init__(self, connector: Callable[[], sqlite3.Connection], patience_ms: int) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._patience_ms = patience_ms
        self._over_budget: set[str] = set()  # SQL that ran over the budget once
        self._thread_work = 0  # calls queued for or running in the worker thread
        self._thread_work_lock = threading.Lock()
        self.inline_statements = 0
        self.resumed_at = 0.0  # when a statement of this connection last gave the loop a turn

    @property
    def busy_in_thread(self) -> bool:
        return self._thread_work > 0

    def cursor(self) -> OneTripCursor:  # type: ignore[override]
        return OneTripCursor(self)

    def run_inline(self, operation: str, parameters: Any, many: bool) -> _Outcome | None:
        """The statement run in the calling (event loop's) thread, or None when it must
        take the trip: it may take long, or it would have to wait for a lock, or the
        worker thread still has work of this connection (a call whose awaiting task was
        cancelled), which must go first."""
        if self.busy_in_thread:
            return None
        if _SELECT.match(operation) and not many:
            if operation in self._over_budget:
                return None
            deadline = time.perf_counter() + INLINE_BUDGET_SECONDS
            self._conn.set_progress_handler(lambda: time.perf_counter() > deadline, _PROGRESS_STEP)
        elif not (_INSERT_VALUES.match(operation) and (not many or len(parameters) <= INLINE_MAX_ROWS)):
            return None
        try:
            outcome = _run(self, operation, parameters, many)
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorcode", None) not in _WAITED_FOR:
                raise
            if error.sqlite_errorcode == sqlite3.SQLITE_INTERRUPT:
                self._remember_over_budget(operation)
            return None  # nothing was done: the worker thread runs it again, and may wait
        finally:
            self._conn.set_progress_handler(None, 0)
        self.inline_statements += 1
        return outcome

    async def run_in_thread(self, operation: str, parameters: Any, many: bool) -> _Outcome:
        return await self._execute(self._patiently, partial(_run, self, operation, parameters, many))

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._thread_work_lock:
            self._thread_work += 1
        work = _Work(partial(fn, *args, **kwargs))
        try:
            return await super()._execute(self._counted, work)
        except asyncio.CancelledError:
            raise  # the call is queued: the worker thread runs it and counts it down
        except BaseException:
            # Refused before it was queued (a closed connection): nothing will count it down.
            if not work.taken:
                self._count_down()
            raise

    def _counted(self, work: "_Work") -> Any:
        work.taken = True
        try:
            return work.call()
        finally:
            self._count_down()

    def _count_down(self) -> None:
        with self._thread_work_lock:
            self._thread_work -= 1

    async def commit(self) -> None:
        await self._execute(self._patiently, self._conn.commit)

    async def rollback(self) -> None:
        # The pool rolls back every connection it takes back; after a commit there is
        # nothing to roll back, and no reason for a trip.
        if self.busy_in_thread or self._conn.in_transaction:
            await self._execute(self._conn.rollback)

    def _patiently(self, work: Callable[[], Any]) -> Any:
        """In the worker thread: `work` may wait for another process's lock."""
        self._conn.execute(f"PRAGMA busy_timeout={self._patience_ms}")
        try:
            return work()
        finally:
            self._conn.execute("PRAGMA busy_timeout=0")

    def _remember_over_budget(self, operation: str) -> None:
        if len(self._over_budget) < 1_000:  # bounded: SQL is generated, so this set stays small
            self._over_budget.add(operation)


def connector(url: str, **connect_args: Any) -> Callable[[], Awaitable[aiosqlite.Connection]]:
    """The `async_creator` for an engine on this SQLite URL: the arguments the aiosqlite
    dialect would give sqlite3.connect, plus `connect_args`."""
    args, params = SQLiteDialect_aiosqlite().create_connect_args(make_url(url))
    params.update(connect_args)
    # The wait for another process's lock is the worker thread's alone (_patiently);
    # the event loop's thread shares the connection, serialized by the pool.
    patience_ms = int(float(params.pop("timeout", 5.0)) * 1000)
    params.update(timeout=0, check_same_thread=False)

    async def connect() -> aiosqlite.Connection:
        connection = OneTripConnection(partial(sqlite3.connect, *args, **params), patience_ms)
        connection._thread.daemon = True  # as SQLAlchemy's adapter does: never holds up exit
        return await connection

    return connect
