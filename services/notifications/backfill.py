"""Webhook backfill: a new subscription's past events, read from the streams themselves.

`POST /subscriptions` with `backfill_from` stores the subscription with its backfill
`pending`; nothing is sent to it until the backfill is queued. This job then reads, for
each stream that holds a subscribed type (IOP_INTAKE, IOP_SCHEDULING, IOP_NOTIFICATIONS,
never IOP_RESTRICTED), every message of the subscription's site stored since
`backfill_from`, keeps the subscribed types (usecases.may_deliver), orders them by the
time the broker stored them (one stream's in stream order) and queues them in one
transaction ahead of the live events (usecases.queue_backfill). Live events applied
meanwhile are queued behind, or moved into the backfill if it holds them too: each event
once, in order. A crash before that transaction leaves the backfill pending: it is read
again on the next start.

Why the stream, and how: the stream is the record of what was published (our database
keeps only what it needs). It is read with JetStream's stored-message get
(`$JS.API.STREAM.MSG.GET.<stream>`: the first message at or after a time, then the next
one matching the site's subjects from a sequence): no consumer is created, so nothing is
left behind on the server and the broker permissions the service needs are one subject
per stream (iopnet/natsd.py grants it on the streams notifications consumes; the
report asks for IOP_NOTIFICATIONS too). One request per message: bounded by
IOPNET_NOTIFY_WEBHOOK_BACKFILL_MAX_EVENTS (queued) and twenty times that (read); past
either the subscription is paused with the reason instead (see resume_subscription).
"""

import asyncio
import base64
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from services.notifications import store, usecases
from shared.contracts import Envelope, UnknownEventType
from shared.contracts.events import EVENT_TYPES
from shared.contracts.subjects import ROOT, event_name
from shared.messaging.broker import client
from shared.runtime import ServiceRuntime

log = logging.getLogger("iopnet.notifications.backfill")

PRODUCER_STREAMS = {"intake": "IOP_INTAKE", "scheduling": "IOP_SCHEDULING", "notifications": "IOP_NOTIFICATIONS"}
NO_MESSAGE = 10037  # JetStream's "no message found"
NO_STREAM = 10059  # "stream not found": nothing was ever published there
READ_FACTOR = 20  # messages read per event queued, at most (other types of the site)
RETRY_SECONDS = 5.0


class TooLarge(Exception):
    pass


class ReadFailed(Exception):
    """The stream could not be read (a refused permission shows as no answer)."""


@dataclass(frozen=True)
class Stored:
    """A message read back from its stream, with where and when the broker stored it."""

    stream: str
    sequence: int
    stored_at: datetime
    envelope: Envelope


def subjects_for(site_id: str, event_types: Iterable[str]) -> dict[str, str]:
    """stream -> the subject to read a site's subscribed events from it with."""
    by_producer: dict[str, list[str]] = {}
    for name in sorted(set(event_types)):
        cls = EVENT_TYPES.get(name)
        if cls is None or cls.restricted:
            continue
        by_producer.setdefault(cls.producer, []).append(name)
    subjects = {}
    for producer, names in by_producer.items():
        token = event_name(names[0]) if len(names) == 1 else "*"
        subjects[PRODUCER_STREAMS[producer]] = ".".join([ROOT, producer, token, site_id])
    return subjects


def _stored_time(value: str) -> datetime:
    # The broker gives nanoseconds; Python keeps microseconds.
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", value).replace("Z", "+00:00")
    return datetime.fromisoformat(trimmed).astimezone(UTC)


async def _get(nc: Client, stream: str, request: dict[str, object]) -> dict[str, object] | None:
    try:
        reply = await nc.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps(request).encode(), timeout=5)
    except Exception as exc:  # no responders, a timeout: also what a refused permission looks like
        raise ReadFailed(f"{stream} not readable: {type(exc).__name__}") from None
    answer = json.loads(reply.data)
    error = answer.get("error")
    if error:
        if error.get("err_code") in (NO_MESSAGE, NO_STREAM):
            return None
        raise ReadFailed(f"{stream} not readable: {error.get('err_code')}")
    message: dict[str, object] = answer["message"]
    return message


async def read_stream(
    nc: Client, stream: str, subject: str, since: datetime, wanted: set[str], limit: int
) -> list[Stored]:
    """The stream's messages on `subject` stored at or after `since` whose type is in
    `wanted`, oldest first; TooLarge past `limit` of them (or READ_FACTOR x limit read)."""
    found: list[Stored] = []
    request: dict[str, object] = {"start_time": since.astimezone(UTC).isoformat().replace("+00:00", "Z")}
    read = 0
    while True:
        message = await _get(nc, stream, {**request, "next_by_subj": subject})
        if message is None:
            return found
        read += 1
        if read > READ_FACTOR * limit:
            raise TooLarge
        sequence = int(str(message["seq"]))
        request = {"seq": sequence + 1}
        try:
            envelope = Envelope.from_bytes(base64.b64decode(str(message.get("data") or "")))
            envelope.event()
        except (ValidationError, UnknownEventType, ValueError):
            log.warning("backfill skipped an undecodable message", extra={"stream": stream, "sequence": sequence})
            continue
        if envelope.event_type not in wanted:
            continue
        found.append(Stored(stream, sequence, _stored_time(str(message["time"])), envelope))
        if len(found) > limit:
            raise TooLarge


async def read_past_events(nc: Client, subscription: store.SubscriptionRow, limit: int) -> list[Envelope] | None:
    """The subscription's past events in delivery order, or None if there are too many."""
    since = subscription["backfill_from"]
    assert since is not None
    wanted = set(subscription["event_types"])
    stored: list[Stored] = []
    try:
        for stream, subject in subjects_for(subscription["site_id"], wanted).items():
            stored += await read_stream(nc, stream, subject, since, wanted, limit - len(stored))
    except TooLarge:
        return None
    stored.sort(key=lambda s: (s.stored_at, s.stream, s.sequence))
    return [s.envelope for s in stored]


class Backfiller:
    """The job that runs pending backfills: woken by a new subscription, and on a timer
    for those a failed read left pending."""

    def __init__(self, policy: usecases.Policy, wake_dispatcher: Callable[[AsyncSession], None]) -> None:
        self.policy = policy
        self.wake_dispatcher = wake_dispatcher
        self._wake = asyncio.Event()
        self.completed = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self, runtime: ServiceRuntime) -> None:
        await runtime.streams_ready.wait()
        while not runtime.stopping.is_set():
            self._wake.clear()
            try:
                await self.run_pending(runtime)
            except Exception as exc:  # a failed round is retried, never fatal
                log.warning("backfill round failed", extra={"error": type(exc).__name__})
            try:
                async with asyncio.timeout(RETRY_SECONDS):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def run_pending(self, runtime: ServiceRuntime) -> None:
        async with runtime.sessions() as session:
            pending = await store.pending_backfills(session)
        nc = client(runtime.broker)
        limit = self.policy.webhooks.backfill_max_events
        for subscription in pending:
            subscription_id = subscription["subscription_id"]
            try:
                envelopes = await read_past_events(nc, subscription, limit)
            except ReadFailed as exc:
                log.warning("backfill could not read", extra={"subscription_id": subscription_id, "error": str(exc)})
                async with runtime.sessions() as session, session.begin():
                    await store.update_subscription(session, subscription_id, backfill_error=str(exc)[:200])
                continue
            async with runtime.sessions() as session, session.begin():
                queued = await usecases.queue_backfill(session, self.policy, subscription_id, envelopes)
                self.wake_dispatcher(session)
            self.completed += 1
            log.info("backfill queued", extra={"subscription_id": subscription_id, "count": queued})
