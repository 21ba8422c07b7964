"""Durable pull consumers on FastStream, with explicit acks, an inbox, and a dead-letter path.

Each `Consumer` registers one FastStream subscriber on its service's NatsBroker: one
durable pull consumer per (service, stream) with `filter_subjects` for the event types
it handles (so one stream's events apply in order), `AckPolicy.MANUAL`, `max_deliver`
and `ack_wait` in its ConsumerConfig (DESIGN B7). A batch goes through the subscriber's
FastStream pipeline (broker middlewares such as Prometheus, our decoder, the handler
`_apply`): one transaction for the batch with its inbox rows, handlers dispatched by
event class. We ack after the commit; a failure retries in place with backoff (the
events behind it wait); after `max_deliver` tries the message is published to
`iop.dlq.>` with its reason and acked.

What FastStream lacks, and how it is extended (its subscriber class, `InOrderPullSubscriber`):
FastStream's batch pull loop keeps fetching until the batch is full or its timeout ends
(an urgent check-in would wait out the timeout), and it knows nothing of the messages
it has fetched: on stop it cancels its task mid-batch and leaves them to ack_wait, and
after a restart the server hands out later messages before them (issue 9: a discharge
applied before its enrollment). So the subscriber's own loop is replaced (its
`_create_subscription` starts nothing): `Consumer.run` binds the durable, fetches "one
message, then whatever is there", keeps the leases and the order described below, and
hands each batch to the subscriber's `process_message`.

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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, cast
from uuid import UUID

import nats.errors
from faststream._internal.broker.registrator import Registrator
from faststream._internal.endpoint.subscriber.call_item import CallsCollection
from faststream.middlewares import AckPolicy as FastStreamAckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.configs import NatsBrokerConfig
from faststream.nats.message import NatsBatchMessage
from faststream.nats.subscriber.config import NatsSubscriberConfig, NatsSubscriberSpecificationConfig
from faststream.nats.subscriber.specification import NatsSubscriberSpecification
from faststream.nats.subscriber.usecases import BatchPullStreamSubscriber
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.contracts import Envelope, Event, UnknownEventType, dlq_subject
from shared.contracts.subjects import RESTRICTED, ROOT, event_name, parse_subject
from shared.logging import log_context
from shared.messaging.broker import client, jetstream
from shared.messaging.inbox import Inbox
from shared.messaging.streams import DLQ_STREAM, STREAMS, ensure_streams
from shared.priority import PriorityGate, first_in_line, later_work
from shared.tracing import span_under

log = logging.getLogger("iopnet.consumer")

# A routine batch's time budget is cut by this while the safety lane has work waiting or
# running (100 ms -> 20 ms by default): a low-risk check-in, and the urgent one behind it,
# wait for a short routine transaction, not a full one.
SAFETY_WORK_BUDGET_DIVISOR = 5

# (session, envelope, event): the event parameter is typed by the handler's own event
# class; the consumer dispatches by that class.
Handler = Callable[[AsyncSession, Envelope, Any], Awaitable[None]]
Outcome = Literal["applied", "duplicate", "not_handled"]
# (session, envelopes): what a batch's handlers will read, taken for all of them at once.
ReadAhead = Callable[[AsyncSession, list[Envelope]], Awaitable[None]]


def named_ids(envelopes: Iterable[Envelope], field: str) -> set[str]:
    """The ids a batch's events name in `field`, for a `ReadAhead`: a value that is no id
    is left out (its event is refused by its handler, and the batch then goes one event
    at a time, without the read ahead)."""
    ids = set()
    for envelope in envelopes:
        value = envelope.data.get(field)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                ids.add(str(UUID(value)))
    return ids


class Delivered(NamedTuple):
    """An event as its message brought it: the envelope and the message's headers (the
    trace context, `_handling`)."""

    envelope: Envelope
    headers: dict[str, str]


class HandlerError(Exception):
    """A handler failure whose message is safe to log and to put on the DLQ (no PHI)."""


class Poison(HandlerError):
    """An event that can never be applied: dead-letter it now instead of retrying."""


class Undecodable(Poison):
    """A message that is not an event we know (the reason names no content)."""


@dataclass(frozen=True)
class Subscription:
    stream: str
    handlers: Mapping[type[Event], Handler]
    # A second durable on the same stream for a few event types that must never wait
    # behind the others (notifications' CheckInSubmitted: an urgent check-in is not
    # queued behind a wave of enrollments). Its events keep their order among
    # themselves; the two lanes must not depend on each other's order.
    lane: str | None = None
    # Which of the safety lane's events are safety work that routine work yields to
    # (shared/priority.py); None: every one. A routine check-in rides the safety lane so
    # that an urgent one is never queued behind a wave, but it holds nobody back: with
    # every check-in pressing, a check-in wave cut each routine batch to one event.
    presses: Callable[[Envelope], bool] | None = None
    # Event types read only for someone outside who asked for them (a consent feed, a
    # webhook), and only at the sites they asked for: `interest` says which, from the
    # service's database. Nobody asking costs nothing; a durable left with nothing to
    # read is deleted (dormant) and created again, from `Interest.since`, when someone asks.
    optional: frozenset[type[Event]] = frozenset()
    interest: "InterestQuery | None" = None
    # Called once per batch of two or more events to apply, in its transaction before
    # their handlers: it may take the locks and read the rows they will need, one
    # statement per table for the batch instead of one per event (kept for the
    # transaction: shared.db.kept_for_this_transaction).
    read_ahead: ReadAhead | None = None
    # Routine work that plans for later (reminders a day ahead): on a shared connection
    # (SQLite) its batches wait behind the other routine consumers', for a bounded time
    # (shared/priority.py, `later_work`), so that those planning a message due now go first.
    later: bool = False

    def durable(self, service: str) -> str:
        return f"{service}-{self.stream}" + (f"-{self.lane}" if self.lane else "")

    def handler_for(self, event: Event) -> Handler | None:
        return self.handlers.get(type(event))

    def event_types(self) -> list[str]:
        return sorted(cls.__name__ for cls in self.handlers)

    def filter_subjects(self, interest: "Interest | None" = None) -> list[str]:
        """One subject per event type (all sites), or, for an optional type, one per site
        the interest names. Without an interest: everything it could read (the AsyncAPI
        document describes that)."""
        subjects = []
        for cls in sorted(self.handlers, key=lambda c: c.__name__):
            prefix = [ROOT, RESTRICTED] if cls.restricted else [ROOT]
            for site in self._sites(cls, interest):
                subjects.append(".".join([*prefix, cls.producer, event_name(cls.__name__), site]))
        return subjects

    def _sites(self, cls: type[Event], interest: "Interest | None") -> list[str]:
        if cls not in self.optional or interest is None:
            return ["*"]
        sites = {site for name, site in interest.wanted if name == cls.__name__}
        return ["*"] if "*" in sites else sorted(sites)


@dataclass(frozen=True)
class Interest:
    """What outside systems ask of a subscription's optional event types right now:
    (event type, site) pairs, site "*" for every site, and where its durable starts if it
    has to be created now (None: the stream's first message)."""

    wanted: frozenset[tuple[str, str]] = frozenset()
    since: datetime | None = None


InterestQuery = Callable[[AsyncSession], Awaitable[Interest]]


class InOrderPullSubscriber(BatchPullStreamSubscriber):
    """FastStream's batch pull subscriber without its fetch loop: `Consumer.run` fetches
    and hands each batch to `process_message` (see the module docstring for why)."""

    async def _create_subscription(self) -> None:
        return None


def _register_subscriber(broker: NatsBroker, consumer: "Consumer") -> InOrderPullSubscriber:
    """Built from FastStream's own parts, as its `broker.subscriber(..., pull_sub=PullSub(
    batch=True))` builds a BatchPullStreamSubscriber, and registered on the broker: it
    gets the broker's middlewares and appears in the service's AsyncAPI document."""
    config = consumer.consumer_config()
    outer = cast("NatsBrokerConfig", broker.config)  # as FastStream's own registrator does
    calls: CallsCollection[Any] = CallsCollection()
    settings = NatsSubscriberConfig(
        subject="",
        sub_config=config,
        extra_options={"durable": consumer.durable, "stream": consumer.subscription.stream},
        no_reply=True,
        _outer_config=outer,
        _ack_policy=FastStreamAckPolicy.MANUAL,
    )
    specification = NatsSubscriberSpecification(
        _outer_config=outer,
        calls=calls,
        specification_config=NatsSubscriberSpecificationConfig(
            subject="",
            queue=None,
            filter_subjects=consumer.subscription.filter_subjects(),
            title_=f"{consumer.durable}:consume",
            description_=(
                f"Durable pull consumer `{consumer.durable}` on stream {consumer.subscription.stream}: "
                + ", ".join(consumer.subscription.event_types())
                + ". Applied in stream order, once (inbox), acknowledged after commit."
            ),
            include_in_schema=True,
        ),
    )
    subscriber = InOrderPullSubscriber(
        settings,
        specification,
        calls,
        stream=JStream(consumer.subscription.stream, declare=False),
        pull_sub=PullSub(batch_size=consumer.batch, timeout=consumer.idle_wait_seconds, batch=True),
    )
    Registrator.subscriber(broker, subscriber, persistent=True)
    subscriber(consumer.apply, decoder=consumer.decode)
    return subscriber


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
        broker: NatsBroker,
        *,
        dlq_broker: NatsBroker | None = None,
        max_deliver: int = 5,
        ack_wait_seconds: float = 30.0,
        nak_delay_seconds: float = 1.0,
        batch: int = 64,
        duplicate_window_seconds: float = 120.0,
        idle_wait_seconds: float = 5.0,
        backlog_wait_seconds: float = 0.02,
        recovery_margin_seconds: float = 1.0,
        publish_timeout_seconds: float = 5.0,
        gate: PriorityGate | None = None,
        transaction_budget_seconds: float = 0.1,
    ) -> None:
        self.service = service
        self.subscription = subscription
        self.sessions = sessions
        self.inbox = inbox
        self.broker = broker
        # IOP_DLQ lives in the main NATS account; a consumer of IOP_RESTRICTED reads
        # through the restricted account's broker and dead-letters through the main one.
        self.dlq_broker = dlq_broker or broker
        self.max_deliver = max_deliver
        self.ack_wait_seconds = ack_wait_seconds
        self.nak_delay_seconds = nak_delay_seconds
        self.batch = batch
        self.duplicate_window_seconds = duplicate_window_seconds
        self.idle_wait_seconds = idle_wait_seconds
        self.backlog_wait_seconds = backlog_wait_seconds
        # Past a lease's end, before the server's timer has surely put it back in line.
        self.recovery_margin_seconds = recovery_margin_seconds
        self.publish_timeout_seconds = publish_timeout_seconds
        # The safety lane goes first; the others yield to it between transactions.
        self.gate = gate
        # A routine batch commits once it has run this long and goes on in a new
        # transaction: on SQLite (one writer) a low-risk check-in, or the dispatcher's
        # claim of a welcome, waits for one bounded transaction, not a batch of 64 events.
        self.transaction_budget_seconds = transaction_budget_seconds
        self.durable = subscription.durable(service)
        self.stats = ConsumerStats()
        self.bound = asyncio.Event()
        # The stream does not exist yet (its producer has not declared it): nothing to
        # consume, and the durable will start from its first message once it does.
        self.awaiting_stream = False
        self._stopping = asyncio.Event()
        # `request_stop()` is for good; `suspended()` (a re-drive) lets go of the work the
        # same way and then parks `run()` until it is resumed.
        self._stop_requested = False
        self._resume = asyncio.Event()
        self._parked = asyncio.Event()
        self._suspend_lock = asyncio.Lock()
        # Fetched and not yet acked or NAKed, by stream sequence.
        self._held: dict[int, Msg] = {}
        self._reconnects = 0
        # Which message of a batch the handler is applying (a failure there counts as its try).
        self._position = 0
        # The filter subjects the durable was last bound with ([] while dormant: nobody
        # outside asks for anything it reads), and a signal for each bind.
        self._bound_subjects: list[str] | None = None
        self.dormant = False
        self._interest_changed = asyncio.Event()
        self._rebound = asyncio.Event()
        self.subscriber = _register_subscriber(broker, self)

    @property
    def js(self) -> JetStreamContext:
        return jetstream(self.broker)

    def consumer_config(self, subjects: list[str] | None = None) -> ConsumerConfig:
        subjects = subjects if subjects is not None else self.subscription.filter_subjects()
        return ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_seconds,
            # Headroom past our own limit: if publishing the dead letter fails on the
            # last try, the server still redelivers so the next try can dead-letter it.
            max_deliver=self.max_deliver + 5,
            # One filter goes in `filter_subject`: nats-py then names it in the CONSUMER.CREATE
            # subject, where the broker's allow-list can check it (intake's durable on
            # IOP_RESTRICTED may read notifications' reports, never a contact detail).
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
            max_ack_pending=max(self.batch * 4, 256),
        )

    def request_stop(self) -> None:
        """Take no new message; `run()` returns once the work in hand is done and the
        rest is handed back (see the module docstring)."""
        self._stop_requested = True
        self._stopping.set()
        self._resume.set()

    @contextlib.asynccontextmanager
    async def suspended(self, timeout: float = 30.0) -> AsyncIterator[None]:
        """While the block runs the consumer holds nothing and fetches nothing: the work
        in hand is finished, the rest NAKed (as at a stop), and `run()` waits. Then it
        binds again and goes on from wherever the durable now stands (a re-drive resets
        it meanwhile: shared/messaging/control.py)."""
        async with self._suspend_lock:
            if self._stop_requested:
                raise HandlerError("the consumer is stopping")
            self._resume.clear()
            self._stopping.set()
            try:
                try:
                    async with asyncio.timeout(timeout):
                        await self._parked.wait()
                except TimeoutError:
                    raise HandlerError("the consumer did not let go of its work in time") from None
                yield
            finally:
                self._parked.clear()
                if not self._stop_requested:
                    self._stopping.clear()
                self._resume.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Consume until `request_stop()`; an unexpected failure (a deleted consumer, a
        failed ack) re-binds after a pause instead of ending the loop."""
        await self.subscriber.start()  # FastStream builds the handler's call model
        try:
            while not self._stop_requested:
                while not self.stopping:
                    try:
                        subscription = await self._bind()
                        if subscription is None:
                            break
                        self.bound.set()
                        await self._consume(subscription)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        self.bound.clear()
                        failure = {"consumer": self.durable, "error": type(exc).__name__}
                        log.error("consumer failed; re-binding", extra=failure)
                        await self._pause(1.0)
                if self._stop_requested:
                    break
                # Suspended (see `suspended`): everything held was handed back.
                self._parked.set()
                await self._resume.wait()
        finally:
            self.bound.clear()
            await self.subscriber.stop()

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

        Only the happy path is batched: if any message does not decode or makes its
        handler fail, the whole transaction is rolled back and every message goes
        through `process` one by one, with its retries and dead letter, in order."""
        if len(messages) == 1:
            await self.process(messages[0])
            return
        self._position = 0
        try:
            outcomes = await self._through_faststream(messages)
        except Undecodable:
            await self._one_by_one(messages)
            return
        except Exception:
            # The message the handler was applying failed once already: it counts as a try.
            await self._one_by_one(messages, failed_at=self._position)
            return
        # A routine batch may stop early to let safety work have the database (`apply`):
        # what it applied is acked, the rest is still held and goes next, in order.
        # Counted before the acks: whoever reads the durable's ack floor (a re-drive's
        # progress) then finds the counters already saying what was applied.
        self._count(outcomes)
        for message in messages[: len(outcomes)]:
            await self._ack(message)
        rest = messages[len(outcomes) :]
        if rest and not self.stopping:
            await self.process_batch(rest)

    async def _through_faststream(self, messages: list[Msg]) -> list[Outcome]:
        """The subscriber's FastStream pipeline: broker middlewares, `decode`, `apply`."""
        if self.gate is not None and self.subscription.lane != "safety":
            await self.gate.routine()
        response = await self.subscriber.process_message(messages)
        outcomes: list[Outcome] = response.body
        return outcomes

    async def decode(self, message: NatsBatchMessage) -> list[Delivered]:
        """The subscriber's decoder (a FastStream extension point): the envelopes with
        their messages' headers, or `Undecodable` with a reason that names no content.
        Each event's own fields are parsed once, by the handler (`_event`).

        The headers travel with the events rather than through a `Context()` parameter of
        `apply`: FastDepends resolves such a field with a synchronous call it runs in a
        worker thread (`run_async` -> `run_in_threadpool`), a thread hop per batch."""
        try:
            return [
                Delivered(Envelope.from_bytes(raw.data), headers)
                for raw, headers in zip(message.raw_message, message.batch_headers, strict=True)
            ]
        except ValidationError as exc:
            raise Undecodable(f"invalid event: {_summarize(exc)}") from None

    async def apply(self, deliveries: list[Delivered]) -> list[Outcome]:
        """The subscriber's handler: the batch in one transaction, each event once (its
        inbox row), by its event class's handler. The consumer acks after the commit.
        The inbox is asked once for the batch and its rows written in one statement."""
        envelopes = [delivered.envelope for delivered in deliveries]
        outcomes: list[Outcome] = []
        async with self._priority(envelopes), self.sessions() as session, session.begin():
            seen = await self.inbox.seen(session, envelopes)
            await self._read_ahead(session, envelopes, seen)
            # The budget counts the transaction's own work, from when it holds the
            # connection: counting the wait for it too (on SQLite, other lanes' turns)
            # ended a routine batch after its first event whenever the wait was long,
            # so a backlog went one event per turn, exactly when it most needed batches.
            started = time.monotonic()
            applied: list[dict[str, object]] = []
            for position, (envelope, headers) in enumerate(deliveries):
                if outcomes and self.subscription.lane != "safety":
                    # A turn of the event loop between two events: on SQLite a handler's reads
                    # and inserts run in the loop's own thread (shared/sqlite_driver.py), so a
                    # batch may otherwise never give one, and safety work that arrived since
                    # could not make itself known (the checks below) until the budget ran out.
                    await asyncio.sleep(0)
                if outcomes and (self._yield_to_safety() or self._over_budget(started)):
                    break  # committed so far; process_batch takes the rest next
                self._position = position
                outcome = await self._apply_one(session, envelope, headers, seen)
                if outcome == "applied":
                    applied.append(self.inbox.row(envelope, self.durable))
                outcomes.append(outcome)
            await self.inbox.record(session, applied)
        self.stats.transactions += 1
        return outcomes

    async def _read_ahead(self, session: AsyncSession, envelopes: list[Envelope], seen: set[str]) -> None:
        read_ahead = self.subscription.read_ahead
        fresh = [envelope for envelope in envelopes if str(envelope.event_id) not in seen]
        if read_ahead is not None and len(fresh) > 1:
            await read_ahead(session, fresh)

    @contextlib.asynccontextmanager
    async def _priority(self, envelopes: list[Envelope]) -> AsyncIterator[None]:
        """The safety lane's transaction is first in line for the database connection;
        if it carries safety work (`Subscription.presses`) it also holds routine work
        back while it waits and runs (shared/priority.py)."""
        if self.subscription.lane != "safety":
            async with self._routine_priority():
                yield
            return
        presses = self.subscription.presses
        pressing = self.gate is not None and (presses is None or any(presses(envelope) for envelope in envelopes))
        with first_in_line(), self.gate.safety_work() if self.gate is not None else contextlib.nullcontext():
            async with self.gate.urgent() if self.gate is not None and pressing else contextlib.nullcontext():
                yield

    @contextlib.asynccontextmanager
    async def _routine_priority(self) -> AsyncIterator[None]:
        """Work that plans for later goes after this process's other routine batches, then
        after their waits for the connection; each for LATER_MAX_WAIT_SECONDS at most."""
        if not self.subscription.later:
            with self.gate.routine_batch() if self.gate is not None else contextlib.nullcontext():
                yield
            return
        waited_its_turn = self.gate is None or await self.gate.after_routine_batches()
        with later_work() if waited_its_turn else contextlib.nullcontext():
            yield

    def _over_budget(self, started: float) -> bool:
        if self.subscription.lane == "safety":
            return False
        budget = self.transaction_budget_seconds
        if self.gate is not None and self.gate.safety_work_under_way:
            # Safety-lane work waits for (or shares) the database: this batch commits soon,
            # without being cut to one event (only `pressing`, an alerting check-in, does that).
            budget /= SAFETY_WORK_BUDGET_DIVISOR
        return time.monotonic() - started > budget

    def _yield_to_safety(self) -> bool:
        return self.gate is not None and self.subscription.lane != "safety" and self.gate.pressing

    async def _apply_one(
        self, session: AsyncSession, envelope: Envelope, headers: Mapping[str, str] | None, seen: set[str]
    ) -> Outcome:
        """One event through its handler unless `seen` holds its id (which it then does)."""
        event = _event(envelope)
        handler = self.subscription.handler_for(event)
        if handler is None:
            return "not_handled"
        if str(envelope.event_id) in seen:
            return "duplicate"
        seen.add(str(envelope.event_id))
        with self._handling(envelope, headers):
            await handler(session, envelope, event)
        return "applied"

    def _count(self, outcomes: list[Outcome]) -> None:
        self.stats.applied += outcomes.count("applied")
        self.stats.skipped_duplicates += outcomes.count("duplicate")

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
        return int(client(self.broker).stats.get("reconnects", 0))

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
        """The durable and a pull subscription on it; None if a stop came first. A durable
        with nothing wanted lies dormant here until someone asks (`refresh_interest`)."""
        delay = 0.2
        while not self.stopping:
            try:
                self._interest_changed.clear()  # before reading it: a change after this wakes us
                subjects, since = await self._wanted()
                if not subjects:
                    await self._lie_dormant()
                    continue
                # The consumer needs somewhere to put dead letters before it takes a message.
                dlq = [STREAMS[DLQ_STREAM]]
                await ensure_streams(jetstream(self.dlq_broker), dlq, self.duplicate_window_seconds, update=False)
                await self.js.add_consumer(self.subscription.stream, await self._config_for(subjects, since))
                subscription = await self.js.pull_subscribe_bind(durable=self.durable, stream=self.subscription.stream)
                self.awaiting_stream = False
                self._bound(subjects)
                return subscription
            except (NotFoundError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                # The owner has not declared the stream yet; keep trying, never give up.
                self.awaiting_stream = isinstance(exc, NotFoundError)
                if self.awaiting_stream:
                    self._rebound.set()  # nothing to bind to yet; it binds with the interest once there is
                log.info(
                    "waiting for stream",
                    extra={"stream": self.subscription.stream, "error": type(exc).__name__},
                )
                await self._pause(delay)
                delay = min(delay * 2, 5.0)
        return None

    async def _wanted(self) -> tuple[list[str], datetime | None]:
        """The filter subjects to bind with now, and where a new durable would start."""
        if self.subscription.interest is None:
            return self.subscription.filter_subjects(), None
        async with self.sessions() as session:
            interest = await self.subscription.interest(session)
        return self.subscription.filter_subjects(interest), interest.since

    async def _config_for(self, subjects: list[str], since: datetime | None) -> ConsumerConfig:
        """An existing durable keeps where it started (JetStream refuses to change that);
        only its filter subjects change. A new one starts at `since` if given."""
        config = self.consumer_config(subjects)
        if self.subscription.interest is None:
            return config
        try:
            existing = (await self.js.consumer_info(self.subscription.stream, self.durable)).config
        except NotFoundError:
            if since is not None:
                config.deliver_policy, config.opt_start_time = DeliverPolicy.BY_START_TIME, since
            return config
        config.deliver_policy = existing.deliver_policy
        config.opt_start_time, config.opt_start_seq = existing.opt_start_time, existing.opt_start_seq
        return config

    async def _lie_dormant(self) -> None:
        """Nothing wanted: no durable (so it neither reads nor piles up pending messages),
        and wait until the interest changes or a stop."""
        if not self.dormant:
            with contextlib.suppress(NotFoundError):
                await self.js.delete_consumer(self.subscription.stream, self.durable)
            log.info("consumer dormant: nobody asks for its events", extra={"consumer": self.durable})
        self.dormant = True
        self.awaiting_stream = False
        self._bound([])
        stopping = asyncio.ensure_future(self._stopping.wait())
        changed = asyncio.ensure_future(self._interest_changed.wait())
        try:
            await asyncio.wait({stopping, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            changed.cancel()

    @property
    def bound_subjects(self) -> list[str]:
        """The filter subjects the durable reads now ([] while dormant or not yet bound)."""
        return list(self._bound_subjects or [])

    def _bound(self, subjects: list[str]) -> None:
        self._bound_subjects = subjects
        self.dormant = not subjects
        self.bound.set()
        self._rebound.set()

    async def refresh_interest(self, timeout: float = 10.0) -> bool:
        """Someone outside asked for more or for less: bind again with the filter subjects
        the database now gives, and wait (bounded) until bound. True if it changed.

        The durable keeps its place in the stream; events of a newly wanted type or site
        come from there on (a new durable starts at `Interest.since`)."""
        if self.subscription.interest is None or self._stop_requested:
            return False
        subjects, _ = await self._wanted()
        if subjects == self._bound_subjects or self._bound_subjects is None:
            return False  # unchanged, or not bound yet (its first bind reads the interest)
        self._rebound.clear()
        if self.dormant:
            self._interest_changed.set()
        else:
            try:
                async with self.suspended():
                    pass  # run() binds again on resume, reading the interest afresh
            except HandlerError:
                return False  # stopping
        try:
            async with asyncio.timeout(timeout):
                await self._rebound.wait()
        except TimeoutError:
            log.warning("consumer not bound again in time", extra={"consumer": self.durable})
        return True

    async def process(self, message: Msg, tried: int = 0) -> None:
        """Apply one message; `tried` counts failed tries made before (in a batch)."""
        attempt = message.metadata.num_delivered + tried
        while True:
            try:
                outcomes = await self._through_faststream([message])
                break
            except Undecodable as exc:
                await self._dead_letter(message, str(exc))
                return
            except Poison as exc:
                event_type = Envelope.from_bytes(message.data).event_type
                await self._dead_letter(message, f"{event_type} rejected: {exc}")
                return
            except Exception as exc:
                reason = _describe(exc)
                if attempt >= self.max_deliver:
                    await self._dead_letter(message, f"failed {attempt} times: {reason}", attempts=attempt)
                    return
                # Retried in place, not NAKed: the events behind this one wait, so a
                # discharge is never applied before the enrollment it ends.
                self.stats.retried += 1
                log.warning("handler failed; will retry", extra=self._log_fields(message, attempt, reason))
                await message.in_progress()  # keeps ack_wait from expiring meanwhile
                if await self._pause(self.nak_delay_seconds * 2 ** (attempt - 1)):
                    return  # stopping: still held, so _release hands it back in order
                attempt += 1
        self._count(outcomes)
        await self._ack(message)

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
            envelope.event()
        except ValidationError as exc:
            raise HandlerError(f"invalid event: {_summarize(exc)}") from None
        except UnknownEventType:
            raise HandlerError("unknown event type") from None
        try:
            async with self.sessions() as session, session.begin():
                outcome = await self._apply_one(session, envelope, None, await self.inbox.seen(session, [envelope]))
                if outcome == "applied":
                    await self.inbox.record(session, [self.inbox.row(envelope, self.durable)])
        except Exception as exc:
            raise HandlerError(f"{envelope.event_type} failed: {_describe(exc)}") from None
        if outcome == "not_handled":
            return outcome
        self.stats.transactions += 1
        self._count([outcome])
        return outcome

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
                await self.dlq_broker.publish(
                    payload,
                    dlq_subject(self.service, name, site),
                    headers=headers,
                    stream=DLQ_STREAM,
                    timeout=self.publish_timeout_seconds,
                )
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

    def _log_fields(self, message: Msg, deliveries: int, reason: str) -> dict[str, object]:
        return {
            "consumer": self.durable,
            "subject": message.subject,
            "sequence": _sequence(message),
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


def _event(envelope: Envelope) -> Event:
    try:
        return envelope.event()
    except ValidationError as exc:
        raise Undecodable(f"invalid event: {_summarize(exc)}") from None
    except UnknownEventType:
        # Never the type itself: the reason reaches the ops-readable DLQ and the log.
        raise Undecodable("unknown event type") from None


def _summarize(exc: ValidationError) -> str:
    # pydantic's error types only (a fixed vocabulary): a location may name a key the
    # sender made up and a message may quote the input, which may be a phone number.
    return ", ".join(sorted({err["type"] for err in exc.errors(include_input=False, include_url=False)}))


def _describe(exc: Exception) -> str:
    if isinstance(exc, HandlerError):
        return f"{type(exc).__name__}: {exc}"
    # Driver errors quote SQL parameters, which may hold PHI: name the type only.
    return type(exc).__name__
