"""Scheduling HTTP API."""

from datetime import date
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from services.scheduling import store
from shared.audit import record_access
from shared.auth import Principal, ensure_site, require_roles
from shared.errors import NotFound
from shared.http import Db

router = APIRouter()

Staff = Annotated[Principal, Depends(require_roles("network_admin", "site_admin", "clinician", "front_desk"))]


class SiteOut(BaseModel):
    site_id: str
    name: str
    timezone: str


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


@router.get("/sites", response_model=list[SiteOut], tags=["sites"])
async def list_sites(principal: Staff, session: Db) -> list[SiteOut]:
    return [SiteOut(**r) for r in await store.list_sites(session, principal.visible_sites())]


@router.get("/enrollments/{enrollment_id}", response_model=EnrollmentOut, tags=["enrollments"])
async def read_enrollment(enrollment_id: UUID, principal: Staff, session: Db) -> EnrollmentOut:
    async with session.begin():
        enrollment = await store.get_enrollment(session, str(enrollment_id))
        if enrollment is None:
            raise NotFound("enrollment not found")
        ensure_site(principal, enrollment["site_id"], "enrollment")
        await record_access(
            session, store.audit, principal, action="enrollment.read",
            site_id=enrollment["site_id"], patient_id=enrollment["patient_id"],
        )  # fmt: skip
    return EnrollmentOut(**{k: v for k, v in enrollment.items() if k in EnrollmentOut.model_fields})
