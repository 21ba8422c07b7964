"""Notifications HTTP API: a patient's messages, care-team rosters, site notification
settings, care-team alerts and their acknowledgement, webhook subscriptions (DESIGN A6)."""

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, cast
from uuid import UUID, uuid4

import httpx
from fastapi import APIRouter, Query, Request
from pydantic import AnyHttpUrl, AwareDatetime, BaseModel, Field, field_validator, model_validator
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifications import domain, store, usecases
from shared import clock
from shared.api import Input
from shared.auth import Admin, Clinical, Integrator, NetworkAdmin, Principal, Staff, ensure_site
from shared.contracts.events import SiteId
from shared.db import transaction
from shared.errors import AccessDenied, Forbidden, Invalid, NotFound
from shared.http import Db, RefreshInterests

router = APIRouter()

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")


def _policy(request: Request) -> usecases.Policy:
    policy: usecases.Policy = request.app.state.notifier.policy
    return policy


def _wake(request: Request, session: AsyncSession) -> None:
    request.app.state.notifier.dispatcher.wake_after_commit(session)


def _target_problem(request: Request, address: str) -> str | None:
    """Why a webhook URL may not be registered (domain.target_refusal), or None. Parsed
    by httpx, the client that will send to it, so both read the same host."""
    try:
        url = httpx.URL(address)
    except httpx.InvalidURL:
        return "not a valid URL"
    allow = request.app.state.settings.notify_allow_insecure_targets
    refusal = domain.target_refusal(
        url.scheme, url.raw_host.decode("ascii"), has_userinfo=bool(url.userinfo), allow_insecure=allow
    )
    return domain.TARGET_REFUSALS[refusal] if refusal is not None else None


async def _ensure_sees_patient(
    session: AsyncSession, principal: Principal, site_id: str, patient_id: UUID | str, action: str
) -> None:
    """404 for a patient of a site the caller does not serve, like an unknown one; the
    attempt is audited (`<action>.denied`, committed by `transaction` with the 404)."""
    if not principal.sees_site(site_id):
        await store.record_access(session, principal, f"{action}.denied", site_id, patient_id)
        raise AccessDenied("patient not found")


def _pick(row: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """A response model's keyword arguments: the row's values of `names`, each a column."""
    return {k: row[k] for k in names}


# --- a patient's messages ---------------------------------------------------------------------


class AttemptOut(BaseModel):
    attempt: int
    at: datetime
    channel: str
    outcome: str
    error: str | None
    provider_id: str | None


class NotificationOut(BaseModel):
    notification_id: UUID
    site_id: str
    recipient_kind: str
    channel: str
    template: str
    status: str
    status_reason: str | None = None
    attempts: int
    last_error: str | None = None
    provider_id: str | None = None
    cause_event_id: UUID
    alert_id: UUID | None = None
    created_at: datetime
    due_at: datetime
    expires_at: datetime | None = None
    sent_at: datetime | None
    deliveries: list[AttemptOut] = []


@router.get("/patients/{patient_id}/notifications", response_model=list[NotificationOut], tags=["patients"])
async def patient_notifications(patient_id: UUID, principal: Staff, session: Db) -> list[NotificationOut]:
    async with transaction(session):
        site_id = await store.patient_site(session, str(patient_id))
        if site_id is None:
            raise NotFound("patient not found")
        await _ensure_sees_patient(session, principal, site_id, patient_id, "notifications.read")
        rows = await store.patient_notifications(session, str(patient_id))
        rows = [r for r in rows if principal.sees_site(r["site_id"])]
        log = await store.attempts_of(session, [r["notification_id"] for r in rows])
        await store.record_access(session, principal, "notifications.read", site_id, patient_id)
    fields = NotificationOut.model_fields
    return [
        NotificationOut(
            **_pick(r, [k for k in r if k in fields]),
            deliveries=[AttemptOut(**_pick(a, AttemptOut.model_fields)) for a in log.get(r["notification_id"], [])],
        )
        for r in rows
    ]


# --- sites: care team and notification settings -----------------------------------------------


async def _known_site(session: AsyncSession, principal: Principal, site_id: str) -> store.SiteRow:
    ensure_site(principal, site_id, "site")
    site = await store.get_site(session, site_id)
    if site is None:
        raise NotFound("site not found")
    return site


class MemberIn(Input):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    role: Annotated[str, Field(min_length=1, max_length=60)]
    channel: Literal["email", "sms", "webhook"]
    address: Annotated[str, Field(min_length=3, max_length=500)]
    language: Annotated[str | None, Field(pattern=r"^[a-z]{2}(-[A-Za-z]{2})?$")] = None
    secret: Annotated[str | None, Field(min_length=16, max_length=200, description="webhook signing secret")] = None

    @model_validator(mode="after")
    def _address_fits_channel(self) -> "MemberIn":
        if self.channel == "email" and not EMAIL.match(self.address):
            raise ValueError("address must be an email address for channel email")
        if self.channel == "sms" and not E164.match(self.address):
            raise ValueError("address must be an E.164 phone number (+15555550100) for channel sms")
        if self.channel == "webhook":
            if not re.match(r"^https?://", self.address):
                raise ValueError("address must be an http(s) URL for channel webhook")
            if self.secret is None:
                raise ValueError("a webhook member needs a signing secret")
        return self


class CareTeamIn(Input):
    members: Annotated[list[MemberIn], Field(max_length=50, description="in on-call order: the first is alerted first")]


class MemberOut(BaseModel):
    position: int
    member_id: str
    name: str
    role: str
    channel: str
    address: str
    language: str


class CareTeamOut(BaseModel):
    site_id: str
    members: list[MemberOut]


def _care_team_out(site_id: str, rows: list[store.CareTeamMemberRow]) -> CareTeamOut:
    return CareTeamOut(site_id=site_id, members=[MemberOut(**_pick(r, MemberOut.model_fields)) for r in rows])


@router.put("/sites/{site_id}/care-team", response_model=CareTeamOut, tags=["care team"])
async def put_care_team(site_id: str, body: CareTeamIn, principal: Admin, session: Db, request: Request) -> CareTeamOut:
    language = request.app.state.settings.notify_care_team_language
    members: list[store.CareTeamMember] = [
        {
            "member_id": domain.member_id(site_id, m.channel, m.address),
            "name": m.name,
            "role": m.role,
            "channel": m.channel,
            "address": m.address,
            "language": m.language or language,
            "secret": m.secret,
        }
        for m in body.members
    ]
    if len({m["member_id"] for m in members}) != len(members):
        raise Invalid("a member is listed twice", {"members": "the same channel and address appear twice"})
    refused = {
        f"members.{i}.address": problem
        for i, m in enumerate(body.members)
        if m.channel == "webhook" and (problem := _target_problem(request, m.address))
    }
    if refused:
        raise Invalid("a webhook address is not allowed", refused)
    async with session.begin():
        await _known_site(session, principal, site_id)
        await store.replace_care_team(session, site_id, members)
        rows = await store.get_care_team(session, site_id)
        if await usecases.route_waiting_alerts(session, _policy(request), site_id, clock.now()):
            request.app.state.notifier.dispatcher.wake_after_commit(session)
    return _care_team_out(site_id, rows)


@router.get("/sites/{site_id}/care-team", response_model=CareTeamOut, tags=["care team"])
async def get_care_team(site_id: str, principal: Clinical, session: Db) -> CareTeamOut:
    async with session.begin():
        await _known_site(session, principal, site_id)
        rows = await store.get_care_team(session, site_id)
    return _care_team_out(site_id, rows)


HHMM = Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="site-local HH:MM")]


class NotificationSettingsIn(Input):
    reminder_offsets_minutes: Annotated[
        list[Annotated[int, Field(ge=5, le=14 * 24 * 60)]] | None,
        Field(max_length=5, description="minutes before a session; [] sends no reminders"),
    ] = None
    quiet_start: HHMM | None = None
    quiet_end: HHMM | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> "NotificationSettingsIn":
        if (self.quiet_start is None) != (self.quiet_end is None):
            raise ValueError("give quiet_start and quiet_end together")
        return self


class NotificationSettingsOut(BaseModel):
    site_id: str
    timezone: str
    reminder_offsets_minutes: list[int]
    quiet_start: str
    quiet_end: str


async def _settings_out(session: AsyncSession, policy: usecases.Policy, site_id: str) -> NotificationSettingsOut:
    rules = await usecases.site_rules(session, policy, site_id)
    return NotificationSettingsOut(
        site_id=site_id,
        timezone=rules.timezone,
        reminder_offsets_minutes=list(rules.reminder_offsets),
        quiet_start=rules.quiet.start.strftime("%H:%M"),
        quiet_end=rules.quiet.end.strftime("%H:%M"),
    )


@router.put("/sites/{site_id}/notification-settings", response_model=NotificationSettingsOut, tags=["sites"])
async def put_notification_settings(
    site_id: str, body: NotificationSettingsIn, principal: Admin, session: Db, request: Request
) -> NotificationSettingsOut:
    """Applies to reminders planned from now on; those already planned keep their time."""
    async with session.begin():
        await _known_site(session, principal, site_id)
        # A field left out goes back to the network default (settings).
        offsets = body.reminder_offsets_minutes
        await store.put_site_settings(
            session,
            site_id,
            principal.sub,
            reminder_offsets=sorted(set(offsets), reverse=True) if offsets is not None else None,
            quiet_start=body.quiet_start,
            quiet_end=body.quiet_end,
        )
        return await _settings_out(session, _policy(request), site_id)


@router.get("/sites/{site_id}/notification-settings", response_model=NotificationSettingsOut, tags=["sites"])
async def get_notification_settings(
    site_id: str, principal: Staff, session: Db, request: Request
) -> NotificationSettingsOut:
    async with session.begin():
        await _known_site(session, principal, site_id)
        return await _settings_out(session, _policy(request), site_id)


# --- alerts -------------------------------------------------------------------------------------


class AlertMessageOut(BaseModel):
    notification_id: UUID
    template: str
    channel: str
    status: str
    attempts: int
    sent_at: datetime | None


class AlertOut(BaseModel):
    alert_id: UUID
    site_id: str
    patient_id: UUID
    reason: str
    severity: str
    status: str
    level: int
    escalate_at: datetime | None
    cause_event_id: UUID
    created_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    messages: list[AlertMessageOut] = []


async def _alert_out(session: AsyncSession, alert: store.AlertRow) -> AlertOut:
    messages = [
        AlertMessageOut(**_pick(m, AlertMessageOut.model_fields))
        for m in await store.alert_messages(session, alert["alert_id"])
    ]
    return AlertOut(**_pick(alert, [k for k in AlertOut.model_fields if k in alert]), messages=messages)


@router.get("/alerts", response_model=list[AlertOut], tags=["alerts"])
async def list_alerts(
    principal: Clinical,
    session: Db,
    status: Literal["open", "acknowledged"] | None = None,
    site_id: SiteId | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[AlertOut]:
    """Care-team alerts of the caller's sites, newest first."""
    async with transaction(session):
        sites = principal.visible_sites()
        if site_id is not None:
            if not principal.sees_site(site_id):
                # Alerts name patients: asking for another site's is an attempt at patient data.
                await store.record_access(session, principal, "alerts.read.denied", site_id, None)
                raise AccessDenied("site not found")
            sites = [site_id]
        rows = await store.list_alerts(session, sites, status, limit)
        out = [await _alert_out(session, r) for r in rows]
        for site, patient in sorted({(r["site_id"], r["patient_id"]) for r in rows}):
            await store.record_access(session, principal, "alerts.read", site, patient)
    return out


async def _visible_alert(
    session: AsyncSession, principal: Principal, alert_id: UUID, action: str, *, lock: bool = False
) -> store.AlertRow:
    """The alert if the caller serves its site, else 404 with `<action>.denied` audited."""
    alert = await store.get_alert(session, str(alert_id), lock=lock)
    if alert is None:
        raise NotFound("alert not found")
    if not principal.sees_site(alert["site_id"]):
        await store.record_access(session, principal, f"{action}.denied", alert["site_id"], alert["patient_id"])
        raise AccessDenied("alert not found")
    return alert


@router.get("/alerts/{alert_id}", response_model=AlertOut, tags=["alerts"])
async def read_alert(alert_id: UUID, principal: Clinical, session: Db) -> AlertOut:
    async with transaction(session):
        alert = await _visible_alert(session, principal, alert_id, "alert.read")
        await store.record_access(session, principal, "alert.read", alert["site_id"], alert["patient_id"])
        return await _alert_out(session, alert)


@router.post("/alerts/{alert_id}/acknowledge", response_model=AlertOut, tags=["alerts"])
async def acknowledge_alert(alert_id: UUID, principal: Clinical, session: Db) -> AlertOut:
    """Someone has it: escalation stops, and escalations not yet sent are cancelled."""
    async with transaction(session):
        alert = await _visible_alert(session, principal, alert_id, "alert.acknowledge", lock=True)
        updated = await usecases.acknowledge(session, alert, principal.sub, clock.now())
        await store.record_access(session, principal, "alert.acknowledge", alert["site_id"], alert["patient_id"])
        return await _alert_out(session, updated)


@router.post("/admin/escalations", tags=["ops"])
async def run_escalations(principal: NetworkAdmin, session: Db, request: Request) -> dict[str, int]:
    """Run the escalation check now (the background loop runs it on a timer)."""
    async with session.begin():
        escalated = await usecases.escalate_alerts(session, _policy(request), clock.now())
        _wake(request, session)
    return {"escalated": len(escalated)}


# --- webhook subscriptions ------------------------------------------------------------------------


class SubscriptionIn(Input):
    site_id: SiteId
    url: AnyHttpUrl
    events: Annotated[
        list[str],
        Field(
            min_length=1,
            max_length=len(usecases.WEBHOOK_EVENTS),
            description="event types: any public type of the event catalog, never a restricted one",
        ),
    ]
    secret: Annotated[str, Field(min_length=16, max_length=200, description="HMAC-SHA256 signing secret")]
    backfill_from: Annotated[
        AwareDatetime | None,
        Field(
            description="deliver the site's past events of these types stored since this time first (in order), "
            "then the live ones; at most IOPNET_NOTIFY_WEBHOOK_BACKFILL_MAX_DAYS back"
        ),
    ] = None

    @field_validator("events")
    @classmethod
    def _known(cls, events: list[str]) -> list[str]:
        unknown = sorted(set(events) - usecases.WEBHOOK_EVENTS)
        if unknown:
            raise ValueError(f"not subscribable: {', '.join(unknown)}; choose from {sorted(usecases.WEBHOOK_EVENTS)}")
        return sorted(set(events))


class SubscriptionOut(BaseModel):
    subscription_id: UUID
    site_id: str
    url: str
    events: list[str]
    created_at: datetime
    status: Literal["active", "paused"] = Field(
        description="paused: nothing is sent (deliveries keep queueing) until POST /subscriptions/{id}/resume"
    )
    paused_reason: str | None
    paused_at: datetime | None
    consecutive_failures: int
    backfill_from: datetime | None
    backfill_status: Literal["none", "pending", "done", "skipped", "too_large"] = Field(
        description="pending: past events are being read; live deliveries wait behind them"
    )
    backfill_events: int | None = Field(description="past events queued by the backfill")
    backfill_error: str | None
    integration_id: str | None = Field(
        description="the integration that subscribed: its basis (qsoa or consent) decides what it receives"
    )


def _subscription_out(row: store.SubscriptionRow) -> SubscriptionOut:
    return SubscriptionOut(
        subscription_id=UUID(row["subscription_id"]), site_id=row["site_id"], url=row["url"],
        events=row["event_types"], created_at=row["created_at"], status=cast(Any, row["status"]),
        paused_reason=row["paused_reason"], paused_at=row["paused_at"],
        consecutive_failures=row["consecutive_failures"], backfill_from=row["backfill_from"],
        backfill_status=cast(Any, row["backfill_status"]), backfill_events=row["backfill_events"],
        backfill_error=row["backfill_error"], integration_id=row["integration_id"],
    )  # fmt: skip


@router.post("/subscriptions", status_code=201, response_model=SubscriptionOut, tags=["webhooks"])
async def subscribe(
    body: SubscriptionIn, principal: Integrator, session: Db, request: Request, refresh_interests: RefreshInterests
) -> SubscriptionOut:
    """Register a webhook: every listed event of the site is POSTed to `url` as its
    envelope (JSON), signed with X-Iopnet-Timestamp and X-Iopnet-Signature = hex
    HMAC-SHA256(secret, f"{timestamp}.{body}"). The secret is never returned.

    Delivery is ordered and at least once: one request at a time per subscription, in
    the order the events were applied (one stream's in stream order); a failed one is
    retried with backoff before anything behind it. `X-Iopnet-Delivery-Id` is the same on
    every attempt of one delivery. A 2xx answer delivers; a 4xx other than 408, 425 and
    429 refuses that delivery (logged as failed, not retried); after
    IOPNET_NOTIFY_WEBHOOK_PAUSE_AFTER_FAILURES failed attempts in a row (default 10) the
    subscription is paused until resumed. `backfill_from`: the past events first.

    `url` must be https to a public host, without credentials in it (422 otherwise);
    the address it resolves to is checked again at every send, and redirects are not
    followed. IOPNET_NOTIFY_ALLOW_INSECURE_TARGETS (development) also allows plain http
    and loopback or private hosts.

    An integration subscribes as itself (`iopnet integrations add`; its token's `sub` is
    its id) for one of its sites, and receives what its basis allows: under `consent`, an
    event about a patient only while the patient's consent names it for its purpose (each
    delivery then enters the patient's accounting of disclosures at intake)."""
    ensure_site(principal, body.site_id, "site")
    problem = _target_problem(request, str(body.url))
    if problem is not None:
        raise Invalid("the webhook url is not allowed", {"url": problem})
    now = clock.now()
    if body.backfill_from is not None:
        days = _policy(request).webhooks.backfill_max_days
        if body.backfill_from > now:
            raise Invalid("backfill_from is in the future", {"backfill_from": "must be a past time"})
        if body.backfill_from < now - timedelta(days=days):
            raise Invalid("backfill_from is too far back", {"backfill_from": f"at most {days} days back"})
    subscription_id = str(uuid4())
    async with session.begin():
        integration_id = await _subscribing_integration(session, principal, body.site_id)
        await store.add_subscription(
            session, subscription_id=subscription_id, site_id=body.site_id, url=str(body.url),
            event_types=body.events, secret=body.secret, created_by=principal.sub,
            backfill_from=body.backfill_from, backfill_status="pending" if body.backfill_from else "none",
            integration_id=integration_id,
        )  # fmt: skip
        row = await store.get_subscription(session, subscription_id)
    assert row is not None
    await refresh_interests()  # a type read for webhooks only starts being read at its site
    if body.backfill_from is not None:
        request.app.state.notifier.backfiller.wake()
    return _subscription_out(row)


@router.get("/subscriptions", response_model=list[SubscriptionOut], tags=["webhooks"])
async def list_subscriptions(principal: Integrator, session: Db) -> list[SubscriptionOut]:
    rows = await store.list_subscriptions(session, principal.visible_sites())
    return [_subscription_out(r) for r in rows if _owns(principal, r)]


async def _subscribing_integration(session: AsyncSession, principal: Principal, site_id: str) -> str | None:
    """An integration subscribes as the integration intake registered (its token's `sub`
    is its id), for one of its sites, and its subscription follows its basis
    (usecases.may_deliver). An admin's subscription belongs to no integration."""
    if principal.role != "integration":
        return None
    integration = await store.get_integration(session, principal.sub)
    if integration is None or not integration["active"]:
        raise Forbidden("not a registered integration: see `iopnet integrations add`")
    if site_id not in json.loads(integration["sites"]):
        raise Forbidden("this integration does not cover that site")
    return principal.sub


def _owns(principal: Principal, row: store.SubscriptionRow) -> bool:
    """An integration sees and manages the subscriptions it made; the site's admins (and
    network admins) see and manage all of their sites'."""
    if not principal.sees_site(row["site_id"]):
        return False
    return principal.role != "integration" or row["created_by"] == principal.sub


async def _owned_subscription(
    session: AsyncSession, principal: Principal, subscription_id: UUID, *, lock: bool = False
) -> store.SubscriptionRow:
    """The subscription if the caller owns it (_owns), else 404 like an unknown one."""
    if lock:
        row = await store.lock_subscription(session, str(subscription_id))
    else:
        row = await store.get_subscription(session, str(subscription_id))
    if row is None or not row["active"] or not _owns(principal, row):
        raise NotFound("subscription not found")
    return row


@router.get("/subscriptions/{subscription_id}", response_model=SubscriptionOut, tags=["webhooks"])
async def read_subscription(subscription_id: UUID, principal: Integrator, session: Db) -> SubscriptionOut:
    async with session.begin():
        return _subscription_out(await _owned_subscription(session, principal, subscription_id))


@router.post("/subscriptions/{subscription_id}/resume", response_model=SubscriptionOut, tags=["webhooks"])
async def resume_subscription(
    subscription_id: UUID, principal: Integrator, session: Db, request: Request
) -> SubscriptionOut:
    """Resume a paused subscription: delivery goes on from where it stopped (the delivery
    it stopped at, retried now, then everything queued meanwhile, in order). 409 if it is
    not paused."""
    async with session.begin():
        row = await _owned_subscription(session, principal, subscription_id, lock=True)
        await usecases.resume_subscription(session, row, clock.now())
        _wake(request, session)
        updated = await store.get_subscription(session, row["subscription_id"])
    assert updated is not None
    return _subscription_out(updated)


class WebhookAttemptOut(BaseModel):
    attempt: int
    at: datetime
    outcome: Literal["sent", "retry", "failed"]
    status_code: int | None = Field(description="the receiver's HTTP status; none if no answer came")
    duration_ms: int | None
    error: str | None = Field(description="a fixed text: a status code, an exception class, a policy refusal")


class DeliveryOut(BaseModel):
    delivery_id: UUID = Field(description="X-Iopnet-Delivery-Id and Idempotency-Key of its requests")
    event_id: UUID
    event_type: str | None
    phase: Literal["backfill", "live"]
    position: int | None = Field(description="its place in the subscription's queue, within its phase")
    status: Literal["pending", "sending", "sent", "failed", "cancelled"]
    status_reason: str | None
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None = Field(
        description="when a queued delivery is tried next; none while the subscription is paused"
    )
    queued_at: datetime
    delivered_at: datetime | None
    log: list[WebhookAttemptOut]


class DeliveryPage(BaseModel):
    subscription_id: UUID
    status: str
    items: list[DeliveryOut] = Field(description="the latest in the queue first")
    next: str | None = Field(description="`before` for the next page; none on the last")


_CURSOR = re.compile(r"^([01])\.(-?\d{1,18})$")


@router.get("/subscriptions/{subscription_id}/deliveries", response_model=DeliveryPage, tags=["webhooks"])
async def subscription_deliveries(
    subscription_id: UUID,
    principal: Integrator,
    session: Db,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[str | None, Query(max_length=40, description="the `next` of the previous page")] = None,
) -> DeliveryPage:
    """The subscription's delivery log: every delivery with its attempts, HTTP status
    codes and timings, and when a queued one is tried next. Ids only: no event body."""
    cursor = None
    if before is not None:
        match = _CURSOR.match(before)
        if match is None:
            raise Invalid("before is not a cursor from this list", {"before": "use the `next` of a page"})
        cursor = (int(match.group(1)), int(match.group(2)))
    async with session.begin():
        subscription = await _owned_subscription(session, principal, subscription_id)
        rows = await store.webhook_deliveries(session, subscription["subscription_id"], limit=limit + 1, before=cursor)
        log = await store.attempts_of(session, [r["notification_id"] for r in rows[:limit]])
    page, more = rows[:limit], len(rows) > limit
    paused = subscription["status"] != "active"
    items = []
    for r in page:
        attempts = log.get(r["notification_id"], [])
        last = attempts[-1] if attempts else None
        items.append(
            DeliveryOut(
                delivery_id=UUID(r["notification_id"]),
                event_id=UUID(r["cause_event_id"]),
                event_type=r["event_type"],
                phase="backfill" if r["queue_phase"] == 0 else "live",
                position=r["queue_seq"],
                status=cast(Any, r["status"]),
                status_reason=r["status_reason"],
                attempts=r["attempts"],
                last_status_code=last["status_code"] if last else None,
                last_error=r["last_error"],
                next_attempt_at=r["due_at"] if r["status"] in store.QUEUED and not paused else None,
                queued_at=r["created_at"],
                delivered_at=r["sent_at"],
                log=[WebhookAttemptOut(**_pick(a, WebhookAttemptOut.model_fields)) for a in attempts],
            )
        )
    last_row = page[-1] if page else None
    following = f"{last_row['queue_phase']}.{last_row['queue_seq']}" if more and last_row else None
    return DeliveryPage(subscription_id=subscription_id, status=subscription["status"], items=items, next=following)


@router.delete("/subscriptions/{subscription_id}", status_code=204, tags=["webhooks"])
async def unsubscribe(
    subscription_id: UUID, principal: Integrator, session: Db, refresh_interests: RefreshInterests
) -> None:
    """Delete the subscription; what it still had queued is cancelled."""
    async with session.begin():
        row = await _owned_subscription(session, principal, subscription_id, lock=True)
        await store.deactivate_subscription(session, row["subscription_id"])
        await store.cancel_queued_webhooks(session, row["subscription_id"])
    await refresh_interests()
