"""Intake HTTP API: sites, patients, enrollments, audit (DESIGN A6)."""

from datetime import UTC, date, datetime
from typing import Annotated, Any
from uuid import UUID, uuid4

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.exc import IntegrityError

from services.intake import domain, store
from shared.audit import record_access
from shared.auth import Principal, ensure_site, require_roles
from shared.contracts import new_envelope
from shared.contracts.events import (
    Cohort,
    LevelOfCare,
    PatientContactChanged,
    PatientEnrolled,
    PreferredChannel,
    ReferralSource,
    SiteId,
    SiteRegistered,
)
from shared.db import transaction
from shared.errors import AccessDenied, Conflict, Invalid, NotFound
from shared.http import Db

router = APIRouter()

NetworkAdmin = Annotated[Principal, Depends(require_roles("network_admin"))]
Staff = Annotated[Principal, Depends(require_roles("network_admin", "site_admin", "clinician", "front_desk"))]
StaffOrPatient = Annotated[
    Principal,
    Depends(require_roles("network_admin", "site_admin", "clinician", "front_desk", "patient")),
]
Auditor = Annotated[Principal, Depends(require_roles("network_admin", "site_admin"))]
AnyRole = Annotated[
    Principal,
    Depends(require_roles("network_admin", "site_admin", "clinician", "front_desk", "integration")),
]


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class SiteIn(Input):
    site_id: SiteId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    timezone: Annotated[str, Field(min_length=1, max_length=64)]


class SiteOut(BaseModel):
    site_id: str
    name: str
    timezone: str


class PatientIn(Input):
    site_id: SiteId
    given_name: Annotated[str, Field(min_length=1, max_length=100)]
    family_name: Annotated[str, Field(min_length=1, max_length=100)]
    birth_date: date
    phone: Annotated[str | None, Field(pattern=r"^\+[1-9]\d{6,14}$")] = None
    email: Annotated[str | None, Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")] = None
    preferred_channel: PreferredChannel = "none"
    language: Annotated[str, Field(pattern=r"^[a-z]{2}$")] = "en"

    @model_validator(mode="after")
    def _channel_has_address(self) -> "PatientIn":
        if self.preferred_channel == "sms" and not self.phone:
            raise ValueError("preferred_channel sms needs a phone number")
        if self.preferred_channel == "email" and not self.email:
            raise ValueError("preferred_channel email needs an email address")
        return self


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


class EnrollmentIn(Input):
    program_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    level_of_care: LevelOfCare
    cohort: Cohort
    start_date: date
    referral_source: ReferralSource


class AuditOut(BaseModel):
    at: datetime
    actor: str
    role: str
    site_id: str
    action: str
    patient_id: UUID | None


def _invalid(error: domain.DomainError) -> Invalid:
    return Invalid(str(error), {error.field: str(error)} if error.field else None)


def _today() -> date:
    return datetime.now(UTC).date()


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
            await store.add_site(session, site_id=body.site_id, name=body.name, timezone=body.timezone)
            event = SiteRegistered(name=body.name, timezone=body.timezone)
            await store.outbox.stage(session, new_envelope(event, site_id=body.site_id))
    except IntegrityError:
        raise Conflict(f"site {body.site_id} already exists") from None
    return SiteOut(site_id=body.site_id, name=body.name, timezone=body.timezone)


@router.get("/sites", response_model=list[SiteOut], tags=["sites"])
async def list_sites(principal: AnyRole, session: Db) -> list[SiteOut]:
    rows = await store.list_sites(session, principal.visible_sites())
    return [SiteOut(**r) for r in rows]


@router.post("/patients", status_code=201, response_model=PatientOut, tags=["patients"])
async def create_patient(body: PatientIn, principal: Staff, session: Db) -> PatientOut:
    ensure_site(principal, body.site_id, "site")
    try:
        domain.validate_birth_date(body.birth_date, _today())
    except domain.DomainError as error:
        raise _invalid(error) from None
    patient_id = uuid4()
    async with session.begin():
        if not await store.get_site(session, body.site_id):
            raise Invalid("unknown site", {"site_id": "no such site is registered"})
        mrn = domain.new_mrn()
        while await store.mrn_taken(session, mrn):
            mrn = domain.new_mrn()
        values = body.model_dump()
        values["name_key"] = domain.normalize_name(body.given_name + body.family_name)
        await store.add_patient(session, patient_id=str(patient_id), mrn=mrn, **values)
        contact = PatientContactChanged(
            patient_id=patient_id,
            phone=body.phone,
            email=body.email,
            preferred_channel=body.preferred_channel,
            language=body.language,
        )
        await store.outbox.stage(session, new_envelope(contact, site_id=body.site_id))
        await record_access(
            session,
            store.audit,
            principal,
            action="patient.create",
            site_id=body.site_id,
            patient_id=patient_id,
        )
    return PatientOut(patient_id=patient_id, mrn=mrn, **body.model_dump())


async def _visible_patient(session: Db, principal: Principal, patient_id: UUID, action: str) -> dict[str, Any]:
    """The patient if the caller may see them, else 404 (and the denial is audited)."""
    patient = await store.get_patient(session, str(patient_id))
    if patient is None:
        raise NotFound("patient not found")
    if principal.role == "patient":
        allowed = principal.patient_id == patient_id
    else:
        allowed = principal.sees_site(patient["site_id"])
    if not allowed:
        await record_access(
            session, store.audit, principal, action=f"{action}.denied",
            site_id=patient["site_id"], patient_id=patient_id,
        )  # fmt: skip
        raise AccessDenied("patient not found")
    return patient


@router.get("/patients/{patient_id}", response_model=PatientOut, tags=["patients"])
async def read_patient(patient_id: UUID, principal: StaffOrPatient, session: Db) -> PatientOut:
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "patient.read")
        episodes = await store.patient_enrollments(session, str(patient_id))
        await record_access(
            session, store.audit, principal, action="patient.read",
            site_id=patient["site_id"], patient_id=patient_id,
        )  # fmt: skip
    fields = {k: v for k, v in patient.items() if k in PatientOut.model_fields}
    return PatientOut(**fields, enrollments=[EnrollmentOut(**e) for e in episodes])


@router.post("/patients/{patient_id}/enrollments", status_code=201, response_model=EnrollmentOut, tags=["enrollments"])
async def enroll_patient(patient_id: UUID, body: EnrollmentIn, principal: Staff, session: Db) -> EnrollmentOut:
    today = _today()
    try:
        domain.check_start_date(body.start_date, today)
    except domain.DomainError as error:
        raise _invalid(error) from None
    enrollment_id = uuid4()
    async with transaction(session):
        patient = await _visible_patient(session, principal, patient_id, "enrollment.create")
        site_id = patient["site_id"]
        open_statuses = [str(s) for s in domain.OPEN_STATUSES]
        try:
            domain.check_can_enroll(await store.open_enrollment_count(session, str(patient_id), open_statuses))
        except domain.IllegalTransition as error:
            raise Conflict(str(error)) from None
        status = domain.initial_status(body.start_date, today)
        enrolled = PatientEnrolled(patient_id=patient_id, enrollment_id=enrollment_id, **body.model_dump())
        envelope = new_envelope(enrolled, site_id=site_id)
        await store.add_enrollment(
            session,
            enrollment_id=str(enrollment_id),
            patient_id=str(patient_id),
            site_id=site_id,
            status=str(status),
            correlation_id=str(envelope.correlation_id),
            **body.model_dump(),
        )
        await store.outbox.stage(session, envelope)
        await record_access(
            session,
            store.audit,
            principal,
            action="enrollment.create",
            site_id=site_id,
            patient_id=patient_id,
        )
    return EnrollmentOut(
        enrollment_id=enrollment_id,
        patient_id=patient_id,
        site_id=site_id,
        status=str(status),
        **body.model_dump(),
    )


@router.get("/audit", response_model=list[AuditOut], tags=["audit"])
async def read_audit(
    principal: Auditor,
    session: Db,
    patient_id: UUID | None = None,
    since: Annotated[datetime | None, Query(alias="from")] = None,
    until: Annotated[datetime | None, Query(alias="to")] = None,
) -> list[AuditOut]:
    rows = await store.audit_rows(
        session, principal.visible_sites(), str(patient_id) if patient_id else None, since, until
    )
    return [AuditOut(**r) for r in rows]
