"""What notifications does, each in the caller's transaction: plan patient messages
behind the consent gate, plan and cancel reminders, raise care-team alerts and escalate
them, fan events out to webhook subscriptions, and decide at send time whether a due
message may go out now.

handlers.py (events), api.py (commands), delivery.py (the dispatcher) and app.py (the
escalation loop) call these. `now` is a parameter wherever a rule depends on the clock,
so tests can drive escalation and expiry at any instant. A broken rule raises
`DomainError`; shared.errors maps its kind to the API's answer.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple, cast
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifications import domain, store
from shared import clock
from shared.contracts import Envelope
from shared.contracts.events import (
    EVENT_TYPES,
    BookingCancelled,
    CareTeamAlerted,
    Channel,
    DisclosureRecorded,
    Event,
    IntegrationRegistered,
    IntegrationRevoked,
    NotificationFailed,
    NotificationSent,
    PatientBooked,
    PatientEnrolled,
    SessionCancelled,
    SessionScheduled,
)
from shared.domain_errors import DomainError
from shared.messaging import Interest, named_ids
from shared.messaging.integrations import CONTEXT_EVENTS
from shared.messaging.outbox import Chain, envelope_for
from shared.settings import Settings

log = logging.getLogger("iopnet.notifications")

# Events a webhook subscription may ask for: every public event type of the catalog
# (shared/contracts), never a restricted one. Envelopes on public subjects carry no PHI
# beyond ids (DESIGN A4). Notifications consumes every one of them (handlers.py).
WEBHOOK_EVENTS = domain.subscribable_event_types(EVENT_TYPES)


class WebhookSettings(BaseSettings):
    """Webhook rules (environment, prefix IOPNET_NOTIFY_WEBHOOK_). Kept here rather than in
    shared/settings.py, which the other services share and do not need these from."""

    model_config = SettingsConfigDict(env_prefix="IOPNET_NOTIFY_WEBHOOK_", extra="ignore")

    # A subscription is paused after this many failed attempts in a row (any delivery).
    pause_after_failures: int = Field(default=10, ge=1, le=1000)
    # Backfill bounds: how far back `backfill_from` may reach, and how many past events
    # one backfill may queue (more: the subscription is paused, see resume_subscription).
    backfill_max_days: int = Field(default=30, ge=1, le=3650)
    backfill_max_events: int = Field(default=10_000, ge=1, le=1_000_000)


@dataclass(frozen=True)
class Policy:
    """The network-wide rules from settings; sites may override offsets and quiet hours."""

    live: bool
    reminder_offsets: tuple[int, ...]
    quiet: domain.Window
    business: domain.Window
    business_days: tuple[int, ...]
    escalate_after: timedelta
    care_language: str
    max_attempts: int
    retry_base_seconds: float
    retry_max_seconds: float
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)

    @classmethod
    def from_settings(cls, settings: Settings, webhooks: WebhookSettings | None = None) -> "Policy":
        return cls(
            live=settings.notify_live_channels,
            reminder_offsets=tuple(settings.notify_reminder_offsets_minutes),
            quiet=domain.Window(
                domain.parse_hhmm(settings.notify_quiet_start), domain.parse_hhmm(settings.notify_quiet_end)
            ),
            business=domain.Window(
                domain.parse_hhmm(settings.notify_business_start), domain.parse_hhmm(settings.notify_business_end)
            ),
            business_days=tuple(settings.notify_business_days),
            escalate_after=timedelta(minutes=settings.notify_escalation_minutes),
            care_language=settings.notify_care_team_language,
            max_attempts=max(1, settings.notify_max_attempts),
            retry_base_seconds=settings.notify_retry_base_seconds,
            retry_max_seconds=settings.notify_retry_max_seconds,
            webhooks=webhooks or WebhookSettings(),
        )


@dataclass(frozen=True)
class SiteRules:
    timezone: str
    reminder_offsets: tuple[int, ...]
    quiet: domain.Window


async def site_rules(session: AsyncSession, policy: Policy, site_id: str) -> SiteRules:
    site = await store.get_site(session, site_id)
    overrides = await store.get_site_settings(session, site_id)
    quiet = policy.quiet
    quiet_start, quiet_end = (overrides["quiet_start"], overrides["quiet_end"]) if overrides else (None, None)
    if quiet_start and quiet_end:
        quiet = domain.Window(domain.parse_hhmm(quiet_start), domain.parse_hhmm(quiet_end))
    offsets = overrides["reminder_offsets"] if overrides else None
    return SiteRules(
        timezone=site["timezone"] if site else domain.DEFAULT_TIMEZONE,
        reminder_offsets=tuple(offsets) if offsets is not None else policy.reminder_offsets,
        quiet=quiet,
    )


def _consents(rows: list[store.ConsentRow]) -> list[domain.Consent]:
    return [domain.Consent(r["recipient"], r["purpose"], r["expires_on"], bool(r["revoked"])) for r in rows]


async def consent_verdict(
    session: AsyncSession, policy: Policy, patient_id: str, timezone: str, now: datetime
) -> domain.ConsentVerdict:
    local_day = now.astimezone(ZoneInfo(timezone)).date()
    consents = _consents(await store.patient_consents(session, patient_id))
    return domain.consent_verdict(consents, local_day, live=policy.live)


# --- events out: the outbox plus webhook fan-out ------------------------------------------------


async def emit(
    session: AsyncSession,
    event: Event,
    site_id: str,
    *,
    cause: Envelope | None = None,
    chain: Chain | None = None,
    fan_out: bool = True,
) -> Envelope:
    """Stage an event of ours (the shared outbox way) and queue it for the webhook
    subscriptions that want it."""
    envelope = await store.outbox.emit(session, event, site_id, cause=cause, chain=chain)
    if fan_out:
        await fan_out_event(session, envelope)
    return envelope


def _chain_of(row: store.NotificationRow | store.AlertRow) -> Chain:
    """A message's or an alert's events continue the chain of the event that caused it."""
    return Chain(UUID(row["correlation_id"]), UUID(row["cause_event_id"]))


async def may_deliver(session: AsyncSession, subscription: store.SubscriptionRow, envelope: Envelope) -> bool:
    """Whether this event goes to this subscription: the one place that decides, for live
    events (queued as they are applied), for the backfill, and again at send time. The
    subscription exists, is its site's, asked for the type, and the type is public. One
    an integration made follows its basis, as intake's feed does: while the integration
    is active; under basis `consent`, an event about a patient only while that patient's
    consent names it for its purpose and was on record when the event happened, and
    without a patient only the context (shared/messaging/integrations.py)."""
    if not subscription["active"]:
        return False
    wanted = domain.webhook_wants(
        subscription["site_id"], subscription["event_types"], WEBHOOK_EVENTS, envelope.site_id, envelope.event_type
    )
    if not wanted or subscription["integration_id"] is None:
        return wanted
    integration = await store.get_integration(session, subscription["integration_id"])
    if integration is None or not integration["active"]:
        return False
    if integration["basis"] != "consent":
        return True
    patient_id = envelope.data.get("patient_id")
    if patient_id is None:
        return envelope.event_type in CONTEXT_EVENTS
    return await _consented(session, str(patient_id), integration, envelope.occurred_at)


async def _consented(
    session: AsyncSession, patient_id: str, integration: store.IntegrationRow, occurred_at: datetime
) -> bool:
    recipient, purpose = f"org:{integration['integration_id']}", integration["purpose"] or ""
    today = clock.today()
    return any(
        domain.consent_covers_event(
            granted_at=c["granted_at"], expires_on=c["expires_on"], occurred_at=occurred_at, today=today
        )
        for c in await store.consents_to(session, patient_id, recipient, purpose)
    )


async def integration_registered(session: AsyncSession, event: IntegrationRegistered) -> None:
    await store.upsert_integration(
        session,
        event.integration_id,
        sites=json.dumps(event.sites),
        basis=event.basis,
        purpose=event.purpose,
        active=True,
    )


async def integration_revoked(session: AsyncSession, event: IntegrationRevoked) -> None:
    """Its subscriptions deliver nothing more (may_deliver), queued deliveries included."""
    current = await store.get_integration(session, event.integration_id)
    if current is None:  # revoked before we heard of it: remember it, as the strictest basis
        await store.upsert_integration(session, event.integration_id, sites="[]", basis="consent", active=False)
    else:
        await store.deactivate_integration(session, event.integration_id)


async def _report_disclosure(session: AsyncSession, subscription: store.SubscriptionRow, payload: str | None) -> None:
    """A webhook delivered an event about a patient under their consent: an entry for the
    patient's accounting of disclosures, which intake keeps (restricted account)."""
    if payload is None or subscription["integration_id"] is None:
        return
    integration = await store.get_integration(session, subscription["integration_id"])
    envelope = Envelope.model_validate_json(payload)
    patient_id = envelope.data.get("patient_id")
    if integration is None or integration["basis"] != "consent" or patient_id is None:
        return
    report = DisclosureRecorded(
        patient_id=UUID(str(patient_id)),
        recipient=f"org:{integration['integration_id']}",
        purpose=integration["purpose"] or "",
        channel="webhook",
        event_type=envelope.event_type,
        event_id=envelope.event_id,
        disclosed_at=clock.now(),
    )
    await store.outbox.emit(session, report, envelope.site_id, cause=envelope)


async def webhook_interest(session: AsyncSession) -> Interest:
    """The (event type, site) pairs some webhook subscription asks for, paused ones
    included (their deliveries queue while they are paused)."""
    subscriptions = await store.list_subscriptions(session, None)
    return Interest(wanted=frozenset((t, s["site_id"]) for s in subscriptions for t in s["event_types"]))


async def fan_out_event(session: AsyncSession, envelope: Envelope) -> int:
    """Queue the event for every subscription of its site that may receive it, at the
    end of each one's queue (positions taken under the subscription's lock: the queue is
    in commit order, and one stream's events commit in stream order)."""
    if envelope.event_type not in WEBHOOK_EVENTS:
        return 0
    queued = 0
    for subscription in await store.subscribers(session, envelope.site_id, envelope.event_type):
        if not await may_deliver(session, subscription, envelope):
            continue
        recipient = domain.recipient_key("subscription", subscription["subscription_id"])
        if await store.notification_exists(session, str(envelope.event_id), "webhook", recipient):
            continue  # queued already (by its backfill, or a re-applied event)
        seq = await store.take_queue_seq(session, subscription["subscription_id"])
        queued += await _queue_webhook(session, subscription, envelope, phase=1, seq=seq)
    return queued


async def _queue_webhook(
    session: AsyncSession, subscription: store.SubscriptionRow, envelope: Envelope, *, phase: int, seq: int
) -> bool:
    return await store.add_notification(
        session,
        notification_id=str(uuid4()),
        site_id=envelope.site_id,
        patient_id=None,
        recipient_kind="integration",
        recipient=domain.recipient_key("subscription", subscription["subscription_id"]),
        channel="webhook",
        template="webhook",
        language=domain.DEFAULT_LANGUAGE,
        cause_event_id=str(envelope.event_id),
        correlation_id=str(envelope.correlation_id),
        status="pending",
        payload=envelope.model_dump_json(),
        event_type=envelope.event_type,
        queue_phase=phase,
        queue_seq=seq,
    )


async def queue_backfill(
    session: AsyncSession, policy: Policy, subscription_id: str, envelopes: list[Envelope] | None
) -> int | None:
    """Queue a subscription's past events (in stream order) ahead of every live one, and
    let it start sending. An event that is queued live already (applied while the
    backfill read the stream) moves to its place in the backfill: each event goes once,
    and in order. Too many past events: nothing is queued, the subscription is paused
    with the reason (resuming it goes on with the live events only); `envelopes` None
    says the reader found too many already. Returns how many
    were queued, or None if the subscription is gone or its backfill is not pending."""
    subscription = await store.lock_subscription(session, subscription_id)
    if subscription is None or not subscription["active"] or subscription["backfill_status"] != "pending":
        return None
    wanted = [e for e in envelopes or [] if await may_deliver(session, subscription, e)]
    limit = policy.webhooks.backfill_max_events
    if envelopes is None or len(wanted) > limit:
        reason = f"backfill too large: more than {limit} events since backfill_from"
        await store.update_subscription(
            session, subscription_id, backfill_status="too_large", backfill_error=reason, status="paused",
            paused_reason=reason, paused_at=clock.now(),
        )  # fmt: skip
        return 0
    recipient = domain.recipient_key("subscription", subscription_id)
    queued = 0
    for ordinal, envelope in enumerate(wanted):
        existing = await store.queued_webhook(session, recipient, str(envelope.event_id))
        if existing is None:
            queued += await _queue_webhook(session, subscription, envelope, phase=0, seq=ordinal)
        elif existing["status"] in store.QUEUED and existing["attempts"] == 0:
            await store.mark_notification(session, existing["notification_id"], queue_phase=0, queue_seq=ordinal)
            queued += 1
    await store.update_subscription(session, subscription_id, backfill_status="done", backfill_events=queued)
    return queued


async def webhook_attempted(
    session: AsyncSession, policy: Policy, row: store.NotificationRow, *, ok: bool, error: str | None = None
) -> None:
    """Count an attempt of a subscription's delivery: a success clears the count of
    failures in a row; the Nth failure in a row pauses the subscription, with its reason."""
    subscription_id = row["recipient"].split(":", 1)[1]
    subscription = await store.lock_subscription(session, subscription_id)
    if subscription is None:
        return
    if ok:
        if subscription["consecutive_failures"]:
            await store.update_subscription(session, subscription_id, consecutive_failures=0)
        await _report_disclosure(session, subscription, row["payload"])
        return
    failures = subscription["consecutive_failures"] + 1
    values: dict[str, Any] = {"consecutive_failures": failures}
    reason = domain.pause_reason(failures, policy.webhooks.pause_after_failures, error)
    if reason is not None and subscription["status"] == "active":
        values.update(status="paused", paused_reason=reason, paused_at=clock.now())
        log.warning("webhook subscription paused", extra={"subscription_id": subscription_id, "reason": reason})
    await store.update_subscription(session, subscription_id, **values)


async def resume_subscription(session: AsyncSession, subscription: store.SubscriptionRow, now: datetime) -> None:
    """Delivery goes on from where it stopped: the delivery at the head of the queue
    (retried at once) and everything queued behind it while paused. A subscription
    paused because its backfill was too large goes on with the live events only."""
    if subscription["status"] != "paused":
        raise DomainError("conflict", "the subscription is not paused")
    values: dict[str, Any] = {"status": "active", "paused_reason": None, "paused_at": None, "consecutive_failures": 0}
    if subscription["backfill_status"] == "too_large":
        values["backfill_status"] = "skipped"
    await store.update_subscription(session, subscription["subscription_id"], **values)
    recipient = domain.recipient_key("subscription", subscription["subscription_id"])
    head = await store.queued_head(session, recipient)
    if head is not None and head["status"] == "pending" and head["due_at"] > now:
        await store.mark_notification(session, head["notification_id"], due_at=now)


class Ended(NamedTuple):
    """A message's last attempt: the message, its channel and how many attempts it took."""

    row: store.NotificationRow
    channel: str
    attempts: int


async def announce_outcome(
    session: AsyncSession,
    kind: type[NotificationSent] | type[NotificationFailed],
    row: store.NotificationRow,
    channel: str,
    attempts: int,
    reason: str | None = None,
) -> None:
    """Publish how a message ended. `reason`: the fixed failure text (a status code,
    "target refused: loopback"), carried once the event declares a `reason` field (an
    additive contract change that shared/contracts owns); until then it is kept on the
    row and in the delivery log."""
    await announce_outcomes(session, kind, [Ended(row, channel, attempts)], reason=reason)


async def announce_outcomes(
    session: AsyncSession,
    kind: type[NotificationSent] | type[NotificationFailed],
    ended: Sequence[Ended],
    reason: str | None = None,
) -> None:
    """`announce_outcome` for several messages, staged in one statement. A webhook
    delivery's own outcome is not fanned out to webhooks again (one delivery would cause
    the next, forever)."""
    extra: dict[str, Any] = {"reason": reason} if reason is not None and "reason" in kind.model_fields else {}
    envelopes = [
        envelope_for(
            kind(
                notification_id=UUID(row["notification_id"]),
                recipient_kind=cast(domain.RecipientKind, row["recipient_kind"]),
                channel=cast(Channel, channel),
                template=row["template"],
                cause_event_id=UUID(row["cause_event_id"]),
                attempts=attempts,
                **extra,
            ),
            row["site_id"],
            chain=_chain_of(row),
        )
        for row, channel, attempts in ended
    ]
    await store.outbox.stage(session, *envelopes)
    for envelope, one in zip(envelopes, ended, strict=True):
        if one.row["recipient_kind"] != "integration":
            await fan_out_event(session, envelope)


# --- patient messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientRecipient:
    """What planning a patient's messages at a site reads, once for all of them (a
    booking's reminders): the site's rules, the contact, its channel, the consents."""

    patient_id: str
    site_id: str
    rules: SiteRules
    contact: store.ContactRow | None
    channel: str | None
    verdict: domain.ConsentVerdict


async def patient_recipient(
    session: AsyncSession,
    policy: Policy,
    patient_id: str,
    site_id: str,
    now: datetime,
    contact: store.ContactRow | None = None,
) -> PatientRecipient:
    """`contact`: the patient's, if the caller has read it already."""
    rules = await site_rules(session, policy, site_id)
    contact = contact or await store.get_contact(session, patient_id)
    channel = domain.patient_channel(contact["preferred_channel"], policy.live) if contact else None
    verdict = await consent_verdict(session, policy, patient_id, rules.timezone, now)
    return PatientRecipient(patient_id, site_id, rules, contact, channel, verdict)


@dataclass(frozen=True)
class PatientMessage:
    """A message to plan for a patient: which one, what caused it, and its times."""

    template: str
    cause_event_id: str
    correlation_id: str
    due_at: datetime | None = None
    expires_at: datetime | None = None
    booking_id: str | None = None
    session_id: str | None = None


async def plan_patient_message(
    session: AsyncSession,
    policy: Policy,
    message: PatientMessage,
    *,
    patient_id: str,
    site_id: str,
    now: datetime,
    recipient: PatientRecipient | None = None,
) -> bool:
    """Queue one patient message (once per cause, template and patient); True if new.
    `recipient`: read already for this patient and site (`patient_recipient`)."""
    if recipient is None:
        recipient = await patient_recipient(session, policy, patient_id, site_id, now)
    return await store.add_notification(session, **patient_message_row(policy, recipient, message, now))


def patient_message_row(
    policy: Policy, recipient: PatientRecipient, message: PatientMessage, now: datetime
) -> dict[str, Any]:
    """The row of one patient message. Its channel and address are settled when it is
    sent (the contact may change in between); here: suppressed if the patient wants no
    messages, cancelled if they refused consent, held while no consent covers it, else
    pending until its due time."""
    rules, contact, channel, verdict = recipient.rules, recipient.contact, recipient.channel, recipient.verdict
    due = message.due_at or now
    if policy.live:
        due = domain.after_quiet_hours(due, rules.timezone, rules.quiet)
    status, reason = "pending", None
    if contact is not None and channel is None:
        status, reason = "suppressed", "patient_opted_out"
    elif verdict == "refused":
        status, reason = "cancelled", "consent_revoked"
    elif verdict == "hold":
        status, reason = "held", "awaiting_consent"
    return {
        "notification_id": str(uuid4()),
        "site_id": recipient.site_id,
        "patient_id": recipient.patient_id,
        "recipient_kind": "patient",
        "recipient": domain.recipient_key("patient", recipient.patient_id),
        "channel": channel or ("console" if not policy.live else "email"),
        "template": message.template,
        "language": contact["language"] if contact else domain.DEFAULT_LANGUAGE,
        "cause_event_id": message.cause_event_id,
        "correlation_id": message.correlation_id,
        "status": status,
        "status_reason": reason,
        "due_at": due,
        "expires_at": message.expires_at,
        "booking_id": message.booking_id,
        "session_id": message.session_id,
    }


async def plan_welcome(session: AsyncSession, policy: Policy, patient_id: str, now: datetime) -> int:
    """A welcome per enrollment once both the enrollment and the contact are known.

    The two arrive on different streams in either order; whichever comes second
    queues the message, and the unique (cause, template, recipient) keeps it to one.
    """
    contact = await store.get_contact(session, patient_id)
    if contact is None:
        return 0
    queued = 0
    for episode in await store.patient_enrollments(session, patient_id):
        if episode["status"] != "active":
            continue
        welcome = PatientMessage(
            "welcome", episode["enrolled_event_id"], episode["correlation_id"], expires_at=now + domain.WELCOME_VALID
        )
        queued += await plan_patient_message(
            session,
            policy,
            welcome,
            patient_id=patient_id,
            site_id=episode["site_id"],
            now=now,
            recipient=await patient_recipient(session, policy, patient_id, episode["site_id"], now, contact),
        )
    return queued


async def read_batch_ahead(session: AsyncSession, envelopes: list[Envelope]) -> None:
    """A routine batch's patients locked in one statement, in id order, before any of its
    events is applied: two consumers' batches sharing patients (a contact and the
    enrollment, on two streams) take them in the same order and never deadlock. Then,
    under those locks, what the handlers read of them (contacts, consents, enrollments
    and their ends), the batch's bookings and sessions, its sites and their settings, and
    which of them have no webhook subscription, one statement per table: a batch of
    enrollments and bookings read a row per table per event before."""
    patient_ids = named_ids(envelopes, "patient_id")
    booking_ids, session_ids = named_ids(envelopes, "booking_id"), named_ids(envelopes, "session_id")
    await store.lock_patients(session, patient_ids)
    await store.read_patients_ahead(session, patient_ids, enrollments_too=patient_ids, ends_too=patient_ids)
    await store.read_bookings_ahead(session, booking_ids)
    await store.read_sessions_ahead(session, session_ids)
    sites = {envelope.site_id for envelope in envelopes}
    await store.read_sites_ahead(session, sites)
    await store.read_subscribers_ahead(session, sites)


# --- episodes, sessions and bookings: events that may arrive out of order -------------------
#
# State-based, so that order and repetition do not matter: an end that arrives before
# its enrollment is remembered, a cancelled session stays cancelled, the later of a
# booking's events wins. A late, repeated or re-applied event (`iopnet events reapply`)
# changes only what is missing.


async def open_enrollment(
    session: AsyncSession, policy: Policy, cause: Envelope, event: PatientEnrolled, now: datetime
) -> int:
    """Project an enrollment (ended already if its end arrived first) and plan the
    welcome of every active episode. Returns how many messages were queued."""
    end = _end_of(await store.get_end(session, str(event.enrollment_id), str(event.patient_id)))
    discharged_on = end.ended_on if end is not None and end.status == "discharged" else None
    await store.add_enrollment(
        session,
        enrollment_id=str(event.enrollment_id),
        patient_id=str(event.patient_id),
        site_id=cause.site_id,
        start_date=event.start_date,
        enrolled_event_id=str(cause.event_id),
        correlation_id=str(cause.correlation_id),
        status=domain.opening_status(end),
        discharged_on=discharged_on,
    )
    return await plan_welcome(session, policy, str(event.patient_id), now)


def _end_of(row: store.EpisodeEndRow | None) -> domain.EpisodeEnd | None:
    return domain.EpisodeEnd(cast(domain.EndStatus, row["status"]), row["ended_on"]) if row else None


async def end_enrollment(
    session: AsyncSession, cause: Envelope, *, enrollment_id: str, patient_id: str, site_id: str, end: domain.EpisodeEnd
) -> None:
    """A discharge or transfer-out, remembered whether or not the enrollment is known
    yet; a known active episode takes it. (The caller cancels what is open.)"""
    await store.remember_end(
        session, enrollment_id, patient_id=patient_id, site_id=site_id, status=end.status,
        ended_on=end.ended_on, event_id=str(cause.event_id),
    )  # fmt: skip
    enrollment = await store.get_enrollment(session, enrollment_id)
    if enrollment is None:
        return  # the late PatientEnrolled finds the end and opens ended
    status = domain.status_after_end(enrollment["status"], end)
    if status == enrollment["status"]:
        return
    values: dict[str, Any] = {"status": status}
    if status == "discharged":
        values["discharged_on"] = end.ended_on
    await store.update_enrollment(session, enrollment_id, **values)


async def record_session(
    session: AsyncSession, cause: Envelope, event: SessionScheduled | SessionCancelled, status: str
) -> str:
    """Project a session; returns its status (a cancelled one stays cancelled)."""
    current = await store.get_session(session, str(event.session_id))
    kept = domain.session_status_after(current["status"] if current else None, status)
    await store.upsert_session(
        session, str(event.session_id), site_id=cause.site_id,
        starts_at=event.starts_at, ends_at=event.ends_at, status=kept,
    )  # fmt: skip
    return kept


@dataclass(frozen=True)
class RecordedBooking:
    """A booking event that applied: the booking as it now is, and whether this projection
    had not heard of the booking before."""

    booking: store.BookingRow
    first_heard: bool


async def record_booking(
    session: AsyncSession, cause: Envelope, event: PatientBooked | BookingCancelled, status: str
) -> RecordedBooking | None:
    """Project a booking event unless a later one of the same booking applied first."""
    current = await store.get_booking(session, str(event.booking_id))
    stored_at, stored_status = (current["event_at"], current["status"]) if current else (None, None)
    if not domain.booking_event_applies(stored_at, stored_status, cause.occurred_at, status):
        return None
    booking = await store.upsert_booking(
        session, str(event.booking_id), session_id=str(event.session_id), patient_id=str(event.patient_id),
        site_id=cause.site_id, starts_at=event.starts_at, status=status, event_at=cause.occurred_at,
    )  # fmt: skip
    return RecordedBooking(booking, first_heard=current is None)


async def booking_announced(
    session: AsyncSession, policy: Policy, cause: Envelope, event: PatientBooked, now: datetime
) -> int:
    """PatientBooked: plan the booking's reminders, unless its cancellation (or its
    session's) applied first, every episode at the site has ended, or they are planned."""
    patient_id, booking_id = str(event.patient_id), str(event.booking_id)
    recorded = await record_booking(session, cause, event, "booked")
    if recorded is None:
        return 0
    target = await store.get_session(session, str(event.session_id))
    if target is not None and target["status"] == "cancelled":
        return 0
    if not domain.may_plan_for(await store.episode_statuses(session, patient_id, cause.site_id)):
        return 0  # discharged: a late booking event plans nothing
    # Only plan_reminders writes messages of a booking, after recording it: a booking heard
    # of for the first time has none, and the query is left out.
    if not recorded.first_heard and await store.open_patient_messages(session, patient_id, booking_id=booking_id):
        return 0  # the same booking announced again: its reminders are planned
    return await plan_reminders(session, policy, recorded.booking, cause, now)


async def booking_withdrawn(session: AsyncSession, cause: Envelope, event: BookingCancelled) -> int:
    """BookingCancelled: cancel the booking's open reminders, unless a later re-booking
    of it applied first."""
    if await record_booking(session, cause, event, "cancelled") is None:
        return 0
    return await store.cancel_open(session, "booking_cancelled", booking_id=str(event.booking_id))


async def plan_reminders(
    session: AsyncSession,
    policy: Policy,
    booking: store.BookingRow,
    cause: Envelope,
    now: datetime,
) -> int:
    """The reminders of one booking, at the site's offsets before the session; what they
    need to know of the patient and the site is read once for all of them."""
    recipient = await patient_recipient(session, policy, booking["patient_id"], booking["site_id"], now)
    rules = recipient.rules
    planned = domain.plan_reminders(
        booking["starts_at"], rules.reminder_offsets, rules.timezone, rules.quiet, now, honour_quiet_hours=policy.live
    )
    # The booking's reminders in one statement; the unique (cause, template, recipient)
    # keeps each to one, and only the new ones are counted.
    cause_event_id, correlation_id = str(cause.event_id), str(cause.correlation_id)
    reminders = [
        PatientMessage(
            reminder.template,
            cause_event_id,
            correlation_id,
            due_at=reminder.due_at,
            expires_at=reminder.expires_at,
            booking_id=booking["booking_id"],
            session_id=booking["session_id"],
        )
        for reminder in planned
    ]
    return await store.add_notifications(session, [patient_message_row(policy, recipient, r, now) for r in reminders])


async def release_held(
    session: AsyncSession, policy: Policy, patient_id: str, now: datetime, *, reason: str | None = None
) -> int:
    """A consent (or the contact) arrived: held messages become due now; the send-time
    checks (consent, quiet hours) apply again when they are picked up. `reason`: only
    those held for that reason."""
    released = 0
    for row in await store.open_patient_messages(session, patient_id, statuses=("held",)):
        if reason is not None and row["status_reason"] != reason:
            continue
        if row["expires_at"] is not None and row["expires_at"] <= now:
            await store.mark_notification(session, row["notification_id"], status="cancelled", status_reason="expired")
            continue
        due = max(row["due_at"], now)
        await store.mark_notification(session, row["notification_id"], status="pending", status_reason=None, due_at=due)
        released += 1
    return released


async def consent_given(session: AsyncSession, policy: Policy, patient_id: str, site_id: str, now: datetime) -> int:
    """After a grant: if patient messages are now covered, release those held for consent."""
    rules = await site_rules(session, policy, site_id)
    if await consent_verdict(session, policy, patient_id, rules.timezone, now) != "allow":
        return 0
    return await release_held(session, policy, patient_id, now, reason="awaiting_consent")


async def consent_withdrawn(session: AsyncSession, policy: Policy, patient_id: str, site_id: str, now: datetime) -> int:
    """After a revocation: unless another active consent still covers patient messages,
    cancel every pending or held one at once."""
    rules = await site_rules(session, policy, site_id)
    verdict = domain.consent_verdict(
        _consents(await store.patient_consents(session, patient_id)),
        now.astimezone(ZoneInfo(rules.timezone)).date(),
        live=True,
    )
    if verdict == "allow":
        return 0
    return await store.cancel_open(session, "consent_revoked", patient_id=patient_id)


# --- care-team alerts -------------------------------------------------------------------------


async def raise_alert(
    session: AsyncSession,
    policy: Policy,
    *,
    reason: str,
    site_id: str,
    patient_id: str,
    cause: Envelope,
    dedupe_key: str,
    now: datetime,
    details: dict[str, Any] | None = None,
) -> str | None:
    """Open an alert, tell the on-call first member of the site's roster and publish
    CareTeamAlerted. Urgent alerts go out at once, whatever the hour, and escalate
    along the roster until acknowledged; the others wait for business hours.
    Returns the alert id, or None if this cause already raised its alert."""
    severity, template = domain.ALERT_KINDS[reason]
    urgent = severity == "urgent"
    # Read the roster first, so the alert is written once with its level and timer (this
    # is the safety path: each statement more is a wait for the database under load).
    roster = await store.get_care_team(session, site_id)
    alert = await store.add_alert(
        session,
        alert_id=str(uuid4()),
        site_id=site_id,
        patient_id=patient_id,
        reason=reason,
        severity=severity,
        status="open",
        level=0 if roster else -1,
        escalate_at=now + policy.escalate_after if urgent else None,
        cause_event_id=str(cause.event_id),
        correlation_id=str(cause.correlation_id),
        dedupe_key=dedupe_key,
        details=json.dumps(details or {}),
    )
    if alert is None:
        return None
    alert_id = alert["alert_id"]
    if roster:
        await _alert_member(session, policy, alert, roster[0], template, now)
    else:
        log.warning("care-team alert with no roster", extra={"site_id": site_id, "alert_id": alert_id})
    event = CareTeamAlerted(
        alert_id=UUID(alert_id),
        patient_id=UUID(patient_id),
        reason=reason,
        severity=severity,
        cause_event_id=cause.event_id,
    )
    await emit(session, event, cause.site_id, cause=cause)
    return alert_id


# Set on a session that planned an urgent message: its commit wakes the dispatcher's
# urgent lane (delivery.py), not only the routine one.
URGENT_PLANNED = "iopnet.notifications.urgent_planned"


def urgent_planned(session: AsyncSession) -> bool:
    return bool(session.info.get(URGENT_PLANNED))


async def _alert_member(
    session: AsyncSession,
    policy: Policy,
    alert: store.AlertRow,
    member: store.CareTeamMemberRow,
    template: str,
    now: datetime,
) -> bool:
    urgent = template in domain.URGENT_TEMPLATES
    due = None  # urgent: due the moment it is committed
    if not urgent and policy.live:
        rules = await site_rules(session, policy, alert["site_id"])
        due = domain.next_business_time(now, rules.timezone, policy.business, policy.business_days)
    values: dict[str, Any] = {"due_at": due} if due is not None else {}
    if urgent:
        session.info[URGENT_PLANNED] = True  # the dispatcher's urgent lane is woken on commit
    return await store.add_notification(
        session,
        notification_id=str(uuid4()),
        site_id=alert["site_id"],
        patient_id=alert["patient_id"],
        recipient_kind="care_team",
        recipient=domain.recipient_key("staff", member["member_id"]),
        channel=member["channel"] if policy.live else "console",
        template=template,
        language=member["language"],
        cause_event_id=alert["cause_event_id"],
        correlation_id=alert["correlation_id"],
        status="pending",
        urgent=urgent,
        alert_id=alert["alert_id"],
        **values,
    )


async def route_waiting_alerts(session: AsyncSession, policy: Policy, site_id: str, now: datetime) -> int:
    """Open alerts raised while the site had no roster go to its new on-call first at
    once (urgent ones then escalate as usual): nothing waits for the escalation timer."""
    roster = await store.get_care_team(session, site_id)
    if not roster:
        return 0
    waiting = await store.unrouted_alerts(session, site_id)
    for alert in waiting:
        await _alert_member(session, policy, alert, roster[0], domain.ALERT_KINDS[alert["reason"]][1], now)
        values: dict[str, Any] = {"level": 0}
        if alert["severity"] == "urgent":
            values["escalate_at"] = now + policy.escalate_after
        await store.update_alert(session, alert["alert_id"], **values)
    return len(waiting)


async def escalate_alerts(session: AsyncSession, policy: Policy, now: datetime) -> list[str]:
    """Every open urgent alert whose acknowledgement is overdue goes to the next member
    of the site's roster (on-call order), with CareTeamAlerted(reason="escalated").
    After the last member the alert stays open, with nobody further to call."""
    escalated = []
    for alert in await store.alerts_to_escalate(session, now):
        roster = await store.get_care_team(session, alert["site_id"])
        following = domain.next_roster_index(alert["level"], len(roster))
        if following is None:
            await store.update_alert(session, alert["alert_id"], escalate_at=None)
            log.warning("urgent alert unacknowledged; roster exhausted", extra={"alert_id": alert["alert_id"]})
            continue
        template = "care_escalated" if alert["level"] >= 0 else domain.ALERT_KINDS[alert["reason"]][1]
        await _alert_member(session, policy, alert, roster[following], template, now)
        await store.update_alert(session, alert["alert_id"], level=following, escalate_at=now + policy.escalate_after)
        event = CareTeamAlerted(
            alert_id=UUID(alert["alert_id"]),
            patient_id=UUID(alert["patient_id"]),
            reason=domain.ESCALATED_REASON,
            severity=cast(domain.Severity, alert["severity"]),
            cause_event_id=UUID(alert["cause_event_id"]),
        )
        await emit(session, event, alert["site_id"], chain=_chain_of(alert))
        escalated.append(alert["alert_id"])
    return escalated


async def acknowledge(session: AsyncSession, alert: store.AlertRow, by: str, now: datetime) -> store.AlertRow:
    """Stop an alert's escalation. Its messages that have not gone out yet (a retry, an
    escalation) are cancelled: the alert is in someone's hands."""
    if alert["status"] == "acknowledged":
        raise DomainError("conflict", "the alert is already acknowledged")
    await store.update_alert(
        session, alert["alert_id"], status="acknowledged", escalate_at=None, acknowledged_at=now, acknowledged_by=by
    )
    for row in await store.alert_messages(session, alert["alert_id"]):
        if row["status"] in store.OPEN_STATUSES:
            await store.mark_notification(
                session, row["notification_id"], status="cancelled", status_reason="acknowledged"
            )
    updated = await store.get_alert(session, alert["alert_id"])
    assert updated is not None
    return updated


# --- send time --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """A message that may go out now on `channel`, with what to render it from."""

    channel: str
    address: str | None
    language: str
    values: dict[str, str]
    secret: str | None = None
    payload: str | None = None


@dataclass(frozen=True)
class Settle:
    """A message that may not go out now: its new status (or a later due time)."""

    status: Literal["pending", "held", "cancelled", "suppressed", "failed"]
    reason: str | None
    due_at: datetime | None = None


async def read_ahead(session: AsyncSession, rows: Sequence[store.NotificationRow]) -> None:
    """What `prepare` will read for these messages, read for all of them at once."""
    patients = [row["patient_id"] for row in rows if row["recipient_kind"] == "patient" and row["patient_id"]]
    welcomed = [row["patient_id"] for row in rows if row["template"] == "welcome" and row["patient_id"]]
    await store.read_patients_ahead(session, patients, enrollments_too=welcomed)
    await store.read_sites_ahead(session, {row["site_id"] for row in rows})


async def prepare(session: AsyncSession, policy: Policy, row: store.NotificationRow, now: datetime) -> Ready | Settle:
    """Decide, at send time, whether a due message goes out now, and to where."""
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return Settle("cancelled", "expired")
    if row["recipient_kind"] == "patient":
        return await _prepare_patient(session, policy, row, now)
    if row["recipient_kind"] == "care_team":
        return await _prepare_care_team(session, policy, row, now)
    return await _prepare_webhook(session, policy, row)


async def _prepare_patient(
    session: AsyncSession, policy: Policy, row: store.NotificationRow, now: datetime
) -> Ready | Settle:
    patient_id = cast(str, row["patient_id"])  # a patient message always names its patient
    rules = await site_rules(session, policy, row["site_id"])
    contact = await store.get_contact(session, patient_id)
    if contact is None:
        return Settle("held", "awaiting_contact")
    channel = domain.patient_channel(contact["preferred_channel"], policy.live)
    if channel is None:
        return Settle("suppressed", "patient_opted_out")
    verdict = await consent_verdict(session, policy, patient_id, rules.timezone, now)
    if verdict == "refused":
        return Settle("cancelled", "consent_revoked")
    if verdict == "hold":
        return Settle("held", "awaiting_consent")
    if policy.live:
        later = domain.after_quiet_hours(now, rules.timezone, rules.quiet)
        if later > now:
            if row["expires_at"] is not None and later >= row["expires_at"]:
                return Settle("cancelled", "quiet_hours")
            return Settle("pending", "quiet_hours", due_at=later)
    values = await _patient_values(session, row, rules.timezone)
    if values is None:
        return Settle("cancelled", "cause_unknown")
    address = contact["phone"] if channel == "sms" else contact["email"] if channel == "email" else None
    return Ready(channel, address, contact["language"], values)


async def _patient_values(session: AsyncSession, row: store.NotificationRow, timezone: str) -> dict[str, str] | None:
    key = domain.text_key(row["template"])
    if key == "welcome":
        episodes = await store.patient_enrollments(session, cast(str, row["patient_id"]))
        cause = next((e for e in episodes if e["enrolled_event_id"] == row["cause_event_id"]), None)
        return {"start_date": cause["start_date"].isoformat()} if cause else None
    if key.startswith("reminder_"):
        booking = await store.get_booking(session, row["booking_id"]) if row["booking_id"] else None
        return domain.reminder_values(booking["starts_at"], timezone) if booking else None
    return {}


async def _prepare_care_team(
    session: AsyncSession, policy: Policy, row: store.NotificationRow, now: datetime
) -> Ready | Settle:
    member_id = row["recipient"].split(":", 1)[1]
    member = await store.get_member(session, row["site_id"], member_id)
    if member is None:
        return Settle("cancelled", "recipient_removed")
    alert = await store.get_alert(session, row["alert_id"]) if row["alert_id"] else None
    if alert is None:
        return Settle("cancelled", "cause_unknown")
    if not row["urgent"] and policy.live:
        rules = await site_rules(session, policy, row["site_id"])
        opening = domain.next_business_time(now, rules.timezone, policy.business, policy.business_days)
        if opening > now:
            return Settle("pending", "business_hours", due_at=opening)
    values = {"patient_id": alert["patient_id"], "site_id": alert["site_id"], "alert_id": alert["alert_id"]}
    values.update({k: str(v) for k, v in json.loads(alert["details"] or "{}").items()})
    channel = member["channel"] if policy.live else "console"
    return Ready(channel, member["address"], member["language"], values, secret=member["secret"])


async def _prepare_webhook(session: AsyncSession, policy: Policy, row: store.NotificationRow) -> Ready | Settle:
    subscription_id = row["recipient"].split(":", 1)[1]
    subscription = await store.get_subscription(session, subscription_id)
    if subscription is None or not subscription["active"]:
        return Settle("cancelled", "recipient_removed")
    if row["payload"] is not None and not await may_deliver(
        session, subscription, Envelope.model_validate_json(row["payload"])
    ):
        return Settle("cancelled", "not_deliverable")
    channel = "webhook" if policy.live else "console"
    return Ready(
        channel, subscription["url"], domain.DEFAULT_LANGUAGE, {}, secret=subscription["secret"], payload=row["payload"]
    )
