"""Notifications' own database: projections of the other services' events (contacts,
consents, sites, enrollments, sessions, bookings, attendance), what this service owns
(care-team rosters, site notification settings, alerts, webhook subscriptions), the
message log with its delivery attempts, plus outbox, inbox, audit and the operators'
repairs."""

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypedDict, TypeVar, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    delete,
    false,
    insert,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncSession

from shared import clock
from shared.audit import AuditTrail, audit_table
from shared.db import (
    UtcDateTime,
    dialect_name,
    in_list,
    insert_absent_rows,
    insert_if_absent,
    insert_row,
    insert_rows,
    kept_for_this_transaction,
    lock_row,
    lock_rows,
    rows_changed,
    select_by,
    update_by,
    update_rows_by,
    upsert_if_newer,
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

# Statuses of a message: pending (due at due_at), held (waits for the patient's consent
# or contact), sending (claimed by a dispatcher until due_at, its lease), sent, failed
# (after the last attempt, or refused), suppressed (the patient wants no messages),
# cancelled. status_reason says why: awaiting_consent, quiet_hours, business_hours,
# booking_cancelled, session_cancelled, discharged, consent_revoked, expired,
# acknowledged, recipient_removed, ...
OPEN_STATUSES = ("pending", "held")

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
    Column("status", String(12), nullable=False, server_default="active"),
    Column("discharged_on", Date, nullable=True),
)

# Every discharge or transfer-out heard of, by enrollment: one that arrives before its
# PatientEnrolled (out of order after a consumer restart) is remembered here, so the late
# enrollment opens ended and no welcome goes out. The first end of an episode wins.
episode_ends = Table(
    "episode_ends",
    metadata,
    Column("enrollment_id", String(36), primary_key=True),
    Column("patient_id", String(36), nullable=False, index=True),
    Column("site_id", String(40), nullable=False),
    Column("status", String(12), nullable=False),
    Column("ended_on", Date, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
)

site_directory = SiteDirectory(metadata)  # projection of SiteRegistered
sites = site_directory.table

# Per-site overrides of the defaults in settings (PUT /sites/{id}/notification-settings).
site_settings = Table(
    "site_settings",
    metadata,
    Column("site_id", String(40), primary_key=True),
    Column("reminder_offsets", Text, nullable=True),  # JSON list of minutes
    Column("quiet_start", String(5), nullable=True),
    Column("quiet_end", String(5), nullable=True),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("updated_by", String(200), nullable=False),
)

consents = Table(
    "consents",
    metadata,
    Column("consent_id", String(36), primary_key=True),
    Column("patient_id", String(36), nullable=False, index=True),
    Column("site_id", String(40), nullable=False),
    Column("recipient", String(200), nullable=False),
    Column("purpose", String(100), nullable=False),
    Column("expires_on", Date, nullable=True),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("granted_at", UtcDateTime, nullable=True),
    Column("revoked_at", UtcDateTime, nullable=True),
    # "end_of_treatment": the consent ends the day the patient is discharged.
    Column("expires_event", String(40), nullable=True),
)

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", String(36), primary_key=True),
    Column("site_id", String(40), nullable=False, index=True),
    Column("starts_at", UtcDateTime, nullable=False),
    Column("ends_at", UtcDateTime, nullable=False),
    Column("status", String(12), nullable=False),
)

bookings = Table(
    "bookings",
    metadata,
    Column("booking_id", String(36), primary_key=True),
    Column("session_id", String(36), nullable=False, index=True),
    Column("patient_id", String(36), nullable=False, index=True),
    Column("site_id", String(40), nullable=False),
    Column("starts_at", UtcDateTime, nullable=False),
    Column("status", String(12), nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    # occurred_at of the event that set `status`: a late, older one changes nothing.
    Column("event_at", UtcDateTime, nullable=True),
)

attendance = Table(
    "attendance",
    metadata,
    Column("session_id", String(36), primary_key=True),
    Column("patient_id", String(36), primary_key=True),
    # The enrollment the patient attended under, or "patient:<id>" if none is known.
    Column("streak_key", String(60), nullable=False, index=True),
    Column("site_id", String(40), nullable=False),
    Column("starts_at", UtcDateTime, nullable=False),
    Column("status", String(10), nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
)

# The on-call order of a site's care team: position 0 is alerted first.
care_team = Table(
    "care_team",
    metadata,
    Column("site_id", String(40), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("member_id", String(32), nullable=False),
    Column("name", String(200), nullable=False),
    Column("role", String(60), nullable=False),
    Column("channel", String(10), nullable=False),
    Column("address", String(500), nullable=False),
    Column("language", String(10), nullable=False),
    Column("secret", String(200), nullable=True),  # webhook members: signing secret
)

alerts = Table(
    "alerts",
    metadata,
    Column("alert_id", String(36), primary_key=True),
    Column("site_id", String(40), nullable=False, index=True),
    Column("patient_id", String(36), nullable=False, index=True),
    Column("reason", String(40), nullable=False),
    Column("severity", String(10), nullable=False),
    Column("status", String(14), nullable=False, index=True),  # open / acknowledged
    Column("level", Integer, nullable=False),  # roster position alerted last
    Column("escalate_at", UtcDateTime, nullable=True, index=True),
    Column("cause_event_id", String(36), nullable=False),
    Column("correlation_id", String(36), nullable=False),
    # What the alert is about (a check-in, a pair of sessions, an enrollment-week):
    # the same cause re-published under a new event id raises no second alert.
    Column("dedupe_key", String(120), nullable=False, unique=True),
    Column("details", Text, nullable=True),  # JSON of ids and numbers, never text
    Column("created_at", UtcDateTime, nullable=False),
    Column("acknowledged_at", UtcDateTime, nullable=True),
    Column("acknowledged_by", String(200), nullable=True),
)

# Outside systems, as intake registered them (IntegrationRegistered / IntegrationRevoked):
# a webhook subscription of an integration follows its basis (usecases.may_deliver).
integrations = Table(
    "integrations",
    metadata,
    Column("integration_id", String(40), primary_key=True),
    Column("sites", Text, nullable=False),  # JSON list
    Column("basis", String(10), nullable=False),  # qsoa | consent
    Column("purpose", String(40), nullable=True),
    Column("active", Boolean, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

subscriptions = Table(
    "subscriptions",
    metadata,
    Column("subscription_id", String(36), primary_key=True),
    Column("site_id", String(40), nullable=False, index=True),
    Column("url", String(500), nullable=False),
    Column("event_types", Text, nullable=False),  # JSON list
    Column("secret", String(200), nullable=False),
    Column("active", Boolean, nullable=False, default=True),  # False: deleted
    Column("created_by", String(200), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    # active / paused (after too many consecutive failures, or a backfill too large);
    # paused: its deliveries keep queueing, none is sent until it is resumed.
    Column("status", String(10), nullable=False, server_default="active"),
    Column("paused_reason", String(200), nullable=True),
    Column("paused_at", UtcDateTime, nullable=True),
    Column("consecutive_failures", Integer, nullable=False, server_default="0"),
    # The queue position of its next live delivery (taken under the row's lock, so the
    # order of the queue is the order the events' transactions committed in).
    Column("next_seq", BigInteger, nullable=False, server_default="1"),
    # Past events asked for at subscription: none / pending / done / skipped / too_large.
    Column("backfill_from", UtcDateTime, nullable=True),
    Column("backfill_status", String(10), nullable=False, server_default="none"),
    Column("backfill_events", Integer, nullable=True),
    Column("backfill_error", String(200), nullable=True),
    # The integration that subscribed (its basis decides what it may receive); None for
    # a subscription an admin made, which receives the site's public events.
    Column("integration_id", String(40), nullable=True, index=True),
)

# A message is queued once per cause, template and recipient.
ONCE_PER_CAUSE = ("cause_event_id", "template", "recipient")
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
    Column("status_reason", String(40), nullable=True),
    Column("expires_at", UtcDateTime, nullable=True),
    Column("urgent", Boolean, nullable=False, server_default=false()),
    Column("booking_id", String(36), nullable=True, index=True),
    Column("session_id", String(36), nullable=True, index=True),
    Column("alert_id", String(36), nullable=True, index=True),
    # Webhook deliveries: the event envelope to post (public events only, no PHI).
    Column("payload", Text, nullable=True),
    # Webhook deliveries: the event's type and the delivery's place in its subscription's
    # queue, sent one at a time in (queue_phase, queue_seq) order: phase 0 the backfill
    # (past events, in stream order), phase 1 the live events (in commit order).
    Column("event_type", String(80), nullable=True),
    Column("queue_phase", Integer, nullable=True),
    Column("queue_seq", BigInteger, nullable=True),
    # One message per (cause event, template, recipient), however often the cause arrives.
    UniqueConstraint(*ONCE_PER_CAUSE, name="uq_notification_once"),
    Index("ix_notifications_webhook_queue", "recipient", "queue_phase", "queue_seq"),
)

# The delivery log: one row per attempt (outcome, error class, provider id; never the
# address or the text).
delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("notification_id", String(36), nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("channel", String(10), nullable=False),
    Column("outcome", String(12), nullable=False),  # sent / retry / failed
    Column("error", String(300), nullable=True),
    Column("provider_id", String(120), nullable=True),
    # Webhooks: the receiver's HTTP status (none if no answer came) and the time it took.
    Column("status_code", Integer, nullable=True),
    Column("duration_ms", Integer, nullable=True),
)


# --- rows as they come back: one TypedDict per kind, the column names and the Python types
# of the tables above (a nullable column: `| None`). At run time they are plain dicts.


class ContactRow(TypedDict):
    patient_id: str
    site_id: str
    phone: str | None
    email: str | None
    preferred_channel: str
    language: str
    changed_at: datetime


class EnrollmentRow(TypedDict):
    enrollment_id: str
    patient_id: str
    site_id: str
    start_date: date
    enrolled_event_id: str
    correlation_id: str
    status: str
    discharged_on: date | None


class EpisodeEndRow(TypedDict):
    enrollment_id: str
    patient_id: str
    site_id: str
    status: str
    ended_on: date
    event_id: str
    recorded_at: datetime


class SiteRow(TypedDict):
    site_id: str
    name: str
    timezone: str
    updated_at: datetime


class SiteSettingsRow(TypedDict):
    site_id: str
    reminder_offsets: list[int] | None  # decoded from its JSON column
    quiet_start: str | None
    quiet_end: str | None
    updated_at: datetime
    updated_by: str


class ConsentRow(TypedDict):
    consent_id: str
    patient_id: str
    site_id: str
    recipient: str
    purpose: str
    expires_on: date | None
    revoked: bool
    granted_at: datetime | None
    revoked_at: datetime | None
    expires_event: str | None


class SessionRow(TypedDict):
    session_id: str
    site_id: str
    starts_at: datetime
    ends_at: datetime
    status: str


class BookingRow(TypedDict):
    booking_id: str
    session_id: str
    patient_id: str
    site_id: str
    starts_at: datetime
    status: str
    updated_at: datetime
    event_at: datetime | None


class AttendanceRow(TypedDict):
    session_id: str
    patient_id: str
    streak_key: str
    site_id: str
    starts_at: datetime
    status: str
    recorded_at: datetime


class CareTeamMember(TypedDict):
    """A roster member as given to replace_care_team (its row less site and position)."""

    member_id: str
    name: str
    role: str
    channel: str
    address: str
    language: str
    secret: str | None


class CareTeamMemberRow(CareTeamMember):
    site_id: str
    position: int


class AlertRow(TypedDict):
    alert_id: str
    site_id: str
    patient_id: str
    reason: str
    severity: str
    status: str
    level: int
    escalate_at: datetime | None
    cause_event_id: str
    correlation_id: str
    dedupe_key: str
    details: str | None  # JSON
    created_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None


class SubscriptionRow(TypedDict):
    subscription_id: str
    site_id: str
    url: str
    event_types: list[str]  # decoded from its JSON column
    secret: str
    active: bool
    created_by: str
    created_at: datetime
    status: str
    paused_reason: str | None
    paused_at: datetime | None
    consecutive_failures: int
    next_seq: int
    backfill_from: datetime | None
    backfill_status: str
    backfill_events: int | None
    backfill_error: str | None
    integration_id: str | None


class IntegrationRow(TypedDict):
    integration_id: str
    sites: str
    basis: str
    purpose: str | None
    active: bool
    updated_at: datetime


class NotificationRow(TypedDict):
    notification_id: str
    site_id: str
    patient_id: str | None
    recipient_kind: str
    recipient: str
    channel: str
    template: str
    language: str
    cause_event_id: str
    correlation_id: str
    status: str
    attempts: int
    last_error: str | None
    provider_id: str | None
    created_at: datetime
    due_at: datetime
    sent_at: datetime | None
    status_reason: str | None
    expires_at: datetime | None
    urgent: bool
    booking_id: str | None
    session_id: str | None
    alert_id: str | None
    payload: str | None
    event_type: str | None
    queue_phase: int | None
    queue_seq: int | None


class DeliveryAttemptRow(TypedDict):
    id: int
    notification_id: str
    attempt: int
    at: datetime
    channel: str
    outcome: str
    error: str | None
    provider_id: str | None
    status_code: int | None
    duration_ms: int | None


RowT = TypeVar("RowT")


def _as(kind: type[RowT], row: Mapping[Any, Any]) -> RowT:
    """A row (a copy, as a plain dict) typed as the TypedDict of its kind."""
    return cast(RowT, dict(row))


def _rows(kind: type[RowT], result: Result[Any]) -> list[RowT]:
    return [_as(kind, r) for r in result.mappings()]


async def _one(session: AsyncSession, kind: type[RowT], query: Any, **parameters: Any) -> RowT | None:
    row = (await session.execute(query, parameters)).mappings().first()
    return _as(kind, row) if row else None


# --- patients, contacts, enrollments --------------------------------------------------------


async def lock_patient(session: AsyncSession, patient_id: str) -> None:
    """The patient's row lock, held until the transaction ends: taken once per transaction."""
    locked = _for_this_transaction(session, _LOCKED)
    if patient_id not in locked:
        await lock_row(session, patients, patient_id=patient_id)
        locked.add(patient_id)


async def lock_patients(session: AsyncSession, patient_ids: Iterable[str]) -> None:
    """Several patients' row locks in one statement (in id order), kept as `lock_patient`'s."""
    locked = _for_this_transaction(session, _LOCKED)
    missing = {patient_id for patient_id in patient_ids if patient_id not in locked}
    await lock_rows(session, patients, [{"patient_id": patient_id} for patient_id in missing])
    locked.update(missing)


_LOCKED = "iopnet.locked_patients"


# Read once per transaction (a consumer's batch brings a patient's events together: the
# registration with the enrollment, a booking's siblings), dropped by whoever writes them.
_CONTACTS, _CONSENTS, _ENROLLMENTS = "iopnet.contacts", "iopnet.patient_consents", "iopnet.patient_enrollments"
_ENDS = "iopnet.patient_ends"


async def upsert_contact(session: AsyncSession, patient_id: str, changed_at: datetime, **values: Any) -> None:
    """The patient's contact as of `changed_at`, unless a later change is stored already
    (events may arrive out of order). A contact written whole is kept as this
    transaction's read of it: the welcome planned next needs it."""
    row = {"patient_id": patient_id, "changed_at": changed_at.astimezone(UTC), **values}
    _forget(session, _CONTACTS, patient_id)
    if await upsert_if_newer(session, contacts, row, newer="changed_at") and set(row) == set(contacts.c.keys()):
        _read_once(session, _CONTACTS)[patient_id] = _as(ContactRow, row)


async def get_contact(session: AsyncSession, patient_id: str) -> ContactRow | None:
    known = _read_once(session, _CONTACTS)
    if patient_id not in known:
        known[patient_id] = await _one(session, ContactRow, select_by(contacts, "patient_id"), patient_id=patient_id)
    found = known[patient_id]
    return cast(ContactRow, dict(found)) if found is not None else None


async def add_enrollment(session: AsyncSession, **values: Any) -> bool:
    """Project an enrollment unless it is known already (one statement); True if new. A
    new one joins its patient's enrollments if this transaction read them (the welcome
    planned next reads them), in their order; written in part, they are read again."""
    values.setdefault("status", "active")
    added = await insert_if_absent(session, enrollments, **values)
    if added:
        known = _read_once(session, _ENROLLMENTS)
        kept = known.pop(values["patient_id"], None)
        if kept is not None and set(values) == set(enrollments.c.keys()):
            known[values["patient_id"]] = sorted([*kept, _as(EnrollmentRow, values)], key=lambda e: e["start_date"])
    return added


async def remember_end(session: AsyncSession, enrollment_id: str, *, patient_id: str, **values: Any) -> bool:
    """Record an episode's end; False if one was recorded before (the first one stays)."""
    _forget(session, _ENDS, patient_id)
    return await insert_if_absent(
        session, episode_ends, enrollment_id=enrollment_id, patient_id=patient_id, recorded_at=clock.now(), **values
    )


async def get_end(session: AsyncSession, enrollment_id: str, patient_id: str | None = None) -> EpisodeEndRow | None:
    """The end recorded for an enrollment (from its patient's ends if this transaction
    read them ahead)."""
    kept = _read_once(session, _ENDS).get(patient_id) if patient_id is not None else None
    if kept is not None:
        return next((cast(EpisodeEndRow, dict(end)) for end in kept if end["enrollment_id"] == enrollment_id), None)
    return await _one(session, EpisodeEndRow, select_by(episode_ends, "enrollment_id"), enrollment_id=enrollment_id)


# Ends and enrollments in one statement (every booking asks), in whatever order they come.
_EPISODE_STATUSES = union_all(
    select(episode_ends.c.enrollment_id, episode_ends.c.status, literal(0).label("enrolled")).where(
        episode_ends.c.patient_id == bindparam("patient_id"), episode_ends.c.site_id == bindparam("site_id")
    ),
    select(enrollments.c.enrollment_id, enrollments.c.status, literal(1).label("enrolled")).where(
        enrollments.c.patient_id == bindparam("patient_id"), enrollments.c.site_id == bindparam("site_id")
    ),
)


async def episode_statuses(session: AsyncSession, patient_id: str, site_id: str) -> list[str]:
    """The status of every episode of the patient known at the site: enrolled ones, and
    ends whose enrollment has not arrived yet. From the patient's ends and enrollments if
    this transaction read them ahead, else in one statement."""
    ends, enrolled = _read_once(session, _ENDS).get(patient_id), _read_once(session, _ENROLLMENTS).get(patient_id)
    if ends is not None and enrolled is not None:
        rows: Iterable[Mapping[Any, Any]] = [
            *({**end, "enrolled": 0} for end in ends if end["site_id"] == site_id),
            *({**episode, "enrolled": 1} for episode in enrolled if episode["site_id"] == site_id),
        ]
    else:
        rows = (await session.execute(_EPISODE_STATUSES, {"patient_id": patient_id, "site_id": site_id})).mappings()
    statuses: dict[str, str] = {}
    for row in rows:
        if row["enrolled"] or row["enrollment_id"] not in statuses:
            statuses[row["enrollment_id"]] = row["status"]  # the enrollment's status wins over its end's
    return list(statuses.values())


async def get_enrollment(session: AsyncSession, enrollment_id: str) -> EnrollmentRow | None:
    return await _one(session, EnrollmentRow, select_by(enrollments, "enrollment_id"), enrollment_id=enrollment_id)


async def move_contact(session: AsyncSession, patient_id: str, site_id: str) -> None:
    _forget(session, _CONTACTS, patient_id)
    await update_by(session, contacts, {"patient_id": patient_id}, site_id=site_id)


async def update_enrollment(session: AsyncSession, enrollment_id: str, **values: Any) -> None:
    _read_once(session, _ENROLLMENTS).clear()  # whose episode it is is not known here
    await update_by(session, enrollments, {"enrollment_id": enrollment_id}, **values)


_PATIENT_ENROLLMENTS = (
    select(enrollments).where(enrollments.c.patient_id == bindparam("patient_id")).order_by(enrollments.c.start_date)
)


async def patient_enrollments(session: AsyncSession, patient_id: str) -> list[EnrollmentRow]:
    known = _read_once(session, _ENROLLMENTS)
    if patient_id not in known:
        found = await session.execute(_PATIENT_ENROLLMENTS, {"patient_id": patient_id})
        known[patient_id] = _rows(EnrollmentRow, found)
    return [cast(EnrollmentRow, dict(row)) for row in known[patient_id]]


async def read_patients_ahead(
    session: AsyncSession,
    patient_ids: Iterable[str],
    *,
    enrollments_too: Iterable[str] = (),
    ends_too: Iterable[str] = (),
) -> None:
    """The contacts and consents of several patients (and the enrollments of
    `enrollments_too`, the episode ends of `ends_too`), one statement per table for all of
    them, kept as this transaction's reads: a group of claimed messages, or a consumer's
    batch, is then handled without a read per message (`get_contact`, `patient_consents`,
    `patient_enrollments`, `get_end` and `episode_statuses` find them)."""
    await _read_ahead(session, _CONTACTS, contacts, ContactRow, patient_ids, single=True)
    await _read_ahead(session, _CONSENTS, consents, ConsentRow, patient_ids)
    await _read_ahead(
        session, _ENROLLMENTS, enrollments, EnrollmentRow, enrollments_too, order=enrollments.c.start_date
    )
    await _read_ahead(session, _ENDS, episode_ends, EpisodeEndRow, ends_too)


async def _read_ahead(
    session: AsyncSession,
    key: str,
    table: Table,
    kind: type[RowT],
    patient_ids: Iterable[str],
    *,
    single: bool = False,
    order: Any = None,
) -> None:
    known = _read_once(session, key)
    missing = sorted({patient_id for patient_id in patient_ids if patient_id not in known})
    if len(missing) < 2:
        return  # one patient's own read costs the same
    query = select(table).where(table.c.patient_id.in_(in_list(missing)))
    if order is not None:
        query = query.order_by(order)
    found: dict[str, list[RowT]] = {patient_id: [] for patient_id in missing}
    for row in _rows(kind, await session.execute(query)):
        found[cast(Mapping[str, Any], row)["patient_id"]].append(row)
    for patient_id, rows in found.items():
        known[patient_id] = (rows[0] if rows else None) if single else rows


async def patient_site(session: AsyncSession, patient_id: str) -> str | None:
    """The site a patient's record belongs to here: the contact's, else the latest
    enrollment's, else that of any message about the patient."""
    contact = await get_contact(session, patient_id)
    if contact is not None:
        return str(contact["site_id"])
    episodes = await patient_enrollments(session, patient_id)
    if episodes:
        return str(episodes[-1]["site_id"])
    query = select(notifications.c.site_id).where(notifications.c.patient_id == patient_id).limit(1)
    found = (await session.execute(query)).first()
    return str(found.site_id) if found else None


# --- sites and their settings ---------------------------------------------------------------


upsert_site = site_directory.upsert


async def get_site(session: AsyncSession, site_id: str) -> SiteRow | None:
    row = await site_directory.get(session, site_id)  # read once per transaction
    return _as(SiteRow, row) if row is not None else None


async def get_site_settings(session: AsyncSession, site_id: str) -> SiteSettingsRow | None:
    known = _read_once(session, _SITE_SETTINGS)
    if site_id not in known:
        row = (await session.execute(select_by(site_settings, "site_id"), {"site_id": site_id})).mappings().first()
        known[site_id] = _site_settings(row) if row is not None else None
    found = known[site_id]
    return cast(SiteSettingsRow, dict(found)) if found is not None else None


async def read_sites_ahead(session: AsyncSession, site_ids: Iterable[str]) -> None:
    """Several sites and their settings, one statement each, kept as `get_site` and
    `get_site_settings` keep them (a batch's messages are planned or sent by site rules)."""
    ids = set(site_ids)
    await site_directory.read_ahead(session, ids)
    known = _read_once(session, _SITE_SETTINGS)
    missing = sorted(site_id for site_id in ids if site_id not in known)
    if len(missing) < 2:
        return
    query = select(site_settings).where(site_settings.c.site_id.in_(missing))
    found = {row["site_id"]: _site_settings(row) for row in (await session.execute(query)).mappings()}
    for site_id in missing:
        known[site_id] = found.get(site_id)


def _site_settings(row: Mapping[Any, Any]) -> SiteSettingsRow:
    offsets = row["reminder_offsets"]
    return _as(SiteSettingsRow, {**row, "reminder_offsets": json.loads(offsets) if offsets is not None else None})


_SITE_SETTINGS = "iopnet.site_settings"


async def put_site_settings(session: AsyncSession, site_id: str, updated_by: str, **values: Any) -> None:
    _forget(session, _SITE_SETTINGS, site_id)
    if values.get("reminder_offsets") is not None:
        values["reminder_offsets"] = json.dumps(values["reminder_offsets"])
    values.update(updated_at=clock.now(), updated_by=updated_by)
    if not await insert_if_absent(session, site_settings, site_id=site_id, **values):
        await session.execute(update(site_settings).where(site_settings.c.site_id == site_id).values(**values))


# --- integrations ---------------------------------------------------------------------------


async def upsert_integration(session: AsyncSession, integration_id: str, **values: Any) -> None:
    values["updated_at"] = clock.now()
    if not await insert_if_absent(session, integrations, integration_id=integration_id, **values):
        current = await get_integration(session, integration_id)
        assert current is not None
        if not current["active"] and values.get("active"):
            return  # revoked for good: a late or re-published registration never revives it
        query = update(integrations).where(integrations.c.integration_id == integration_id)
        await session.execute(query.values(**values))


async def deactivate_integration(session: AsyncSession, integration_id: str) -> None:
    query = update(integrations).where(integrations.c.integration_id == integration_id)
    await session.execute(query.values(active=False, updated_at=clock.now()))


async def get_integration(session: AsyncSession, integration_id: str) -> IntegrationRow | None:
    return await _one(
        session, IntegrationRow, select(integrations).where(integrations.c.integration_id == integration_id)
    )


_LIVE_CONSENTS_TO = select(consents).where(
    consents.c.patient_id == bindparam("patient_id"),
    consents.c.recipient == bindparam("recipient"),
    consents.c.purpose == bindparam("purpose"),
    consents.c.revoked == false(),
)


async def consents_to(session: AsyncSession, patient_id: str, recipient: str, purpose: str) -> list[ConsentRow]:
    key = {"patient_id": patient_id, "recipient": recipient, "purpose": purpose}
    return _rows(ConsentRow, await session.execute(_LIVE_CONSENTS_TO, key))


# --- consents -------------------------------------------------------------------------------


async def upsert_consent(session: AsyncSession, consent_id: str, **values: Any) -> None:
    _read_once(session, _CONSENTS).clear()
    if not await insert_if_absent(session, consents, consent_id=consent_id, **values):
        current = await _one(session, ConsentRow, select_by(consents, "consent_id"), consent_id=consent_id)
        assert current is not None
        if current["revoked"] and not values.get("revoked"):
            return  # a late or re-published grant never revives a revoked consent
        await update_by(session, consents, {"consent_id": consent_id}, **values)


async def end_treatment_consents(session: AsyncSession, patient_id: str, discharged_on: date) -> None:
    """Consents that last until the end of treatment end with the discharge."""
    _forget(session, _CONSENTS, patient_id)
    await session.execute(
        update(consents)
        .where(
            consents.c.patient_id == patient_id,
            consents.c.expires_event == "end_of_treatment",
            consents.c.expires_on.is_(None),
        )
        .values(expires_on=discharged_on)
    )


async def patient_consents(session: AsyncSession, patient_id: str) -> list[ConsentRow]:
    known = _read_once(session, _CONSENTS)
    if patient_id not in known:
        found = await session.execute(select_by(consents, "patient_id"), {"patient_id": patient_id})
        known[patient_id] = _rows(ConsentRow, found)
    return [cast(ConsentRow, dict(row)) for row in known[patient_id]]


# --- sessions, bookings, attendance ---------------------------------------------------------


async def upsert_session(session: AsyncSession, session_id: str, **values: Any) -> None:
    _forget(session, _SESSIONS, session_id)
    if not await insert_if_absent(session, sessions, session_id=session_id, **values):
        await update_by(session, sessions, {"session_id": session_id}, **values)


async def get_session(session: AsyncSession, session_id: str) -> SessionRow | None:
    known = _read_once(session, _SESSIONS)
    if session_id not in known:
        known[session_id] = await _one(session, SessionRow, select_by(sessions, "session_id"), session_id=session_id)
    found = known[session_id]
    return cast(SessionRow, dict(found)) if found is not None else None


_SESSIONS = "iopnet.sessions"


async def read_sessions_ahead(session: AsyncSession, session_ids: Iterable[str]) -> None:
    """Several sessions in one statement, kept as this transaction's reads (`get_session`
    finds them). This service's sessions are written by the consumer of scheduling's
    events only, which reads them ahead in the same transaction as it writes them."""
    await _read_ahead_by_id(session, _SESSIONS, sessions, SessionRow, "session_id", session_ids)


async def upsert_booking(session: AsyncSession, booking_id: str, **values: Any) -> BookingRow:
    """The booking as written (every column is set): the caller need not read it back."""
    values["updated_at"] = clock.now()
    if not await insert_if_absent(session, bookings, booking_id=booking_id, **values):
        await update_by(session, bookings, {"booking_id": booking_id}, **values)
    written = cast(BookingRow, {"booking_id": booking_id, **values})
    _read_once(session, _BOOKINGS)[booking_id] = dict(written)
    return written


async def get_booking(session: AsyncSession, booking_id: str) -> BookingRow | None:
    known = _read_once(session, _BOOKINGS)
    if booking_id not in known:
        known[booking_id] = await _one(session, BookingRow, select_by(bookings, "booking_id"), booking_id=booking_id)
    found = known[booking_id]
    return cast(BookingRow, dict(found)) if found is not None else None


async def read_bookings_ahead(session: AsyncSession, booking_ids: Iterable[str]) -> None:
    """Several bookings in one statement, kept as this transaction's reads (`get_booking`
    finds them; `upsert_booking` keeps what it writes). Read under their patients' locks:
    whoever writes a booking holds its patient's."""
    await _read_ahead_by_id(session, _BOOKINGS, bookings, BookingRow, "booking_id", booking_ids)


async def _read_ahead_by_id(
    session: AsyncSession, key: str, table: Table, kind: type[RowT], id_column: str, ids: Iterable[str]
) -> None:
    known = _read_once(session, key)
    missing = sorted({row_id for row_id in ids if row_id not in known})
    if len(missing) < 2:
        return  # one row's own read costs the same
    query = select(table).where(table.c[id_column].in_(in_list(missing)))
    found = {row[id_column]: row for row in (await session.execute(query)).mappings()}
    for row_id in missing:
        known[row_id] = _as(kind, found[row_id]) if row_id in found else None


_BOOKINGS = "iopnet.bookings"


async def patient_booking_for_session(session: AsyncSession, patient_id: str, session_id: str) -> BookingRow | None:
    query = select_by(bookings, "patient_id", "session_id")
    return await _one(session, BookingRow, query, patient_id=patient_id, session_id=session_id)


async def upsert_attendance(session: AsyncSession, session_id: str, patient_id: str, **values: Any) -> None:
    if not await insert_if_absent(session, attendance, session_id=session_id, patient_id=patient_id, **values):
        await session.execute(
            update(attendance)
            .where(attendance.c.session_id == session_id, attendance.c.patient_id == patient_id)
            .values(**values)
        )


async def streak_attendance(session: AsyncSession, streak_key: str) -> list[AttendanceRow]:
    query = select(attendance).where(attendance.c.streak_key == streak_key).order_by(attendance.c.starts_at)
    return _rows(AttendanceRow, await session.execute(query))


# --- care team --------------------------------------------------------------------------------


async def replace_care_team(session: AsyncSession, site_id: str, members: list[CareTeamMember]) -> None:
    await session.execute(delete(care_team).where(care_team.c.site_id == site_id))
    if members:
        await session.execute(
            insert(care_team), [{"site_id": site_id, "position": i, **m} for i, m in enumerate(members)]
        )


async def get_care_team(session: AsyncSession, site_id: str) -> list[CareTeamMemberRow]:
    query = select(care_team).where(care_team.c.site_id == site_id).order_by(care_team.c.position)
    return _rows(CareTeamMemberRow, await session.execute(query))


async def get_member(session: AsyncSession, site_id: str, member_id: str) -> CareTeamMemberRow | None:
    query = select(care_team).where(care_team.c.site_id == site_id, care_team.c.member_id == member_id)
    return await _one(session, CareTeamMemberRow, query)


# --- alerts -----------------------------------------------------------------------------------


async def add_alert(session: AsyncSession, **values: Any) -> AlertRow | None:
    """The alert as written, or None if one with this dedupe_key exists already: one
    INSERT … ON CONFLICT DO NOTHING (an urgent check-in's alert is on the safety path)."""
    row = {"created_at": clock.now(), "acknowledged_at": None, "acknowledged_by": None, **values}
    if not await insert_if_absent(session, alerts, conflict=["dedupe_key"], **row):
        return None
    return cast(AlertRow, row)


async def get_alert(session: AsyncSession, alert_id: str, *, lock: bool = False) -> AlertRow | None:
    query = select(alerts).where(alerts.c.alert_id == alert_id)
    if lock:
        query = query.with_for_update()
    return await _one(session, AlertRow, query)


async def update_alert(session: AsyncSession, alert_id: str, **values: Any) -> None:
    await update_by(session, alerts, {"alert_id": alert_id}, **values)


async def list_alerts(
    session: AsyncSession, site_ids: list[str] | None, status: str | None, limit: int
) -> list[AlertRow]:
    query = select(alerts).order_by(alerts.c.created_at.desc()).limit(limit)
    if site_ids is not None:
        query = query.where(alerts.c.site_id.in_(site_ids))
    if status is not None:
        query = query.where(alerts.c.status == status)
    return _rows(AlertRow, await session.execute(query))


async def unrouted_alerts(session: AsyncSession, site_id: str) -> list[AlertRow]:
    """Open alerts nobody has been told of yet (raised while the site had no roster)."""
    query = select(alerts).where(alerts.c.site_id == site_id, alerts.c.status == "open", alerts.c.level == -1)
    if dialect_name(session) == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return _rows(AlertRow, await session.execute(query.order_by(alerts.c.created_at)))


async def alerts_to_escalate(session: AsyncSession, at: datetime) -> list[AlertRow]:
    query = (
        select(alerts)
        .where(alerts.c.status == "open", alerts.c.escalate_at.is_not(None), alerts.c.escalate_at <= at)
        .order_by(alerts.c.escalate_at)
    )
    if dialect_name(session) == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return _rows(AlertRow, await session.execute(query))


# --- webhook subscriptions --------------------------------------------------------------------


async def add_subscription(session: AsyncSession, **values: Any) -> None:
    values["event_types"] = json.dumps(sorted(values["event_types"]))
    await insert_row(session, subscriptions, active=True, created_at=clock.now(), **values)


def _subscription(row: Mapping[Any, Any]) -> SubscriptionRow:
    return _as(SubscriptionRow, {**row, "event_types": json.loads(row["event_types"])})


async def get_subscription(session: AsyncSession, subscription_id: str) -> SubscriptionRow | None:
    query = select(subscriptions).where(subscriptions.c.subscription_id == subscription_id)
    row = (await session.execute(query)).mappings().first()
    return _subscription(row) if row else None


async def list_subscriptions(session: AsyncSession, site_ids: list[str] | None) -> list[SubscriptionRow]:
    query = select(subscriptions).where(subscriptions.c.active.is_(True)).order_by(subscriptions.c.created_at)
    if site_ids is not None:
        query = query.where(subscriptions.c.site_id.in_(site_ids))
    return [_subscription(r) for r in (await session.execute(query)).mappings()]


async def subscribers(session: AsyncSession, site_id: str, event_type: str) -> list[SubscriptionRow]:
    """Every subscription of the site that asked for the type, paused ones included (their
    deliveries queue while they are paused).

    Every event a consumer applies asks this, and most sites have no subscription: that
    answer is kept for the rest of the transaction (a consumer's batch), one query per
    site instead of one per event. A subscription that commits meanwhile starts after
    this batch, as if it had committed after it; sites with subscriptions are read each
    time (a deactivation must stop their deliveries at once)."""
    unsubscribed = _for_this_transaction(session, _UNSUBSCRIBED)
    if site_id in unsubscribed:
        return []
    found = await list_subscriptions(session, [site_id])
    if not found:
        unsubscribed.add(site_id)
    return [s for s in found if event_type in s["event_types"]]


_UNSUBSCRIBED = "iopnet.unsubscribed_sites"


async def read_subscribers_ahead(session: AsyncSession, site_ids: Iterable[str]) -> None:
    """Which of several sites have no subscription, in one statement: `subscribers` then
    answers for them without one, for the rest of the transaction."""
    unsubscribed = _for_this_transaction(session, _UNSUBSCRIBED)
    missing = sorted({site_id for site_id in site_ids if site_id not in unsubscribed})
    if len(missing) < 2:
        return  # one site's own read costs the same
    unsubscribed.update(set(missing) - {s["site_id"] for s in await list_subscriptions(session, missing)})


def _for_this_transaction(session: AsyncSession, key: str) -> set[str]:
    """A set kept in the session as long as its current transaction lasts."""
    return kept_for_this_transaction(session, key, set[str])


def _read_once(session: AsyncSession, key: str) -> dict[str, Any]:
    """Rows read in this transaction, by id: a batch of events reads a site's or a
    patient's rows once. Whoever writes such a row in the transaction drops it from here
    (`_forget`, or `.clear()` where the writer does not know whose row it is)."""
    return kept_for_this_transaction(session, key, dict[str, Any])


def _forget(session: AsyncSession, key: str, row_id: str) -> None:
    _read_once(session, key).pop(row_id, None)


async def deactivate_subscription(session: AsyncSession, subscription_id: str) -> None:
    await session.execute(
        update(subscriptions).where(subscriptions.c.subscription_id == subscription_id).values(active=False)
    )


async def cancel_queued_webhooks(session: AsyncSession, subscription_id: str) -> int:
    result = await session.execute(
        update(notifications)
        .where(
            notifications.c.recipient == f"subscription:{subscription_id}",
            notifications.c.template == "webhook",
            notifications.c.status.in_(QUEUED),
        )
        .values(status="cancelled", status_reason="recipient_removed")
    )
    return rows_changed(result)


async def update_subscription(session: AsyncSession, subscription_id: str, **values: Any) -> None:
    await session.execute(
        update(subscriptions).where(subscriptions.c.subscription_id == subscription_id).values(**values)
    )


async def lock_subscription(session: AsyncSession, subscription_id: str) -> SubscriptionRow | None:
    """The subscription, locked for the rest of the transaction (PostgreSQL; SQLite has one
    writer anyway): its queue positions and failure count change under this lock."""
    query = select(subscriptions).where(subscriptions.c.subscription_id == subscription_id).with_for_update()
    row = (await session.execute(query)).mappings().first()
    return _subscription(row) if row else None


async def take_queue_seq(session: AsyncSession, subscription_id: str) -> int:
    """The next live queue position of a subscription. The UPDATE locks its row until
    the transaction ends, so positions are handed out in commit order."""
    await session.execute(
        update(subscriptions)
        .where(subscriptions.c.subscription_id == subscription_id)
        .values(next_seq=subscriptions.c.next_seq + 1)
    )
    query = select(subscriptions.c.next_seq).where(subscriptions.c.subscription_id == subscription_id)
    return int((await session.execute(query)).scalar_one()) - 1


async def pending_backfills(session: AsyncSession) -> list[SubscriptionRow]:
    query = (
        select(subscriptions)
        .where(subscriptions.c.active.is_(True), subscriptions.c.backfill_status == "pending")
        .order_by(subscriptions.c.created_at)
    )
    return [_subscription(r) for r in (await session.execute(query)).mappings()]


def _webhook_queue(recipient: str) -> Any:
    return (
        select(notifications)
        .where(notifications.c.recipient == recipient, notifications.c.template == "webhook")
        .order_by(notifications.c.queue_phase, notifications.c.queue_seq, notifications.c.created_at)
    )


# A subscription's deliveries that have not been sent or given up on: the queue.
QUEUED = ("pending", "sending")


async def webhook_heads(session: AsyncSession) -> list[NotificationRow]:
    """The first queued delivery of every subscription that may send now (active, not
    paused, backfill over). A head that is `sending` is in flight (until its lease ends):
    nothing behind it goes out meanwhile, so each subscription has one request at a time."""
    query = select(subscriptions.c.subscription_id).where(
        subscriptions.c.active.is_(True),
        subscriptions.c.status == "active",
        subscriptions.c.backfill_status.in_(("none", "done", "skipped")),
    )
    heads = []
    for subscription_id in (await session.execute(query)).scalars():
        head = await queued_head(session, f"subscription:{subscription_id}")
        if head is not None:
            heads.append(head)
    return heads


async def queued_head(session: AsyncSession, recipient: str) -> NotificationRow | None:
    """The first queued delivery of a subscription, paused or not."""
    return await _one(
        session, NotificationRow, _webhook_queue(recipient).where(notifications.c.status.in_(QUEUED)).limit(1)
    )


async def queued_webhook(session: AsyncSession, recipient: str, event_id: str) -> NotificationRow | None:
    query = select(notifications).where(
        notifications.c.recipient == recipient,
        notifications.c.template == "webhook",
        notifications.c.cause_event_id == event_id,
    )
    return await _one(session, NotificationRow, query)


async def webhook_deliveries(
    session: AsyncSession, subscription_id: str, *, limit: int, before: tuple[int, int] | None = None
) -> list[NotificationRow]:
    """A subscription's deliveries, the latest in its queue first; `before`: only those
    ahead of this (queue_phase, queue_seq) position (the next page)."""
    query = select(notifications).where(
        notifications.c.recipient == f"subscription:{subscription_id}", notifications.c.template == "webhook"
    )
    if before is not None:
        phase, seq = before
        query = query.where(
            (notifications.c.queue_phase < phase)
            | ((notifications.c.queue_phase == phase) & (notifications.c.queue_seq < seq))
        )
    query = query.order_by(
        notifications.c.queue_phase.desc(), notifications.c.queue_seq.desc(), notifications.c.created_at.desc()
    )
    return _rows(NotificationRow, await session.execute(query.limit(limit)))


# --- messages ---------------------------------------------------------------------------------


_NOTIFICATION_OF_CAUSE = select(notifications.c.notification_id).where(
    notifications.c.cause_event_id == bindparam("cause_event_id"),
    notifications.c.template == bindparam("template"),
    notifications.c.recipient == bindparam("recipient"),
)


async def notification_exists(session: AsyncSession, cause_event_id: str, template: str, recipient: str) -> bool:
    key = {"cause_event_id": cause_event_id, "template": template, "recipient": recipient}
    return (await session.execute(_NOTIFICATION_OF_CAUSE, key)).first() is not None


async def add_notification(session: AsyncSession, **values: Any) -> bool:
    """Insert a message unless one for (cause, template, recipient) exists; True if new.
    One statement: the unique constraint decides, also against a racing replica."""
    stamp = clock.now()
    values.setdefault("due_at", stamp)
    return await insert_if_absent(
        session, notifications, conflict=ONCE_PER_CAUSE, created_at=stamp, attempts=0, **values
    )


async def add_notifications(session: AsyncSession, messages: list[dict[str, Any]]) -> int:
    """`add_notification` for several messages of the same columns, in one statement; how
    many were new."""
    stamp = clock.now()
    rows = [{"due_at": stamp, **message, "created_at": stamp, "attempts": 0} for message in messages]
    return await insert_absent_rows(session, notifications, rows, conflict=ONCE_PER_CAUSE)


# Due for the dispatcher: pending messages whose time has come, and messages whose
# send lease ran out (the process died while sending them).
DISPATCHABLE = ("pending", "sending")


async def due_notifications(
    session: AsyncSession, at: datetime, limit: int, *, urgent: bool | None = None
) -> list[NotificationRow]:
    """Due messages to patients and care teams (only the urgent ones, or only the others,
    if `urgent` says); webhook deliveries go one at a time per subscription (webhook_heads)."""
    query = (
        select(notifications)
        .where(
            notifications.c.status.in_(DISPATCHABLE),
            notifications.c.due_at <= at,
            notifications.c.template != "webhook",
            *([] if urgent is None else [notifications.c.urgent == urgent]),
        )
        .order_by(notifications.c.urgent.desc(), notifications.c.due_at)
        .limit(limit)
    )
    return _rows(NotificationRow, await session.execute(query))


_DUE_BY_IDS = select(notifications).where(
    notifications.c.notification_id.in_(bindparam("notification_ids", expanding=True)),
    notifications.c.status.in_(DISPATCHABLE),
    notifications.c.due_at <= bindparam("at"),
)
_DUE_BY_IDS_LOCKED = _DUE_BY_IDS.with_for_update(skip_locked=True)


async def claim_notifications(
    session: AsyncSession, leases: Mapping[str, datetime], at: datetime
) -> dict[str, NotificationRow]:
    """Take due messages for sending, each (a notification_id of `leases`) with status
    `sending` until its lease ends, so another dispatcher (a replica on PostgreSQL: SKIP
    LOCKED) leaves it alone, and a crash mid-send only delays it to the end of the lease.
    The rows taken, as they were before: a message not due (any more) at `at` is not
    among them. Two statements for all of them."""
    if not leases:
        return {}
    query = _DUE_BY_IDS_LOCKED if dialect_name(session) == "postgresql" else _DUE_BY_IDS
    found = await session.execute(query, {"notification_ids": in_list(leases), "at": at})
    taken = {row["notification_id"]: row for row in _rows(NotificationRow, found)}
    claims = [{"notification_id": key, "status": "sending", "due_at": leases[key]} for key in sorted(taken)]
    await update_rows_by(session, notifications, ("notification_id",), claims)
    return taken


async def next_due_at(session: AsyncSession, *, urgent: bool | None = None) -> datetime | None:
    """When the next message falls due: a patient or care-team message (only urgent ones,
    or only the others, if `urgent` says), or, unless only urgent ones are asked for, the
    head of a subscription that may send (a paused one's queue waits for its resume)."""
    query = (
        select(notifications.c.due_at)
        .where(
            notifications.c.status.in_(DISPATCHABLE),
            notifications.c.template != "webhook",
            *([] if urgent is None else [notifications.c.urgent == urgent]),
        )
        .order_by(notifications.c.due_at)
    )
    found = (await session.execute(query.limit(1))).first()
    times = [found.due_at] if found else []
    if not urgent:
        times += [head["due_at"] for head in await webhook_heads(session)]
    return min(times) if times else None


async def mark_notification(session: AsyncSession, notification_id: str, **values: Any) -> None:
    await update_by(session, notifications, {"notification_id": notification_id}, **values)


async def open_patient_messages(
    session: AsyncSession,
    patient_id: str,
    *,
    booking_id: str | None = None,
    site_id: str | None = None,
    statuses: Iterable[str] = OPEN_STATUSES,
) -> list[NotificationRow]:
    query = select(notifications).where(
        notifications.c.patient_id == patient_id,
        notifications.c.recipient_kind == "patient",
        notifications.c.status.in_(list(statuses)),
    )
    if booking_id is not None:
        query = query.where(notifications.c.booking_id == booking_id)
    if site_id is not None:
        query = query.where(notifications.c.site_id == site_id)
    return _rows(NotificationRow, await session.execute(query))


async def cancel_open(session: AsyncSession, reason: str, **where: str) -> int:
    """Cancel open (pending or held) patient messages matching `where` (column = value)."""
    conditions = [notifications.c[name] == value for name, value in where.items()]
    result = await session.execute(
        update(notifications)
        .where(
            notifications.c.status.in_(OPEN_STATUSES),
            notifications.c.recipient_kind == "patient",
            *conditions,
        )
        .values(status="cancelled", status_reason=reason)
    )
    return rows_changed(result)


async def alert_messages(session: AsyncSession, alert_id: str) -> list[NotificationRow]:
    query = select(notifications).where(notifications.c.alert_id == alert_id).order_by(notifications.c.created_at)
    return _rows(NotificationRow, await session.execute(query))


async def patient_notifications(session: AsyncSession, patient_id: str) -> list[NotificationRow]:
    query = select(notifications).where(notifications.c.patient_id == patient_id).order_by(notifications.c.created_at)
    return _rows(NotificationRow, await session.execute(query))


async def record_attempt(session: AsyncSession, **values: Any) -> None:
    await insert_row(session, delivery_attempts, at=clock.now(), **values)


async def mark_sent(session: AsyncSession, sent: Sequence[Mapping[str, Any]]) -> None:
    """Messages that went out, each with its notification_id, attempts, channel and
    provider_id: one statement for all of them."""
    stamp = clock.now()
    rows = [
        {**message, "status": "sent", "status_reason": None, "sent_at": stamp, "last_error": None} for message in sent
    ]
    await update_rows_by(session, notifications, ("notification_id",), rows)


async def record_attempts(session: AsyncSession, attempts: Sequence[Mapping[str, Any]]) -> None:
    """`record_attempt` for several attempts of the same columns, in one statement."""
    stamp = clock.now()
    await insert_rows(session, delivery_attempts, [{"at": stamp, **attempt} for attempt in attempts])


async def attempts_of(session: AsyncSession, notification_ids: list[str]) -> dict[str, list[DeliveryAttemptRow]]:
    if not notification_ids:
        return {}
    query = (
        select(delivery_attempts)
        .where(delivery_attempts.c.notification_id.in_(notification_ids))
        .order_by(delivery_attempts.c.id)
    )
    grouped: dict[str, list[DeliveryAttemptRow]] = {}
    for row in _rows(DeliveryAttemptRow, await session.execute(query)):
        grouped.setdefault(row["notification_id"], []).append(row)
    return grouped
