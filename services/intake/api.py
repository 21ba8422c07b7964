"""Intake HTTP API (DESIGN A6): sites, patients, enrollments and their lifecycle,
Part 2 consents, daily check-ins with risk, recovery plans, and the audit trail.

Every read or change of a patient record writes an audit row in the same transaction;
a refused read is audited too (`transaction` keeps that row when it answers 404)."""

import hashlib
import json
import re
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic import AwareDatetime as PydanticAwareDatetime
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.intake import domain, store
from shared.audit import record_access
from shared.auth import Principal, ensure_site, require_roles
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import (
    CheckInSubmitted,
    Cohort,
    ConsentGranted,
    ConsentRevoked,
    DischargeReason,
    GoalStatus,
    LevelOfCare,
    PatientContactChanged,
    PatientDischarged,
    PatientEnrolled,
    PatientTransferred,
    PreferredChannel,
    ReferralSource,
    SiteId,
    SiteRegistered,
    TreatmentPlanUpdated,
)
from shared.db import transaction
from shared.errors import AccessDenied, AuditedConflict, Conflict, Invalid, NotFound
from shared.http import Db

router = APIRouter()

NetworkAdmin = Annotated[Principal, Depends(require_roles("network_admin"))]
Staff = Annotated[Principal, Depends(require_roles("network_admin", "site_admin", "clinician", "front_desk"))]
Clinical = Annotated[Principal, Depends(require_roles("network_admin", "site_admin", "clinician"))]
StaffOrPatient = Annotated[
    Principal, Depends(require_roles("network_admin", "site_admin", "clinician", "front_desk", "patient"))
]
Auditor = Annotated[Principal, Depends(require_roles("network_admin", "site_admin"))]
AnyStaffOrSystem = Annotated[
    Principal, Depends(require_roles("network_admin", "site_admin", "clinician", "front_desk", "integration"))
]

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
ConsentPurpose = Literal[
    "treatment", "care_coordination", "appointment_reminders", "payment", "court_reporting", "research"
]


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # PostgreSQL text cannot hold U+0000 (the insert fails with a 500); no input needs it.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("may not contain the NUL character")
        return value


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


def _channel_has_address(preferred: str | None, phone: str | None, email: str | None) -> None:
    if preferred == "sms" and not phone:
        raise ValueError("preferred_channel sms needs a phone number")
    if preferred == "email" and not email:
        raise ValueError("preferred_channel email needs an email address")


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
        _channel_has_address(self.preferred_channel, self.phone, self.email)
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


_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
RECIPIENT_PATTERN = rf"^((class|org):[a-z0-9_-]{{2,70}}|person:{_UUID})$"


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


def _invalid(error: domain.DomainError) -> Invalid:
    return Invalid(str(error), {error.field: str(error)} if error.field else None)


def _now() -> datetime:
    return datetime.now(UTC)


def _today() -> date:
    return _now().date()


def plan_id_of(enrollment_id: str) -> UUID:
    """One plan per episode, with a stable id: no row needed to name it."""
    return uuid5(NAMESPACE_URL, f"iopnet:plan:{enrollment_id}")


async def _audit(session: AsyncSession, principal: Principal, action: str, site_id: str, patient_id: Any) -> None:
    await record_access(session, store.audit, principal, action=action, site_id=site_id, patient_id=patient_id)


async def _visible_patient(
    session: AsyncSession, principal: Principal, patient_id: UUID, action: str
) -> dict[str, Any]:
    """The patient if the caller may see them, else 404 (and the denial is audited)."""
    patient = await store.get_patient(session, str(patient_id))
    if patient is None:
        raise NotFound("patient not found")
    if principal.role == "patient":
        allowed = principal.patient_id == patient_id
    else:
        allowed = principal.sees_site(patient["site_id"])
    if not allowed:
        await _audit(session, principal, f"{action}.denied", patient["site_id"], patient_id)
        raise AccessDenied("patient not found")
    return patient


async def _visible_enrollment(
    session: AsyncSession, principal: Principal, enrollment_id: UUID, action: str, *, lock: bool = False
) -> dict[str, Any]:
    enrollment = await store.get_enrollment(session, str(enrollment_id), lock=lock)
    if enrollment is None:
        raise NotFound("enrollment not found")
    try:
        await _visible_patient(session, principal, UUID(enrollment["patient_id"]), action)
    except AccessDenied:
        raise AccessDenied("enrollment not found") from None
    if principal.role != "patient" and not principal.sees_site(enrollment["site_id"]):
        # An older episode at a site the caller does not serve: a denied attempt, audited there.
        await _audit(session, principal, f"{action}.denied", enrollment["site_id"], enrollment["patient_id"])
        raise AccessDenied("enrollment not found")
    return enrollment


def _transition(current: str, target: domain.EnrollmentStatus) -> None:
    try:
        domain.check_transition(domain.EnrollmentStatus(current), target)
    except domain.IllegalTransition as error:
        raise Conflict(str(error)) from None


async def _enrollment_detail(session: AsyncSession, enrollment: dict[str, Any]) -> EnrollmentDetail:
    history = [HistoryOut(**h) for h in await store.history(session, enrollment["enrollment_id"])]
    return EnrollmentDetail(**{k: v for k, v in enrollment.items() if k in EnrollmentOut.model_fields}, history=history)


async def _treatment_ended_since(session: AsyncSession, patient_id: str, signed_at: datetime) -> bool:
    """'End of treatment' for a consent: a discharge on or after the day it was signed.
    A transfer continues treatment elsewhere; a later re-enrollment does not revive it."""
    return any(
        e["status"] == "discharged" and e["ended_on"] is not None and e["ended_on"] >= signed_at.date()
        for e in await store.patient_enrollments(session, patient_id)
    )


def _consent_state(consent: dict[str, Any], episode_ended: bool) -> domain.ConsentState:
    return domain.consent_state(
        revoked_at=consent["revoked_at"],
        expires_on=consent["expires_on"],
        expires_event=consent["expires_event"],
        today=_today(),
        episode_ended=episode_ended,
    )


# --- sites -----------------------------------------------------------------------------


@router.post("/sites", status_code=201, response_model=SiteOut, tags=["sites"])
async def register_site(body: SiteIn, principal: NetworkAdmin, session: Db) -> SiteOut:
    try:
        domain.validate_timezone(body.timezone)
    except domain.DomainError as error:
        raise _invalid(error) from None
    try:
        async with session.begin():
            if await store.get_site(session, body.site_id):
                raise Conflict(f"site {body.site_id} already exists")
            await store.add_site(session, **body.model_dump())
            event = SiteRegistered(name=body.name, timezone=body.timezone)
            await store.outbox.stage(session, new_envelope(event, site_id=body.site_id))
    except IntegrityError:
        raise Conflict(f"site {body.site_id} already exists") from None
    return SiteOut(**body.model_dump())


@router.patch("/sites/{site_id}", response_model=SiteOut, tags=["sites"])
async def update_site(site_id: SiteId, body: SiteChange, principal: NetworkAdmin, session: Db) -> SiteOut:
    changes = body.model_dump(exclude_unset=True)
    if "timezone" in changes:
        try:
            domain.validate_timezone(changes["timezone"] or "")
        except domain.DomainError as error:
            raise _invalid(error) from None
    async with session.begin():
        site = await store.get_site(session, site_id)
        if site is None:
            raise NotFound("site not found")
        if changes:
            await store.update_site(session, site_id, **changes)
        updated = {**site, **changes}
        if changes.keys() & {"name", "timezone"}:
            event = SiteRegistered(name=updated["name"], timezone=updated["timezone"])
            await store.outbox.stage(session, new_envelope(event, site_id=site_id))
    return SiteOut(**{k: updated[k] for k in SiteOut.model_fields})


@router.get("/sites", response_model=list[SiteOut], tags=["sites"])
async def list_sites(principal: AnyStaffOrSystem, session: Db) -> list[SiteOut]:
    return [
        SiteOut(**{k: r[k] for k in SiteOut.model_fields})
        for r in await store.list_sites(session, principal.visible_sites())
    ]


class ProgramOut(BaseModel):
    program_id: str
    site_id: str
    name: str
    cohort: str
    level_of_care: str


@router.get("/programs", response_model=list[ProgramOut], tags=["sites"])
async def list_programs(
    principal: AnyStaffOrSystem, session: Db, site_id: Annotated[SiteId | None, Query()] = None
) -> list[ProgramOut]:
    """Programs a patient can be enrolled in: intake's projection of ProgramPublished."""
    rows = await store.list_programs(session, site_id)
    return [ProgramOut(**{k: r[k] for k in ProgramOut.model_fields}) for r in rows if principal.sees_site(r["site_id"])]


# --- patients --------------------------------------------------------------------------


@router.post("/patients", status_code=201, response_model=PatientOut, tags=["patients"])
async def create_patient(body: PatientIn, principal: Staff, session: Db) -> PatientOut:
    ensure_site(principal, body.site_id, "site")
    try:
        domain.validate_birth_date(body.birth_date, _today())
    except domain.DomainError as error:
        raise _invalid(error) from None
    patient_id = uuid4()
    values = body.model_dump(exclude={"confirmed_not_duplicate"})
    name_key = domain.normalize_name(body.given_name + body.family_name)
    async with transaction(session):
        if not await store.get_site(session, body.site_id):
            raise Invalid("unknown site", {"site_id": "no such site is registered"})
        await store.lock_identity(session, name_key, body.birth_date)
        matches = await store.find_identities(session, name_key, body.birth_date)
        seen = [m for m in matches if principal.sees_site(m["site_id"])]
        if seen and not body.confirmed_not_duplicate:
            # Naming the existing record is an access to it: audited, and the row kept.
            existing = seen[0]
            await _audit(session, principal, "patient.duplicate_match", existing["site_id"], existing["patient_id"])
            raise AuditedConflict(
                f"likely duplicate of patient {existing['patient_id']} ({existing['mrn']})",
                {"patient_id": existing["patient_id"]},
            )
        mrn = domain.new_mrn()
        while await store.mrn_taken(session, mrn):
            mrn = domain.new_mrn()
        await store.add_patient(session, patient_id=str(patient_id), mrn=mrn, name_key=name_key, **values)
        await _queue_unseen_matches(session, patient_id, [m for m in matches if m not in seen])
        await _stage_contact(session, patient_id, body.site_id, values)
        await _audit(session, principal, "patient.create", body.site_id, patient_id)
    return PatientOut(patient_id=patient_id, mrn=mrn, **values)


async def _queue_unseen_matches(session: AsyncSession, patient_id: UUID, unseen: list[dict[str, Any]]) -> None:
    """Matches at sites the caller does not serve go to the network admins' queue, never
    into the answer: a 409 would tell this site that the person is in treatment elsewhere.
    No audit row is written here: nothing was disclosed to anyone yet, and a row at the
    matched site naming this caller would tell that site where the person registered.
    A desk's `confirmed_not_duplicate` covers the records it was shown, not these."""
    for match in unseen:
        await store.add_potential_duplicate(session, str(patient_id), match["patient_id"])


async def _stage_contact(session: AsyncSession, patient_id: UUID, site_id: str, values: dict[str, Any]) -> None:
    """Contact details travel only on iop.restricted.> (PatientContactChanged.restricted)."""
    contact = PatientContactChanged(
        patient_id=patient_id,
        phone=values["phone"],
        email=values["email"],
        preferred_channel=values["preferred_channel"],
        language=values["language"],
    )
    await store.outbox.stage(session, new_envelope(contact, site_id=site_id))


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
            await _audit(session, principal, "patient.search", row["site_id"], row["patient_id"])
    return [PatientSummary(**{k: r[k] for k in PatientSummary.model_fields}) for r in rows]


@router.get("/patients/{patient_id}", response_model=PatientOut, tags=["patients"])
async def read_patient(patient_id: UUID, principal: StaffOrPatient, session: Db) -> PatientOut:
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "patient.read")
        episodes = await store.patient_enrollments(session, str(patient_id))
        await _audit(session, principal, "patient.read", patient["site_id"], patient_id)
    fields = {k: v for k, v in patient.items() if k in PatientOut.model_fields}
    return PatientOut(
        **fields, enrollments=[EnrollmentOut(**{k: e[k] for k in EnrollmentOut.model_fields}) for e in episodes]
    )


@router.patch("/patients/{patient_id}", response_model=PatientOut, tags=["patients"])
async def update_patient(patient_id: UUID, body: PatientChange, principal: Staff, session: Db) -> PatientOut:
    changes = body.model_dump(exclude_unset=True)
    if "birth_date" in changes:
        try:
            domain.validate_birth_date(changes["birth_date"], _today())
        except domain.DomainError as error:
            raise _invalid(error) from None
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "patient.update")
        updated = {**patient, **changes}
        try:
            _channel_has_address(updated["preferred_channel"], updated["phone"], updated["email"])
        except ValueError as error:
            raise Invalid(str(error), {"preferred_channel": str(error)}) from None
        if changes.keys() & {"given_name", "family_name"}:
            changes["name_key"] = domain.normalize_name(updated["given_name"] + updated["family_name"])
        if changes:
            await store.update_patient(session, str(patient_id), **changes)
        if changes.keys() & {"phone", "email", "preferred_channel", "language"}:
            await _stage_contact(session, patient_id, patient["site_id"], updated)
        await _audit(session, principal, "patient.update", patient["site_id"], patient_id)
        episodes = await store.patient_enrollments(session, str(patient_id))
    fields = {k: v for k, v in updated.items() if k in PatientOut.model_fields}
    return PatientOut(
        **fields, enrollments=[EnrollmentOut(**{k: e[k] for k in EnrollmentOut.model_fields}) for e in episodes]
    )


# --- enrollments -----------------------------------------------------------------------


@router.post("/patients/{patient_id}/enrollments", status_code=201, response_model=EnrollmentOut, tags=["enrollments"])
async def enroll_patient(patient_id: UUID, body: EnrollmentIn, principal: Staff, session: Db) -> EnrollmentOut:
    try:
        domain.check_start_date(body.start_date, _today())
    except domain.DomainError as error:
        raise _invalid(error) from None
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "enrollment.create")
        await _check_program(session, body.program_id, patient["site_id"], body.cohort)
        enrollment, _ = await _open_episode(session, principal, patient, body.model_dump(), None)
    return EnrollmentOut(**{k: enrollment[k] for k in EnrollmentOut.model_fields})


async def _check_program(session: AsyncSession, program_id: str, site_id: str, cohort: str) -> None:
    program = await store.get_program(session, program_id)
    if program is None or program["site_id"] != site_id:
        raise Invalid("unknown program", {"program_id": "not a published program of this site"})
    if program["cohort"] != cohort:
        raise Invalid("the program serves another cohort", {"cohort": f"program is for {program['cohort']}"})


async def _open_episode(
    session: AsyncSession, principal: Principal, patient: dict[str, Any], spec: dict[str, Any], cause: Envelope | None
) -> tuple[dict[str, Any], Envelope]:
    """Create an enrollment (pending or active) and stage PatientEnrolled."""
    patient_id = patient["patient_id"]
    # The patient row's lock serializes concurrent enrollments: one open episode, even on PostgreSQL.
    await store.get_patient(session, patient_id, lock=True)
    open_statuses = [str(s) for s in domain.OPEN_STATUSES]
    try:
        domain.check_can_enroll(await store.open_enrollment_count(session, patient_id, open_statuses))
    except domain.IllegalTransition as error:
        raise Conflict(str(error)) from None
    enrollment_id = uuid4()
    status = domain.initial_status(spec["start_date"], _today())
    event = PatientEnrolled(patient_id=UUID(patient_id), enrollment_id=enrollment_id, **spec)
    envelope = (
        new_envelope(
            event, site_id=patient["site_id"], correlation_id=cause.correlation_id, causation_id=cause.event_id
        )
        if cause
        else new_envelope(event, site_id=patient["site_id"])
    )
    await store.add_enrollment(
        session,
        enrollment_id=str(enrollment_id),
        patient_id=patient_id,
        site_id=patient["site_id"],
        status=str(status),
        correlation_id=str(envelope.correlation_id),
        **spec,
    )
    await store.add_history(session, str(enrollment_id), "created", principal.sub, to_value=str(status))
    await store.outbox.stage(session, envelope)
    await _audit(session, principal, "enrollment.create", patient["site_id"], patient_id)
    enrollment = await store.get_enrollment(session, str(enrollment_id))
    assert enrollment is not None
    return enrollment, envelope


@router.get("/enrollments/{enrollment_id}", response_model=EnrollmentDetail, tags=["enrollments"])
async def read_enrollment(enrollment_id: UUID, principal: StaffOrPatient, session: Db) -> EnrollmentDetail:
    async with transaction(session):
        enrollment = await _visible_enrollment(session, principal, enrollment_id, "enrollment.read")
        await _audit(session, principal, "enrollment.read", enrollment["site_id"], enrollment["patient_id"])
        return await _enrollment_detail(session, enrollment)


@router.post("/enrollments/{enrollment_id}/level", response_model=EnrollmentDetail, tags=["enrollments"])
async def change_level(enrollment_id: UUID, body: LevelIn, principal: Clinical, session: Db) -> EnrollmentDetail:
    """Step-down or step-up between ASAM levels within the episode, kept as history."""
    async with transaction(session):
        enrollment = await _visible_enrollment(session, principal, enrollment_id, "enrollment.level", lock=True)
        if enrollment["status"] not in {str(s) for s in domain.OPEN_STATUSES}:
            raise Conflict(f"a {enrollment['status']} enrollment cannot change level")
        try:
            change = domain.level_change(enrollment["level_of_care"], body.level_of_care)
        except domain.IllegalTransition as error:
            raise Conflict(str(error)) from None
        await store.update_enrollment(session, str(enrollment_id), level_of_care=body.level_of_care)
        await store.add_history(
            session,
            str(enrollment_id),
            str(change),
            principal.sub,
            from_value=enrollment["level_of_care"],
            to_value=body.level_of_care,
            reason=body.reason,
        )
        await _audit(session, principal, "enrollment.level", enrollment["site_id"], enrollment["patient_id"])
        updated = await store.get_enrollment(session, str(enrollment_id))
        assert updated is not None
        return await _enrollment_detail(session, updated)


@router.post(
    "/enrollments/{enrollment_id}/transfer", status_code=201, response_model=EnrollmentOut, tags=["enrollments"]
)
async def transfer(enrollment_id: UUID, body: TransferIn, principal: Clinical, session: Db) -> EnrollmentOut:
    """Ends the episode at this site (transferred) and opens one at the receiving site.

    PatientTransferred is published under both sites' subjects, so both sites'
    subscribers see it; PatientEnrolled follows for the new episode."""
    if body.effective_on < _today() - timedelta(days=30):
        raise Invalid("effective_on is too far in the past", {"effective_on": "more than 30 days ago"})
    async with transaction(session):
        enrollment = await _visible_enrollment(session, principal, enrollment_id, "enrollment.transfer", lock=True)
        await _audit(session, principal, "enrollment.transfer", enrollment["site_id"], enrollment["patient_id"])
        if body.to_site_id == enrollment["site_id"]:
            raise Invalid("a transfer goes to another site", {"to_site_id": "same site"})
        await _check_destination(session, principal, body, enrollment["cohort"])
        _transition(enrollment["status"], domain.EnrollmentStatus.TRANSFERRED)
        await store.update_enrollment(session, str(enrollment_id), status="transferred", ended_on=body.effective_on)
        await store.add_history(
            session,
            str(enrollment_id),
            "transferred",
            principal.sub,
            from_value=enrollment["site_id"],
            to_value=body.to_site_id,
        )
        event = PatientTransferred(
            patient_id=UUID(enrollment["patient_id"]),
            enrollment_id=enrollment_id,
            from_site_id=enrollment["site_id"],
            to_site_id=body.to_site_id,
            to_program_id=body.to_program_id,
            effective_on=body.effective_on,
        )
        first = new_envelope(event, site_id=enrollment["site_id"], correlation_id=UUID(enrollment["correlation_id"]))
        second = new_envelope(
            event, site_id=body.to_site_id, correlation_id=first.correlation_id, causation_id=first.event_id
        )
        await store.outbox.stage(session, first, second)
        await store.update_patient(session, enrollment["patient_id"], site_id=body.to_site_id)
        patient = await store.get_patient(session, enrollment["patient_id"])
        assert patient is not None
        spec = {
            "program_id": body.to_program_id,
            "level_of_care": enrollment["level_of_care"],
            "cohort": enrollment["cohort"],
            "start_date": body.effective_on,
            "referral_source": enrollment["referral_source"],
        }
        new_episode, _ = await _open_episode(session, principal, patient, spec, first)
    return EnrollmentOut(**{k: new_episode[k] for k in EnrollmentOut.model_fields})


def _unknown_destination() -> Invalid:
    return Invalid(
        "unknown destination",
        {"to_site_id": "not a site you serve", "to_program_id": "not a published program of that site"},
    )


async def _check_destination(session: AsyncSession, principal: Principal, body: TransferIn, cohort: str) -> None:
    """The receiving site must be one the caller serves (network admins serve all). A site
    the caller does not serve, a site that does not exist and a program the site does not
    publish answer alike: the answer must not tell which site ids exist."""
    if not principal.sees_site(body.to_site_id) or await store.get_site(session, body.to_site_id) is None:
        raise _unknown_destination()
    program = await store.get_program(session, body.to_program_id)
    if program is None or program["site_id"] != body.to_site_id:
        raise _unknown_destination()
    if program["cohort"] != cohort:
        raise Invalid("the program serves another cohort", {"to_program_id": f"program is for {program['cohort']}"})


@router.post("/enrollments/{enrollment_id}/discharge", response_model=EnrollmentDetail, tags=["enrollments"])
async def discharge(enrollment_id: UUID, body: DischargeIn, principal: Clinical, session: Db) -> EnrollmentDetail:
    if body.discharged_on > _today() + timedelta(days=1):
        raise Invalid("discharged_on is in the future", {"discharged_on": "in the future"})
    async with transaction(session):
        enrollment = await _visible_enrollment(session, principal, enrollment_id, "enrollment.discharge", lock=True)
        _transition(enrollment["status"], domain.EnrollmentStatus.DISCHARGED)
        if body.discharged_on < enrollment["start_date"] and enrollment["status"] == "active":
            raise Invalid("discharged before the episode started", {"discharged_on": "before start_date"})
        await store.update_enrollment(session, str(enrollment_id), status="discharged", ended_on=body.discharged_on)
        await store.add_history(
            session,
            str(enrollment_id),
            "discharged",
            principal.sub,
            from_value=enrollment["status"],
            to_value="discharged",
            reason=body.reason,
        )
        event = PatientDischarged(
            patient_id=UUID(enrollment["patient_id"]),
            enrollment_id=enrollment_id,
            reason=body.reason,
            discharged_on=body.discharged_on,
        )
        envelope = new_envelope(event, site_id=enrollment["site_id"], correlation_id=UUID(enrollment["correlation_id"]))
        await store.outbox.stage(session, envelope)
        await _audit(session, principal, "enrollment.discharge", enrollment["site_id"], enrollment["patient_id"])
        updated = await store.get_enrollment(session, str(enrollment_id))
        assert updated is not None
        return await _enrollment_detail(session, updated)


# --- consents (42 CFR Part 2) -------------------------------------------------------------


@router.post("/patients/{patient_id}/consents", status_code=201, response_model=ConsentOut, tags=["consents"])
async def grant_consent(patient_id: UUID, body: ConsentIn, principal: StaffOrPatient, session: Db) -> ConsentOut:
    now = _now()
    try:
        domain.check_consent_dates(body.signed_at, body.expires_on, body.expires_event, now)
    except domain.DomainError as error:
        raise _invalid(error) from None
    consent_id = uuid4()
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "consent.grant")
        values = body.model_dump()
        await store.add_consent(
            session, consent_id=str(consent_id), patient_id=str(patient_id), site_id=patient["site_id"], **values
        )
        event = ConsentGranted(
            consent_id=consent_id,
            patient_id=patient_id,
            recipient=body.recipient,
            purpose=body.purpose,
            expires_on=body.expires_on,
            expires_event=body.expires_event,
        )
        await store.outbox.stage(session, new_envelope(event, site_id=patient["site_id"]))
        await _audit(session, principal, "consent.grant", patient["site_id"], patient_id)
    return ConsentOut(consent_id=consent_id, patient_id=patient_id, revoked_at=None, state="active", **values)


@router.get("/patients/{patient_id}/consents", response_model=list[ConsentOut], tags=["consents"])
async def list_consents(patient_id: UUID, principal: StaffOrPatient, session: Db) -> list[ConsentOut]:
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "consent.read")
        consents = await store.patient_consents(session, str(patient_id))
        states = [
            _consent_state(c, await _treatment_ended_since(session, str(patient_id), c["signed_at"])) for c in consents
        ]
        await _audit(session, principal, "consent.read", patient["site_id"], patient_id)
    return [
        ConsentOut(**{k: c[k] for k in ConsentOut.model_fields if k in c}, state=str(state))
        for c, state in zip(consents, states, strict=True)
    ]


@router.post("/consents/{consent_id}/revoke", response_model=ConsentOut, tags=["consents"])
async def revoke_consent(consent_id: UUID, body: RevokeIn, principal: StaffOrPatient, session: Db) -> ConsentOut:
    """Revocation in writing (sec. 2.31): the time it was made and an optional note."""
    now = _now()
    revoked_at = body.revoked_at or now
    if revoked_at > now + timedelta(minutes=5):
        raise Invalid("revoked_at is in the future", {"revoked_at": "in the future"})
    async with transaction(session):
        consent = await store.get_consent(session, str(consent_id), lock=True)
        if consent is None:
            raise NotFound("consent not found")
        try:
            patient = await _visible_patient(session, principal, UUID(consent["patient_id"]), "consent.revoke")
        except AccessDenied:
            raise AccessDenied("consent not found") from None
        ended = await _treatment_ended_since(session, consent["patient_id"], consent["signed_at"])
        try:
            domain.check_revocation(_consent_state(consent, ended))
        except domain.IllegalTransition as error:
            raise Conflict(str(error)) from None
        if revoked_at < consent["signed_at"]:
            raise Invalid("revoked before it was signed", {"revoked_at": "before signed_at"})
        await store.revoke_consent(session, str(consent_id), revoked_at, body.note)
        event = ConsentRevoked(
            consent_id=consent_id,
            patient_id=UUID(consent["patient_id"]),
            recipient=consent["recipient"],
            purpose=consent["purpose"],
            expires_on=consent["expires_on"],
            expires_event=consent["expires_event"],
        )
        await store.outbox.stage(session, new_envelope(event, site_id=patient["site_id"]))
        await _audit(session, principal, "consent.revoke", patient["site_id"], consent["patient_id"])
    fields = {k: consent[k] for k in ConsentOut.model_fields if k in consent}
    return ConsentOut(**{**fields, "revoked_at": revoked_at}, state="revoked")


# --- daily check-ins ------------------------------------------------------------------------


class _Replay(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body


@router.post("/patients/{patient_id}/check-ins", status_code=201, response_model=CheckInOut, tags=["check-ins"])
async def submit_check_in(
    patient_id: UUID,
    body: CheckInIn,
    principal: StaffOrPatient,
    session: Db,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> Any:
    """A daily check-in, scored for risk. With an `Idempotency-Key`, a retry of the same
    request answers what the first did and creates nothing; the same key with another
    body is a conflict."""
    if principal.role not in ("patient", "clinician", "front_desk", "site_admin", "network_admin"):
        raise NotFound("patient not found")
    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    # A key belongs to one caller and one patient: nobody replays someone else's answer.
    caller = hashlib.sha256(principal.sub.encode()).hexdigest()[:16]
    scope = f"check-in:{patient_id}:{caller}"
    replay: tuple[int, dict[str, Any]] | None = None
    try:
        async with transaction(session):
            patient = await _visible_patient(session, principal, patient_id, "check_in.submit")
            earlier = await store.get_idempotent(session, scope, idempotency_key) if idempotency_key else None
            if earlier is not None:
                replay = _replayed(earlier, request_hash)
                await _audit(session, principal, "check_in.replay", patient["site_id"], patient_id)
            else:
                answer = await _record_check_in(session, principal, patient, body)
                if idempotency_key and not await store.remember_idempotent(
                    session,
                    scope=scope,
                    key=idempotency_key,
                    request_hash=request_hash,
                    status_code=201,
                    response=answer.model_dump_json(),
                ):
                    # A concurrent retry won the race: roll back ours and answer with its result.
                    winner = await store.get_idempotent(session, scope, idempotency_key)
                    assert winner is not None
                    raise _Replay(*_replayed(winner, request_hash))
    except _Replay as raced:
        return JSONResponse(raced.body, status_code=raced.status)
    if replay is not None:
        return JSONResponse(replay[1], status_code=replay[0])
    return answer


def _replayed(earlier: dict[str, Any], request_hash: str) -> tuple[int, dict[str, Any]]:
    if earlier["request_hash"] != request_hash:
        raise Conflict("this Idempotency-Key was used for a different check-in")
    return int(earlier["status_code"]), json.loads(earlier["response"])


async def _record_check_in(
    session: AsyncSession, principal: Principal, patient: dict[str, Any], body: CheckInIn
) -> CheckInOut:
    enrollment = await store.open_enrollment(session, patient["patient_id"], [str(s) for s in domain.OPEN_STATUSES])
    if enrollment is None:
        raise Conflict("check-ins need an open enrollment")
    goals = {g["goal_id"]: g for g in await store.plan_goals_of(session, enrollment["enrollment_id"])}
    for index, progress in enumerate(body.goal_progress):
        if str(progress.goal_id) not in goals:
            raise Invalid("not a goal of this episode's plan", {f"goal_progress.{index}.goal_id": "unknown goal"})
    previous = await store.recent_cravings(session, enrollment["enrollment_id"])
    risk, reasons = domain.score_risk(
        mood=body.mood,
        craving=body.craving,
        used_since_last=body.used_since_last,
        safety_concern=body.safety_concern,
        previous_cravings=previous,
    )
    check_in_id, submitted_at = uuid4(), _now()
    await store.add_check_in(
        session,
        check_in_id=str(check_in_id),
        patient_id=patient["patient_id"],
        enrollment_id=enrollment["enrollment_id"],
        site_id=enrollment["site_id"],
        submitted_at=submitted_at,
        submitted_by=principal.sub,
        submitted_role=principal.role,
        mood=body.mood,
        craving=body.craving,
        used_since_last=body.used_since_last,
        substances=json.dumps(body.substances),
        sleep_hours=body.sleep_hours,
        safety_concern=body.safety_concern,
        goals=body.goals,
        challenges=body.challenges,
        risk=str(risk),
        risk_reasons=json.dumps(reasons),
    )
    for progress in body.goal_progress:
        await store.add_progress(
            session,
            goal_id=str(progress.goal_id),
            check_in_id=str(check_in_id),
            note=progress.note,
            actor=principal.sub,
        )
    event = CheckInSubmitted(
        check_in_id=check_in_id,
        patient_id=UUID(patient["patient_id"]),
        enrollment_id=UUID(enrollment["enrollment_id"]),
        submitted_at=submitted_at,
        mood=body.mood,
        craving=body.craving,
        used_since_last=body.used_since_last,
        safety_concern=body.safety_concern,
        risk=str(risk),
    )
    envelope = new_envelope(event, site_id=enrollment["site_id"], correlation_id=UUID(enrollment["correlation_id"]))
    await store.outbox.stage(session, envelope)
    await _audit(session, principal, "check_in.submit", enrollment["site_id"], patient["patient_id"])
    return CheckInOut(
        check_in_id=check_in_id,
        patient_id=patient["patient_id"],
        enrollment_id=enrollment["enrollment_id"],
        submitted_at=submitted_at,
        risk=str(risk),
        risk_reasons=reasons,
    )


@router.get("/patients/{patient_id}/check-ins", response_model=list[CheckInRecord], tags=["check-ins"])
async def list_check_ins(patient_id: UUID, principal: StaffOrPatient, session: Db) -> list[CheckInRecord]:
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "check_in.read")
        rows = await store.patient_check_ins(session, str(patient_id))
        await _audit(session, principal, "check_in.read", patient["site_id"], patient_id)
    return [
        CheckInRecord(
            **{k: r[k] for k in CheckInRecord.model_fields if k in r and k not in ("substances", "risk_reasons")},
            substances=json.loads(r["substances"]),
            risk_reasons=json.loads(r["risk_reasons"]),
        )
        for r in rows
    ]


# --- recovery plan ------------------------------------------------------------------------


async def _stage_plan(session: AsyncSession, enrollment: dict[str, Any]) -> None:
    goals = await store.plan_goals_of(session, enrollment["enrollment_id"])
    event = TreatmentPlanUpdated(
        patient_id=UUID(enrollment["patient_id"]),
        enrollment_id=UUID(enrollment["enrollment_id"]),
        plan_id=plan_id_of(enrollment["enrollment_id"]),
        goals=[GoalStatus(goal_id=UUID(g["goal_id"]), status=g["status"]) for g in goals],
    )
    envelope = new_envelope(event, site_id=enrollment["site_id"], correlation_id=UUID(enrollment["correlation_id"]))
    await store.outbox.stage(session, envelope)


async def _plan_out(session: AsyncSession, enrollment: dict[str, Any]) -> PlanOut:
    goals = await store.plan_goals_of(session, enrollment["enrollment_id"])
    progress = await store.progress_of(session, [g["goal_id"] for g in goals])
    return PlanOut(
        plan_id=plan_id_of(enrollment["enrollment_id"]),
        enrollment_id=enrollment["enrollment_id"],
        goals=[
            GoalOut(
                **{k: g[k] for k in ("goal_id", "text", "target", "status", "review_on")},
                progress=[
                    ProgressOut(**{k: p[k] for k in ProgressOut.model_fields})
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
        if enrollment["status"] not in {str(s) for s in domain.OPEN_STATUSES}:
            raise Conflict(f"a {enrollment['status']} enrollment's plan is closed")
        await store.add_goal(
            session,
            goal_id=str(uuid4()),
            plan_id=str(plan_id_of(str(enrollment_id))),
            enrollment_id=str(enrollment_id),
            text=body.text,
            target=body.target,
            status="active",
            review_on=body.review_on,
        )
        await _stage_plan(session, enrollment)
        await _audit(session, principal, "plan.update", enrollment["site_id"], enrollment["patient_id"])
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
        if "status" in changes:
            try:
                domain.check_goal_status_change(goal["status"], changes["status"])
            except domain.DomainError as error:
                raise (
                    Conflict(str(error)) if isinstance(error, domain.IllegalTransition) else _invalid(error)
                ) from None
        if changes:
            await store.update_goal(session, str(goal_id), **changes)
        if "status" in changes or body.note:
            await store.add_progress(
                session, goal_id=str(goal_id), note=body.note, status=changes.get("status"), actor=principal.sub
            )
        if "status" in changes:
            await _stage_plan(session, enrollment)
        await _audit(session, principal, "plan.update", enrollment["site_id"], enrollment["patient_id"])
        return await _plan_out(session, enrollment)


@router.get("/enrollments/{enrollment_id}/plan", response_model=PlanOut, tags=["plan"])
async def read_plan(enrollment_id: UUID, principal: StaffOrPatient, session: Db) -> PlanOut:
    async with transaction(session):
        enrollment = await _visible_enrollment(session, principal, enrollment_id, "plan.read")
        await _audit(session, principal, "plan.read", enrollment["site_id"], enrollment["patient_id"])
        return await _plan_out(session, enrollment)


# --- audit ----------------------------------------------------------------------------------


@router.get("/audit", response_model=list[AuditOut], tags=["audit"])
async def read_audit(
    principal: Auditor,
    session: Db,
    patient_id: UUID | None = None,
    since: Annotated[AwareDatetime | None, Query(alias="from")] = None,
    until: Annotated[AwareDatetime | None, Query(alias="to")] = None,
) -> list[AuditOut]:
    rows = await store.audit_rows(
        session, principal.visible_sites(), str(patient_id) if patient_id else None, since, until
    )
    return [AuditOut(**r) for r in rows]


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


async def _audit_pair(session: AsyncSession, principal: Principal, action: str, row: dict[str, Any]) -> None:
    await _audit(session, principal, action, row["site_id"], row["patient_id"])
    await _audit(session, principal, action, row["match_site_id"], row["match_patient_id"])


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
    return [DuplicateOut(**{k: r[k] for k in DuplicateOut.model_fields}) for r in rows]


async def _resolve(
    session: AsyncSession, principal: Principal, duplicate_id: UUID, resolution: Literal["linked", "dismissed"]
) -> DuplicateOut:
    async with session.begin():
        if await store.get_potential_duplicate(session, str(duplicate_id)) is None:
            raise NotFound("potential duplicate not found")
        if not await store.resolve_potential_duplicate(session, str(duplicate_id), resolution, principal.sub):
            raise Conflict("this potential duplicate is already resolved")
        row = await store.get_potential_duplicate(session, str(duplicate_id))
        assert row is not None
        action = "patient.duplicate_link" if resolution == "linked" else "patient.duplicate_dismiss"
        await _audit_pair(session, principal, action, row)
    return DuplicateOut(**{k: row[k] for k in DuplicateOut.model_fields})


@router.post("/potential-duplicates/{duplicate_id}/link", response_model=DuplicateOut, tags=["patients"])
async def link_duplicate(duplicate_id: UUID, principal: NetworkAdmin, session: Db) -> DuplicateOut:
    """The two records are one person: recorded for the network (the records are not merged)."""
    return await _resolve(session, principal, duplicate_id, "linked")


@router.post("/potential-duplicates/{duplicate_id}/dismiss", response_model=DuplicateOut, tags=["patients"])
async def dismiss_duplicate(duplicate_id: UUID, principal: NetworkAdmin, session: Db) -> DuplicateOut:
    """Two different people who share a folded name and a birth date."""
    return await _resolve(session, principal, duplicate_id, "dismissed")
