"""Scheduling's own database: sites and enrollments (projections of intake's events),
the ends of episodes, programs, sessions, bookings, attendance, closures and hours
alerts; plus outbox, inbox, audit and the operators' repairs."""

from collections.abc import Collection
from datetime import date, datetime
from pathlib import Path
from typing import Any, NamedTuple, NotRequired, TypedDict, TypeVar, cast

from sqlalchemy import (
    Column,
    ColumnElement,
    Date,
    Float,
    Index,
    Integer,
    MetaData,
    Result,
    RowMapping,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    func,
    insert,
    select,
    union,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from shared import clock
from shared.audit import AuditTrail, audit_table
from shared.db import (
    UtcDateTime,
    dialect_name,
    in_list,
    insert_if_absent,
    insert_row,
    insert_row_returning,
    insert_rows,
    kept_for_this_transaction,
    rows_changed,
    select_by,
    update_by,
)
from shared.messaging import Inbox, Outbox
from shared.messaging.control import OperationsLog
from shared.projections import SiteDirectory

MIGRATIONS = Path(__file__).parent / "migrations"
metadata = MetaData()
outbox = Outbox(metadata)
inbox = Inbox(metadata)
audit = audit_table(metadata)
record_access = AuditTrail(audit)  # every read or change of a patient record (DESIGN B5)
operations = OperationsLog.declare(metadata)  # `iopnet events reapply`, audited

site_directory = SiteDirectory(metadata)  # projection of SiteRegistered
sites = site_directory.table

enrollments = Table(
    "enrollments",
    metadata,
    Column("enrollment_id", String(36), primary_key=True),
    Column("patient_id", String(36), nullable=False, index=True),
    Column("site_id", String(40), nullable=False, index=True),
    Column("program_id", String(64), nullable=False),
    Column("level_of_care", String(4), nullable=False),
    Column("cohort", String(12), nullable=False),
    Column("start_date", Date, nullable=False),
    Column("weekly_hours_target", Float, nullable=False),
    Column("status", String(12), nullable=False),
    Column("enrolled_event_id", String(36), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("correlation_id", String(36), nullable=True),
    Column("ended_on", Date, nullable=True),
)

# Every discharge or transfer-out heard of, by enrollment: one that arrives before its
# PatientEnrolled (out of order after a consumer restart) is remembered here, so the late
# enrollment opens ended instead of being booked. The first end of an episode wins.
episode_ends = Table(
    "episode_ends",
    metadata,
    Column("enrollment_id", String(36), primary_key=True),
    Column("patient_id", String(36), nullable=False, index=True),
    Column("status", String(12), nullable=False),
    Column("ended_on", Date, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
)

programs = Table(
    "programs",
    metadata,
    Column("program_id", String(64), primary_key=True),
    Column("site_id", String(40), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("track", String(60), nullable=False),
    Column("cohort", String(12), nullable=False),
    Column("level_of_care", String(4), nullable=False),
    Column("weekly_hours_target", Float, nullable=False),
    Column("template", Text, nullable=False),
    Column("published_at", UtcDateTime, nullable=False),
    Column("materialized_until", Date, nullable=True),
)

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", String(36), primary_key=True),
    Column("program_id", String(64), nullable=True, index=True),
    Column("site_id", String(40), nullable=False, index=True),
    Column("kind", String(24), nullable=False),
    Column("title", String(200), nullable=False),
    Column("block_key", String(40), nullable=False),
    Column("local_date", Date, nullable=False),
    Column("starts_at", UtcDateTime, nullable=False, index=True),
    Column("ends_at", UtcDateTime, nullable=False),
    Column("capacity", Integer, nullable=False),
    Column("status", String(12), nullable=False),
    Column("clinician_id", String(200), nullable=True, index=True),
    Column("completed_at", UtcDateTime, nullable=True),
    # Materializing the same template day twice yields the same rows, not copies.
    UniqueConstraint("program_id", "local_date", "block_key", name="uq_session_slot"),
)

bookings = Table(
    "bookings",
    metadata,
    Column("booking_id", String(36), primary_key=True),
    Column("session_id", String(36), nullable=False),
    Column("enrollment_id", String(36), nullable=False, index=True),
    Column("patient_id", String(36), nullable=False, index=True),
    Column("status", String(12), nullable=False),
    Column("position", Integer, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("cancel_reason", String(40), nullable=True),
    UniqueConstraint("session_id", "enrollment_id", name="uq_booking_once"),
    # A session's booked seats are counted, and the last waitlist place found, in the
    # index alone: a long waitlist is never read to book one more enrollment (_SEATS).
    Index("ix_bookings_session_status_position", "session_id", "status", "position"),
)

attendance = Table(
    "attendance",
    metadata,
    Column("session_id", String(36), primary_key=True),
    Column("patient_id", String(36), primary_key=True),
    Column("enrollment_id", String(36), nullable=False, index=True),
    Column("status", String(10), nullable=False),
    Column("minutes", Integer, nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
    Column("recorded_by", String(200), nullable=False),
)

closures = Table(
    "closures",
    metadata,
    Column("site_id", String(40), primary_key=True),
    Column("local_date", Date, primary_key=True),
    Column("reason", String(40), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

hours_alerts = Table(
    "hours_alerts",
    metadata,
    Column("enrollment_id", String(36), primary_key=True),
    Column("iso_week", String(8), primary_key=True),
    Column("kind", String(10), primary_key=True),
    Column("raised_at", UtcDateTime, nullable=False),
)


# --- rows ----------------------------------------------------------------------------
#
# What the reads below return: one TypedDict per row kind, with the columns of the tables
# above (a nullable column is `X | None`). Plain dicts at run time, as before.


class SiteRow(TypedDict):
    """A row of `sites` (shared.projections.SiteDirectory)."""

    site_id: str
    name: str
    timezone: str
    updated_at: datetime


class EnrollmentRow(TypedDict):
    enrollment_id: str
    patient_id: str
    site_id: str
    program_id: str
    level_of_care: str
    cohort: str
    start_date: date
    weekly_hours_target: float
    status: str
    enrolled_event_id: str
    created_at: datetime
    correlation_id: str | None
    ended_on: date | None


class EpisodeEndRow(TypedDict):
    enrollment_id: str
    patient_id: str
    status: str
    ended_on: date
    event_id: str
    recorded_at: datetime


class ProgramRow(TypedDict):
    program_id: str
    site_id: str
    name: str
    track: str
    cohort: str
    level_of_care: str
    weekly_hours_target: float
    template: str  # JSON: the template's blocks
    published_at: datetime
    materialized_until: date | None


class SessionRow(TypedDict):
    session_id: str
    program_id: str | None  # None: a clinician's one-to-one slot
    site_id: str
    kind: str
    title: str
    block_key: str
    local_date: date
    starts_at: datetime
    ends_at: datetime
    capacity: int
    status: str
    clinician_id: str | None
    completed_at: datetime | None


class NewSession(TypedDict):
    """A session as the use cases create it (`add_session`'s values): not a fetched row,
    so no `completed_at`, and a program's group sessions have no `clinician_id`."""

    session_id: str
    program_id: str | None
    site_id: str
    kind: str
    title: str
    block_key: str
    local_date: date
    starts_at: datetime
    ends_at: datetime
    capacity: int
    status: str
    clinician_id: NotRequired[str | None]


class BookingRow(TypedDict):
    booking_id: str
    session_id: str
    enrollment_id: str
    patient_id: str
    status: str
    position: int | None  # set while waitlisted
    created_at: datetime
    updated_at: datetime
    cancel_reason: str | None


class BookingWithSessionRow(BookingRow):
    """A booking joined with columns of its session (`enrollment_bookings`,
    `patient_bookings`)."""

    starts_at: datetime
    ends_at: datetime
    kind: str
    title: str
    program_id: NotRequired[str | None]  # only `enrollment_bookings` selects it
    site_id: str
    session_status: str


class AttendanceRow(TypedDict):
    session_id: str
    patient_id: str
    enrollment_id: str
    status: str
    minutes: int
    recorded_at: datetime
    recorded_by: str


class ClosureRow(TypedDict):
    site_id: str
    local_date: date
    reason: str
    created_at: datetime


class HoursAlertRow(TypedDict):
    enrollment_id: str
    iso_week: str
    kind: str
    raised_at: datetime


_RowT = TypeVar("_RowT")


def _typed(kind: type[_RowT], row: RowMapping) -> _RowT:
    """A fetched row as the TypedDict of its kind: a plain dict of its columns."""
    return cast(_RowT, dict(row))


def _rows(kind: type[_RowT], result: Result[Any]) -> list[_RowT]:
    return [_typed(kind, r) for r in result.mappings()]


async def _one(kind: type[_RowT], session: AsyncSession, query: Any, **parameters: Any) -> _RowT | None:
    row = (await session.execute(query, parameters)).mappings().first()
    return _typed(kind, row) if row else None


# --- sites -------------------------------------------------------------------


upsert_site = site_directory.upsert


async def get_site(session: AsyncSession, site_id: str) -> SiteRow | None:
    return cast(SiteRow | None, await site_directory.get(session, site_id))


async def list_sites(session: AsyncSession, only: list[str] | None) -> list[SiteRow]:
    return cast(list[SiteRow], await site_directory.list(session, only))


# --- enrollments ---------------------------------------------------------------


def _kept_enrollments(session: AsyncSession) -> dict[str, EnrollmentRow | None]:
    """Enrollments a batch read ahead (None: not projected yet), for its transaction."""
    return kept_for_this_transaction(session, "iopnet.enrollments", dict[str, EnrollmentRow | None])


def _kept_ends(session: AsyncSession) -> dict[str, EpisodeEndRow | None]:
    return kept_for_this_transaction(session, "iopnet.episode_ends", dict[str, EpisodeEndRow | None])


_ENROLLMENTS = select(enrollments).where(enrollments.c.enrollment_id.in_(bindparam("ids", expanding=True)))
_ENDS = select(episode_ends).where(episode_ends.c.enrollment_id.in_(bindparam("ids", expanding=True)))


async def read_episodes_ahead(session: AsyncSession, enrollment_ids: Collection[str]) -> None:
    """The enrollments and episode ends of a batch's events in one statement each, kept
    for its transaction (an absent one too): its handlers read none of them again. The
    writers below keep what is kept true."""
    if not enrollment_ids:
        return
    ids = {"ids": in_list(enrollment_ids)}
    found = {row["enrollment_id"]: row for row in _rows(EnrollmentRow, await session.execute(_ENROLLMENTS, ids))}
    ended = {row["enrollment_id"]: row for row in _rows(EpisodeEndRow, await session.execute(_ENDS, ids))}
    kept, kept_ends = _kept_enrollments(session), _kept_ends(session)
    for enrollment_id in enrollment_ids:
        kept[enrollment_id] = found.get(enrollment_id)
        kept_ends[enrollment_id] = ended.get(enrollment_id)


async def get_enrollment(session: AsyncSession, enrollment_id: str) -> EnrollmentRow | None:
    kept = _kept_enrollments(session)
    if enrollment_id in kept:
        return kept[enrollment_id]
    return await _one(EnrollmentRow, session, select_by(enrollments, "enrollment_id"), enrollment_id=enrollment_id)


async def add_enrollment(session: AsyncSession, **values: Any) -> EnrollmentRow:
    """The enrollment as stored (its own INSERT ... RETURNING: no read back)."""
    row = _typed(EnrollmentRow, await insert_row_returning(session, enrollments, created_at=clock.now(), **values))
    _kept_enrollments(session)[row["enrollment_id"]] = row
    return row


async def update_enrollment(session: AsyncSession, enrollment_id: str, **values: Any) -> None:
    _kept_enrollments(session).pop(enrollment_id, None)
    await update_by(session, enrollments, {"enrollment_id": enrollment_id}, **values)


async def remember_end(
    session: AsyncSession, enrollment_id: str, patient_id: str, status: str, ended_on: date, event_id: str
) -> bool:
    """Record an episode's end; False if one was recorded before (the first one stays)."""
    _kept_ends(session).pop(enrollment_id, None)
    return await insert_if_absent(
        session, episode_ends, enrollment_id=enrollment_id, patient_id=patient_id, status=status,
        ended_on=ended_on, event_id=event_id, recorded_at=clock.now(),
    )  # fmt: skip


async def get_end(session: AsyncSession, enrollment_id: str) -> EpisodeEndRow | None:
    kept = _kept_ends(session)
    if enrollment_id in kept:
        return kept[enrollment_id]
    return await _one(EpisodeEndRow, session, select_by(episode_ends, "enrollment_id"), enrollment_id=enrollment_id)


async def active_enrollments(session: AsyncSession, program_id: str) -> list[EnrollmentRow]:
    query = select(enrollments).where(enrollments.c.program_id == program_id, enrollments.c.status == "active")
    return _rows(EnrollmentRow, await session.execute(query))


async def site_enrollments(session: AsyncSession, site_id: str | None = None) -> list[EnrollmentRow]:
    query = select(enrollments).where(enrollments.c.status == "active")
    if site_id is not None:
        query = query.where(enrollments.c.site_id == site_id)
    return _rows(EnrollmentRow, await session.execute(query))


# --- programs ------------------------------------------------------------------


async def add_program(session: AsyncSession, **values: Any) -> None:
    _programs_read(session).pop(values["program_id"], None)
    await session.execute(insert(programs).values(published_at=clock.now(), **values))


async def get_program(session: AsyncSession, program_id: str) -> ProgramRow | None:
    """Read once per transaction: a consumer's batch of enrollments asks for few programs
    (whoever writes one here forgets it)."""
    known = _programs_read(session)
    if program_id not in known:
        known[program_id] = await _one(ProgramRow, session, select_by(programs, "program_id"), program_id=program_id)
    found = known[program_id]
    return cast(ProgramRow, dict(found)) if found is not None else None


def _programs_read(session: AsyncSession) -> dict[str, ProgramRow | None]:
    return kept_for_this_transaction(session, "iopnet.programs", dict[str, ProgramRow | None])


async def list_programs(session: AsyncSession, site_id: str | None = None) -> list[ProgramRow]:
    query = select(programs).order_by(programs.c.site_id, programs.c.name, programs.c.track)
    if site_id is not None:
        query = query.where(programs.c.site_id == site_id)
    return _rows(ProgramRow, await session.execute(query))


async def set_materialized_until(session: AsyncSession, program_id: str, until: date) -> None:
    _programs_read(session).pop(program_id, None)
    await update_by(session, programs, {"program_id": program_id}, materialized_until=until)


# --- sessions ------------------------------------------------------------------


_SESSION_OF_BLOCK = select(sessions.c.session_id).where(
    sessions.c.program_id == bindparam("program_id"),
    sessions.c.local_date == bindparam("local_date"),
    sessions.c.block_key == bindparam("block_key"),
)


async def session_exists(session: AsyncSession, program_id: str, local_date: date, block_key: str) -> bool:
    key = {"program_id": program_id, "local_date": local_date, "block_key": block_key}
    return (await session.execute(_SESSION_OF_BLOCK, key)).first() is not None


async def add_session(session: AsyncSession, **values: Any) -> None:
    await insert_row(session, sessions, **values)


_SESSION_LOCKED = select_by(sessions, "session_id").with_for_update()


async def get_session(session: AsyncSession, session_id: str, *, lock: bool = False) -> SessionRow | None:
    # Locked, it serializes bookings of one session across requests and replicas (PostgreSQL).
    query = _SESSION_LOCKED if lock else select_by(sessions, "session_id")
    return await _one(SessionRow, session, query, session_id=session_id)


async def update_session(session: AsyncSession, session_id: str, **values: Any) -> None:
    await update_by(session, sessions, {"session_id": session_id}, **values)


async def sessions_between(
    session: AsyncSession,
    *,
    site_id: str | None = None,
    program_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    status: str | None = None,
    local_date: date | None = None,
) -> list[SessionRow]:
    query = select(sessions).order_by(sessions.c.starts_at)
    for column, value in (
        (sessions.c.site_id, site_id),
        (sessions.c.program_id, program_id),
        (sessions.c.status, status),
        (sessions.c.local_date, local_date),
    ):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(sessions.c.starts_at >= since)
    if until is not None:
        query = query.where(sessions.c.starts_at < until)
    return _rows(SessionRow, await session.execute(query))


async def lock_clinician(session: AsyncSession, clinician_id: str) -> None:
    """Serialize slot creation per clinician for the rest of the transaction. PostgreSQL:
    a transaction-scoped advisory lock; SQLite already serializes writers."""
    if dialect_name(session) == "postgresql":
        await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"clinician:{clinician_id}"))))


async def clinician_overlaps(session: AsyncSession, clinician_id: str, starts: datetime, ends: datetime) -> bool:
    query = select(sessions.c.session_id).where(
        sessions.c.clinician_id == clinician_id,
        sessions.c.status != "cancelled",
        sessions.c.starts_at < ends,
        sessions.c.ends_at > starts,
    )
    return (await session.execute(query)).first() is not None


# --- bookings ------------------------------------------------------------------


_SESSIONS_LOCKED = (
    select(sessions)
    .where(sessions.c.session_id.in_(bindparam("session_ids", expanding=True)))
    .order_by(sessions.c.session_id)
    .with_for_update()
)


_OPEN_SESSIONS_LOCKED = (
    select(sessions)
    .where(
        sessions.c.program_id == bindparam("program_id"),
        sessions.c.status == "scheduled",
        sessions.c.kind.in_(bindparam("kinds", expanding=True)),
        sessions.c.starts_at >= bindparam("since"),
    )
    .order_by(sessions.c.session_id)
    .with_for_update()
)


async def lock_open_sessions(
    session: AsyncSession, program_id: str, kinds: Collection[str], since: datetime
) -> list[SessionRow]:
    """A program's scheduled sessions of these kinds from `since` on, found and locked in
    one statement (in id order, as `lock_sessions`), in time order. PostgreSQL checks the
    conditions again on a row it waited for, so a session cancelled meanwhile is not among them."""
    parameters = {"program_id": program_id, "kinds": sorted(kinds), "since": since}
    rows = _rows(SessionRow, await session.execute(_OPEN_SESSIONS_LOCKED, parameters))
    return sorted(rows, key=lambda row: row["starts_at"])


async def lock_sessions(session: AsyncSession, session_ids: list[str]) -> dict[str, SessionRow]:
    """Several sessions at once, locked as `get_session(lock=True)` locks one (in id
    order, so two bookers of overlapping sets never deadlock)."""
    rows = _rows(SessionRow, await session.execute(_SESSIONS_LOCKED, {"session_ids": session_ids}))
    return {row["session_id"]: row for row in rows}


_BOOKINGS_OF = select(bookings).where(
    bookings.c.enrollment_id == bindparam("enrollment_id"),
    bookings.c.session_id.in_(bindparam("session_ids", expanding=True)),
)


async def bookings_of(session: AsyncSession, enrollment_id: str, session_ids: list[str]) -> dict[str, BookingRow]:
    """An enrollment's booking (any status) in each of these sessions, by session id."""
    found = await session.execute(_BOOKINGS_OF, {"enrollment_id": enrollment_id, "session_ids": session_ids})
    return {row["session_id"]: row for row in _rows(BookingRow, found)}


_LAST_IN_LINE = (
    select(bookings.c.session_id, func.max(bookings.c.position))
    .where(bookings.c.session_id.in_(bindparam("session_ids", expanding=True)), bookings.c.status == "waitlisted")
    .group_by(bookings.c.session_id)
)


def _of_this_session(status: str) -> ColumnElement[bool]:
    return and_(bookings.c.session_id == sessions.c.session_id, bookings.c.status == status)


# Both an enrollment's placement needs, per session, each from its own short range of
# ix_bookings_session_status_position: the booked seats (at most the capacity) and the
# waitlist's last place (one entry). Grouping the sessions' bookings read every waitlisted
# one: under `iopnet bench --postgres` the statement took more of the server's CPU than
# any other (issue 10).
_SEATS = select(
    sessions.c.session_id,
    select(func.count()).where(_of_this_session("booked")).scalar_subquery(),
    select(func.max(bookings.c.position)).where(_of_this_session("waitlisted")).scalar_subquery(),
).where(sessions.c.session_id.in_(bindparam("session_ids", expanding=True)))


class Seats(NamedTuple):
    booked: int
    last_in_line: int | None  # the last waitlist position taken, if any


async def seats(session: AsyncSession, session_ids: list[str]) -> dict[str, Seats]:
    """Each session's booked seats and the last place taken in its waitlist (None when it
    has none)."""
    found = await session.execute(_SEATS, {"session_ids": session_ids})
    return {
        str(session_id): Seats(int(booked), None if last is None else int(last)) for session_id, booked, last in found
    }


async def last_in_line(session: AsyncSession, session_ids: list[str]) -> dict[str, int]:
    """The last waitlist position taken in each of these sessions that has a waitlist."""
    found = await session.execute(_LAST_IN_LINE, {"session_ids": session_ids})
    return {str(session_id): int(last) for session_id, last in found.all() if last is not None}


async def get_booking(session: AsyncSession, session_id: str, enrollment_id: str) -> BookingRow | None:
    query = select_by(bookings, "session_id", "enrollment_id")
    return await _one(BookingRow, session, query, session_id=session_id, enrollment_id=enrollment_id)


async def session_bookings(session: AsyncSession, session_id: str, status: str | None = None) -> list[BookingRow]:
    query = (
        select(bookings).where(bookings.c.session_id == session_id).order_by(bookings.c.position, bookings.c.created_at)
    )
    if status is not None:
        query = query.where(bookings.c.status == status)
    return _rows(BookingRow, await session.execute(query))


async def count_booked(session: AsyncSession, session_id: str) -> int:
    query = select(func.count()).where(bookings.c.session_id == session_id, bookings.c.status == "booked")
    return int((await session.execute(query)).scalar_one())


async def add_bookings(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """New bookings in one multi-row INSERT."""
    stamp = clock.now()
    await insert_rows(session, bookings, [{**row, "created_at": stamp, "updated_at": stamp} for row in rows])


async def update_booking(session: AsyncSession, booking_id: str, **values: Any) -> None:
    await update_by(session, bookings, {"booking_id": booking_id}, updated_at=clock.now(), **values)


async def enrollment_bookings(
    session: AsyncSession, enrollment_id: str, *, since: datetime | None = None, active_only: bool = True
) -> list[BookingWithSessionRow]:
    """An enrollment's bookings joined with their sessions, in time order."""
    query = (
        select(bookings, sessions.c.starts_at, sessions.c.ends_at, sessions.c.kind, sessions.c.title,
               sessions.c.program_id, sessions.c.site_id, sessions.c.status.label("session_status"))
        .join(sessions, sessions.c.session_id == bookings.c.session_id)
        .where(bookings.c.enrollment_id == enrollment_id)
        .order_by(sessions.c.starts_at)
    )  # fmt: skip
    if active_only:
        query = query.where(bookings.c.status != "cancelled")
    if since is not None:
        query = query.where(sessions.c.starts_at >= since)
    return _rows(BookingWithSessionRow, await session.execute(query))


async def patient_bookings(session: AsyncSession, patient_id: str) -> list[BookingWithSessionRow]:
    query = (
        select(bookings, sessions.c.starts_at, sessions.c.ends_at, sessions.c.kind, sessions.c.title,
               sessions.c.site_id, sessions.c.status.label("session_status"))
        .join(sessions, sessions.c.session_id == bookings.c.session_id)
        .where(bookings.c.patient_id == patient_id)
        .order_by(sessions.c.starts_at)
    )  # fmt: skip
    return _rows(BookingWithSessionRow, await session.execute(query))


async def patient_sites(session: AsyncSession, patient_id: str) -> set[str]:
    """Every site holding scheduling data of the patient: an enrollment or a booking."""
    enrolled = select(enrollments.c.site_id).where(enrollments.c.patient_id == patient_id)
    booked = (
        select(sessions.c.site_id)
        .join(bookings, bookings.c.session_id == sessions.c.session_id)
        .where(bookings.c.patient_id == patient_id)
    )
    return {row.site_id for row in await session.execute(union(enrolled, booked))}


# --- attendance ----------------------------------------------------------------


async def get_attendance(session: AsyncSession, session_id: str) -> list[AttendanceRow]:
    return _rows(AttendanceRow, await session.execute(select(attendance).where(attendance.c.session_id == session_id)))


async def upsert_attendance(session: AsyncSession, session_id: str, patient_id: str, **values: Any) -> None:
    found = await session.execute(
        update(attendance)
        .where(attendance.c.session_id == session_id, attendance.c.patient_id == patient_id)
        .values(**values)
    )
    if rows_changed(found) == 0:
        await session.execute(insert(attendance).values(session_id=session_id, patient_id=patient_id, **values))


async def recorded_sessions(session: AsyncSession, enrollment_id: str, since: datetime, until: datetime) -> set[str]:
    query = (
        select(attendance.c.session_id)
        .join(sessions, sessions.c.session_id == attendance.c.session_id)
        .where(attendance.c.enrollment_id == enrollment_id, sessions.c.starts_at >= since, sessions.c.starts_at < until)
    )
    return {r.session_id for r in await session.execute(query)}


async def attendance_between(
    session: AsyncSession, enrollment_id: str, since: datetime, until: datetime
) -> list[tuple[str, int]]:
    query = (
        select(attendance.c.status, attendance.c.minutes)
        .join(sessions, sessions.c.session_id == attendance.c.session_id)
        .where(
            and_(
                attendance.c.enrollment_id == enrollment_id, sessions.c.starts_at >= since, sessions.c.starts_at < until
            )
        )
    )
    return [(r.status, r.minutes) for r in await session.execute(query)]


# --- closures and hours alerts -----------------------------------------------------


async def add_closure(session: AsyncSession, site_id: str, local_date: date, reason: str) -> bool:
    found = await _one(
        ClosureRow, session, select(closures).where(closures.c.site_id == site_id, closures.c.local_date == local_date)
    )
    if found:
        return False
    await session.execute(
        insert(closures).values(site_id=site_id, local_date=local_date, reason=reason, created_at=clock.now())
    )
    return True


async def closed_dates(session: AsyncSession, site_id: str) -> set[date]:
    return {
        r.local_date for r in await session.execute(select(closures.c.local_date).where(closures.c.site_id == site_id))
    }


async def claim_hours_alert(session: AsyncSession, enrollment_id: str, iso_week: str, kind: str) -> bool:
    """True the first time (enrollment, week, kind) is raised; False ever after."""
    return await insert_if_absent(
        session, hours_alerts, enrollment_id=enrollment_id, iso_week=iso_week, kind=kind, raised_at=clock.now()
    )


async def hours_alerts_for(session: AsyncSession, enrollment_id: str) -> list[HoursAlertRow]:
    return _rows(
        HoursAlertRow, await session.execute(select(hours_alerts).where(hours_alerts.c.enrollment_id == enrollment_id))
    )
