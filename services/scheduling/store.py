"""Scheduling's own database: its projections of sites and enrollments, plus outbox,
inbox and audit."""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Date, Float, MetaData, String, Table, insert, select, update
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
    Column("updated_at", UtcDateTime, nullable=False),
)

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
)


def now() -> datetime:
    return datetime.now(UTC)


async def upsert_site(session: AsyncSession, site_id: str, name: str, timezone: str) -> None:
    values = {"name": name, "timezone": timezone, "updated_at": now()}
    found = await session.execute(update(sites).where(sites.c.site_id == site_id).values(**values))
    if found.rowcount == 0:
        await session.execute(insert(sites).values(site_id=site_id, **values))


async def list_sites(session: AsyncSession, only: list[str] | None) -> list[dict[str, Any]]:
    query = select(sites).order_by(sites.c.site_id)
    if only is not None:
        query = query.where(sites.c.site_id.in_(only))
    return [dict(r) for r in (await session.execute(query)).mappings()]


async def get_enrollment(session: AsyncSession, enrollment_id: str) -> dict[str, Any] | None:
    query = select(enrollments).where(enrollments.c.enrollment_id == enrollment_id)
    row = (await session.execute(query)).mappings().first()
    return dict(row) if row else None


async def add_enrollment(session: AsyncSession, **values: Any) -> None:
    await session.execute(insert(enrollments).values(created_at=now(), **values))
