"""SQLite for the async engine with one trip to aiosqlite's thread per statement.

SQLAlchemy's aiosqlite adapter sends four requests to aiosqlite's worker thread for
every statement: open a cursor, execute, fetch the rows, close the cursor. Each is a
queue put, a wake-up of the event loop through its self-pipe when the answer is ready,
and a hand-over of the GIL, which the busy event loop gives up only at the
interpreter's switch interval. Under the enrollment wave of `make bench` (issue 10) a
service's single SQLite connection spent most of its time in those trips, and every
consumer, request and the dispatcher queued behind it.

The cursor here does the four in one trip: the statement runs and its rows are read in
the worker thread, and the cursor answers SQLAlchemy from memory. It reaches SQLAlchemy
through `create_async_engine(async_creator=...)`, the documented way to hand the
aiosqlite dialect its own driver connection; the connection is aiosqlite's own class
with `cursor()` replaced, so transactions, commit, rollback and close are aiosqlite's.
Server-side cursors are not used here (no `stream_results`): every result is read whole.
It leans on two of aiosqlite's internals, `Connection._execute` (queue a call for the
worker thread) and `Connection._conn` (the sqlite3 connection there), as SQLAlchemy's own
adapter does; aiosqlite is pinned in requirements/dev.txt, and
tests/integration/test_sqlite_driver.py fails if either changes.
"""

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import aiosqlite
from sqlalchemy import make_url
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite

_Outcome = tuple[Any, int, int | None, list[Any]]


def _run(connection: aiosqlite.Connection, operation: str, parameters: Any, many: bool) -> _Outcome:
    """In the worker thread: the statement, its rows, and what the cursor reports."""
    cursor = connection._conn.cursor()  # the sqlite3 connection aiosqlite keeps in its thread
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
    from the one trip `execute` made."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
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
        outcome = await self._connection._execute(_run, self._connection, operation, parameters, many)
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


class OneTripConnection(aiosqlite.Connection):
    def cursor(self) -> OneTripCursor:  # type: ignore[override]
        return OneTripCursor(self)


def connector(url: str, **connect_args: Any) -> Callable[[], Awaitable[aiosqlite.Connection]]:
    """The `async_creator` for an engine on this SQLite URL: the arguments the aiosqlite
    dialect would give sqlite3.connect, plus `connect_args`."""
    args, params = SQLiteDialect_aiosqlite().create_connect_args(make_url(url))
    params.update(connect_args)

    async def connect() -> aiosqlite.Connection:
        connection = OneTripConnection(partial(sqlite3.connect, *args, **params), iter_chunk_size=64)
        connection._thread.daemon = True  # as SQLAlchemy's adapter does: never holds up exit
        return await connection

    return connect
