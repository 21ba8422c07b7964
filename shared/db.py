"""Async engines for SQLite and PostgreSQL, sessions, and Alembic migrations on start."""

import functools
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from sqlalchemy import (
    DateTime,
    Insert,
    MetaData,
    Select,
    Table,
    TextClause,
    Update,
    bindparam,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, CursorResult, Result, RowMapping, make_url
from sqlalchemy.engine.interfaces import BindTyping
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeDecorator

from shared import sqlite_driver
from shared.priority import SafetyFirstPool

if TYPE_CHECKING:
    from _typeshed import SupportsRichComparison

T = TypeVar("T")
Sortable = TypeVar("Sortable", bound="SupportsRichComparison")


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC in and out on every backend (SQLite would hand back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


# How many connections a service process keeps to PostgreSQL (IOPNET_DB_POOL_SIZE).
DEFAULT_POOL_SIZE = 20


def create_engine(url: str, pool_size: int = DEFAULT_POOL_SIZE, application_name: str | None = None) -> AsyncEngine:
    """The service's engine. On PostgreSQL `application_name` names its connections in
    `pg_stat_activity` and the server's logs: which process (and lane) holds a lock or
    runs a slow statement."""
    if not is_sqlite(url):
        named = {"server_settings": {"application_name": application_name}} if application_name else {}
        # No pre-ping: it costs two round trips per checkout, on every request (the
        # bench's profile). A connection the server dropped fails its next use once;
        # SQLAlchemy then invalidates the pool, and the caller's retry (a consumer's, the
        # relay's, a client's with its Idempotency-Key) gets a fresh one.
        # No overflow: a connection opened under a burst is kept, not closed at its
        # check-in. Each new one costs a server process and a prepare of every statement
        # it runs; under `iopnet bench --postgres` intake opened 73 connections a run with
        # 10 kept and 10 of overflow, 19 with 20 kept (docs/performance.md).
        # LIFO: the connection given back last goes out first, with its statements already
        # prepared. In turn (FIFO), work after a burst went round all of them, preparing
        # its statements again on each: intake prepared 740 statements a bench run, 512 LIFO.
        return create_async_engine(
            url,
            poolclass=SafetyFirstPool,
            pool_size=pool_size,
            max_overflow=0,
            pool_use_lifo=True,
            pool_recycle=1800,
            connect_args=named,
        )
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    # SQLite has one writer at a time. One pooled connection makes the process's
    # transactions queue on an asyncio wait instead of SQLite's sleeping busy handler
    # (which costs tens of ms per collision); the service is the file's only user.
    # Safety work waiting for it goes first (shared/priority.py). One trip to aiosqlite's
    # thread per statement, not four (shared/sqlite_driver.py).
    connect = sqlite_driver.connector(url, timeout=30)
    engine = create_async_engine(url, async_creator=connect, poolclass=SafetyFirstPool, pool_size=1, max_overflow=0)
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets HTTP reads proceed while the relay or a consumer writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


@asynccontextmanager
async def transaction(session: AsyncSession) -> AsyncIterator[None]:
    """Like `session.begin()`, but an error marked `keeps_audit` (AccessDenied, a
    DomainError(keeps_audit=True)) commits before it propagates, so the audit row written for it
    survives; nothing else in such a transaction writes."""
    async with session.begin() as current:
        try:
            yield
        except Exception as error:
            if getattr(error, "keeps_audit", False):
                await current.commit()
            raise


def dialect_name(session: AsyncSession) -> str:
    """ "postgresql" or "sqlite": some statements (locks, upserts) differ between them."""
    return session.get_bind().dialect.name


def rows_changed(result: Result[Any]) -> int:
    """Rows an UPDATE/DELETE/INSERT touched (a DML result is a CursorResult; the session's
    execute is typed with the base class)."""
    return int(cast(CursorResult[Any], result).rowcount or 0)


async def insert_if_absent(
    session: AsyncSession, table: Table, *, conflict: Sequence[str] | None = None, **values: Any
) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING on the primary key (or the unique columns
    `conflict`); True if this call inserted. Safe under concurrency: a racing insert
    waits for the other and then does nothing."""
    _known_columns(table, values)
    statement = _insert_if_absent(dialect_name(session), table, tuple(conflict) if conflict is not None else None)
    # The values as parameters, not .values(...): the statement is built once per table and
    # its compiled form cached, instead of building and hashing a new one on every call.
    return bool(rows_changed(await session.execute(statement, values)))


@functools.cache
def _insert_if_absent(dialect: str, table: Table, conflict: tuple[str, ...] | None) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    keys = list(conflict) if conflict is not None else [column.name for column in table.primary_key.columns]
    return insert(table).on_conflict_do_nothing(index_elements=keys)


async def upsert_if_newer(session: AsyncSession, table: Table, row: Mapping[str, Any], *, newer: str) -> bool:
    """INSERT `row` into `table`, or, if its primary key is there, UPDATE the stored row
    to `row` unless the stored `newer` column is later than `row`'s (events may arrive out
    of order: an older change never overwrites a newer one). One statement (INSERT ... ON
    CONFLICT DO UPDATE ... WHERE), where a read and a write took two. Whether `row` is
    now what is stored."""
    _known_columns(table, row)
    keys = tuple(column.name for column in table.primary_key.columns)
    if newer not in row or any(key not in row for key in keys):
        raise ValueError(f"an upsert of {table.name} names its key ({', '.join(keys)}) and {newer}")
    statement = _upsert_if_newer(dialect_name(session), table, tuple(row), newer)
    return (await session.execute(statement, dict(row))).first() is not None


@functools.cache
def _upsert_if_newer(dialect: str, table: Table, columns: tuple[str, ...], newer: str) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(table)
    keys = [column.name for column in table.primary_key.columns]
    changed = {name: statement.excluded[name] for name in columns if name not in keys}
    return statement.on_conflict_do_update(
        index_elements=keys, set_=changed, where=table.c[newer] <= statement.excluded[newer]
    ).returning(*table.primary_key.columns)


async def insert_absent_rows(
    session: AsyncSession, table: Table, rows: Sequence[Mapping[str, Any]], *, conflict: Sequence[str] | None = None
) -> int:
    """`insert_if_absent` for several rows of the same columns in one statement; how many
    were inserted. SQLAlchemy sends them as one multi-row INSERT ... ON CONFLICT DO NOTHING
    RETURNING (its "insertmanyvalues"), and only the rows inserted come back."""
    if not rows:
        return 0
    columns = rows[0].keys()
    _known_columns(table, columns)
    if any(row.keys() != columns for row in rows):
        raise ValueError(f"rows for {table.name} with different columns: one statement takes the same ones")
    statement = _insert_absent_returning(dialect_name(session), table, tuple(conflict) if conflict else None)
    return len((await session.execute(statement, list(rows))).all())


@functools.cache
def _insert_absent_returning(dialect: str, table: Table, conflict: tuple[str, ...] | None) -> Any:
    return _insert_if_absent(dialect, table, conflict).returning(*table.primary_key.columns)


# Statements built once and executed with parameters. Building a statement and its cache
# key costs more CPU than running it: a primary-key SELECT through the session took
# 0.28-0.43 ms built per call and 0.15-0.18 ms prebuilt, on both SQLite and PostgreSQL
# (docs/performance.md, "Statements built once"). SQLAlchemy memoizes the cache key on the
# statement object, so a statement kept and reused skips both; its compiled form comes from
# the engine's cache as before. Parameters are named after the columns they match.


def in_list(values: Iterable[Sortable]) -> list[Sortable]:
    """`values` for an expanding IN: distinct, sorted, and as many as the next power of
    two, the last one repeated (which changes nothing the IN matches).

    An expanding IN renders one SQL string per number of values, and on PostgreSQL each
    string is prepared once per connection: a round trip, and the server's parse and
    plan. A check-in group of 1 to 64 read its patients with up to 64 strings; rounded up,
    with 7, each prepared once and kept."""
    distinct = sorted(set(values))
    if not distinct:
        return distinct
    size = 1 << (len(distinct) - 1).bit_length()
    return distinct + [distinct[-1]] * (size - len(distinct))


@functools.cache
def select_by(table: Table, *keys: str) -> Select[Any]:
    """SELECT every column of `table` WHERE each key column equals its parameter."""
    return select(table).where(*(table.c[key] == bindparam(key) for key in keys))


@functools.cache
def _insert_into(table: Table) -> Insert:
    return insert(table)


async def insert_row(session: AsyncSession, table: Table, **values: Any) -> None:
    """INSERT one row of `values` into `table`."""
    _known_columns(table, values)
    await session.execute(_insert_into(table), values)


async def insert_row_returning(session: AsyncSession, table: Table, **values: Any) -> RowMapping:
    """`insert_row`, answering the row as stored, every column (INSERT ... RETURNING):
    a caller that needs it does not read it back in a second statement."""
    _known_columns(table, values)
    return (await session.execute(_insert_returning(table), values)).mappings().one()


@functools.cache
def _insert_returning(table: Table) -> Insert:
    return insert(table).returning(*table.c)


async def insert_rows(session: AsyncSession, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT several rows into `table` in one statement (none: nothing runs)."""
    if not rows:
        return
    for row in rows:
        _known_columns(table, row)
    await session.execute(_insert_into(table), list(rows))


@functools.cache
def _update_by(table: Table, keys: tuple[str, ...]) -> Update:
    # The key's parameters are prefixed: a parameter named after a column is a SET value.
    return update(table).where(*(table.c[key] == bindparam(f"key_{key}") for key in keys))


async def update_by(session: AsyncSession, table: Table, key: Mapping[str, Any], **values: Any) -> int:
    """UPDATE `table` SET `values` WHERE each column of `key` equals its value; the rows
    changed. The columns set are the keys of `values`, so one statement per table and key
    columns serves every caller."""
    _known_columns(table, values)
    if not values:
        raise ValueError(f"an update of {table.name} with nothing to set")
    parameters = {f"key_{name}": value for name, value in key.items()}
    return rows_changed(await session.execute(_update_by(table, tuple(key)), {**values, **parameters}))


async def update_rows_by(
    session: AsyncSession, table: Table, keys: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> None:
    """`update_by` for several rows that set the same columns: each row holds its key
    (the `keys` columns) and its values. One statement run with each row's parameters
    (the driver's executemany: asyncpg sends them in one round trip)."""
    if not rows:
        return
    columns = rows[0].keys()
    if any(row.keys() != columns for row in rows):
        raise ValueError(f"updates of {table.name} setting different columns: one statement sets the same ones")
    values = [name for name in columns if name not in keys]
    _known_columns(table, columns)
    if not values or len(values) + len(keys) != len(columns):
        raise ValueError(f"updates of {table.name} need each of {', '.join(keys)} and something to set")
    parameters = [{**{name: row[name] for name in values}, **{f"key_{key}": row[key] for key in keys}} for row in rows]
    await session.execute(_update_by(table, tuple(keys)), parameters)


def _known_columns(table: Table, values: Iterable[str]) -> None:
    # `.values(...)` refuses a name that is no column; parameters would be ignored silently.
    unknown = [name for name in values if name not in table.c]
    if unknown:
        raise ValueError(f"no such column in {table.name}: {', '.join(sorted(unknown))}")


async def lock_row(session: AsyncSession, table: Table, **key: Any) -> None:
    """Create-if-missing and lock one row for the rest of the transaction.

    Handlers on different streams may touch the same entity at once (a patient's
    contact and enrollment arrive concurrently); each takes this lock first, so the
    second waits for the first to commit and then sees its rows. On SQLite the
    insert makes the transaction a writer at once, which serializes it the same way.
    """
    if set(key) != set(table.primary_key.columns.keys()):
        raise ValueError(f"a lock on {table.name} is taken by its whole primary key, not {', '.join(sorted(key))}")
    if dialect_name(session) == "sqlite":
        await insert_if_absent(session, table, **key)
        return  # the insert made this transaction the writer; SQLite has no row locks
    await session.execute(_lock_row(table), key)


async def lock_rows(session: AsyncSession, table: Table, keys: Sequence[Mapping[str, Any]]) -> None:
    """`lock_row` for several rows in one statement, in the order of their keys: two
    transactions locking overlapping sets this way take them in the same order, so
    neither can hold a row the other waits for while it waits for one the other holds."""
    ordered = sorted({tuple(sorted(key.items())) for key in keys})
    if not ordered:
        return
    for key in ordered:
        if {name for name, _ in key} != set(table.primary_key.columns.keys()):
            raise ValueError(f"a lock on {table.name} is taken by its whole primary key")
    rows = [dict(key) for key in ordered]
    if dialect_name(session) == "sqlite":
        await session.execute(_insert_if_absent("sqlite", table, None), rows)
        return
    await session.execute(_lock_row(table), rows)


@functools.cache
def _lock_row(table: Table) -> Any:
    # One round trip, not an insert and a SELECT ... FOR UPDATE: ON CONFLICT DO UPDATE
    # locks the row it finds, as an UPDATE does, even one its snapshot cannot see yet, and
    # a row it inserts is this transaction's until it ends. Setting the key to itself
    # changes no indexed value, so the update is a HOT one on the same page.
    keys = [column.name for column in table.primary_key.columns]
    statement = postgresql.insert(table)
    return statement.on_conflict_do_update(index_elements=keys, set_={keys[0]: statement.excluded[keys[0]]})


def kept_for_this_transaction(session: AsyncSession, key: str, new: Callable[[], T]) -> T:
    """A value kept in the session as long as its current transaction lasts (a set of
    rows locked, rows read once), made by `new` when the transaction has none yet. The
    stores use it to take a lock or read a row once per transaction, however many events
    of a consumer's batch ask for it."""
    transaction = session.get_transaction()
    if transaction is None:
        # No transaction yet (the next statement begins one): nothing can be kept for it,
        # or a read made now would be kept past the commit of the one it begins.
        return new()
    kept = session.info.get(key)
    if kept is None or kept[0] is not transaction:
        kept = session.info[key] = (transaction, new())
    return cast(T, kept[1])


_AT_COMMIT = "iopnet.rows_at_commit"
# Rows written together in one statement on PostgreSQL, per table. A statement's text
# depends on its row counts, and each new text costs asyncpg a round trip to prepare it:
# larger groups (a consumer's batch) keep their own multi-row INSERT, whose text is fixed.
_JOINED_ROWS = 4


async def insert_at_commit(session: AsyncSession, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT `rows` into `table` as the transaction commits, not now: for rows nothing
    reads back in the transaction that writes them (audit rows, events staged in the
    outbox). A rollback drops them with the rest. On PostgreSQL the small groups of
    several tables go in one statement just before the COMMIT (data-modifying CTEs): a
    request that writes its record, an event and an audit row saves a round trip per
    table. A session not made by `session_factory` (it has no commit hook), or one with no
    transaction begun yet, inserts at once."""
    if not rows:
        return
    for row in rows:
        _known_columns(table, row)
    sync = session.sync_session
    current = sync.get_transaction()
    if current is None or not getattr(sync, "writes_at_commit", False):
        await insert_rows(session, table, rows)
        return
    kept: tuple[object, list[tuple[Table, list[dict[str, Any]]]]] | None = sync.info.get(_AT_COMMIT)
    if kept is None or kept[0] is not current:
        kept = sync.info[_AT_COMMIT] = (current, [])
    kept[1].append((table, [dict(row) for row in rows]))


def _write_rows_at_commit(session: Session) -> None:
    # A `before_commit` hook: it runs in the greenlet of the AsyncSession's commit, so
    # its statements are awaited like any other (SQLAlchemy's own flush runs there too).
    kept = session.info.pop(_AT_COMMIT, None)
    if kept is None or kept[0] is not session.get_transaction():
        return  # nothing staged, or staged in a transaction that was rolled back
    for statement, parameters in _statements_at_commit(session.get_bind().dialect.name, kept[1]):
        session.execute(statement, parameters)


def _statements_at_commit(dialect: str, staged: list[tuple[Table, list[dict[str, Any]]]]) -> Iterable[tuple[Any, Any]]:
    """The INSERTs of what a transaction staged: each table's rows in the order staged;
    on PostgreSQL the small groups of several tables joined in one statement."""
    groups: dict[tuple[Table, tuple[str, ...]], list[dict[str, Any]]] = {}
    for table, rows in staged:
        for row in rows:
            groups.setdefault((table, tuple(row)), []).append(row)
    joined: list[tuple[Table, list[dict[str, Any]]]] = []
    for (table, _), rows in groups.items():
        if (
            dialect == "postgresql"
            and len(rows) <= _JOINED_ROWS
            and all(t is not table for t, _ in joined)
            and _fills_every_column(table, rows[0])
        ):
            joined.append((table, rows))
        else:
            yield _insert_into(table), rows
    if len(joined) == 1:
        yield _insert_into(joined[0][0]), joined[0][1]
    elif joined:
        shape = tuple((table, tuple(rows[0]), len(rows)) for table, rows in joined)
        parameters = {
            _joined_name(number, index, key): value
            for number, (_, rows) in enumerate(joined)
            for index, row in enumerate(rows)
            for key, value in row.items()
        }
        yield _joined_insert(shape), parameters


def _fills_every_column(table: Table, row: Mapping[str, Any]) -> bool:
    # A column's Python-side default, not given in the row, is filled per row by the
    # table's own INSERT (an executemany); a joined statement's VALUES would leave it null.
    return all(column.default is None or column.key in row for column in table.columns)


def _joined_name(number: int, index: int, key: str) -> str:
    return f"j{number}_{index}_{key}"


@functools.lru_cache(maxsize=256)
def _joined_insert(shape: tuple[tuple[Table, tuple[str, ...], int], ...]) -> TextClause:
    # Built once per shape (tables, columns, row counts), with its values as parameters:
    # a statement with the values in it had its cache key computed, over every value, at
    # every commit.
    def rows(number: int, table: Table, keys: tuple[str, ...], count: int) -> list[dict[str, Any]]:
        return [
            {key: bindparam(_joined_name(number, index, key), type_=table.c[key].type) for key in keys}
            for index in range(count)
        ]

    (main, keys, count), *others = shape
    statement = insert(main).values(rows(0, main, keys, count))
    for number, (table, columns, size) in enumerate(others, start=1):
        statement = statement.add_cte(
            insert(table).values(rows(number, table, columns, size)).cte(f"at_commit_{number}")
        )
    names = {
        _joined_name(number, index, key)
        for number, (_, keys, count) in enumerate(shape)
        for index in range(count)
        for key in keys
    }
    return _compiled_once(statement, names)


# PostgreSQL's SQL with :name parameters and no casts, to be read back by text().
_NAMED_POSTGRESQL = postgresql.asyncpg.dialect(paramstyle="named")
_NAMED_POSTGRESQL.bind_typing = BindTyping.NONE


def _compiled_once(statement: Insert, names: set[str]) -> TextClause:
    """The joined INSERT as a text() of its SQL, with its typed parameters.

    SQLAlchemy gives a multi-row VALUES no cache key, so it compiled the statement at
    every commit (6-7% of intake's CPU under `iopnet bench --postgres`). A text() with
    bound parameters has one, memoized on this object: compiled once per connection
    dialect, as any other statement. The casts come back when the text is compiled
    for asyncpg, from the parameters' types.
    """
    compiled = statement.compile(dialect=_NAMED_POSTGRESQL)
    # Every parameter is one of the rows' values (no column default: _fills_every_column).
    assert set(compiled.binds) == names, sorted(set(compiled.binds) - names)
    return text(str(compiled)).bindparams(
        *(bindparam(name, type_=bound.type) for name, bound in compiled.binds.items())
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # A session class of its own per factory, so commit hooks (the outbox wake-up, the
    # rows written at commit) attach to this service's sessions only.
    sync_class = type("ServiceSession", (Session,), {"writes_at_commit": True})
    event.listen(sync_class, "before_commit", _write_rows_at_commit)
    return async_sessionmaker(engine, expire_on_commit=False, sync_session_class=sync_class)


async def migrate(engine: AsyncEngine, migrations_dir: Path) -> None:
    """Upgrade the service's database to head (Alembic, run on every start)."""

    def upgrade(connection: Connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(migrations_dir))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Replicas of a service start together on one database: one migrates, the
            # others wait for it and then find nothing to do (the lock ends with the
            # transaction). Keyed by the migrations' directory: one lock per service.
            key = zlib.crc32(migrations_dir.name.encode() + str(migrations_dir.parent.name).encode())
            await connection.execute(select(func.pg_advisory_xact_lock(key)))
        await connection.run_sync(upgrade)


def run_migrations(context: Any, target_metadata: MetaData) -> None:
    # `context` is alembic's `context` module, a proxy to the EnvironmentContext in use.
    """Body of every service's migrations/env.py (online mode only)."""
    connection: Connection | None = context.config.attributes.get("connection")
    if connection is None:
        url = context.config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("run migrations through shared.db.migrate or set sqlalchemy.url")
        import asyncio

        asyncio.run(_migrate_url(url, context, target_metadata))
        return
    _configure_and_run(context, connection, target_metadata)


async def _migrate_url(url: str, context: EnvironmentContext, target_metadata: MetaData) -> None:
    engine = create_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(lambda c: _configure_and_run(context, c, target_metadata))
    await engine.dispose()


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    # Migrations stay free of project imports: UtcDateTime is stored as DateTime(tz).
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure_and_run(context: EnvironmentContext, connection: Connection, target_metadata: MetaData) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()
