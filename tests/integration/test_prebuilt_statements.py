"""Statements built once and run with parameters (shared/db.py: select_by, insert_row,
update_by), on SQLite and PostgreSQL: they read and write what `.where(...)` and
`.values(...)` did, refuse what those refused, and are built once per table and key, which
is what saves their cost on every call (docs/performance.md, "Statements built once")."""

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, event, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db import (
    create_engine,
    in_list,
    insert_absent_rows,
    insert_row,
    kept_for_this_transaction,
    select_by,
    update_by,
    update_rows_by,
)

metadata = MetaData()
rooms = Table(
    "prebuilt_rooms",
    metadata,
    Column("site_id", String(40), primary_key=True),
    Column("room", String(40), primary_key=True),
    Column("seats", Integer, nullable=False),
    Column("note", String(200)),
)


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield async_sessionmaker(engine, expire_on_commit=False)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.drop_all)
    await engine.dispose()


async def statements_sent(session: AsyncSession) -> list[str]:
    """The statements the session's connection sends from now on, as they are sent."""
    sent: list[str] = []
    connection = (await session.connection()).sync_connection
    assert connection is not None
    event.listen(connection, "before_cursor_execute", lambda *args: sent.append(args[2]))
    return sent


async def rooms_of(session: AsyncSession, site_id: str) -> list[dict[str, object]]:
    found = await session.execute(select_by(rooms, "site_id").order_by(rooms.c.room), {"site_id": site_id})
    return [dict(row) for row in found.mappings()]


async def test_rows_are_written_read_and_changed_by_their_key(sessions) -> None:
    async with sessions() as session, session.begin():
        await insert_row(session, rooms, site_id="north", room="a", seats=12)
        await insert_row(session, rooms, site_id="north", room="b", seats=8, note="quiet")
        await insert_row(session, rooms, site_id="south", room="a", seats=20)
    async with sessions() as session, session.begin():
        changed = await update_by(session, rooms, {"site_id": "north", "room": "a"}, seats=14, note="moved")
        assert changed == 1
        assert await update_by(session, rooms, {"site_id": "east", "room": "a"}, seats=1) == 0
    async with sessions() as session:
        assert await rooms_of(session, "north") == [
            {"site_id": "north", "room": "a", "seats": 14, "note": "moved"},
            {"site_id": "north", "room": "b", "seats": 8, "note": "quiet"},
        ]
        one = await session.execute(select_by(rooms, "site_id", "room"), {"site_id": "south", "room": "a"})
        assert [dict(row) for row in one.mappings()] == [{"site_id": "south", "room": "a", "seats": 20, "note": None}]


async def test_a_key_column_can_be_set_too_without_touching_other_rows(sessions) -> None:
    async with sessions() as session, session.begin():
        await insert_row(session, rooms, site_id="north", room="a", seats=12)
        await insert_row(session, rooms, site_id="north", room="b", seats=8)
    async with sessions() as session, session.begin():
        assert await update_by(session, rooms, {"site_id": "north", "room": "a"}, room="c") == 1
    async with sessions() as session:
        assert [row["room"] for row in await rooms_of(session, "north")] == ["b", "c"]


async def test_a_name_that_is_no_column_is_refused_and_changes_nothing(sessions) -> None:
    async with sessions() as session, session.begin():
        await insert_row(session, rooms, site_id="north", room="a", seats=12)
    async with sessions() as session:
        with pytest.raises(ValueError, match="no such column in prebuilt_rooms: colour"):
            await insert_row(session, rooms, site_id="north", room="b", seats=1, colour="red")
        with pytest.raises(ValueError, match="no such column in prebuilt_rooms: sets"):
            await update_by(session, rooms, {"site_id": "north", "room": "a"}, sets=3)
        with pytest.raises(ValueError, match="nothing to set"):
            await update_by(session, rooms, {"site_id": "north", "room": "a"})
        await session.rollback()
        assert await rooms_of(session, "north") == [{"site_id": "north", "room": "a", "seats": 12, "note": None}]


def test_each_statement_is_built_once_per_table_and_key() -> None:
    # What the helpers are for: the same statement object comes back, so SQLAlchemy's cache
    # key, memoized on it, is computed once instead of on every call.
    assert select_by(rooms, "site_id") is select_by(rooms, "site_id")
    assert select_by(rooms, "site_id", "room") is not select_by(rooms, "site_id")


async def test_absent_rows_are_inserted_in_one_statement_and_only_the_new_counted(sessions) -> None:
    async with sessions() as session, session.begin():
        await insert_row(session, rooms, site_id="north", room="a", seats=12)
    async with sessions() as session, session.begin():
        sent = await statements_sent(session)
        new = await insert_absent_rows(
            session,
            rooms,
            [
                {"site_id": "north", "room": "a", "seats": 99, "note": "already there"},
                {"site_id": "north", "room": "b", "seats": 8, "note": None},
                {"site_id": "north", "room": "c", "seats": 4, "note": "small"},
            ],
        )
        assert new == 2 and len(sent) == 1
        assert await insert_absent_rows(session, rooms, []) == 0
        with pytest.raises(ValueError, match="different columns"):
            await insert_absent_rows(session, rooms, [{"site_id": "x", "room": "a", "seats": 1}, {"site_id": "x"}])
        with pytest.raises(ValueError, match="no such column in prebuilt_rooms: colour"):
            await insert_absent_rows(session, rooms, [{"site_id": "x", "room": "a", "seats": 1, "colour": "red"}])
    async with sessions() as session:
        assert await rooms_of(session, "north") == [
            {"site_id": "north", "room": "a", "seats": 12, "note": None},
            {"site_id": "north", "room": "b", "seats": 8, "note": None},
            {"site_id": "north", "room": "c", "seats": 4, "note": "small"},
        ]
        assert await rooms_of(session, "x") == []


async def test_rows_are_changed_each_by_its_key_in_one_statement(sessions) -> None:
    async with sessions() as session, session.begin():
        for room, seats in (("a", 12), ("b", 8), ("c", 4)):
            await insert_row(session, rooms, site_id="north", room=room, seats=seats)
        await insert_row(session, rooms, site_id="south", room="a", seats=20)
    async with sessions() as session, session.begin():
        sent = await statements_sent(session)
        await update_rows_by(
            session,
            rooms,
            ("site_id", "room"),
            [
                {"site_id": "north", "room": "a", "seats": 14, "note": "moved"},
                {"site_id": "north", "room": "c", "seats": 5, "note": None},
                {"site_id": "east", "room": "a", "seats": 1, "note": "no such room"},
            ],
        )
        assert len(sent) == 1
        await update_rows_by(session, rooms, ("site_id", "room"), [])
        assert len(sent) == 1
        with pytest.raises(ValueError, match="different columns"):
            await update_rows_by(session, rooms, ("site_id",), [{"site_id": "x", "seats": 1}, {"site_id": "x"}])
        with pytest.raises(ValueError, match="no such column in prebuilt_rooms: colour"):
            await update_rows_by(session, rooms, ("site_id",), [{"site_id": "x", "colour": "red"}])
        with pytest.raises(ValueError, match="need each of site_id, room and something to set"):
            await update_rows_by(session, rooms, ("site_id", "room"), [{"site_id": "north", "seats": 1}])
    async with sessions() as session:
        assert await rooms_of(session, "north") == [
            {"site_id": "north", "room": "a", "seats": 14, "note": "moved"},
            {"site_id": "north", "room": "b", "seats": 8, "note": None},
            {"site_id": "north", "room": "c", "seats": 5, "note": None},
        ]
        assert await rooms_of(session, "south") == [{"site_id": "south", "room": "a", "seats": 20, "note": None}]
        assert await rooms_of(session, "east") == []


async def test_a_value_is_kept_for_a_transaction_and_not_past_it(sessions) -> None:
    """`kept_for_this_transaction`: one value per transaction; before any transaction
    begins nothing is kept, so a read kept then cannot outlive the commit that follows."""
    async with sessions() as session:
        kept_for_this_transaction(session, "seats", dict)["north"] = 12  # no transaction yet
        assert kept_for_this_transaction(session, "seats", dict) == {}
        await insert_row(session, rooms, site_id="north", room="a", seats=12)  # begins one
        kept_for_this_transaction(session, "seats", dict)["north"] = 12
        assert kept_for_this_transaction(session, "seats", dict) == {"north": 12}
        await session.commit()
        assert kept_for_this_transaction(session, "seats", dict) == {}
        await update_by(session, rooms, {"site_id": "north", "room": "a"}, seats=14)
        assert kept_for_this_transaction(session, "seats", dict) == {}


async def test_an_in_list_of_any_length_is_one_of_few_statements_and_reads_the_same_rows(sessions) -> None:
    # shared.db.in_list: each distinct SQL string is prepared once per PostgreSQL connection.
    query = select(rooms).where(rooms.c.site_id == "north", rooms.c.room.in_(bindparam("rooms", expanding=True)))
    async with sessions() as session, session.begin():
        north = [{"site_id": "north", "room": f"r{n:02}", "seats": n} for n in range(64)]
        await insert_absent_rows(session, rooms, north)
        sent = await statements_sent(session)
        for size in range(1, 65):
            wanted = [f"r{n:02}" for n in range(size)] + ["r00", "missing"]
            found = await session.execute(query, {"rooms": in_list(wanted)})
            assert sorted(row.room for row in found) == sorted(set(wanted) - {"missing"})
    assert len(set(sent)) == 7  # 2, 3-4, 5-8, 9-16, 17-32, 33-64, 65 values: 64 strings without in_list
    assert in_list([]) == [] and in_list(["b", "a", "b"]) == ["a", "b"] and in_list([3, 1, 2]) == [1, 2, 3, 3]
