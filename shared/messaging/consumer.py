"""Durable pull consumers with explicit acks, an inbox, and a dead-letter path.

Why not FastStream's subscriber: DESIGN B7 lists the ways its defaults lose or loop
messages (ack policy, message_id, max_workers duplicates, batches that do not wait).
Here every one of those is explicit: one durable per (service, stream), explicit ack
after the handler's transaction commits, retries in place with backoff (so events of one
stream are applied in order), and after `max_deliver` tries the message is published to
`iop.dlq.>` with its reason and then acked, so it never blocks the messages behind it
for longer than its retries.

In order across restarts as well. Every message fetched and not yet acked is *held*:
- while held, its lease is renewed (`in_progress()` every third of ack_wait), so a batch
  that works longer than ack_wait is not redelivered behind our back, and ack_wait can be
  short: a crashed consumer's messages come back within seconds;
- on `request_stop()` the consumer takes no new message, lets the message or batch in
  hand finish (the runtime bounds how long), stops the server's deliveries to it and NAKs
  (no delay) everything still held, oldest first: they are redelivered at once, in order,
  before any later message;
- after a kill -9 (or a lost connection) the server still counts the dead run's messages
  as pending until their lease ends, and would hand the restarted consumer *later*
  messages first. So before taking new work the consumer asks how many are pending
  (`_recover`), gathers them back (NAKed ones come at once, orphaned ones when their
  lease ends, at most ack_wait) and applies them, oldest first, before anything newer.
"""

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.contracts import EVENT_TYPES, Envelope, Event, UnknownEventType, dlq_subject
from shared.contracts.subjects import RESTRICTED, ROOT, event_name, parse_subject
from shared.logging import log_context
from shared.messaging.inbox import Inbox
from shared.messaging.streams import STREAMS, ensure_streams
from shared.tracing import span_under

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
    recovered: int = 0  # messages an earlier run left unacked, gathered back before new ones
    returned: int = 0  # messages NAKed at a stop (or a re-bind) so they come back at once
    redelivered: int = 0  # fetched messages the server had delivered before


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
        recovery_margin_seconds: float = 1.0,
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
        # Past a lease's end, before the server's timer has surely put it back in line.
        self.recovery_margin_seconds = recovery_margin_seconds
        self.durable = f"{service}-{subscription.stream}"
        self.stats = ConsumerStats()
        self.bound = asyncio.Event()
        # The stream does not exist yet (its producer has not declared it): nothing to
        # consume, and the durable will start from its first message once it does.
        self.awaiting_stream = False
        self._stopping = asyncio.Event()
        # Fetched and not yet acked or NAKed, by stream sequence.
        self._held: dict[int, Msg] = {}
        self._reconnects = 0

    def request_stop(self) -> None:
        """Take no new message; `run()` returns once the work in hand is done and the
        rest is handed back (see the module docstring)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Consume until `request_stop()`; an unexpected failure (a deleted consumer, a
        failed ack) re-binds after a pause instead of ending the loop."""
        try:
            while not self.stopping:
                try:
                    subscription = await self._bind()
                    if subscription is None:
                        return
                    self.bound.set()
                    await self._consume(subscription)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.bound.clear()
                    failure = {"consumer": self.durable, "error": type(exc).__name__}
                    log.error("consumer failed; re-binding", extra=failure)
                    await self._pause(1.0)
        finally:
            self.bound.clear()

    async def _consume(self, subscription: JetStreamContext.PullSubscription) -> None:
        leases = asyncio.create_task(self._keep_leases(), name=f"{self.durable}-leases")
        try:
            await self._recover(subscription)
            while not self.stopping:
                if self._reconnected():
                    # The broker may have lost what it sent us meanwhile: see _recover.
                    await self._recover(subscription)
                    continue
                # Wait for one message (returns as soon as it arrives), then take the
                # backlog in batches. A plain fetch(batch) would hold the first message
                # until the batch filled or the request expired.
                messages = await self._idle_fetch(subscription)
                # Messages fetched across a reconnect stay held: _recover applies them
                # after the ones the broker may still count as ours from before.
                while messages and not self.stopping and not self._reconnected():
                    await self.process_batch(messages)
                    if self.stopping or self._reconnected():
                        break
                    messages = await self._fetch(subscription, self.batch, self.backlog_wait_seconds)
        finally:
            leases.cancel()
            await self._release(subscription)

    async def process_batch(self, messages: list[Msg]) -> None:
        """A backlog in one transaction (one commit, one fsync, instead of one per event).

        Only the happy path is batched: if any message does not parse, has no handler or
        makes its handler fail, the whole transaction is rolled back and every message
        goes through `process` one by one, with its retries and dead letter, in order."""
        if len(messages) == 1:
            await self.process(messages[0])
            return
        work: list[tuple[Envelope, Event, Handler]] = []
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
            await self._one_by_one(messages)
            return
        applied: list[bool] = []
        try:
            async with self.sessions() as session, session.begin():
                for message, (envelope, event, handler) in zip(messages, work, strict=True):
                    fresh = await self.inbox.claim(session, envelope, self.durable)
                    if fresh:
                        with self._handling(envelope, message.headers):
                            await handler(session, envelope, event)
                    applied.append(fresh)
        except Exception:
            # The message at len(applied) failed once already: it counts as a try.
            await self._one_by_one(messages, failed_at=len(applied))
            return
        self.stats.transactions += 1
        for message in messages:
            await self._ack(message)
        self.stats.applied += sum(applied)
        self.stats.skipped_duplicates += len(applied) - sum(applied)

    async def _one_by_one(self, messages: list[Msg], failed_at: int | None = None) -> None:
        for index, message in enumerate(messages):
            if self.stopping:
                return  # the rest stay held: _release hands them back in order
            await self.process(message, tried=1 if index == failed_at else 0)

    async def _fetch(self, subscription: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
        try:
            messages = await subscription.fetch(batch, timeout=wait)
        except TimeoutError:  # nats-py raises both its own and asyncio's TimeoutError
            self.stats.idle_fetches += 1
            return []
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
            await self._pause(0.5)  # backoff while nats-py reconnects
            return []
        for message in messages:
            self._held[_sequence(message)] = message
            self.stats.redelivered += message.metadata.num_delivered > 1
        return messages

    async def _idle_fetch(self, subscription: JetStreamContext.PullSubscription) -> list[Msg]:
        """The long wait for the next message, cut short by `request_stop()`."""
        fetch = asyncio.ensure_future(self._fetch(subscription, 1, self.idle_wait_seconds))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not fetch.done():
                # A message that reaches us after this is still in the subscription's
                # queue: _release takes it from there and NAKs it.
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fetch
        return fetch.result() if not fetch.cancelled() else []

    async def _recover(self, subscription: JetStreamContext.PullSubscription) -> None:
        """Before any new message: gather back, and apply oldest first, the messages an
        earlier run (or this one, before a lost connection) fetched and never acked.

        The server counts them in `num_ack_pending`. NAKed ones (a clean stop) are
        redelivered at once; a dead run's come back only when their lease ends, and until
        then the server hands out *later* messages. Those later ones are held, not
        applied, and nothing more is fetched until the lease is surely over (ack_wait
        from now: the dead run renewed it at most until it died, which was before now)."""
        self._reconnects = self._reconnect_count()
        info = await subscription.consumer_info()
        delivered_before = info.delivered.stream_seq if info.delivered else 0
        if (info.num_ack_pending or 0) > len(self._held):
            await self._gather(subscription, info)
        # With what was fetched across a reconnect and kept back: all of it, oldest first.
        if self.stopping or not self._held:
            return
        self.stats.recovered += sum(seq <= delivered_before for seq in self._held)
        await self.process_batch(sorted(self._held.values(), key=_sequence))

    async def _gather(self, subscription: JetStreamContext.PullSubscription, info: ConsumerInfo) -> None:
        """Fetch until every message the server counts as ours is held (or give up)."""
        outstanding = (info.num_ack_pending or 0) - len(self._held)
        delivered_before = info.delivered.stream_seq if info.delivered else 0
        loop = asyncio.get_running_loop()
        lease = max(self.ack_wait_seconds, info.config.ack_wait or 0.0)
        deadline = loop.time() + lease + self.recovery_margin_seconds
        # Past this, whatever is still counted is not coming back (an ack the server
        # processed late, a count gone stale across a broker restart): go on.
        give_up = deadline + lease
        log.warning("recovering unacknowledged messages", extra={"consumer": self.durable, "count": outstanding})
        while not self.stopping:
            missing = (info.num_ack_pending or 0) - len(self._held)
            if missing <= 0:
                break  # every pending message is in hand
            now = loop.time()
            if now >= give_up:
                extra = {"consumer": self.durable, "count": missing}
                log.warning("unacknowledged messages did not come back", extra=extra)
                break
            if now < deadline and any(seq > delivered_before for seq in self._held):
                # Later messages are coming instead: the rest return only at their lease's end.
                await self._pause(min(deadline - now, 0.5))
            else:
                # Redeliveries come before anything new. A fetch may return part of them
                # (the rest arrive after its wait): fetch again until all are in hand.
                await self._fetch(subscription, max(self.batch, missing), 0.5)
            info = await subscription.consumer_info()

    async def _keep_leases(self) -> None:
        """Renew the lease of every held message, every third of ack_wait: a batch may
        work longer than ack_wait without being redelivered meanwhile."""
        while True:
            await asyncio.sleep(self.ack_wait_seconds / 3)  # a heartbeat period, not a wait on work
            for message in list(self._held.values()):
                with contextlib.suppress(Exception):  # acked meanwhile, or the connection is down
                    await message.in_progress()

    async def _release(self, subscription: JetStreamContext.PullSubscription) -> None:
        """Stop the server's deliveries to this subscription, then NAK (no delay) every
        message fetched and not acked, oldest first: they are redelivered at once and in
        order, to whoever binds next, instead of after ack_wait behind later ones."""
        for message in await _stop_deliveries(subscription):
            self._held.setdefault(_sequence(message), message)
        unacked = sorted(self._held.values(), key=_sequence)
        self._held.clear()
        for message in unacked:
            with contextlib.suppress(Exception):  # the broker is gone: the lease returns them
                await message.nak()
        if unacked:
            self.stats.returned += len(unacked)
            with contextlib.suppress(Exception):
                await subscription._nc.flush(timeout=1)
            log.info("returned unacknowledged messages", extra={"consumer": self.durable, "count": len(unacked)})

    async def _ack(self, message: Msg) -> None:
        await message.ack()
        self._held.pop(_sequence(message), None)

    async def _nak(self, message: Msg, delay: float | None = None) -> None:
        await message.nak(delay=delay)
        self._held.pop(_sequence(message), None)

    def _reconnect_count(self) -> int:
        client = getattr(self.js, "_nc", None)  # nats-py's JetStreamContext keeps its client here
        return int(client.stats.get("reconnects", 0)) if client is not None else 0

    def _reconnected(self) -> bool:
        return self._reconnect_count() != self._reconnects

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds` unless a stop is requested first; True if it was."""
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            return False
        return True

    async def _bind(self) -> JetStreamContext.PullSubscription | None:
        """The durable and a pull subscription on it; None if a stop came first."""
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
        while not self.stopping:
            try:
                # The consumer needs somewhere to put dead letters before it takes a message.
                await ensure_streams(self.dlq_js, [STREAMS["IOP_DLQ"]], self.duplicate_window_seconds, update=False)
                await self.js.add_consumer(self.subscription.stream, config)
                subscription = await self.js.pull_subscribe_bind(durable=self.durable, stream=self.subscription.stream)
                self.awaiting_stream = False
                return subscription
            except (NotFoundError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                # The owner has not declared the stream yet; keep trying, never give up.
                self.awaiting_stream = isinstance(exc, NotFoundError)
                log.info(
                    "waiting for stream",
                    extra={"stream": self.subscription.stream, "error": type(exc).__name__},
                )
                await self._pause(delay)
                delay = min(delay * 2, 5.0)
        return None

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
            await self._ack(message)
            return
        attempt = deliveries
        while True:
            try:
                async with self.sessions() as session, session.begin():
                    applied = await self.inbox.claim(session, envelope, self.durable)
                    if applied:
                        with self._handling(envelope, message.headers):
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
                if await self._pause(self.nak_delay_seconds * 2 ** (attempt - 1)):
                    return  # stopping: still held, so _release hands it back in order
                attempt += 1
        await self._ack(message)
        if applied:
            self.stats.applied += 1
        else:
            self.stats.skipped_duplicates += 1

    @contextmanager
    def _handling(self, envelope: Envelope, headers: Mapping[str, str] | None) -> Iterator[None]:
        """The handler runs in a CONSUMER span under the publisher's trace context (from
        the message headers) and with the event's ids on every log line: what it stages
        continues the same trace and the same correlation."""
        attributes = {"messaging.system": "nats", "messaging.consumer.group.name": self.durable}
        with (
            span_under(headers, f"{envelope.event_type} process", SpanKind.CONSUMER, **attributes),
            log_context(correlation_id=envelope.correlation_id, event_id=envelope.event_id),
        ):
            yield

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
        delay = self.nak_delay_seconds
        while True:
            try:
                await self.dlq_js.publish(dlq_subject(self.service, name, site), payload, headers=headers)
                break
            except Exception as exc:
                # Retried in place, like a failing handler: NAKing and moving on would let the
                # messages behind this one be applied first (a discharge before its enrollment).
                log.error("dead-letter publish failed", extra={"consumer": self.durable, "error": type(exc).__name__})
                with contextlib.suppress(Exception):
                    await message.in_progress()
                if await self._pause(delay):
                    return  # stopping: still held, so _release hands it back in order
                delay = min(delay * 2, 5.0)
        await self._ack(message)
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


def _sequence(message: Msg) -> int:
    return int(message.metadata.sequence.stream)


async def _stop_deliveries(subscription: JetStreamContext.PullSubscription) -> list[Msg]:
    """Unsubscribe the pull subscription's inbox and return the messages already in its
    queue. After the UNSUB and a round trip, the server has no interest left: it drops
    any pull request still waiting (nats-server checks interest before delivering), and
    whatever it sent before is in the queue. nats-py has no public call for "stop and
    give me what you have", so this reaches into its Subscription (nats-py 2.x)."""
    inner = subscription._sub
    try:
        await inner._conn._send_unsubscribe(inner._id)
        await inner._conn.flush(timeout=1)
    except Exception as exc:  # closed or reconnecting: the server forgets us either way
        log.info("could not stop deliveries", extra={"error": type(exc).__name__})
    left: list[Msg] = []
    queue = inner._pending_queue
    while not queue.empty():
        message = queue.get_nowait()
        if message.reply and not JetStreamContext.is_status_msg(message):
            left.append(message)
    with contextlib.suppress(Exception):
        await subscription.unsubscribe()
    return left


def _summarize(exc: ValidationError) -> str:
    # pydantic's error types only (a fixed vocabulary): a location may name a key the
    # sender made up and a message may quote the input, which may be a phone number.
    return ", ".join(sorted({err["type"] for err in exc.errors(include_input=False, include_url=False)}))


def _describe(exc: Exception) -> str:
    if isinstance(exc, HandlerError):
        return f"{type(exc).__name__}: {exc}"
    # Driver errors quote SQL parameters, which may hold PHI: name the type only.
    return type(exc).__name__
