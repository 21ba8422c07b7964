"""Durable pull consumers with explicit acks, an inbox, and a dead-letter path.

Why not FastStream's subscriber: DESIGN B7 lists the ways its defaults lose or loop
messages (ack policy, message_id, max_workers duplicates, batches that do not wait).
Here every one of those is explicit: one durable per (service, stream), explicit ack
after the handler's transaction commits, retries in place with backoff (so events of one
stream are applied in order), and after `max_deliver` tries the message is published to
`iop.dlq.>` with its reason and then acked, so it never blocks the messages behind it
for longer than its retries.
"""

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.contracts import EVENT_TYPES, Envelope, Event, UnknownEventType, dlq_subject
from shared.contracts.subjects import RESTRICTED, ROOT, event_name, parse_subject
from shared.messaging.inbox import Inbox
from shared.messaging.streams import STREAMS, ensure_streams

log = logging.getLogger("iopnet.consumer")

Handler = Callable[[AsyncSession, Envelope, Event], Awaitable[None]]


class HandlerError(Exception):
    """A handler failure whose message is safe to log and to put on the DLQ (no PHI)."""


class Poison(HandlerError):
    """An event that can never be applied: dead-letter it now instead of retrying."""


@dataclass(frozen=True)
class Subscription:
    stream: str
    handlers: Mapping[str, Handler]

    def filter_subjects(self) -> list[str]:
        subjects = []
        for event_type in sorted(self.handlers):
            cls = EVENT_TYPES[event_type]
            prefix = [ROOT, RESTRICTED] if cls.restricted else [ROOT]
            subjects.append(".".join([*prefix, cls.producer, event_name(event_type), "*"]))
        return subjects


@dataclass
class ConsumerStats:
    applied: int = 0
    skipped_duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    idle_fetches: int = 0
    transactions: int = 0  # committed handler transactions (a batch commits once)


class Consumer:
    def __init__(
        self,
        service: str,
        subscription: Subscription,
        sessions: async_sessionmaker[AsyncSession],
        inbox: Inbox,
        js: JetStreamContext,
        *,
        dlq_js: JetStreamContext | None = None,
        max_deliver: int = 5,
        ack_wait_seconds: float = 30.0,
        nak_delay_seconds: float = 1.0,
        batch: int = 64,
        duplicate_window_seconds: float = 120.0,
        idle_wait_seconds: float = 5.0,
        backlog_wait_seconds: float = 0.02,
    ) -> None:
        self.service = service
        self.subscription = subscription
        self.sessions = sessions
        self.inbox = inbox
        self.js = js
        # IOP_DLQ lives in the main NATS account; a consumer of IOP_RESTRICTED reads
        # through the restricted account's connection and dead-letters through this one.
        self.dlq_js = dlq_js or js
        self.max_deliver = max_deliver
        self.ack_wait_seconds = ack_wait_seconds
        self.nak_delay_seconds = nak_delay_seconds
        self.batch = batch
        self.duplicate_window_seconds = duplicate_window_seconds
        self.idle_wait_seconds = idle_wait_seconds
        self.backlog_wait_seconds = backlog_wait_seconds
        self.durable = f"{service}-{subscription.stream}"
        self.stats = ConsumerStats()
        self.bound = asyncio.Event()

    async def run(self) -> None:
        """Consume forever; an unexpected failure (a deleted consumer, a failed ack)
        re-binds after a pause instead of ending the loop."""
        while True:
            try:
                subscription = await self._bind()
                self.bound.set()
                await self._consume(subscription)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.bound.clear()
                log.error("consumer failed; re-binding", extra={"consumer": self.durable, "error": type(exc).__name__})
                await asyncio.sleep(1.0)

    async def _consume(self, subscription: JetStreamContext.PullSubscription) -> None:
        while True:
            # Wait for one message (returns as soon as it arrives), then take the
            # backlog in batches. A plain fetch(batch) would hold the first message
            # until the batch filled or the request expired.
            for message in await self._fetch(subscription, 1, self.idle_wait_seconds):
                await self.process(message)
                while backlog := await self._fetch(subscription, self.batch, self.backlog_wait_seconds):
                    await self.process_batch(backlog)

    async def process_batch(self, messages: list[Msg]) -> None:
        """A backlog in one transaction (one commit, one fsync, instead of one per event).

        Only the happy path is batched: if any message does not parse, has no handler or
        makes its handler fail, the whole transaction is rolled back and every message
        goes through `process` one by one, with its retries and dead letter, in order."""
        if len(messages) == 1:
            await self.process(messages[0])
            return
        work = []
        for message in messages:
            try:
                envelope = Envelope.from_bytes(message.data)
                event = envelope.event()
            except (ValidationError, UnknownEventType):
                work = []
                break
            handler = self.subscription.handlers.get(envelope.event_type)
            if handler is None:
                work = []
                break
            work.append((envelope, event, handler))
        if not work:
            for message in messages:
                await self.process(message)
            return
        applied: list[bool] = []
        try:
            async with self.sessions() as session, session.begin():
                for envelope, event, handler in work:
                    fresh = await self.inbox.claim(session, envelope, self.durable)
                    if fresh:
                        await handler(session, envelope, event)
                    applied.append(fresh)
        except Exception:
            # The message at len(applied) failed once already: it counts as a try.
            for index, message in enumerate(messages):
                await self.process(message, tried=1 if index == len(applied) else 0)
            return
        self.stats.transactions += 1
        for message in messages:
            await message.ack()
        self.stats.applied += sum(applied)
        self.stats.skipped_duplicates += len(applied) - sum(applied)

    async def _fetch(self, subscription: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
        try:
            return await subscription.fetch(batch, timeout=wait)
        except TimeoutError:  # nats-py raises both its own and asyncio's TimeoutError
            self.stats.idle_fetches += 1
            return []
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
            await asyncio.sleep(0.5)  # backoff while nats-py reconnects
            return []

    async def _bind(self) -> JetStreamContext.PullSubscription:
        config = ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_seconds,
            # Headroom past our own limit: if publishing the dead letter fails on the
            # last try, the server still redelivers so the next try can dead-letter it.
            max_deliver=self.max_deliver + 5,
            filter_subjects=self.subscription.filter_subjects(),
            max_ack_pending=max(self.batch * 4, 256),
        )
        delay = 0.2
        while True:
            try:
                # The consumer needs somewhere to put dead letters before it takes a message.
                await ensure_streams(self.dlq_js, [STREAMS["IOP_DLQ"]], self.duplicate_window_seconds, update=False)
                await self.js.add_consumer(self.subscription.stream, config)
                return await self.js.pull_subscribe_bind(durable=self.durable, stream=self.subscription.stream)
            except (NotFoundError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                # The owner has not declared the stream yet; keep trying, never give up.
                log.info(
                    "waiting for stream",
                    extra={"stream": self.subscription.stream, "error": type(exc).__name__},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def process(self, message: Msg, tried: int = 0) -> None:
        """Apply one message; `tried` counts failed tries made before (in a batch)."""
        deliveries = message.metadata.num_delivered + tried
        try:
            envelope = Envelope.from_bytes(message.data)
            event = envelope.event()
        except ValidationError as exc:
            await self._dead_letter(message, f"invalid event: {_summarize(exc)}")
            return
        except UnknownEventType:
            # Never the type itself: the reason reaches the ops-readable DLQ and the log.
            await self._dead_letter(message, "unknown event type")
            return
        handler = self.subscription.handlers.get(envelope.event_type)
        if handler is None:
            await message.ack()
            return
        attempt = deliveries
        while True:
            try:
                async with self.sessions() as session, session.begin():
                    applied = await self.inbox.claim(session, envelope, self.durable)
                    if applied:
                        await handler(session, envelope, event)
                self.stats.transactions += 1
                break
            except Poison as exc:
                await self._dead_letter(message, f"{envelope.event_type} rejected: {exc}")
                return
            except Exception as exc:
                reason = _describe(exc)
                if attempt >= self.max_deliver:
                    await self._dead_letter(message, f"failed {attempt} times: {reason}", attempts=attempt)
                    return
                # Retried in place, not NAKed: the events behind this one wait, so a
                # discharge is never applied before the enrollment it ends.
                self.stats.retried += 1
                log.warning("handler failed; will retry", extra=self._log_fields(envelope, attempt, reason))
                await message.in_progress()  # keeps ack_wait from expiring meanwhile
                await asyncio.sleep(self.nak_delay_seconds * 2 ** (attempt - 1))
                attempt += 1
        await message.ack()
        if applied:
            self.stats.applied += 1
        else:
            self.stats.skipped_duplicates += 1

    async def apply_stored(self, data: bytes) -> str:
        """Apply one message re-read from its stream (a dead-letter retry, a replay) once,
        through the inbox: "applied", "duplicate" or "not_handled". One try, no dead
        letter: the operator who asked sees the failure as a HandlerError with a reason
        that is safe to show (no PHI)."""
        try:
            envelope = Envelope.from_bytes(data)
            event = envelope.event()
        except ValidationError as exc:
            raise HandlerError(f"invalid event: {_summarize(exc)}") from None
        except UnknownEventType:
            raise HandlerError("unknown event type") from None
        handler = self.subscription.handlers.get(envelope.event_type)
        if handler is None:
            return "not_handled"
        try:
            async with self.sessions() as session, session.begin():
                applied = await self.inbox.claim(session, envelope, self.durable)
                if applied:
                    await handler(session, envelope, event)
        except Exception as exc:
            raise HandlerError(f"{envelope.event_type} failed: {_describe(exc)}") from None
        self.stats.transactions += 1
        if applied:
            self.stats.applied += 1
            return "applied"
        self.stats.skipped_duplicates += 1
        return "duplicate"

    async def _dead_letter(self, message: Msg, reason: str, attempts: int | None = None) -> None:
        reason = re.sub(r"[\r\n]+", " ", reason)[:500]
        try:
            parsed = parse_subject(message.subject)
            name, site = parsed.event_name, parsed.site_id
        except ValueError:
            name, site = "unparseable", "unknown"
        meta = message.metadata
        headers = {
            "Nats-Msg-Id": f"dlq:{self.durable}:{meta.sequence.stream}",
            "Iop-Dlq-Reason": reason,
            "Iop-Consumer": self.durable,
            "Iop-Original-Subject": message.subject,
            "Iop-Original-Stream": meta.stream,
            "Iop-Original-Sequence": str(meta.sequence.stream),
            "Iop-Deliveries": str(attempts or meta.num_delivered),
            "Iop-Dead-Lettered-At": datetime.now(UTC).isoformat(),
        }
        payload = message.data
        if message.subject.startswith(f"{ROOT}.{RESTRICTED}."):
            # IOP_DLQ is readable by ops; contact details must stay in IOP_RESTRICTED, where
            # the original is kept (stream and sequence are in the headers).
            payload = b""
            headers["Iop-Payload-Withheld"] = "restricted"
        try:
            await self.dlq_js.publish(dlq_subject(self.service, name, site), payload, headers=headers)
        except Exception as exc:
            # Not acked: the server redelivers it and the next try dead-letters again.
            log.error("dead-letter publish failed", extra={"consumer": self.durable, "error": type(exc).__name__})
            await message.nak(delay=self.nak_delay_seconds)
            return
        await message.ack()
        self.stats.dead_lettered += 1
        log.error(
            "event dead-lettered",
            extra={"consumer": self.durable, "subject": message.subject, "reason": reason},
        )

    def _log_fields(self, envelope: Envelope, deliveries: int, reason: str) -> dict[str, object]:
        return {
            "consumer": self.durable,
            "event_id": envelope.event_id,
            "event_type": envelope.event_type,
            "deliveries": deliveries,
            "reason": reason,
        }


def _summarize(exc: ValidationError) -> str:
    # pydantic's error types only (a fixed vocabulary): a location may name a key the
    # sender made up and a message may quote the input, which may be a phone number.
    return ", ".join(sorted({err["type"] for err in exc.errors(include_input=False, include_url=False)}))


def _describe(exc: Exception) -> str:
    if isinstance(exc, HandlerError):
        return f"{type(exc).__name__}: {exc}"
    # Driver errors quote SQL parameters, which may hold PHI: name the type only.
    return type(exc).__name__
