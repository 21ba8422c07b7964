"""Intake's own database: sites, patients (PHI), enrollments, plus outbox, inbox, audit."""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Date,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from shared.audit import audit_table
from shared.db import UtcDateTime
from shared.messaging import Inbox, Outbox

MIGRATIONS = Path(__file__).parent / "migrations"
metadata = MetaData()
outbox = Outbox(metadata)
inbox = Inbox(metadata)
audit = audit_table(metadata)

sites = Table(
    "sites",
    metadata,
    Column("site_id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

patients = Table(
    "patients",
    metadata,
    Column("patient_id", String(36), primary_key=True),
    Column("site_id", String(40), ForeignKey("sites.site_id"), nullable=False, index=True),
    Column("mrn", String(20), nullable=False, unique=True),
    Column("given_name", String(100), nullable=False),
    Column("family_name", String(100), nullable=False),
    Column("name_key", String(200), nullable=False),
    Column("birth_date", Date, nullable=False),
    Column("phone", String(32), nullable=True),
    Column("email", String(254), nullable=True),
    Column("preferred_channel", String(10), nullable=False),
    Column("language", String(10), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_patients_identity", "name_key", "birth_date"),
)

enrollments = Table(
    "enrollments",
    metadata,
    Column("enrollment_id", String(36), primary_key=True),
    Column("patient_id", String(36), ForeignKey("patients.patient_id"), nullable=False, index=True),
    Column("site_id", String(40), ForeignKey("sites.site_id"), nullable=False, index=True),
    Column("program_id", String(64), nullable=False),
    Column("level_of_care", String(4), nullable=False),
    Column("cohort", String(12), nullable=False),
    Column("start_date", Date, nullable=False),
    Column("referral_source", String(20), nullable=False),
    Column("status", String(12), nullable=False),
    Column("correlation_id", String(36), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)


def now() -> datetime:
    return datetime.now(UTC)


async def get_site(session: AsyncSession, site_id: str) -> dict[str, Any] | None:
    row = (await session.execute(select(sites).where(sites.c.site_id == site_id))).mappings().first()
    return dict(row) if row else None


async def list_sites(session: AsyncSession, only: list[str] | None) -> list[dict[str, Any]]:
    query = select(sites).order_by(sites.c.site_id)
    if only is not None:
        query = query.where(sites.c.site_id.in_(only))
    return [dict(r) for r in (await session.execute(query)).mappings()]


async def add_site(session: AsyncSession, **values: Any) -> None:
    await session.execute(insert(sites).values(created_at=now(), **values))


async def get_patient(session: AsyncSession, patient_id: str) -> dict[str, Any] | None:
    row = (await session.execute(select(patients).where(patients.c.patient_id == patient_id))).mappings().first()
    return dict(row) if row else None


async def mrn_taken(session: AsyncSession, mrn: str) -> bool:
    return (await session.execute(select(patients.c.mrn).where(patients.c.mrn == mrn))).first() is not None


async def add_patient(session: AsyncSession, **values: Any) -> None:
    await session.execute(insert(patients).values(created_at=now(), **values))


async def open_enrollment_count(session: AsyncSession, patient_id: str, open_statuses: list[str]) -> int:
    query = (
        select(func.count())
        .select_from(enrollments)
        .where(enrollments.c.patient_id == patient_id, enrollments.c.status.in_(open_statuses))
    )
    return int((await session.execute(query)).scalar_one())


async def add_enrollment(session: AsyncSession, **values: Any) -> None:
    await session.execute(insert(enrollments).values(created_at=now(), **values))


async def patient_enrollments(session: AsyncSession, patient_id: str) -> list[dict[str, Any]]:
    query = select(enrollments).where(enrollments.c.patient_id == patient_id).order_by(enrollments.c.created_at)
    return [dict(r) for r in (await session.execute(query)).mappings()]


async def audit_rows(
    session: AsyncSession,
    site_ids: list[str] | None,
    patient_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    query = select(audit).order_by(audit.c.id)
    if site_ids is not None:
        query = query.where(audit.c.site_id.in_(site_ids))
    if patient_id is not None:
        query = query.where(audit.c.patient_id == patient_id)
    if since is not None:
        query = query.where(audit.c.at >= since)
    if until is not None:
        query = query.where(audit.c.at < until)
    return [dict(r) for r in (await session.execute(query)).mappings()]
