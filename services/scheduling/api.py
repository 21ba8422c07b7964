"""Scheduling HTTP API: programs and tracks, the calendar, bookings, attendance,
closures and treatment hours (DESIGN A6).

Every read or change of a patient's data writes an audit row in the same transaction,
and so does a refused attempt at another site's patient: `transaction` keeps that row
while the caller gets the same 404 as for a record that does not exist (DESIGN B5).
Dates, wall times and ISO weeks are bounded at the boundary (`domain.check_day`), so no
input reaches date arithmetic that could overflow."""

from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal, cast
from uuid import UUID

from fastapi import APIRouter, Path, Query
from pydantic import AfterValidator, BaseModel, Field, model_validator
from sqlalchemy.ext.asyncio import AsyncSession

from services.scheduling import domain, store, usecases
from services.scheduling.store import EnrollmentRow, ProgramRow, SessionRow, SiteRow
from shared import clock
from shared.api import Input
from shared.auth import Admin, Clinical, NetworkAdmin, Principal, Staff, StaffOrPatient, ensure_site
from shared.contracts.events import AttendanceStatus, Cohort, LevelOfCare, SessionKind, SiteId
from shared.db import transaction
from shared.errors import AccessDenied, Invalid, NotFound
from shared.http import Db

router = APIRouter()

# Bounded at the boundary: a day, a site-local wall time and an ISO week the date
# arithmetic behind every route can hold (a bad one is a 422, never a 500).
Day = Annotated[date, Field(description=f"{domain.FIRST_DAY} to {domain.LAST_DAY}"), AfterValidator(domain.check_day)]
WallTime = Annotated[datetime, AfterValidator(domain.check_wall_time)]
IsoWeek = Annotated[str, Field(pattern=r"^[0-9]{4}-W[0-9]{2}$"), AfterValidator(domain.check_iso_week)]
# sessions.clinician_id is 200 characters: a longer id would fail the insert itself.
ClinicianId = Annotated[str, Path(min_length=1, max_length=200)]


WeekState = Literal["met", "on_track", "at_risk", "shortfall"]


class BlockIn(Input):
    weekday: Annotated[int, Field(ge=1, le=7, description="ISO weekday, 1 = Monday")]
    start: Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="site-local HH:MM")]
    minutes: Annotated[int, Field(ge=15, le=480)]
    kind: SessionKind
    title: Annotated[str, Field(min_length=1, max_length=120)]
    capacity: Annotated[int | None, Field(ge=1, le=200)] = None
    topics: Annotated[list[Annotated[str, Field(min_length=1, max_length=80)]], Field(max_length=20)] = []

    @model_validator(mode="after")
    def _default_capacity(self) -> "BlockIn":
        if self.capacity is None:
            self.capacity = 1 if self.kind == "individual_therapy" else domain.GROUP_CAPACITY
        return self


class ProgramIn(Input):
    site_id: SiteId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    track: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,60}$")] = "main"
    cohort: Cohort
    level_of_care: LevelOfCare = "2.1"
    weekly_hours_target: Annotated[float | None, Field(gt=0, le=40)] = None
    blocks: Annotated[list[BlockIn], Field(min_length=1, max_length=60)]


class ProgramOut(BaseModel):
    program_id: str
    site_id: str
    name: str
    track: str
    cohort: str
    level_of_care: str
    weekly_hours_target: float
    blocks: list[dict[str, Any]]
    sessions_created: int | None = None


class SessionOut(BaseModel):
    session_id: UUID
    program_id: str | None
    site_id: str
    kind: str
    title: str
    local_date: date
    starts_at: datetime
    ends_at: datetime
    capacity: int
    status: str
    clinician_id: str | None = None
    booked: int = 0
    waitlisted: int = 0


class RosterEntry(BaseModel):
    patient_id: UUID
    enrollment_id: UUID
    status: str
    position: int | None
    attendance: str | None = None
    minutes: int | None = None


class SessionDetail(SessionOut):
    roster: list[RosterEntry]


class BookingOut(BaseModel):
    booking_id: UUID
    session_id: UUID
    enrollment_id: UUID
    status: str
    position: int | None
    starts_at: datetime
    ends_at: datetime
    kind: str
    title: str
    site_id: str
    session_status: str
    timezone: str = Field(description="the site's time zone: its wall clock for starts_at and ends_at")


class AttendanceRecordIn(Input):
    patient_id: UUID
    status: AttendanceStatus
    minutes: Annotated[int, Field(ge=0, le=480)]


class AttendanceIn(Input):
    records: Annotated[list[AttendanceRecordIn], Field(min_length=1, max_length=200)]


class ClosureIn(Input):
    date: Day
    reason: Literal["holiday", "weather", "staffing", "facility", "other"]


class TrackIn(Input):
    program_id: Annotated[str, Field(min_length=1, max_length=64)]


class SlotIn(Input):
    site_id: SiteId
    starts_local: Annotated[WallTime, Field(description="site-local wall time, no offset")]
    minutes: Annotated[int, Field(ge=15, le=180)] = 50


class SlotBookingIn(Input):
    enrollment_id: UUID


class WeekOut(BaseModel):
    iso_week: str
    attended_hours: float
    remaining_booked_hours: float
    target_hours: float
    state: "WeekState"
    alerts: list[str]


class HoursOut(BaseModel):
    enrollment_id: UUID
    patient_id: UUID
    weekly_hours_target: float
    weeks: list[WeekOut]


class EnrollmentOut(BaseModel):
    enrollment_id: UUID
    patient_id: UUID
    site_id: str
    program_id: str
    level_of_care: str
    cohort: str
    start_date: date
    weekly_hours_target: float
    status: str
    ended_on: date | None = None  # discharged or transferred on


class SiteOut(BaseModel):
    site_id: str
    name: str
    timezone: str


async def _site(session: AsyncSession, principal: Principal, site_id: str) -> SiteRow:
    ensure_site(principal, site_id, "site")
    site = await store.get_site(session, site_id)
    if site is None:
        raise NotFound("site not found")
    return site


async def _deny(
    session: AsyncSession, principal: Principal, action: str, site_id: str, patient_ids: list[str], what: str
) -> AccessDenied:
    """Audit a refused attempt, one row per patient it aimed at (one without a patient
    when there is none yet: the probe itself is worth keeping); the caller raises the
    404, whose body is the one an unknown id gets."""
    targets: list[str | None] = [*patient_ids] or [None]
    for patient_id in targets:
        await store.record_access(session, principal, f"{action}.denied", site_id, patient_id)
    return AccessDenied(f"{what} not found")


async def _visible_site(session: AsyncSession, principal: Principal, site_id: str, action: str) -> SiteRow:
    """A site whose patient figures the caller may read (a refusal is audited)."""
    site = await store.get_site(session, site_id)
    if site is None:
        raise NotFound("site not found")
    if not principal.sees_site(site_id):
        raise await _deny(session, principal, action, site_id, [], "site")
    return site


async def _session(
    session: AsyncSession, principal: Principal, session_id: UUID, action: str, *, lock: bool = False
) -> SessionRow:
    """A session of the caller's sites. A refusal is audited for each patient on its
    roster: the roster (and attendance) is what the caller was after."""
    row = await store.get_session(session, str(session_id), lock=lock)
    if row is None:
        raise NotFound("session not found")
    if not principal.sees_site(row["site_id"]):
        roster = await store.session_bookings(session, row["session_id"])
        patients = sorted({b["patient_id"] for b in roster if b["status"] != "cancelled"})
        raise await _deny(session, principal, action, row["site_id"], patients, "session")
    return row


async def _enrollment(session: AsyncSession, principal: Principal, enrollment_id: UUID, action: str) -> EnrollmentRow:
    """An enrollment the caller may see: staff of its site, or the patient it belongs
    to. A refusal is audited against that patient."""
    row = await store.get_enrollment(session, str(enrollment_id))
    if row is None:
        raise NotFound("enrollment not found")
    if principal.role == "patient":
        allowed = principal.patient_id == UUID(row["patient_id"])
    else:
        allowed = principal.sees_site(row["site_id"])
    if not allowed:
        raise await _deny(session, principal, action, row["site_id"], [row["patient_id"]], "enrollment")
    return row


def _program_out(program: ProgramRow, created: int | None = None) -> ProgramOut:
    import json

    return ProgramOut(
        program_id=program["program_id"],
        site_id=program["site_id"],
        name=program["name"],
        track=program["track"],
        cohort=program["cohort"],
        level_of_care=program["level_of_care"],
        weekly_hours_target=program["weekly_hours_target"],
        blocks=json.loads(program["template"]),
        sessions_created=created,
    )


# --- sites and programs ----------------------------------------------------------------


@router.get("/sites", response_model=list[SiteOut], tags=["sites"])
async def list_sites(principal: Staff, session: Db) -> list[SiteOut]:
    return [
        SiteOut(site_id=r["site_id"], name=r["name"], timezone=r["timezone"])
        for r in await store.list_sites(session, principal.visible_sites())
    ]


@router.post("/programs", status_code=201, response_model=ProgramOut, tags=["programs"])
async def publish_program(body: ProgramIn, principal: Admin, session: Db) -> ProgramOut:
    async with session.begin():
        ensure_site(principal, body.site_id, "site")
        site = await store.get_site(session, body.site_id)
        if site is None:
            raise Invalid("unknown site", {"site_id": "no such site is registered"})
        today = domain.site_today(clock.now(), site["timezone"])
        spec = body.model_dump()
        program = await usecases.publish_program(session, site, spec, today)
        sessions = await store.sessions_between(session, program_id=program["program_id"])
    return _program_out(program, len(sessions))


@router.get("/programs", response_model=list[ProgramOut], tags=["programs"])
async def list_programs(principal: Staff, session: Db, site_id: str | None = None) -> list[ProgramOut]:
    programs = await store.list_programs(session, site_id)
    return [_program_out(p) for p in programs if principal.sees_site(p["site_id"])]


@router.post("/sites/{site_id}/closures", status_code=201, tags=["sites"])
async def close_day(site_id: str, body: ClosureIn, principal: Admin, session: Db) -> dict[str, Any]:
    async with session.begin():
        site = await _site(session, principal, site_id)
        if body.date < domain.site_today(clock.now(), site["timezone"]):
            raise Invalid("a closure cannot be in the past", {"date": "in the past"})
        cancelled = await usecases.close_site_day(session, site, body.date, body.reason)
    return {"site_id": site_id, "date": body.date, "sessions_cancelled": cancelled}


# --- calendar and sessions ---------------------------------------------------------------


@router.get("/sites/{site_id}/sessions", response_model=list[SessionOut], tags=["calendar"])
async def site_calendar(
    site_id: str,
    principal: Staff,
    session: Db,
    since: Annotated[Day | None, Query(alias="from", description="site-local first day")] = None,
    until: Annotated[Day | None, Query(alias="to", description="site-local last day (inclusive)")] = None,
) -> list[SessionOut]:
    site = await _site(session, principal, site_id)
    today = domain.site_today(clock.now(), site["timezone"])
    first, last = domain.calendar_range(since, until, today)
    # A day's margin each side of the site-local days; `local_date` then picks exactly.
    rows = await store.sessions_between(
        session,
        site_id=site_id,
        since=domain.local_instant(first - timedelta(days=1), datetime.min.time(), _zone(site)),
        until=domain.local_instant(last + timedelta(days=2), datetime.min.time(), _zone(site)),
    )
    out = []
    for row in rows:
        if first <= row["local_date"] <= last:
            out.append(await _session_out(session, row))
    return out


def _zone(site: SiteRow) -> Any:
    from zoneinfo import ZoneInfo

    return ZoneInfo(site["timezone"])


async def _session_out(session: AsyncSession, row: SessionRow) -> SessionOut:
    bookings = await store.session_bookings(session, row["session_id"])
    return SessionOut.model_validate(  # the row's other columns are ignored
        {
            **row,
            "booked": sum(1 for b in bookings if b["status"] == "booked"),
            "waitlisted": sum(1 for b in bookings if b["status"] == "waitlisted"),
        }
    )


@router.get("/sessions/{session_id}", response_model=SessionDetail, tags=["calendar"])
async def session_roster(session_id: UUID, principal: Staff, session: Db) -> SessionDetail:
    async with transaction(session):
        row = await _session(session, principal, session_id, "roster.read")
        attendance = {a["patient_id"]: a for a in await store.get_attendance(session, str(session_id))}
        roster = []
        for booking in await store.session_bookings(session, str(session_id)):
            if booking["status"] == "cancelled":
                continue
            record = attendance.get(booking["patient_id"])
            roster.append(
                RosterEntry(
                    patient_id=UUID(booking["patient_id"]),
                    enrollment_id=UUID(booking["enrollment_id"]),
                    status=booking["status"],
                    position=booking["position"],
                    attendance=record["status"] if record else None,
                    minutes=record["minutes"] if record else None,
                )
            )
            await store.record_access(session, principal, "roster.read", row["site_id"], booking["patient_id"])
        summary = await _session_out(session, row)
    return SessionDetail(**summary.model_dump(), roster=roster)


@router.post("/sessions/{session_id}/attendance", tags=["attendance"])
async def record_attendance(session_id: UUID, body: AttendanceIn, principal: Clinical, session: Db) -> dict[str, Any]:
    async with transaction(session):
        row = await _session(session, principal, session_id, "attendance.record", lock=True)
        records = [{**r.model_dump(), "patient_id": str(r.patient_id)} for r in body.records]
        count = await usecases.record_attendance(session, row, records, principal.sub, clock.now())
        for record in records:
            await store.record_access(session, principal, "attendance.record", row["site_id"], record["patient_id"])
    return {"session_id": session_id, "recorded": count}


@router.post("/sessions/{session_id}/complete", tags=["attendance"])
async def complete_session(session_id: UUID, principal: Clinical, session: Db) -> dict[str, Any]:
    async with transaction(session):
        row = await _session(session, principal, session_id, "session.complete", lock=True)
        counts = await usecases.complete_session(session, row, clock.now())
    return {"session_id": session_id, "status": "completed", **counts}


# --- individual therapy ------------------------------------------------------------------


@router.post("/clinicians/{clinician_id}/slots", status_code=201, response_model=SessionOut, tags=["individual"])
async def open_slot(clinician_id: ClinicianId, body: SlotIn, principal: Clinical, session: Db) -> SessionOut:
    if principal.role == "clinician" and principal.sub != clinician_id:
        raise NotFound("clinician not found")
    async with session.begin():
        site = await _site(session, principal, body.site_id)
        starts = domain.local_instant(body.starts_local.date(), body.starts_local.time(), _zone(site))
        ends = starts + timedelta(minutes=body.minutes)
        times: usecases.SlotTimes = {"local_date": body.starts_local.date(), "starts_at": starts, "ends_at": ends}
        row = await usecases.open_slot(session, site, clinician_id, times, clock.now())
    return SessionOut.model_validate(row)  # the row's other columns are ignored


@router.post("/sessions/{session_id}/bookings", status_code=201, tags=["bookings"])
async def book_session(session_id: UUID, body: SlotBookingIn, principal: Staff, session: Db) -> dict[str, Any]:
    async with transaction(session):
        row = await _session(session, principal, session_id, "booking.create", lock=True)
        enrollment = await _enrollment(session, principal, body.enrollment_id, "booking.create")
        status = await usecases.book_by_staff(session, row, enrollment, clock.now())
        await store.record_access(session, principal, "booking.create", row["site_id"], enrollment["patient_id"])
    return {"session_id": session_id, "enrollment_id": body.enrollment_id, "status": status}


# --- patients and enrollments ------------------------------------------------------------


@router.get("/patients/{patient_id}/bookings", response_model=list[BookingOut], tags=["bookings"])
async def patient_schedule(patient_id: UUID, principal: StaffOrPatient, session: Db) -> list[BookingOut]:
    async with transaction(session):
        known = await store.patient_sites(session, str(patient_id))
        if not known:
            raise NotFound("patient not found")
        if principal.role == "patient":
            readable = known if principal.patient_id == patient_id else set()
        else:
            readable = {s for s in known if principal.sees_site(s)}
        if not readable:
            for site_id in sorted(known):
                await store.record_access(session, principal, "schedule.read.denied", site_id, patient_id)
            raise AccessDenied("patient not found")
        for site_id in sorted(readable):
            await store.record_access(session, principal, "schedule.read", site_id, patient_id)
        rows = await store.patient_bookings(session, str(patient_id))
        sites = {site_id: await store.get_site(session, site_id) for site_id in readable}
    zones = {site_id: site["timezone"] if site else "UTC" for site_id, site in sites.items()}
    return [
        BookingOut.model_validate({**r, "timezone": zones[r["site_id"]]})  # the row's other columns are ignored
        for r in rows
        if r["site_id"] in readable and r["status"] != "cancelled"
    ]


@router.get("/enrollments/{enrollment_id}", response_model=EnrollmentOut, tags=["enrollments"])
async def read_enrollment(enrollment_id: UUID, principal: Staff, session: Db) -> EnrollmentOut:
    async with transaction(session):
        enrollment = await _enrollment(session, principal, enrollment_id, "enrollment.read")
        await store.record_access(
            session, principal, "enrollment.read", enrollment["site_id"], enrollment["patient_id"]
        )
    return EnrollmentOut.model_validate(enrollment)  # the row's other columns are ignored


@router.post("/enrollments/{enrollment_id}/track", tags=["enrollments"])
async def switch_track(enrollment_id: UUID, body: TrackIn, principal: Staff, session: Db) -> dict[str, Any]:
    async with transaction(session):
        enrollment = await _enrollment(session, principal, enrollment_id, "enrollment.switch_track")
        program = await store.get_program(session, body.program_id)
        if program is None or not principal.sees_site(program["site_id"]):
            raise Invalid("unknown program", {"program_id": "no such program"})
        booked = await usecases.switch_track(session, enrollment, program, clock.now())
        await store.record_access(
            session, principal, "enrollment.switch_track", enrollment["site_id"], enrollment["patient_id"]
        )
    return {"enrollment_id": enrollment_id, "program_id": body.program_id, "sessions_booked": booked}


@router.get("/enrollments/{enrollment_id}/hours", response_model=HoursOut, tags=["hours"])
async def enrollment_hours(enrollment_id: UUID, principal: StaffOrPatient, session: Db) -> HoursOut:
    async with transaction(session):
        enrollment = await _enrollment(session, principal, enrollment_id, "hours.read")
        site = await store.get_site(session, enrollment["site_id"])
        if site is None:
            raise NotFound("site not found")
        now = clock.now()
        alerts: dict[str, list[str]] = {}
        for alert in await store.hours_alerts_for(session, enrollment["enrollment_id"]):
            alerts.setdefault(alert["iso_week"], []).append(alert["kind"])
        weeks = []
        for iso_week in _weeks_since(enrollment["start_date"], now, site["timezone"]):
            hours = await usecases.week_hours(session, enrollment, site["timezone"], iso_week, now)
            _, end = domain.week_bounds(iso_week, site["timezone"])
            verdict = domain.hours_verdict(hours, now, end)
            state = cast(WeekState, verdict or ("met" if hours.met else "on_track"))
            weeks.append(
                WeekOut(
                    iso_week=iso_week, attended_hours=hours.attended, remaining_booked_hours=hours.remaining_booked,
                    target_hours=hours.target, state=state, alerts=sorted(alerts.get(iso_week, [])),
                )
            )  # fmt: skip
        await store.record_access(session, principal, "hours.read", enrollment["site_id"], enrollment["patient_id"])
    return HoursOut(
        enrollment_id=enrollment_id, patient_id=UUID(enrollment["patient_id"]),
        weekly_hours_target=enrollment["weekly_hours_target"], weeks=weeks,
    )  # fmt: skip


def _weeks_since(start: date, now: datetime, timezone: str) -> list[str]:
    today = domain.site_today(now, timezone)
    monday = start - timedelta(days=start.isoweekday() - 1)
    weeks = []
    while monday <= today:
        year, week, _ = monday.isocalendar()
        weeks.append(f"{year}-W{week:02d}")
        monday += timedelta(days=7)
    return weeks[-26:]


@router.get("/sites/{site_id}/hours-report", tags=["hours"])
async def hours_report(
    site_id: str,
    principal: Clinical,
    session: Db,
    week: Annotated[IsoWeek | None, Query(description="ISO week, e.g. 2026-W07; default this week")] = None,
) -> dict[str, Any]:
    async with transaction(session):
        site = await _visible_site(session, principal, site_id, "hours_report.read")
        now = clock.now()
        iso_week = week or domain.iso_week_of(now, site["timezone"])
        programs = await _program_hours(session, site, iso_week, now)
        at_risk = sorted(e for p in programs for e in p["at_risk"])
        # The enrollment ids it names are patients' data: each patient disclosed is audited.
        for patient_id in sorted({patient for p in programs for patient in p["disclosed"]}):
            await store.record_access(session, principal, "hours_report.read", site_id, patient_id)
    report = [_rates(entry) for entry in programs]
    totals = {
        "enrollments": sum(p["enrollments"] for p in report),
        "attended_hours": round(sum(p["attended_hours"] for p in report), 2),
        "attendance_rate": _rate(sum(p["present"] for p in programs), sum(p["recorded"] for p in programs)),
        "at_risk": at_risk,
    }
    return {"site_id": site_id, "iso_week": iso_week, "site": totals, "programs": report, "program_count": len(report)}


async def _program_hours(session: AsyncSession, site: SiteRow, iso_week: str, now: datetime) -> list[dict[str, Any]]:
    """Per program of the site: active enrollments, their hours and attendance in the
    week, and the enrollments at risk (or short) of their weekly target."""
    start, end = domain.week_bounds(iso_week, site["timezone"])
    programs: dict[str, dict[str, Any]] = {}
    for program in await store.list_programs(session, site["site_id"]):
        programs[program["program_id"]] = {
            "program_id": program["program_id"], "name": program["name"], "track": program["track"],
            "enrollments": 0, "attended_hours": 0.0, "target_hours": 0.0, "at_risk": [],
            "present": 0, "recorded": 0, "disclosed": [],
        }  # fmt: skip
    for enrollment in await store.site_enrollments(session, site["site_id"]):
        entry = programs.get(enrollment["program_id"])
        if entry is None:
            continue
        hours = await usecases.week_hours(session, enrollment, site["timezone"], iso_week, now)
        records = await store.attendance_between(session, enrollment["enrollment_id"], start, end)
        entry["enrollments"] += 1
        entry["attended_hours"] = round(entry["attended_hours"] + hours.attended, 2)
        entry["target_hours"] = round(entry["target_hours"] + hours.target, 2)
        entry["recorded"] += len(records)
        entry["present"] += sum(1 for status, _ in records if status in domain.COUNTED_STATUSES)
        if domain.hours_verdict(hours, now, end) is not None:
            entry["at_risk"].append(enrollment["enrollment_id"])
            entry["disclosed"].append(enrollment["patient_id"])
    return list(programs.values())


def _rate(present: int, recorded: int) -> float | None:
    return round(present / recorded, 3) if recorded else None


def _rates(entry: dict[str, Any]) -> dict[str, Any]:
    """A program's entry as reported: its attendance rate instead of the raw counts (and
    without the patient ids behind `at_risk`, kept only for the audit)."""
    shown = {k: v for k, v in entry.items() if k not in ("present", "recorded", "disclosed")}
    return {**shown, "attendance_rate": _rate(entry["present"], entry["recorded"])}


# --- operations ------------------------------------------------------------------------


@router.post("/admin/hours-review", tags=["ops"])
async def run_hours_review(principal: NetworkAdmin, session: Db) -> dict[str, int]:
    """Run the treatment-hours review now (the background loop runs it on a timer)."""
    async with session.begin():
        return await usecases.review_hours(session, clock.now())


@router.post("/admin/horizon", tags=["ops"])
async def extend_horizon(principal: NetworkAdmin, session: Db) -> dict[str, int]:
    """Materialize every program's sessions up to the rolling horizon now."""
    async with session.begin():
        return {"sessions_created": await usecases.extend_horizons(session, clock.now())}
