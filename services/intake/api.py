"""Intake HTTP API (DESIGN A6): sites, patients, enrollments and their lifecycle,
Part 2 consents, daily check-ins with risk, recovery plans, and the audit trail.

Routes parse, check access, call a use case (usecases.py holds the business steps)
and shape the answer. Every read or change of a patient record writes an audit row in
the same transaction; a refused read is audited too (`transaction` keeps that row when
it answers 404)."""

import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal, NamedTuple, cast
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, model_validator
from pydantic import AwareDatetime as PydanticAwareDatetime
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.intake import domain, store, usecases
from services.intake.store import DuplicateRow, EnrollmentRow, IdempotencyRow, PatientRow
from shared import clock
from shared.api import Input
from shared.auth import Admin, Clinical, NetworkAdmin, Principal, Staff, StaffOrPatient, StaffOrSystem, ensure_site
from shared.contracts.events import (
    Cohort,
    DischargeReason,
    LevelOfCare,
    PreferredChannel,
    ReferralSource,
    SiteId,
)
from shared.db import transaction
from shared.errors import AccessDenied, Conflict, Forbidden, Invalid, NotFound
from shared.group_commit import GroupCommit
from shared.http import Db, Writes
from shared.runtime import ServiceRuntime
from shared.tracing import current_context

router = APIRouter()
# Check-ins written in one transaction at most (more wait for the next): a group's
# transaction, and so the wait of the requests behind it, stays short.
CHECK_INS_PER_GROUP = 64

# --- boundary types: what a request may hold, checked before any handler runs ----------------
# pydantic's lax mode reads "0" or 0.5 as seconds since 1970 and accepts a date-time
# without offset; a year-1 time at +14:00 parses but overflows on conversion to UTC (a 500
# in the database driver). These types take RFC 3339 / ISO 8601 text only, in a sane range.

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})$")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
EARLIEST_YEAR, LATEST_YEAR = 1900, 2199


def _rfc3339_text(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("give an RFC 3339 date-time with a UTC offset, e.g. 2026-03-09T09:00:00-05:00")
    return value


def _utc_in_range(value: datetime) -> datetime:
    # The wall-clock year is checked before any arithmetic: an offset moves it by a day at most.
    if not EARLIEST_YEAR <= value.year <= LATEST_YEAR:
        raise ValueError(f"a date-time between the years {EARLIEST_YEAR} and {LATEST_YEAR}")
    return value.astimezone(UTC)


def _iso_date_text(value: Any) -> Any:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _ISO_DATE.match(value):
        raise ValueError("give a date as YYYY-MM-DD")
    return value


def _not_null(value: Any) -> Any:
    # For changes (PATCH): leaving a field out keeps it; null would clear a required one.
    if value is None:
        raise ValueError("may not be null: leave the field out to keep its value")
    return value


def _searchable(value: str | None) -> str | None:
    if value is not None:
        domain.search_key(value)
    return value


AwareDatetime = Annotated[PydanticAwareDatetime, BeforeValidator(_rfc3339_text), AfterValidator(_utc_in_range)]
IsoDate = Annotated[date, BeforeValidator(_iso_date_text)]
NotNull = BeforeValidator(_not_null)

Phone = Annotated[str, Field(pattern=r"^\+[1-9]\d{6,14}$")]
Email = Annotated[str, Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
Language = Annotated[str, Field(pattern=r"^[a-z]{2}$")]
Name = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(domain.check_person_name)]
FreeText = Annotated[str, Field(max_length=2000)]
# Substances as codes, so a check-in's list can be counted without reading free text.
Substance = Literal["alcohol", "opioids", "stimulants", "cannabis", "benzodiazepines", "nicotine", "other"]
ConsentPurpose = domain.ConsentPurpose


# --- request and response models --------------------------------------------------------


class SiteIn(Input):
    site_id: SiteId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    timezone: Annotated[str, Field(min_length=1, max_length=64)]
    address: Annotated[str | None, Field(max_length=300)] = None


class SiteChange(Input):
    name: Annotated[str | None, Field(min_length=1, max_length=200), NotNull] = None
    timezone: Annotated[str | None, Field(min_length=1, max_length=64), NotNull] = None
    address: Annotated[str | None, Field(max_length=300)] = None


class SiteOut(BaseModel):
    site_id: str
    name: str
    timezone: str
    address: str | None = None


class PatientIn(Input):
    site_id: SiteId
    given_name: Name
    family_name: Name
    birth_date: IsoDate
    phone: Phone | None = None
    email: Email | None = None
    preferred_channel: PreferredChannel = "none"
    language: Language = "en"
    # Twins and namesakes exist: front desk may confirm a flagged duplicate is another person.
    confirmed_not_duplicate: bool = False

    @model_validator(mode="after")
    def _contact(self) -> "PatientIn":
        domain.check_channel_address(self.preferred_channel, self.phone, self.email)
        return self


class PatientChange(Input):
    given_name: Annotated[Name | None, NotNull] = None
    family_name: Annotated[Name | None, NotNull] = None
    birth_date: Annotated[IsoDate | None, NotNull] = None
    phone: Phone | None = None
    email: Email | None = None
    preferred_channel: Annotated[PreferredChannel | None, NotNull] = None
    language: Annotated[Language | None, NotNull] = None


class EnrollmentOut(BaseModel):
    enrollment_id: UUID
    patient_id: UUID
    site_id: str
    program_id: str
    level_of_care: str
    cohort: str
    start_date: date
    referral_source: str
    status: str
    ended_on: date | None = None


class HistoryOut(BaseModel):
    at: datetime
    kind: str
    from_value: str | None
    to_value: str | None
    reason: str | None
    actor: str


class EnrollmentDetail(EnrollmentOut):
    history: list[HistoryOut]


class PatientOut(BaseModel):
    patient_id: UUID
    site_id: str
    mrn: str
    given_name: str
    family_name: str
    birth_date: date
    phone: str | None
    email: str | None
    preferred_channel: str
    language: str
    enrollments: list[EnrollmentOut] = []


class PatientSummary(BaseModel):
    patient_id: UUID
    site_id: str
    mrn: str
    given_name: str
    family_name: str
    birth_date: date


class EnrollmentIn(Input):
    program_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    level_of_care: LevelOfCare
    cohort: Cohort
    start_date: IsoDate
    referral_source: ReferralSource


class LevelIn(Input):
    level_of_care: LevelOfCare
    reason: Annotated[str | None, Field(pattern=r"^[a-z_]{2,40}$")] = None


class TransferIn(Input):
    to_site_id: SiteId
    to_program_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    effective_on: IsoDate


class DischargeIn(Input):
    reason: DischargeReason
    discharged_on: IsoDate


class ConsentIn(Input):
    # A class of recipients, an organization, or a named person by an opaque id: the bus
    # carries it, so never a person's name.
    recipient: Annotated[
        str,
        Field(
            pattern=r"^((class|org):[a-z0-9_-]{2,70}|person:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
        ),
    ]
    purpose: ConsentPurpose
    information: Annotated[str, Field(min_length=1, max_length=2000)]
    expires_on: IsoDate | None = None
    expires_event: Literal["end_of_treatment"] | None = None
    signed_at: AwareDatetime


class RevokeIn(Input):
    revoked_at: AwareDatetime | None = None
    note: FreeText | None = None


class ConsentOut(BaseModel):
    consent_id: UUID
    patient_id: UUID
    recipient: str
    purpose: str
    information: str
    expires_on: date | None
    expires_event: str | None
    signed_at: datetime
    revoked_at: datetime | None
    state: str


class GoalProgressIn(Input):
    goal_id: UUID
    note: FreeText | None = None


class CheckInIn(Input):
    mood: Annotated[int, Field(ge=1, le=10)]
    craving: Annotated[int, Field(ge=0, le=10)]
    used_since_last: bool
    safety_concern: bool
    sleep_hours: Annotated[float | None, Field(ge=0, le=24)] = None
    substances: Annotated[list[Substance], Field(max_length=7)] = []
    goals: FreeText | None = None
    challenges: FreeText | None = None
    goal_progress: Annotated[list[GoalProgressIn], Field(max_length=20)] = []


class CheckInOut(BaseModel):
    check_in_id: UUID
    patient_id: UUID
    enrollment_id: UUID
    submitted_at: datetime
    risk: str
    risk_reasons: list[str]


class CheckInRecord(CheckInOut):
    mood: int
    craving: int
    used_since_last: bool
    safety_concern: bool
    sleep_hours: float | None
    substances: list[str]
    goals: str | None
    challenges: str | None
    submitted_role: str


class GoalIn(Input):
    text: Annotated[str, Field(min_length=1, max_length=500)]
    target: Annotated[str | None, Field(max_length=500)] = None
    review_on: IsoDate | None = None


class GoalChange(Input):
    status: Annotated[Literal["active", "met", "dropped"] | None, NotNull] = None
    text: Annotated[str | None, Field(min_length=1, max_length=500), NotNull] = None
    target: Annotated[str | None, Field(max_length=500)] = None
    review_on: IsoDate | None = None
    note: FreeText | None = None


class ProgressOut(BaseModel):
    at: datetime
    check_in_id: UUID | None
    note: str | None
    status: str | None
    actor: str


class GoalOut(BaseModel):
    goal_id: UUID
    text: str
    target: str | None
    status: str
    review_on: date | None
    progress: list[ProgressOut] = []


class PlanOut(BaseModel):
    plan_id: UUID
    enrollment_id: UUID
    goals: list[GoalOut]


class AuditOut(BaseModel):
    at: datetime
    actor: str
    role: str
    site_id: str
    action: str
    patient_id: UUID | None


# --- helpers -------------------------------------------------------------------------


def _values(row: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The row's values under these names (each must be in the row), as a response
    model's keyword arguments."""
    return {k: row[k] for k in names}


async def _visible_patient(
    session: AsyncSession, principal: Principal, patient_id: UUID, action: str, *, lock: bool = False
) -> PatientRow:
    """The patient if the caller may see them, else 404 (and the denial is audited);
    `lock`: read with their row locked, for a change that takes the lock anyway."""
    patient = await store.get_patient(session, str(patient_id), lock=lock)
    if patient is None:
        raise NotFound("patient not found")
    if not _may_see(principal, patient):
        await store.record_access(session, principal, f"{action}.denied", patient["site_id"], patient_id)
        raise AccessDenied("patient not found")
    return patient


async def _visible_enrollment(
    session: AsyncSession, principal: Principal, enrollment_id: UUID, action: str, *, lock: bool = False
) -> EnrollmentRow:
    enrollment = await store.get_enrollment(session, str(enrollment_id), lock=lock)
    if enrollment is None:
        raise NotFound("enrollment not found")
    try:
        await _visible_patient(session, principal, UUID(enrollment["patient_id"]), action)
    except AccessDenied:
        raise AccessDenied("enrollment not found") from None
    if principal.role != "patient" and not principal.sees_site(enrollment["site_id"]):
        # An older episode at a site the caller does not serve: a denied attempt, audited there.
        await store.record_access(
            session, principal, f"{action}.denied", enrollment["site_id"], enrollment["patient_id"]
        )
        raise AccessDenied("enrollment not found")
    return enrollment


async def _enrollment_detail(session: AsyncSession, enrollment: EnrollmentRow) -> EnrollmentDetail:
    history = [HistoryOut.model_validate(h) for h in await store.history(session, enrollment["enrollment_id"])]
    fields = _values(enrollment, [k for k in enrollment if k in EnrollmentOut.model_fields])
    return EnrollmentDetail(**fields, history=history)


# --- sites -----------------------------------------------------------------------------


@router.post("/sites", status_code=201, response_model=SiteOut, tags=["sites"])
async def register_site(body: SiteIn, principal: NetworkAdmin, session: Db) -> SiteOut:
    try:
        async with session.begin():
            await usecases.register_site(session, body.model_dump())
    except IntegrityError:
        # Two admins registering one site id at once: the loser's insert hits the key.
        raise Conflict(f"site {body.site_id} already exists") from None
    return SiteOut(**body.model_dump())


@router.patch("/sites/{site_id}", response_model=SiteOut, tags=["sites"])
async def update_site(site_id: SiteId, body: SiteChange, principal: NetworkAdmin, session: Db) -> SiteOut:
    async with session.begin():
        updated = await usecases.update_site(session, site_id, body.model_dump(exclude_unset=True))
    return SiteOut(**_values(updated, SiteOut.model_fields))


@router.get("/sites", response_model=list[SiteOut], tags=["sites"])
async def list_sites(principal: StaffOrSystem, session: Db) -> list[SiteOut]:
    return [
        SiteOut(**_values(r, SiteOut.model_fields)) for r in await store.list_sites(session, principal.visible_sites())
    ]


class ProgramOut(BaseModel):
    program_id: str
    site_id: str
    name: str
    cohort: str
    level_of_care: str


@router.get("/programs", response_model=list[ProgramOut], tags=["sites"])
async def list_programs(
    principal: StaffOrSystem, session: Db, site_id: Annotated[SiteId | None, Query()] = None
) -> list[ProgramOut]:
    """Programs a patient can be enrolled in: intake's projection of ProgramPublished."""
    rows = await store.list_programs(session, site_id)
    return [ProgramOut(**_values(r, ProgramOut.model_fields)) for r in rows if principal.sees_site(r["site_id"])]


# --- patients --------------------------------------------------------------------------


@router.post("/patients", status_code=201, response_model=PatientOut, tags=["patients"])
async def create_patient(body: PatientIn, principal: Staff, writes: Writes) -> PatientOut:
    ensure_site(principal, body.site_id, "site")
    spec = body.model_dump(exclude={"confirmed_not_duplicate"})
    today = clock.today()

    async def register(session: AsyncSession) -> dict[str, Any]:
        patient = await usecases.register_patient(session, principal, spec, body.confirmed_not_duplicate, today)
        await store.record_access(session, principal, "patient.create", body.site_id, patient["patient_id"])
        return patient

    return PatientOut(**await writes.run(register))


@router.get("/patients", response_model=list[PatientSummary], tags=["patients"])
async def search_patients(
    principal: Staff,
    session: Db,
    name: Annotated[str | None, Query(min_length=2, max_length=200), AfterValidator(_searchable)] = None,
    birth_date: Annotated[IsoDate | None, Query()] = None,
    mrn: Annotated[str | None, Query(pattern=r"^IOP-[A-Za-z0-9]{8}$")] = None,
) -> list[PatientSummary]:
    if not (name or birth_date or mrn):
        raise Invalid("search by name, birth_date or mrn", {"name": "give at least one criterion"})
    async with session.begin():
        rows = await store.search_patients(
            session,
            principal.visible_sites(),
            name_key=domain.search_key(name) if name else None,
            birth_date=birth_date,
            mrn=mrn,
        )
        for row in rows:
            await store.record_access(session, principal, "patient.search", row["site_id"], row["patient_id"])
    return [PatientSummary(**_values(r, PatientSummary.model_fields)) for r in rows]


@router.get("/patients/{patient_id}", response_model=PatientOut, tags=["patients"])
async def read_patient(patient_id: UUID, principal: StaffOrPatient, session: Db) -> PatientOut:
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "patient.read")
        episodes = await store.patient_enrollments(session, str(patient_id))
        await store.record_access(session, principal, "patient.read", patient["site_id"], patient_id)
    return _patient_out(patient, episodes)


@router.patch("/patients/{patient_id}", response_model=PatientOut, tags=["patients"])
async def update_patient(patient_id: UUID, body: PatientChange, principal: Staff, session: Db) -> PatientOut:
    changes = body.model_dump(exclude_unset=True)
    usecases.check_patient_changes(changes, clock.today())
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "patient.update")
        updated = await usecases.update_patient(session, patient, changes)
        await store.record_access(session, principal, "patient.update", patient["site_id"], patient_id)
        episodes = await store.patient_enrollments(session, str(patient_id))
    return _patient_out(updated, episodes)


def _patient_out(patient: PatientRow, episodes: list[EnrollmentRow]) -> PatientOut:
    fields = _values(patient, [k for k in patient if k in PatientOut.model_fields])
    return PatientOut(**fields, enrollments=[EnrollmentOut(**_values(e, EnrollmentOut.model_fields)) for e in episodes])


# --- enrollments -----------------------------------------------------------------------


@router.post("/patients/{patient_id}/enrollments", status_code=201, response_model=EnrollmentOut, tags=["enrollments"])
async def enroll_patient(patient_id: UUID, body: EnrollmentIn, principal: Staff, writes: Writes) -> EnrollmentOut:
    today = clock.today()
    usecases.check_enrollment(body.start_date, today)

    async def open_episode(session: AsyncSession) -> EnrollmentRow:
        patient = await _visible_patient(session, principal, patient_id, "enrollment.create", lock=True)
        enrollment = await usecases.enroll(session, principal.sub, patient, body.model_dump(), today)
        await store.record_access(session, principal, "enrollment.create", patient["site_id"], patient_id)
        return enrollment

    enrollment = await writes.run(open_episode)
    return EnrollmentOut(**_values(enrollment, EnrollmentOut.model_fields))


@router.get("/enrollments/{enrollment_id}", response_model=EnrollmentDetail, tags=["enrollments"])
async def read_enrollment(enrollment_id: UUID, principal: StaffOrPatient, session: Db) -> EnrollmentDetail:
    async with transaction(session):
        enrollment = await _visible_enrollment(session, principal, enrollment_id, "enrollment.read")
        await store.record_access(
            session, principal, "enrollment.read", enrollment["site_id"], enrollment["patient_id"]
        )
        return await _enrollment_detail(session, enrollment)


@router.post("/enrollments/{enrollment_id}/level", response_model=EnrollmentDetail, tags=["enrollments"])
async def change_level(enrollment_id: UUID, body: LevelIn, principal: Clinical, session: Db) -> EnrollmentDetail:
    """Step-down or step-up between ASAM levels within the episode, kept as history."""
    async with transaction(session):
        enrollment = await _visible_enrollment(session, principal, enrollment_id, "enrollment.level", lock=True)
        updated = await usecases.change_level(session, principal.sub, enrollment, body.level_of_care, body.reason)
        await store.record_access(
            session, principal, "enrollment.level", enrollment["site_id"], enrollment["patient_id"]
        )
        return await _enrollment_detail(session, updated)


@router.post(
    "/enrollments/{enrollment_id}/transfer", status_code=201, response_model=EnrollmentOut, tags=["enrollments"]
)
async def transfer(enrollment_id: UUID, body: TransferIn, principal: Clinical, session: Db) -> EnrollmentOut:
    """Ends the episode at this site (transferred) and opens one at the receiving site.

    PatientTransferred is published under both sites' subjects, so both sites'
    subscribers see it; PatientEnrolled follows for the new episode."""
    today = clock.today()
    usecases.check_transfer(body.effective_on, today)
    async with transaction(session):
        enrollment = await _visible_enrollment(session, principal, enrollment_id, "enrollment.transfer", lock=True)
        await store.record_access(
            session, principal, "enrollment.transfer", enrollment["site_id"], enrollment["patient_id"]
        )
        new_episode = await usecases.transfer(session, principal, enrollment, body.model_dump(), today)
        await store.record_access(
            session, principal, "enrollment.create", new_episode["site_id"], new_episode["patient_id"]
        )
    return EnrollmentOut(**_values(new_episode, EnrollmentOut.model_fields))


@router.post("/enrollments/{enrollment_id}/discharge", response_model=EnrollmentDetail, tags=["enrollments"])
async def discharge(enrollment_id: UUID, body: DischargeIn, principal: Clinical, session: Db) -> EnrollmentDetail:
    usecases.check_discharge(body.discharged_on, clock.today())
    async with transaction(session):
        enrollment = await _visible_enrollment(session, principal, enrollment_id, "enrollment.discharge", lock=True)
        updated = await usecases.discharge(session, principal.sub, enrollment, body.reason, body.discharged_on)
        await store.record_access(
            session, principal, "enrollment.discharge", enrollment["site_id"], enrollment["patient_id"]
        )
        return await _enrollment_detail(session, updated)


# --- consents (42 CFR Part 2) -------------------------------------------------------------


@router.post("/patients/{patient_id}/consents", status_code=201, response_model=ConsentOut, tags=["consents"])
async def grant_consent(patient_id: UUID, body: ConsentIn, principal: StaffOrPatient, session: Db) -> ConsentOut:
    spec = body.model_dump()
    usecases.check_consent(spec, clock.now())
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "consent.grant")
        consent_id = await usecases.grant_consent(session, patient, spec)
        await store.record_access(session, principal, "consent.grant", patient["site_id"], patient_id)
    return ConsentOut(consent_id=consent_id, patient_id=patient_id, revoked_at=None, state="active", **spec)


@router.get("/patients/{patient_id}/consents", response_model=list[ConsentOut], tags=["consents"])
async def list_consents(patient_id: UUID, principal: StaffOrPatient, session: Db) -> list[ConsentOut]:
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "consent.read")
        consents = await store.patient_consents(session, str(patient_id))
        states = [await usecases.consent_state(session, c, clock.today()) for c in consents]
        await store.record_access(session, principal, "consent.read", patient["site_id"], patient_id)
    return [
        ConsentOut(**_values(c, [k for k in ConsentOut.model_fields if k in c]), state=str(state))
        for c, state in zip(consents, states, strict=True)
    ]


class DisclosureOut(BaseModel):
    disclosed_at: datetime
    recipient: str
    purpose: str
    channel: str
    event_type: str
    event_id: UUID


class DisclosuresPage(BaseModel):
    disclosures: list[DisclosureOut]
    next_offset: int | None = Field(description="pass as `offset` for the next page; null on the last")


@router.get("/patients/{patient_id}/disclosures", response_model=DisclosuresPage, tags=["consents"])
async def list_disclosures(
    patient_id: UUID,
    principal: StaffOrPatient,
    session: Db,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DisclosuresPage:
    """The accounting of disclosures (42 CFR 2.24): every event about the patient that left
    iopnet for an outside system under their consent, newest first. For the patient
    themself and their site's admins."""
    if principal.role not in ("patient", "site_admin", "network_admin"):
        raise Forbidden("the accounting of disclosures is for the patient and their site's admins")
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "disclosures.read")
        rows = await store.patient_disclosures(session, str(patient_id), limit + 1, offset)
        await store.record_access(session, principal, "disclosures.read", patient["site_id"], patient_id)
    page = [DisclosureOut(**_values(r, DisclosureOut.model_fields)) for r in rows[:limit]]
    return DisclosuresPage(disclosures=page, next_offset=offset + limit if len(rows) > limit else None)


@router.post("/consents/{consent_id}/revoke", response_model=ConsentOut, tags=["consents"])
async def revoke_consent(consent_id: UUID, body: RevokeIn, principal: StaffOrPatient, session: Db) -> ConsentOut:
    """Revocation in writing (sec. 2.31): the time it was made and an optional note."""
    now = clock.now()
    revoked_at = body.revoked_at or now
    usecases.check_revocation_time(revoked_at, now)
    async with transaction(session):
        consent = await store.get_consent(session, str(consent_id), lock=True)
        if consent is None:
            raise NotFound("consent not found")
        try:
            patient = await _visible_patient(session, principal, UUID(consent["patient_id"]), "consent.revoke")
        except AccessDenied:
            raise AccessDenied("consent not found") from None
        await usecases.revoke_consent(session, consent, patient, revoked_at, body.note, now.date())
        await store.record_access(session, principal, "consent.revoke", patient["site_id"], consent["patient_id"])
    fields = _values(consent, [k for k in ConsentOut.model_fields if k in consent])
    return ConsentOut(**{**fields, "revoked_at": revoked_at}, state="revoked")


# --- daily check-ins ------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckInRequest:
    """A check-in request as it waits for its group's transaction (`write_check_ins`)."""

    principal: Principal
    patient_id: str
    answers: dict[str, Any]
    request_hash: str
    scope: str  # of its Idempotency-Key: a key belongs to one caller and one patient
    idempotency_key: str | None
    trace_context: str | None

    @property
    def key(self) -> tuple[str, str] | None:
        return (self.scope, self.idempotency_key) if self.idempotency_key else None


class Replayed(NamedTuple):
    """What the first request with the same Idempotency-Key was answered."""

    status: int
    body: dict[str, Any]


CheckInAnswer = CheckInOut | Replayed


class IdempotencyRace(Exception):
    """Two requests with one Idempotency-Key in flight at once: the group is written
    again one request at a time (GroupCommit), and the one that lost is answered with
    what the winner was (`winner`, read after the winner committed)."""

    def __init__(self, winner: IdempotencyRow | None = None) -> None:
        super().__init__("an Idempotency-Key used twice at once")
        self.winner = winner


def check_in_group(runtime: ServiceRuntime) -> GroupCommit[CheckInRequest, CheckInAnswer]:
    """Check-ins that arrive together share one transaction and multi-row statements
    (`write_check_ins`); each is answered once the commit holding its row is durable.
    The transaction is safety work: routine work starts nothing while it waits and runs."""

    @contextlib.asynccontextmanager
    async def safety_sessions() -> AsyncIterator[AsyncSession]:
        async with runtime.gate.urgent(), runtime.sessions() as session:
            yield session

    return GroupCommit.set_based(safety_sessions, write_check_ins, max_group=CHECK_INS_PER_GROUP)


async def _check_ins(request: Request) -> GroupCommit[CheckInRequest, CheckInAnswer]:
    # async: FastAPI runs a plain `def` dependency in a worker thread (a hop per request)
    return cast("GroupCommit[CheckInRequest, CheckInAnswer]", request.app.state.check_ins)


CheckIns = Annotated[GroupCommit[CheckInRequest, CheckInAnswer], Depends(_check_ins)]


@router.post("/patients/{patient_id}/check-ins", status_code=201, response_model=CheckInOut, tags=["check-ins"])
async def submit_check_in(
    patient_id: UUID,
    body: CheckInIn,
    principal: StaffOrPatient,
    check_ins: CheckIns,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> Any:
    """A daily check-in, scored for risk. With an `Idempotency-Key`, a retry of the same
    request answers what the first did and creates nothing; the same key with another
    body is a conflict."""
    if principal.role not in ("patient", "clinician", "front_desk", "site_admin", "network_admin"):
        raise NotFound("patient not found")
    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    caller = hashlib.sha256(principal.sub.encode()).hexdigest()[:16]
    submitted = CheckInRequest(
        principal=principal,
        patient_id=str(patient_id),
        answers=body.model_dump(),
        request_hash=request_hash,
        scope=f"check-in:{patient_id}:{caller}",
        idempotency_key=idempotency_key,
        trace_context=current_context(),
    )
    try:
        answer = await check_ins.record(submitted)
    except IdempotencyRace as race:  # alone in its transaction, and lost: the winner's answer
        if race.winner is None:
            raise
        answer = Replayed(*_replayed(race.winner, request_hash))
    if isinstance(answer, Replayed):
        return JSONResponse(answer.body, status_code=answer.status)
    return answer


async def write_check_ins(session: AsyncSession, requests: list[CheckInRequest]) -> list[CheckInAnswer | Exception]:
    """A group of check-in requests in one transaction, set-based (usecases.record_check_ins):
    the patients (with their open episodes and recent cravings) and the Idempotency-Keys
    read in one query each, then the check-ins,
    their audit rows and their keys written in one multi-row INSERT each. Each request is
    answered as it would be alone: 404 (a refusal audited), a replay of its key's first
    answer, a refusal of the use case, or its new check-in."""
    subjects = await usecases.check_in_subjects(session, [r.patient_id for r in requests])
    earlier = await store.get_idempotent_many(session, [r.key for r in requests if r.key])
    answers: list[CheckInAnswer | Exception | None] = [None] * len(requests)
    audit: list[dict[str, object]] = []
    fresh: list[int] = []
    for index, request in enumerate(requests):
        subject = subjects.get(request.patient_id)
        if subject is None:
            answers[index] = NotFound("patient not found")
        elif not _may_see(request.principal, subject.patient):
            audit.append(
                store.record_access.row(
                    request.principal, "check_in.submit.denied", subject.patient["site_id"], request.patient_id
                )
            )
            answers[index] = AccessDenied("patient not found")
        elif request.key in earlier:
            try:
                answers[index] = Replayed(*_replayed(earlier[request.key], request.request_hash))
            except Conflict as conflict:
                answers[index] = conflict
                continue
            audit.append(
                store.record_access.row(
                    request.principal, "check_in.replay", subject.patient["site_id"], request.patient_id
                )
            )
        else:
            fresh.append(index)
    keys = [requests[i].key for i in fresh if requests[i].key]
    if len(keys) != len(set(keys)):
        raise IdempotencyRace()  # the same key twice in this group: one at a time decides
    submissions = [
        usecases.Submission(
            requests[i].principal, subjects[requests[i].patient_id], requests[i].answers, requests[i].trace_context
        )
        for i in fresh
    ]
    remember: list[dict[str, Any]] = []
    for index, recorded in zip(fresh, await usecases.record_check_ins(session, submissions, clock.now), strict=True):
        request = requests[index]
        if isinstance(recorded, Exception):
            answers[index] = recorded
            continue
        answer = CheckInOut(**{k: recorded[k] for k in CheckInOut.model_fields})
        answers[index] = answer
        audit.append(
            store.record_access.row(request.principal, "check_in.submit", recorded["site_id"], request.patient_id)
        )
        if request.key:
            remember.append(_idempotency_row(request, answer))
    await store.record_access.many(session, audit)
    inserted = await store.remember_idempotent_many(session, remember)
    lost = [(row["scope"], row["key"]) for row in remember if (row["scope"], row["key"]) not in inserted]
    if lost:
        # A concurrent request with the same key committed first: roll back, answer its result.
        raise IdempotencyRace((await store.get_idempotent_many(session, lost[:1]))[lost[0]])
    assert all(answer is not None for answer in answers)
    return cast("list[CheckInAnswer | Exception]", answers)


def _idempotency_row(request: CheckInRequest, answer: CheckInOut) -> dict[str, Any]:
    return {
        "scope": request.scope,
        "key": request.idempotency_key,
        "request_hash": request.request_hash,
        "status_code": 201,
        "response": answer.model_dump_json(),
    }


def _may_see(principal: Principal, patient: PatientRow) -> bool:
    if principal.role == "patient":
        return principal.patient_id == UUID(patient["patient_id"])
    return principal.sees_site(patient["site_id"])


def _replayed(earlier: IdempotencyRow, request_hash: str) -> tuple[int, dict[str, Any]]:
    if earlier["request_hash"] != request_hash:
        raise Conflict("this Idempotency-Key was used for a different check-in")
    return int(earlier["status_code"]), json.loads(earlier["response"])


@router.get("/patients/{patient_id}/check-ins", response_model=list[CheckInRecord], tags=["check-ins"])
async def list_check_ins(patient_id: UUID, principal: StaffOrPatient, session: Db) -> list[CheckInRecord]:
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "check_in.read")
        rows = await store.patient_check_ins(session, str(patient_id))
        await store.record_access(session, principal, "check_in.read", patient["site_id"], patient_id)
    return [
        CheckInRecord(
            **_values(r, [k for k in CheckInRecord.model_fields if k in r and k not in ("substances", "risk_reasons")]),
            substances=json.loads(r["substances"]),
            risk_reasons=json.loads(r["risk_reasons"]),
        )
        for r in rows
    ]


# --- recovery plan ------------------------------------------------------------------------


async def _plan_out(session: AsyncSession, enrollment: EnrollmentRow) -> PlanOut:
    goals = await store.plan_goals_of(session, enrollment["enrollment_id"])
    progress = await store.progress_of(session, [g["goal_id"] for g in goals])
    return PlanOut(
        plan_id=domain.plan_id_of(enrollment["enrollment_id"]),
        enrollment_id=UUID(enrollment["enrollment_id"]),
        goals=[
            GoalOut(
                **_values(g, ("goal_id", "text", "target", "status", "review_on")),
                progress=[
                    ProgressOut(**_values(p, ProgressOut.model_fields))
                    for p in progress
                    if p["goal_id"] == g["goal_id"]
                ],
            )
            for g in goals
        ],
    )


@router.post("/enrollments/{enrollment_id}/plan/goals", status_code=201, response_model=PlanOut, tags=["plan"])
async def add_goal(enrollment_id: UUID, body: GoalIn, principal: Clinical, session: Db) -> PlanOut:
    async with transaction(session):
        enrollment = await _visible_enrollment(session, principal, enrollment_id, "plan.update", lock=True)
        await usecases.add_goal(session, enrollment, body.model_dump())
        await store.record_access(session, principal, "plan.update", enrollment["site_id"], enrollment["patient_id"])
        return await _plan_out(session, enrollment)


@router.patch("/goals/{goal_id}", response_model=PlanOut, tags=["plan"])
async def change_goal(goal_id: UUID, body: GoalChange, principal: Clinical, session: Db) -> PlanOut:
    changes = body.model_dump(exclude_unset=True, exclude={"note"})
    async with transaction(session):
        goal = await store.get_goal(session, str(goal_id))
        if goal is None:
            raise NotFound("goal not found")
        try:
            enrollment = await _visible_enrollment(
                session, principal, UUID(goal["enrollment_id"]), "plan.update", lock=True
            )
        except AccessDenied:
            raise AccessDenied("goal not found") from None
        await usecases.change_goal(session, principal.sub, goal, enrollment, changes, body.note)
        await store.record_access(session, principal, "plan.update", enrollment["site_id"], enrollment["patient_id"])
        return await _plan_out(session, enrollment)


@router.get("/enrollments/{enrollment_id}/plan", response_model=PlanOut, tags=["plan"])
async def read_plan(enrollment_id: UUID, principal: StaffOrPatient, session: Db) -> PlanOut:
    async with transaction(session):
        enrollment = await _visible_enrollment(session, principal, enrollment_id, "plan.read")
        await store.record_access(session, principal, "plan.read", enrollment["site_id"], enrollment["patient_id"])
        return await _plan_out(session, enrollment)


# --- audit ----------------------------------------------------------------------------------


@router.get("/audit", response_model=list[AuditOut], tags=["audit"])
async def read_audit(
    principal: Admin,
    session: Db,
    patient_id: UUID | None = None,
    since: Annotated[AwareDatetime | None, Query(alias="from")] = None,
    until: Annotated[AwareDatetime | None, Query(alias="to")] = None,
) -> list[AuditOut]:
    rows = await store.audit_rows(
        session, principal.visible_sites(), str(patient_id) if patient_id else None, since, until
    )
    return [AuditOut.model_validate(r) for r in rows]


# --- potential duplicates (network admins) -----------------------------------------------------


class DuplicateOut(BaseModel):
    """Ids and sites only: a network admin opens the two records to compare them (audited)."""

    duplicate_id: UUID
    patient_id: UUID
    site_id: str
    match_patient_id: UUID
    match_site_id: str
    created_at: datetime
    status: Literal["open", "resolved"]
    resolution: Literal["linked", "dismissed"] | None
    resolved_at: datetime | None
    resolved_by: str | None


async def _audit_pair(session: AsyncSession, principal: Principal, action: str, row: DuplicateRow) -> None:
    await store.record_access(session, principal, action, row["site_id"], row["patient_id"])
    await store.record_access(session, principal, action, row["match_site_id"], row["match_patient_id"])


@router.get("/potential-duplicates", response_model=list[DuplicateOut], tags=["patients"])
async def list_potential_duplicates(
    principal: NetworkAdmin,
    session: Db,
    status: Literal["open", "resolved", "all"] = "open",
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[DuplicateOut]:
    """Registrations that matched (folded name and birth date) a patient at a site the
    registering desk does not serve. Listing is a read of both records: audited."""
    async with session.begin():
        rows = await store.list_potential_duplicates(session, None if status == "all" else status, limit)
        for row in rows:
            await _audit_pair(session, principal, "patient.duplicate_review", row)
    return [DuplicateOut(**_values(r, DuplicateOut.model_fields)) for r in rows]


async def _resolve(
    session: AsyncSession, principal: Principal, duplicate_id: UUID, resolution: Literal["linked", "dismissed"]
) -> DuplicateOut:
    async with session.begin():
        row = await usecases.resolve_duplicate(session, str(duplicate_id), resolution, principal.sub)
        action = "patient.duplicate_link" if resolution == "linked" else "patient.duplicate_dismiss"
        await _audit_pair(session, principal, action, row)
    return DuplicateOut(**_values(row, DuplicateOut.model_fields))


@router.post("/potential-duplicates/{duplicate_id}/link", response_model=DuplicateOut, tags=["patients"])
async def link_duplicate(duplicate_id: UUID, principal: NetworkAdmin, session: Db) -> DuplicateOut:
    """The two records are one person: recorded for the network (the records are not merged)."""
    return await _resolve(session, principal, duplicate_id, "linked")


@router.post("/potential-duplicates/{duplicate_id}/dismiss", response_model=DuplicateOut, tags=["patients"])
async def dismiss_duplicate(duplicate_id: UUID, principal: NetworkAdmin, session: Db) -> DuplicateOut:
    """Two different people who share a folded name and a birth date."""
    return await _resolve(session, principal, duplicate_id, "dismissed")
