"""Notifications' own database: contact and enrollment projections, the message log,
plus outbox, inbox and audit."""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Date,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from shared.audit import audit_table
from shared.db import UtcDateTime, lock_row
from shared.messaging import Inbox, Outbox

MIGRATIONS = Path(__file__).parent / "migrations"
metadata = MetaData()
outbox = Outbox(metadata)
inbox = Inbox(metadata)
audit = audit_table(metadata)

# One row per patient this service has heard of: the lock that serializes the
# handlers of different streams working on the same patient (see shared.db.lock_row).
patients = Table(
    "patients",
    metadata,
    Column("patient_id", String(36), primary_key=True),
)

contacts = Table(
    "contacts",
    metadata,
    Column("patient_id", String(36), primary_key=True),
    Column("site_id", String(40), nullable=False, index=True),
    Column("phone", String(32), nullable=True),
    Column("email", String(254), nullable=True),
    Column("preferred_channel", String(10), nullable=False),
    Column("language", String(10), nullable=False),
    Column("changed_at", UtcDateTime, nullable=False),
)

enrollments = Table(
    "enrollments",
    metadata,
    Column("enrollment_id", String(36), primary_key=True),
    Column("patient_id", String(36), nullable=False, index=True),
    Column("site_id", String(40), nullable=False, index=True),
    Column("start_date", Date, nullable=False),
    Column("enrolled_event_id", String(36), nullable=False),
    Column("correlation_id", String(36), nullable=False),
)

notifications = Table(
    "notifications",
    metadata,
    Column("notification_id", String(36), primary_key=True),
    Column("site_id", String(40), nullable=False, index=True),
    Column("patient_id", String(36), nullable=True, index=True),
    Column("recipient_kind", String(20), nullable=False),
    Column("recipient", String(80), nullable=False),
    Column("channel", String(10), nullable=False),
    Column("template", String(40), nullable=False),
    Column("language", String(10), nullable=False),
    Column("cause_event_id", String(36), nullable=False),
    Column("correlation_id", String(36), nullable=False),
    Column("status", String(12), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", String(300), nullable=True),
    Column("provider_id", String(120), nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("due_at", UtcDateTime, nullable=False, index=True),
    Column("sent_at", UtcDateTime, nullable=True),
    # One message per (cause event, template, recipient), however often the cause arrives.
    UniqueConstraint("cause_event_id", "template", "recipient", name="uq_notification_once"),
)


def now() -> datetime:
    return datetime.now(UTC)


async def lock_patient(session: AsyncSession, patient_id: str) -> None:
    await lock_row(session, patients, patient_id=patient_id)


async def upsert_contact(session: AsyncSession, patient_id: str, changed_at: datetime, **values: Any) -> None:
    current = (await session.execute(select(contacts.c.changed_at).where(contacts.c.patient_id == patient_id))).first()
    if current is None:
        await session.execute(insert(contacts).values(patient_id=patient_id, changed_at=changed_at, **values))
    elif current.changed_at <= changed_at:
        # Events may arrive out of order: an older change never overwrites a newer one.
        await session.execute(
            update(contacts).where(contacts.c.patient_id == patient_id).values(changed_at=changed_at, **values)
        )


async def get_contact(session: AsyncSession, patient_id: str) -> dict[str, Any] | None:
    row = (await session.execute(select(contacts).where(contacts.c.patient_id == patient_id))).mappings().first()
    return dict(row) if row else None


async def add_enrollment(session: AsyncSession, **values: Any) -> bool:
    query = select(enrollments.c.enrollment_id).where(enrollments.c.enrollment_id == values["enrollment_id"])
    if (await session.execute(query)).first() is not None:
        return False
    await session.execute(insert(enrollments).values(**values))
    return True


async def patient_enrollments(session: AsyncSession, patient_id: str) -> list[dict[str, Any]]:
    query = select(enrollments).where(enrollments.c.patient_id == patient_id)
    return [dict(r) for r in (await session.execute(query)).mappings()]


async def notification_exists(session: AsyncSession, cause_event_id: str, template: str, recipient: str) -> bool:
    query = select(notifications.c.notification_id).where(
        notifications.c.cause_event_id == cause_event_id,
        notifications.c.template == template,
        notifications.c.recipient == recipient,
    )
    return (await session.execute(query)).first() is not None


async def add_notification(session: AsyncSession, **values: Any) -> None:
    stamp = now()
    values.setdefault("due_at", stamp)
    await session.execute(insert(notifications).values(created_at=stamp, attempts=0, **values))


async def due_notifications(session: AsyncSession, limit: int) -> list[dict[str, Any]]:
    query = (
        select(notifications)
        .where(notifications.c.status == "pending", notifications.c.due_at <= now())
        .order_by(notifications.c.due_at)
        .limit(limit)
    )
    return [dict(r) for r in (await session.execute(query)).mappings()]


async def mark_notification(session: AsyncSession, notification_id: str, **values: Any) -> None:
    await session.execute(
        update(notifications).where(notifications.c.notification_id == notification_id).values(**values)
    )


async def patient_notifications(session: AsyncSession, patient_id: str) -> list[dict[str, Any]]:
    query = select(notifications).where(notifications.c.patient_id == patient_id).order_by(notifications.c.created_at)
    return [dict(r) for r in (await session.execute(query)).mappings()]
