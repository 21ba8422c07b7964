"""What scheduling does, each in the caller's transaction: publish a program and
materialize its sessions, book and cancel with waitlist backfill, close a site day,
record attendance, complete a session, review treatment hours, switch track.

Both entrypoints call these: api.py for commands, handlers.py for events. Every event
goes through the outbox in the same transaction as the change that caused it.
`now`/`today` are parameters so the rules can be exercised at any instant. A broken
rule raises `DomainError`; shared.errors maps its kind to the API's answer.
"""

import json
from datetime import date, datetime, timedelta
from typing import Any, NamedTuple, TypedDict, cast
from uuid import UUID, uuid4

from sqlalchemy.ext.asyncio import AsyncSession

from services.scheduling import domain, store
from services.scheduling.store import (
    BookingRow,
    EnrollmentRow,
    EpisodeEndRow,
    NewSession,
    ProgramRow,
    SessionRow,
    SiteRow,
)
from shared.contracts import Envelope
from shared.contracts.events import (
    AttendanceRecorded,
    BookingCancelled,
    Event,
    HoursAtRisk,
    PatientBooked,
    PatientEnrolled,
    PatientWaitlisted,
    ProgramPublished,
    SessionCancelled,
    SessionCompleted,
    SessionKind,
    SessionScheduled,
    TemplateBlock,
    WeeklyHoursShortfall,
)
from shared.domain_errors import DomainError
from shared.messaging import named_ids
from shared.messaging.outbox import Chain


def _episode(enrollment: EnrollmentRow) -> Chain | None:
    """An episode's events continue the chain of its PatientEnrolled, when the row
    knows it."""
    correlation_id = enrollment.get("correlation_id")
    if not correlation_id:
        return None
    return Chain(UUID(correlation_id), UUID(enrollment["enrolled_event_id"]))


# --- programs and sessions -------------------------------------------------------------


def _block(raw: dict[str, Any]) -> domain.Block:
    return domain.Block(
        weekday=raw["weekday"],
        start=domain.parse_start(raw["start"]),
        minutes=raw["minutes"],
        kind=raw["kind"],
        title=raw["title"],
        capacity=raw["capacity"],
        topics=tuple(raw.get("topics") or ()),
    )


def blocks_of(program: ProgramRow) -> list[domain.Block]:
    return [_block(raw) for raw in json.loads(program["template"])]


async def publish_program(session: AsyncSession, site: SiteRow, spec: dict[str, Any], today: date) -> ProgramRow:
    blocks = [_block(raw) for raw in spec["blocks"]]
    domain.validate_template(blocks)
    program = {
        "program_id": str(uuid4()),
        "site_id": site["site_id"],
        "name": spec["name"],
        "track": spec["track"],
        "cohort": spec["cohort"],
        "level_of_care": spec["level_of_care"],
        "weekly_hours_target": spec["weekly_hours_target"] or domain.weekly_hours_target(spec["cohort"]),
        "template": json.dumps(spec["blocks"]),
    }
    await store.add_program(session, **program)
    event = ProgramPublished(
        program_id=program["program_id"],
        name=program["name"],
        level_of_care=program["level_of_care"],
        cohort=program["cohort"],
        weekly_hours_target=program["weekly_hours_target"],
        template=[TemplateBlock(**{k: b[k] for k in TemplateBlock.model_fields}) for b in spec["blocks"]],
    )
    await store.outbox.emit(session, event, site["site_id"])
    stored = await store.get_program(session, program["program_id"])
    assert stored is not None
    await materialize(session, stored, site, today + timedelta(days=domain.HORIZON_DAYS), today)
    return stored


async def materialize(session: AsyncSession, program: ProgramRow, site: SiteRow, until: date, today: date) -> int:
    """Create the program's sessions for site-local days up to `until` (idempotent), and
    book the program's active enrollments into the new group sessions."""
    first = max(today, (program["materialized_until"] or today - timedelta(days=1)) + timedelta(days=1))
    if first > until:
        return 0
    closed = await store.closed_dates(session, site["site_id"])
    created: list[NewSession] = []
    for occurrence in domain.expand(blocks_of(program), site["timezone"], first, until):
        if occurrence.local_date in closed:
            continue
        if await store.session_exists(session, program["program_id"], occurrence.local_date, occurrence.block.key):
            continue
        row: NewSession = {
            "session_id": str(uuid4()),
            "program_id": program["program_id"],
            "site_id": site["site_id"],
            "kind": occurrence.block.kind,
            "title": occurrence.block.title_for(occurrence.local_date),
            "block_key": occurrence.block.key,
            "local_date": occurrence.local_date,
            "starts_at": occurrence.starts_at,
            "ends_at": occurrence.ends_at,
            "capacity": occurrence.block.capacity,
            "status": "scheduled",
        }
        await store.add_session(session, **row)
        await store.outbox.emit(session, _session_event(SessionScheduled, row), site["site_id"])
        created.append(row)
    await store.set_materialized_until(session, program["program_id"], until)
    for enrollment in await store.active_enrollments(session, program["program_id"]):
        for row in created:
            if _bookable_for(row, enrollment, site):
                await book(session, row["session_id"], enrollment, None)
    return len(created)


# One fixed title: a free-text title of a one-to-one session could name the patient on the bus.
INDIVIDUAL_TITLE = "Individual session"


class SlotTimes(TypedDict):
    local_date: date  # site-local
    starts_at: datetime
    ends_at: datetime


async def open_slot(
    session: AsyncSession, site: SiteRow, clinician_id: str, times: SlotTimes, now: datetime
) -> NewSession:
    """Open a one-to-one session (`times`: local_date, starts_at, ends_at) in a
    clinician's calendar, unless it overlaps another of theirs. Returns the session."""
    if times["starts_at"] <= now:
        raise DomainError("invalid", "a slot must be in the future", fields={"starts_local": "in the past"})
    await store.lock_clinician(session, clinician_id)
    if await store.clinician_overlaps(session, clinician_id, times["starts_at"], times["ends_at"]):
        raise DomainError("conflict", "the clinician already has a session at that time")
    slot: NewSession = {
        **times, "session_id": str(uuid4()), "program_id": None, "site_id": site["site_id"],
        "kind": "individual_therapy", "title": INDIVIDUAL_TITLE, "block_key": f"slot-{uuid4().hex[:12]}",
        "capacity": 1, "status": "scheduled", "clinician_id": clinician_id,
    }  # fmt: skip
    await store.add_session(session, **slot)
    await store.outbox.emit(session, _session_event(SessionScheduled, slot), site["site_id"])
    return slot


def _session_event(kind: type[SessionScheduled] | type[SessionCancelled], row: NewSession | SessionRow) -> Event:
    return kind(
        session_id=UUID(row["session_id"]),
        program_id=row["program_id"] or "",
        kind=cast(SessionKind, row["kind"]),  # a String column; only SessionKind values are ever stored
        title=row["title"],
        starts_at=row["starts_at"],
        ends_at=row["ends_at"],
        capacity=row["capacity"],
    )


def _bookable_for(row: NewSession | SessionRow, enrollment: EnrollmentRow, site: SiteRow) -> bool:
    return (
        row["kind"] in domain.GROUP_KINDS
        and row["status"] == "scheduled"
        and domain.site_today(row["starts_at"], site["timezone"]) >= enrollment["start_date"]
    )


async def extend_horizons(session: AsyncSession, now: datetime) -> int:
    """The daily job: keep every program materialized HORIZON_DAYS ahead of today."""
    created = 0
    for program in await store.list_programs(session):
        site = await store.get_site(session, program["site_id"])
        if site is None:
            continue
        today = domain.site_today(now, site["timezone"])
        created += await materialize(session, program, site, today + timedelta(days=domain.HORIZON_DAYS), today)
    return created


# --- episodes: intake's lifecycle events ------------------------------------------------
#
# State-based, so that order and repetition do not matter: each event records what it
# says (an enrollment, an end) and then the episode's bookings converge on its status.
# A redelivery, a re-published copy or an operator's reapply changes only what is
# missing; a discharge that arrives before its enrollment still ends the episode.


async def read_batch_ahead(session: AsyncSession, envelopes: list[Envelope]) -> None:
    """A batch's enrollments and episode ends read in one statement each before any of
    its events is applied (the consumer's `read_ahead`): a wave of enrollments read two
    rows per event before."""
    await store.read_episodes_ahead(session, named_ids(envelopes, "enrollment_id"))


async def open_enrollment(session: AsyncSession, cause: Envelope, event: PatientEnrolled, now: datetime) -> str:
    """Project an enrollment (ended already if its end arrived first) and converge its
    bookings. Returns the episode's status."""
    enrollment_id = str(event.enrollment_id)
    enrollment = await store.get_enrollment(session, enrollment_id)
    projected = enrollment is None
    if enrollment is None:
        enrollment = await _add_enrollment(session, cause, event)
    await converge_bookings(session, enrollment, cause, now, projected_now=projected)
    return str(enrollment["status"])


async def _add_enrollment(session: AsyncSession, cause: Envelope, event: PatientEnrolled) -> EnrollmentRow:
    end = _end_of(await store.get_end(session, str(event.enrollment_id)))
    program = await store.get_program(session, event.program_id)
    target = program["weekly_hours_target"] if program else domain.weekly_hours_target(event.cohort)
    return await store.add_enrollment(
        session,
        enrollment_id=str(event.enrollment_id),
        patient_id=str(event.patient_id),
        site_id=cause.site_id,
        program_id=event.program_id,
        level_of_care=event.level_of_care,
        cohort=event.cohort,
        start_date=event.start_date,
        weekly_hours_target=target,
        status=domain.opening_status(end),
        ended_on=end.ended_on if end else None,
        enrolled_event_id=str(cause.event_id),
        correlation_id=str(cause.correlation_id),
    )


def _end_of(row: EpisodeEndRow | None) -> domain.EpisodeEnd | None:
    # `status` was written by remember_end from an EpisodeEnd: one of its statuses.
    return domain.EpisodeEnd(cast(domain.EndStatus, row["status"]), row["ended_on"]) if row else None


async def end_enrollment(
    session: AsyncSession, cause: Envelope, enrollment_id: str, patient_id: str, end: domain.EpisodeEnd, now: datetime
) -> str | None:
    """A discharge or transfer-out: remembered whether or not the enrollment is known
    yet; a known active episode ends and gives up its future places (backfilled).
    Returns the episode's status, None while its enrollment has not arrived."""
    await store.remember_end(session, enrollment_id, patient_id, end.status, end.ended_on, str(cause.event_id))
    enrollment = await store.get_enrollment(session, enrollment_id)
    if enrollment is None:
        return None  # the late PatientEnrolled finds the end and opens ended
    status = domain.status_after_end(enrollment["status"], end)
    if status != enrollment["status"]:
        await store.update_enrollment(session, enrollment_id, status=status, ended_on=end.ended_on)
    await converge_bookings(session, {**enrollment, "status": status}, cause, now)
    return status


async def converge_bookings(
    session: AsyncSession,
    enrollment: EnrollmentRow,
    cause: Envelope | None,
    now: datetime,
    *,
    projected_now: bool = False,
) -> int:
    """An active episode is booked into every future group session of its program; an
    ended one holds no future booking or waitlist place. What already holds is left
    alone (no event), so applying this again is harmless. `projected_now`: the enrollment
    was projected in this transaction, so it holds no booking yet (none is read)."""
    if domain.holds_places(enrollment["status"]):
        return await book_enrollment(session, enrollment, cause, now, projected_now=projected_now)
    return await cancel_future_bookings(session, enrollment["enrollment_id"], now, enrollment["status"], cause)


# --- bookings ------------------------------------------------------------------------


async def book_by_staff(session: AsyncSession, target: SessionRow, enrollment: EnrollmentRow, now: datetime) -> str:
    """Staff book an enrollment into a session of its site that has not started: a
    group session waitlists when full, an individual one refuses. Returns the status."""
    if enrollment["site_id"] != target["site_id"] or enrollment["status"] != "active":
        raise DomainError(
            "invalid", "the enrollment is not active at this session's site", fields={"enrollment_id": "wrong site"}
        )
    if target["starts_at"] <= now:
        raise DomainError("invalid", "the session has started", fields={"session_id": "in the past"})
    individual = target["kind"] == "individual_therapy"
    return await book(session, str(target["session_id"]), enrollment, None, waitlist=not individual)


async def book(
    session: AsyncSession, session_id: str, enrollment: EnrollmentRow, cause: Envelope | None, *, waitlist: bool = True
) -> str:
    """Book an enrollment into a session, or waitlist it when full. Returns the status."""
    target = await store.get_session(session, session_id, lock=True)
    existing = await store.get_booking(session, session_id, enrollment["enrollment_id"])
    booked = await store.count_booked(session, session_id)
    return await _book_locked(session, target, existing, booked, enrollment, cause, waitlist=waitlist)


class _Placement(NamedTuple):
    """What booking an enrollment into a locked session does: the status it holds, its
    waitlist position, and whether that is a change (False: it already held a place)."""

    status: str
    position: int | None
    changed: bool


def _placement(
    target: SessionRow | None, existing: BookingRow | None, booked: int, last_in_line: int | None, *, waitlist: bool
) -> _Placement:
    if target is None or target["status"] != "scheduled":
        raise DomainError("conflict", "the session is not open for booking")
    if existing is not None and existing["status"] != "cancelled":
        return _Placement(str(existing["status"]), existing["position"], changed=False)
    status = domain.booking_decision(booked, target["capacity"])
    if status == "waitlisted" and not waitlist:
        raise DomainError("conflict", "the session is full")
    # A waitlisted booking has its position: booking sets it, only booking or cancelling clears it.
    position = (
        domain.waitlist_position([] if last_in_line is None else [last_in_line]) if status == "waitlisted" else None
    )
    return _Placement(status, position, changed=True)


def _placement_event(placement: _Placement, booking_id: str, target: SessionRow, enrollment: EnrollmentRow) -> Event:
    patient_id = UUID(enrollment["patient_id"])
    if placement.status == "booked":
        return PatientBooked(
            booking_id=UUID(booking_id),
            session_id=UUID(target["session_id"]),
            patient_id=patient_id,
            starts_at=target["starts_at"],
            reason=None,
        )
    assert placement.position is not None
    return PatientWaitlisted(session_id=UUID(target["session_id"]), patient_id=patient_id, position=placement.position)


async def book_enrollment(
    session: AsyncSession,
    enrollment: EnrollmentRow,
    cause: Envelope | None,
    now: datetime,
    *,
    projected_now: bool = False,
) -> int:
    """Book an enrollment into every future group session of its program. Set-based
    (issue 10: the enrollment wave's fan-out): the sessions are found and locked in one
    query, and their seats, waitlists and this enrollment's bookings read in two more
    for all of them (one when it was `projected_now`: it has none); the new bookings and
    their events are written in one multi-row INSERT each. Reading each full session's
    waitlist per enrollment made a wave quadratic."""
    site = await store.get_site(session, enrollment["site_id"])
    if site is None:
        return 0
    open_sessions = await store.lock_open_sessions(session, enrollment["program_id"], domain.GROUP_KINDS, now)
    locked = {row["session_id"]: row for row in open_sessions if _bookable_for(row, enrollment, site)}
    candidates = list(locked)
    if not candidates:
        return 0
    existing = {} if projected_now else await store.bookings_of(session, enrollment["enrollment_id"], candidates)
    taken = await store.seats(session, candidates)
    new_bookings: list[dict[str, Any]] = []
    events: list[Event] = []
    for session_id in candidates:
        target, held = locked.get(session_id), existing.get(session_id)
        seats = taken.get(session_id, store.Seats(0, None))
        placement = _placement(target, held, seats.booked, seats.last_in_line, waitlist=True)
        if not placement.changed:
            continue
        assert target is not None  # _placement refuses a session that is gone
        booking_id = held["booking_id"] if held else str(uuid4())
        if held:
            await store.update_booking(
                session, booking_id, status=placement.status, position=placement.position, cancel_reason=None
            )
        else:
            new_bookings.append({
                "booking_id": booking_id, "session_id": session_id, "enrollment_id": enrollment["enrollment_id"],
                "patient_id": enrollment["patient_id"], "status": placement.status, "position": placement.position,
            })  # fmt: skip
        events.append(_placement_event(placement, booking_id, target, enrollment))
    await store.add_bookings(session, new_bookings)
    await store.outbox.emit_all(session, events, site["site_id"], cause=cause)
    return len(candidates)


async def _book_locked(
    session: AsyncSession,
    target: SessionRow | None,
    existing: BookingRow | None,
    booked: int,
    enrollment: EnrollmentRow,
    cause: Envelope | None,
    *,
    waitlist: bool = True,
) -> str:
    """`book` once the session is locked and its booked seats and this enrollment's
    booking there are known."""
    last_in_line = None
    if target is not None and booked >= target["capacity"]:
        last_in_line = (await store.last_in_line(session, [target["session_id"]])).get(target["session_id"])
    placement = _placement(target, existing, booked, last_in_line, waitlist=waitlist)
    if not placement.changed:
        return placement.status
    assert target is not None
    booking_id = existing["booking_id"] if existing else str(uuid4())
    if existing:
        await store.update_booking(
            session, booking_id, status=placement.status, position=placement.position, cancel_reason=None
        )
    else:
        await store.add_bookings(session, [{
            "booking_id": booking_id, "session_id": target["session_id"], "enrollment_id": enrollment["enrollment_id"],
            "patient_id": enrollment["patient_id"], "status": placement.status, "position": placement.position,
        }])  # fmt: skip
    event = _placement_event(placement, booking_id, target, enrollment)
    await store.outbox.emit(session, event, target["site_id"], cause=cause)
    return placement.status


async def cancel_booking(
    session: AsyncSession, booking: BookingRow, reason: str, cause: Envelope | None, *, backfill: bool = True
) -> None:
    """Cancel one booking (or waitlist place); a freed seat goes to the first in line."""
    was_booked = booking["status"] == "booked"
    await store.update_booking(session, booking["booking_id"], status="cancelled", position=None, cancel_reason=reason)
    target = await store.get_session(session, booking["session_id"], lock=True)
    assert target is not None
    if not was_booked:
        return
    event = BookingCancelled(
        booking_id=UUID(booking["booking_id"]),
        session_id=UUID(booking["session_id"]),
        patient_id=UUID(booking["patient_id"]),
        starts_at=target["starts_at"],
        reason=reason,
    )
    await store.outbox.emit(session, event, target["site_id"], cause=cause)
    if backfill and target["status"] == "scheduled":
        await _backfill(session, target, cause)


async def _backfill(session: AsyncSession, target: SessionRow, cause: Envelope | None) -> None:
    if await store.count_booked(session, target["session_id"]) >= target["capacity"]:
        return
    waiting = await store.session_bookings(session, target["session_id"], "waitlisted")
    if not waiting:
        return
    first = waiting[0]  # ordered by position: first come, first served
    await store.update_booking(session, first["booking_id"], status="booked", position=None)
    event = PatientBooked(
        booking_id=UUID(first["booking_id"]),
        session_id=UUID(target["session_id"]),
        patient_id=UUID(first["patient_id"]),
        starts_at=target["starts_at"],
        reason="waitlist",
    )
    await store.outbox.emit(session, event, target["site_id"], cause=cause)


async def cancel_future_bookings(
    session: AsyncSession, enrollment_id: str, since: datetime, reason: str, cause: Envelope | None
) -> int:
    future = await store.enrollment_bookings(session, enrollment_id, since=since)
    for booking in future:
        await cancel_booking(session, booking, reason, cause)
    return len(future)


async def close_site_day(session: AsyncSession, site: SiteRow, local_date: date, reason: str) -> int:
    """A holiday or closure: cancel that day's sessions and every booking in them."""
    if not await store.add_closure(session, site["site_id"], local_date, reason):
        raise DomainError("conflict", f"{local_date} is already closed")
    cancelled = 0
    for row in await store.sessions_between(
        session, site_id=site["site_id"], local_date=local_date, status="scheduled"
    ):
        await store.update_session(session, row["session_id"], status="cancelled")
        await store.outbox.emit(session, _session_event(SessionCancelled, row), site["site_id"])
        for booking in await store.session_bookings(session, row["session_id"]):
            if booking["status"] != "cancelled":
                await cancel_booking(session, booking, "site_closed", None, backfill=False)
        cancelled += 1
    return cancelled


async def switch_track(session: AsyncSession, enrollment: EnrollmentRow, program: ProgramRow, now: datetime) -> int:
    """Move an enrollment to another track of its site: future bookings move, past
    attendance (and so the week's hours) stays with the enrollment."""
    if enrollment["status"] != "active":
        raise DomainError("conflict", "only an active enrollment can switch track")
    if program["site_id"] != enrollment["site_id"]:
        raise DomainError("invalid", "a track switch stays within the site; use a transfer", "program_id")
    if program["cohort"] != enrollment["cohort"]:
        raise DomainError("invalid", "that track serves another cohort", "program_id")
    if program["program_id"] == enrollment["program_id"]:
        raise DomainError("conflict", "the enrollment is already on that track")
    await cancel_future_bookings(session, enrollment["enrollment_id"], now, "track_switch", None)
    await store.update_enrollment(session, enrollment["enrollment_id"], program_id=program["program_id"])
    moved: EnrollmentRow = {**enrollment, "program_id": program["program_id"]}
    return await book_enrollment(session, moved, None, now)


# --- attendance -----------------------------------------------------------------------


async def record_attendance(
    session: AsyncSession, target: SessionRow, records: list[dict[str, Any]], recorded_by: str, now: datetime
) -> int:
    if target["status"] == "cancelled":
        raise DomainError("conflict", "the session was cancelled")
    if target["status"] == "completed":
        raise DomainError("conflict", "the session is completed; attendance is closed")
    if target["starts_at"] > now:
        raise DomainError("invalid", "attendance cannot be recorded before the session starts")
    booked = {b["patient_id"]: b for b in await store.session_bookings(session, target["session_id"], "booked")}
    session_minutes = int((target["ends_at"] - target["starts_at"]).total_seconds() // 60)
    for index, record in enumerate(records):
        if record["patient_id"] not in booked:
            raise DomainError("invalid", "the patient is not booked into this session", f"records.{index}.patient_id")
        if record["minutes"] > session_minutes:
            raise DomainError("invalid", f"minutes exceed the session's {session_minutes}", f"records.{index}.minutes")
    for record in records:
        minutes = record["minutes"] if record["status"] in domain.COUNTED_STATUSES else 0
        await store.upsert_attendance(
            session,
            target["session_id"],
            record["patient_id"],
            enrollment_id=booked[record["patient_id"]]["enrollment_id"],
            status=record["status"],
            minutes=minutes,
            recorded_at=now,
            recorded_by=recorded_by,
        )
        event = AttendanceRecorded(
            session_id=UUID(target["session_id"]),
            patient_id=UUID(record["patient_id"]),
            status=record["status"],
            minutes=minutes,
        )
        await store.outbox.emit(session, event, target["site_id"])
    return len(records)


async def complete_session(session: AsyncSession, target: SessionRow, now: datetime) -> dict[str, int]:
    if target["status"] == "completed":
        raise DomainError("conflict", "the session is already completed")
    if target["status"] == "cancelled":
        raise DomainError("conflict", "a cancelled session cannot be completed")
    if target["starts_at"] > now:
        raise DomainError("invalid", "a session cannot be completed before it starts")
    records = await store.get_attendance(session, target["session_id"])
    present = sum(1 for r in records if r["status"] in domain.COUNTED_STATUSES)
    absent = sum(1 for r in records if r["status"] == "absent")
    await store.update_session(session, target["session_id"], status="completed", completed_at=now)
    event = SessionCompleted(
        session_id=UUID(target["session_id"]),
        kind=cast(SessionKind, target["kind"]),
        started_at=target["starts_at"],
        ended_at=target["ends_at"],
        present_count=present,
        absent_count=absent,
    )
    await store.outbox.emit(session, event, target["site_id"])
    return {"present_count": present, "absent_count": absent}


# --- treatment hours ---------------------------------------------------------------------


async def week_hours(
    session: AsyncSession, enrollment: EnrollmentRow, timezone: str, iso_week: str, now: datetime
) -> domain.WeekHours:
    start, end = domain.week_bounds(iso_week, timezone)
    attended = domain.attended_hours(await store.attendance_between(session, enrollment["enrollment_id"], start, end))
    recorded = await store.recorded_sessions(session, enrollment["enrollment_id"], start, end)
    remaining = 0.0
    # Still possible: every booked session of the week not yet completed and without a
    # record for this patient — including one that has started or ended but whose
    # attendance is not entered yet (else a late entry would look like a lost hour).
    for booking in await store.enrollment_bookings(session, enrollment["enrollment_id"], since=start):
        if (
            booking["status"] == "booked"
            and booking["session_status"] == "scheduled"
            and booking["starts_at"] < end
            and booking["session_id"] not in recorded
        ):
            remaining += (booking["ends_at"] - booking["starts_at"]).total_seconds() / 3600
    target = await _week_target(session, enrollment, timezone, iso_week)
    return domain.WeekHours(iso_week, attended, round(remaining, 2), target)


async def _week_target(session: AsyncSession, enrollment: EnrollmentRow, timezone: str, iso_week: str) -> float:
    """The weekly target, prorated in the week the enrollment starts by the share of the
    program's template hours still ahead of its start day."""
    target = float(enrollment["weekly_hours_target"])
    start, _ = domain.week_bounds(iso_week, timezone)
    monday = domain.site_today(start, timezone)
    if not monday < enrollment["start_date"] < monday + timedelta(days=7):
        return target
    program = await store.get_program(session, enrollment["program_id"])
    if program is None:
        return target
    blocks = [b for b in blocks_of(program) if b.kind in domain.GROUP_KINDS or b.kind == "individual_therapy"]
    total = sum(b.minutes for b in blocks)
    ahead = sum(b.minutes for b in blocks if b.weekday >= enrollment["start_date"].isoweekday())
    return round(target * ahead / total, 2) if total else target


async def review_hours(session: AsyncSession, now: datetime) -> dict[str, int]:
    """Raise HoursAtRisk (mid-week, once per enrollment-week) and WeeklyHoursShortfall
    (at week close, once) for every active enrollment."""
    raised = {"at_risk": 0, "shortfall": 0}
    for enrollment in await store.site_enrollments(session):
        site = await store.get_site(session, enrollment["site_id"])
        if site is None:
            continue
        timezone = site["timezone"]
        this_week = domain.iso_week_of(now, timezone)
        for iso_week in _weeks_to_review(enrollment["start_date"], this_week, timezone):
            _, end = domain.week_bounds(iso_week, timezone)
            hours = await week_hours(session, enrollment, timezone, iso_week, now)
            verdict = domain.hours_verdict(hours, now, end)
            if verdict is None or not await store.claim_hours_alert(
                session, enrollment["enrollment_id"], iso_week, verdict
            ):
                continue
            raised[verdict] += 1
            await store.outbox.emit(
                session, _hours_event(verdict, enrollment, hours), enrollment["site_id"], chain=_episode(enrollment)
            )
    return raised


def _weeks_to_review(start_date: date, this_week: str, timezone: str) -> list[str]:
    """This week and the previous one (whose close may not be reviewed yet), never a
    week before the enrollment started."""
    this_monday = date.fromisocalendar(int(this_week[:4]), int(this_week[6:]), 1)
    weeks = []
    for monday in (this_monday - timedelta(days=7), this_monday):
        if monday + timedelta(days=7) > start_date:
            year, week, _ = monday.isocalendar()
            weeks.append(f"{year}-W{week:02d}")
    return weeks


def _hours_event(verdict: str, enrollment: EnrollmentRow, hours: domain.WeekHours) -> Event:
    ids = {"patient_id": UUID(enrollment["patient_id"]), "enrollment_id": UUID(enrollment["enrollment_id"])}
    if verdict == "at_risk":
        return HoursAtRisk(
            **ids,
            iso_week=hours.iso_week,
            attended_hours=hours.attended,
            remaining_booked_hours=hours.remaining_booked,
            target_hours=hours.target,
        )
    return WeeklyHoursShortfall(
        **ids, iso_week=hours.iso_week, attended_hours=hours.attended, target_hours=hours.target
    )
