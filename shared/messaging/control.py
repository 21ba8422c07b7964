"""Operators' requests to one service: re-apply a dead letter, re-drive one of its
durables from a point in its stream, and re-apply one stored event that the inbox
already holds (a repair, audited).

Why a request to the consuming service rather than a re-publish: the broker lets only a
producer publish its own subjects (iopnet/natsd.py), so nobody else can put an event on
the bus; and a re-published copy would reach every subscriber, other systems included,
as a new message. Here the consumer that dead-lettered (or lost) an event re-reads the
producer's stored original from its stream by sequence and applies it through its
inbox: exactly the stored message, to that consumer only, at most once.

Subjects: `iop.ctl.<service>.<operation>` (core NATS request/reply; only `ops` may
publish them, and each service hears only its own). Every replica of a service listens
in one queue group: a request is handled once, by one of them.

`redrive` re-drives a durable from a stream sequence or a time without rewriting the
stream: the service suspends its consumer on that durable (what it holds is finished or
NAKed), resets the durable with JetStream's consumer reset (`$JS.API.CONSUMER.RESET`,
nats-server >= 2.14: the durable then stands as if created with that start sequence,
same filter subjects and settings; it never moves past a message it has not acked) and
resumes. The events come again through the consumer's ordinary path, in stream order,
and its inbox skips what was applied: a projection cleared by the operator is rebuilt,
the rest is left alone. Other subscribers see nothing. `consumer_state` reports the
durable's progress (pending, unacked) for the operator's progress bar.

`reapply` is the repair for an effect that was lost although the inbox recorded the
event (a bug since fixed, a state edited by hand): the stored event is applied again
even though the inbox holds it, in one transaction with a row in the service's
`operations` table that says who asked, when, which event and why. The handlers are
state-based (they converge on what the event says), so applying one again changes only
what is missing. The reason is kept in the database, never in a log line.
"""

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self
from uuid import uuid4

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError
from pydantic import AwareDatetime, BaseModel, Field, StringConstraints, ValidationError, model_validator
from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts import Envelope, Event, UnknownEventType
from shared.db import UtcDateTime
from shared.messaging.broker import client
from shared.messaging.consumer import Consumer, Handler, HandlerError, Subscription
from shared.messaging.streams import DLQ_STREAM

log = logging.getLogger("iopnet.control")

CONTROL_ROOT = "iop.ctl"
OPERATIONS_TABLE = "operations"
Operation = Literal["dlq_retry", "redrive", "consumer_state", "reapply"]
# How long the broker gets to answer a consumer reset.
RESET_TIMEOUT_SECONDS = 10.0
# How long a reset may take to read back as made (`_reset_confirmed`), and the pause
# between two tries.
RESET_CONFIRM_SECONDS = 5.0
RESET_RETRY_SECONDS = 0.05
# Who asked: a login name, never free text. Why: bounded, one line, no control characters
# (it lands in a database column that an auditor reads, not in a log).
Operator = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._@-]{1,64}$")]
Reason = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=3, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
]
StreamName = Annotated[str, StringConstraints(pattern=r"^IOP_[A-Z_]{1,36}$")]
DurableName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,120}$")]


def control_subject(service: str, operation: Operation) -> str:
    return f"{CONTROL_ROOT}.{service}.{operation}"


class DeadLetterRetry(BaseModel):
    dlq_sequence: int = Field(ge=1)


class RedriveRequest(BaseModel):
    """Re-drive `durable` from `from_seq` or from the first event stored at or after
    `since`; `dry_run` only says what it would do."""

    durable: DurableName
    from_seq: int | None = Field(default=None, ge=1)
    since: AwareDatetime | None = None
    dry_run: bool = False

    @model_validator(mode="after")
    def one_start_point(self) -> Self:
        if (self.from_seq is None) == (self.since is None):
            raise ValueError("give exactly one of from_seq and since")
        return self


class ConsumerStateRequest(BaseModel):
    durable: DurableName


class ReapplyRequest(BaseModel):
    stream: StreamName
    sequence: int = Field(ge=1)
    reason: Reason
    requested_by: Operator = "ops"


class Failure(BaseModel):
    sequence: int
    reason: str


class ControlReply(BaseModel):
    service: str
    ok: bool
    error: str | None = None
    consumed: bool = True  # False: this service has no consumer on that stream
    outcome: str | None = None  # dlq_retry: applied | duplicate | not_handled
    applied: int = 0
    duplicates: int = 0
    not_handled: int = 0
    failed: list[Failure] = []
    next_seq: int | None = None
    last_seq: int | None = None
    # reapply: the audit row written for it, and what was applied (ids and types only).
    operation_id: str | None = None
    event_id: str | None = None
    event_type: str | None = None
    # redrive and consumer_state: the durable, where its re-drive starts, how many of the
    # stream's messages its filter covers from there, and where it stands.
    durable: str | None = None
    stream: str | None = None
    filter_subjects: list[str] = []
    start_seq: int | None = None
    requested_seq: int | None = None  # the start asked for, when the durable had not got that far
    covered: int | None = None
    num_pending: int | None = None
    num_ack_pending: int | None = None
    ack_floor_seq: int | None = None
    dead_lettered: int = 0


class OperationsLog:
    """The `operations` table of a service's database: one row per operator repair
    (who, when, which stored event, why, and how it ended)."""

    def __init__(self, table: Table) -> None:
        self.table = table

    @classmethod
    def declare(cls, metadata: MetaData) -> "OperationsLog":
        return cls(
            Table(
                OPERATIONS_TABLE,
                metadata,
                Column("operation_id", String(36), primary_key=True),
                Column("operation", String(20), nullable=False),
                Column("requested_by", String(64), nullable=False),
                Column("requested_at", UtcDateTime, nullable=False),
                Column("consumer", String(120), nullable=False),
                Column("stream", String(40), nullable=False),
                Column("sequence", BigInteger, nullable=False),
                Column("event_id", String(36), nullable=True),
                Column("event_type", String(80), nullable=True),
                Column("outcome", String(120), nullable=False),
                Column("reason", String(200), nullable=False),
            )
        )

    @classmethod
    def find(cls, metadata: MetaData) -> "OperationsLog | None":
        """The log declared in `metadata`, if the service keeps one."""
        table = metadata.tables.get(OPERATIONS_TABLE)
        return cls(table) if table is not None else None

    async def record(self, session: AsyncSession, **values: Any) -> None:
        await session.execute(insert(self.table).values(requested_at=datetime.now(UTC), **values))


def _parse(data: bytes) -> tuple[Envelope, Event]:
    try:
        envelope = Envelope.from_bytes(data)
        return envelope, envelope.event()
    except ValidationError:
        raise HandlerError("the stored event is not valid") from None
    except UnknownEventType:
        raise HandlerError("unknown event type") from None


async def _first_at_or_after(consumer: Consumer, stream: str, since: datetime, last: int) -> int:
    """The sequence of the first message stored at or after `since` (past the end if none)."""
    request = json.dumps({"start_time": since.astimezone(UTC).isoformat().replace("+00:00", "Z")}).encode()
    subject = f"$JS.API.STREAM.MSG.GET.{stream}"
    answer = json.loads((await client(consumer.broker).request(subject, request, timeout=RESET_TIMEOUT_SECONDS)).data)
    if "error" in answer:
        if answer["error"].get("code") == 404:
            return last + 1
        raise HandlerError(f"the broker refused the lookup: {answer['error'].get('description', 'error')}")
    return int(answer["message"]["seq"])


async def _count_from(consumer: Consumer, stream: str, filters: list[str], start: int, last: int) -> int:
    """How many messages from `start` to `last` the durable's filter subjects match (one
    read per message: a dry run changes nothing, not even a temporary consumer)."""
    total = 0
    for subject in filters or [">"]:
        seq = start
        while seq <= last:
            try:
                message = await consumer.js.get_msg(stream, seq, subject=subject, next=True)
            except NotFoundError:
                break
            if message.seq is None or message.seq > last:
                break
            total += 1
            seq = message.seq + 1
    return total


def _reads_stale(info: ConsumerInfo, start: int, covered: int) -> bool:
    """A durable just reset to `start` that reports a position past it although none of
    the reset's `covered` messages has left: see `ControlPlane._reset_confirmed`."""
    delivered = int(info.delivered.stream_seq if info.delivered else 0)
    floor = int(info.ack_floor.stream_seq if info.ack_floor else 0)
    untouched = not info.num_ack_pending and int(info.num_pending or 0) >= covered
    return untouched and max(delivered, floor) >= start


def _describe(exc: Exception) -> str:
    # A HandlerError's text is written to be shown; anything else (a driver error quotes
    # its SQL parameters, which may hold PHI) is named by its class only.
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, HandlerError) else type(exc).__name__


class ElsewhereError(Exception):
    """The request is for a lane another process of this service reads (`Settings.lanes`):
    this one stays silent and that one answers."""


class ControlPlane:
    def __init__(
        self,
        service: str,
        main_js: JetStreamContext,
        consumers: list[Consumer],
        *,
        lanes: str = "all",
        elsewhere: Sequence[Subscription] = (),
    ) -> None:
        self.service = service
        self.main_js = main_js
        self.consumers = consumers
        self.lanes = lanes
        # The subscriptions another process of the service consumes (its lanes split).
        self.elsewhere = list(elsewhere)

    async def start(self, nc: Client) -> None:
        # One queue group for the service's replicas: one of them handles each request
        # (two replicas resetting the same durable, or re-applying the same event, would
        # each do it). Processes that split the lanes are a group each: a request reaches
        # one of each, and the one that reads the lane answers.
        queue = f"iopnet-{self.service}" + ("" if self.lanes == "all" else f"-{self.lanes}")
        await nc.subscribe(f"{CONTROL_ROOT}.{self.service}.*", queue=queue, cb=self._on_request)

    def _not_here(self, *, durable: str | None = None, stream: str | None = None, event: Event | None = None) -> None:
        """Raise ElsewhereError if another process's lane is the one asked for."""
        for subscription in self.elsewhere:
            if durable is not None and subscription.durable(self.service) == durable:
                raise ElsewhereError
            if stream == subscription.stream and (event is None or subscription.handler_for(event) is not None):
                raise ElsewhereError

    async def _on_request(self, msg: Msg) -> None:
        try:
            reply = await self._answer(msg)
        except ElsewhereError:
            return
        if msg.reply:
            await msg.respond(reply.model_dump_json().encode())

    async def _answer(self, msg: Msg) -> ControlReply:
        operation = msg.subject.rsplit(".", 1)[-1]
        try:
            if operation == "dlq_retry":
                reply = await self.retry(DeadLetterRetry.model_validate_json(msg.data))
            elif operation == "redrive":
                reply = await self.redrive(RedriveRequest.model_validate_json(msg.data))
            elif operation == "consumer_state":
                reply = await self.consumer_state(ConsumerStateRequest.model_validate_json(msg.data))
            elif operation == "reapply":
                reply = await self.reapply(ReapplyRequest.model_validate_json(msg.data))
            else:
                reply = self._refuse("unknown operation")
        except ValidationError:
            reply = self._refuse("invalid request")
        except HandlerError as exc:  # its text is written to be shown
            reply = self._refuse(str(exc))
        except ElsewhereError:
            raise
        except Exception as exc:  # the operator gets an answer, never a timeout
            log.error("control request failed", extra={"reason": operation, "error": type(exc).__name__})
            reply = self._refuse(f"failed: {type(exc).__name__}")
        return reply

    def _refuse(self, error: str, **fields: Any) -> ControlReply:
        return ControlReply(service=self.service, ok=False, error=error, **fields)

    def _consumer(self, *, durable: str | None = None, stream: str | None = None) -> Consumer | None:
        for consumer in self.consumers:
            if durable is not None and consumer.durable == durable:
                return consumer
            if stream is not None and consumer.subscription.stream == stream:
                return consumer
        return None

    def _lanes(self, stream: str) -> list[Consumer]:
        """Every consumer of `stream` (a stream may have a routine and a safety lane)."""
        return [c for c in self.consumers if c.subscription.stream == stream]

    async def retry(self, request: DeadLetterRetry) -> ControlReply:
        try:
            letter = await self.main_js.get_msg(DLQ_STREAM, request.dlq_sequence)
        except NotFoundError:
            return self._refuse("no such dead letter")
        # Only this service may publish under iop.dlq.<service>. (the broker says so), so
        # the subject proves whose dead letter it is; the headers then say where the
        # original is, and the original, not the dead letter's copy, is what is applied.
        if not (letter.subject or "").startswith(f"iop.dlq.{self.service}."):
            return self._refuse("not a dead letter of this service")
        headers = letter.headers or {}
        self._not_here(durable=headers.get("Iop-Consumer"))
        consumer = self._consumer(durable=headers.get("Iop-Consumer"))
        stream = headers.get("Iop-Original-Stream")
        sequence = headers.get("Iop-Original-Sequence", "")
        if consumer is None or stream != consumer.subscription.stream or not sequence.isdigit():
            return self._refuse("the dead letter names no stored event of this service's consumers")
        try:
            original = await consumer.js.get_msg(stream, int(sequence))
        except NotFoundError:
            return self._refuse("the original event is no longer stored")
        if original.subject != headers.get("Iop-Original-Subject"):
            return self._refuse("the stored event does not match the dead letter")
        try:
            outcome = await consumer.apply_stored(original.data or b"")
        except HandlerError as exc:
            return self._refuse(str(exc))
        log.info("dead letter re-applied", extra={"consumer": consumer.durable, "reason": outcome})
        return ControlReply(service=self.service, ok=True, outcome=outcome)

    async def redrive(self, request: RedriveRequest) -> ControlReply:
        self._not_here(durable=request.durable)
        consumer = self._consumer(durable=request.durable)
        if consumer is None:
            return self._refuse(f"this service has no durable {request.durable}")
        stream = consumer.subscription.stream
        state = (await consumer.js.stream_info(stream)).state
        last = int(state.last_seq)
        if request.from_seq is not None:
            if request.from_seq > last + 1:
                return self._refuse(f"{stream} ends at sequence {last}")
            start = max(request.from_seq, int(state.first_seq or 1), 1)
        else:
            assert request.since is not None
            start = await _first_at_or_after(consumer, stream, request.since, last)
        info = await consumer.js.consumer_info(stream, consumer.durable)
        # Never past a message the durable has not acknowledged yet: a re-drive goes back,
        # it must not skip work the consumer has still to do.
        requested = start
        if info.num_pending or info.num_ack_pending:
            start = min(start, int(info.ack_floor.stream_seq if info.ack_floor else 0) + 1)
        reply = ControlReply(
            service=self.service,
            ok=True,
            durable=consumer.durable,
            stream=stream,
            filter_subjects=list(info.config.filter_subjects or [info.config.filter_subject or ">"]),
            start_seq=start,
            requested_seq=requested if requested != start else None,
            last_seq=last,
        )
        if request.dry_run:
            reply.covered = await _count_from(consumer, stream, reply.filter_subjects, start, last)
            return self._with_state(reply, info, consumer)
        async with consumer.suspended():
            reset, begun = await self._reset_confirmed(consumer, stream, start)
            # The counters as the re-drive begins: the operator's progress compares with them.
            counters = replace(consumer.stats)
        if "error" in reset or begun is None:
            return self._refuse(f"the broker refused the reset: {reset['error'].get('description', 'error')}")
        reply.covered = int(reset.get("num_pending", 0))
        log.info(
            "durable re-driven from sequence %d",
            start,
            extra={"consumer": consumer.durable, "stream": stream, "count": reply.covered},
        )
        # Where the durable stood as the re-drive began (this process consumed nothing yet).
        reply = self._with_state(reply, begun, consumer)
        reply.applied, reply.duplicates = counters.applied, counters.skipped_duplicates
        reply.dead_lettered = counters.dead_lettered
        return reply

    async def consumer_state(self, request: ConsumerStateRequest) -> ControlReply:
        self._not_here(durable=request.durable)
        consumer = self._consumer(durable=request.durable)
        if consumer is None:
            return self._refuse(f"this service has no durable {request.durable}")
        stream = consumer.subscription.stream
        info = await consumer.js.consumer_info(stream, consumer.durable)
        reply = ControlReply(service=self.service, ok=True, durable=consumer.durable, stream=stream)
        return self._with_state(reply, info, consumer)

    @staticmethod
    def _with_state(reply: ControlReply, info: ConsumerInfo, consumer: Consumer) -> ControlReply:
        reply.num_pending = int(info.num_pending or 0)
        reply.num_ack_pending = int(info.num_ack_pending or 0)
        reply.ack_floor_seq = int(info.ack_floor.stream_seq if info.ack_floor else 0)
        # This process's counters since it started (the operator compares two readings).
        reply.applied = consumer.stats.applied
        reply.duplicates = consumer.stats.skipped_duplicates
        reply.dead_lettered = consumer.stats.dead_lettered
        return reply

    async def _reset_confirmed(
        self, consumer: Consumer, stream: str, start: int
    ) -> tuple[dict[str, Any], ConsumerInfo | None]:
        """The reset, and the durable's state read back once it reads as reset.

        Why read it back: a nats-server trap (2.15, single-replica durables). A reset to
        sequence 1 leaves the consumer store's in-memory state empty, and an empty state
        is read from the store's file instead; if the store's flusher was writing that file
        at the moment of the reset (the acks just before kick it), the reset's own write is
        skipped (`consumerFileStore.writeState`), so until its next delivery the durable
        reports its old delivered position and ack floor, while `num_pending` is already
        the reset's. A re-drive's follower took "ack floor at the end, nothing unacked" for
        caught up before anything was re-applied. While this process is suspended nobody
        here takes a message, so a durable that still reports a position past `start - 1`
        with all of the reset's messages pending and none delivered reads its stale file:
        resetting again (nothing was delivered since, so it changes nothing else) writes
        the file anew. Another replica taking messages meanwhile moves the durable for real
        (something unacked, or fewer pending) and ends the check."""
        deadline = time.monotonic() + RESET_CONFIRM_SECONDS
        while True:
            reset = await self._reset(consumer, stream, start)
            if "error" in reset:
                return reset, None
            info = await consumer.js.consumer_info(stream, consumer.durable)
            if not _reads_stale(info, start, int(reset.get("num_pending", 0))) or time.monotonic() > deadline:
                return reset, info
            log.warning(
                "durable read its old position after a reset; resetting again", extra={"consumer": consumer.durable}
            )
            await asyncio.sleep(RESET_RETRY_SECONDS)  # the flusher's write in progress: nothing to wait on

    async def _reset(self, consumer: Consumer, stream: str, start: int) -> dict[str, Any]:
        """JetStream's consumer reset, on the consumer's own connection (its account, and
        after the NAKs it just sent). The broker answers nothing to a request it refuses
        for permissions (or to a server older than 2.14): the timeout says so."""
        subject = f"$JS.API.CONSUMER.RESET.{stream}.{consumer.durable}"
        try:
            answer = await client(consumer.broker).request(
                subject, json.dumps({"seq": start}).encode(), timeout=RESET_TIMEOUT_SECONDS
            )
        except nats.errors.TimeoutError:
            raise HandlerError(
                f"no answer to {subject}: this service's NATS user needs permission to publish it "
                "(and nats-server >= 2.14)"
            ) from None
        result: dict[str, Any] = json.loads(answer.data)
        return result

    async def reapply(self, request: ReapplyRequest) -> ControlReply:
        """Apply the stored event at (stream, sequence) again, even though the inbox holds
        it, with an audit row in the same transaction. An event the inbox does not hold
        yet is recorded there (so its delivery later is skipped): it is applied once more
        either way, never twice by accident."""
        consumer = self._consumer(stream=request.stream)
        if consumer is None:
            self._not_here(stream=request.stream)
            return self._refuse("this service does not consume that stream", consumed=False)
        # The log lives in the service's database next to the inbox, so it is declared in
        # the same metadata: found there, the runtime needs no new wiring for it.
        operations = OperationsLog.find(consumer.inbox.table.metadata)
        if operations is None:
            return self._refuse("reapply is not enabled in this service")
        try:
            stored = await consumer.js.get_msg(request.stream, request.sequence)
        except NotFoundError:
            return self._refuse("no such stored event")
        try:
            envelope, event = _parse(stored.data or b"")
        except HandlerError as exc:
            return self._refuse(str(exc))
        for lane in self._lanes(request.stream):
            handler = lane.subscription.handler_for(event)
            if handler is not None:
                return await self._apply_again(lane, operations, request, envelope, event, handler)
        self._not_here(stream=request.stream, event=event)
        return self._refuse("this service does not handle that event type", outcome="not_handled")

    async def _apply_again(
        self,
        consumer: Consumer,
        operations: OperationsLog,
        request: ReapplyRequest,
        envelope: Envelope,
        event: Event,
        handler: Handler,
    ) -> ControlReply:
        operation_id = str(uuid4())
        audit = {
            "operation_id": operation_id,
            "operation": "reapply",
            "requested_by": request.requested_by,
            "consumer": consumer.durable,
            "stream": request.stream,
            "sequence": request.sequence,
            "event_id": str(envelope.event_id),
            "event_type": envelope.event_type,
            "reason": request.reason,
        }
        ids: dict[str, Any] = {
            "operation_id": operation_id, "event_id": str(envelope.event_id), "event_type": envelope.event_type,
        }  # fmt: skip
        try:
            async with consumer.sessions() as session, session.begin():
                held = not await consumer.inbox.claim(session, envelope, consumer.durable)
                await handler(session, envelope, event)
                outcome = "reapplied" if held else "applied"
                await operations.record(session, outcome=outcome, **audit)
        except Exception as exc:
            failure = f"{envelope.event_type} failed: {_describe(exc)}"[:120]
            await self._record_failure(consumer, operations, audit, failure)
            return self._refuse(failure, outcome="failed", **ids)
        # Ids only: the operator's reason stays in the operations table.
        log.info(
            "stored event re-applied by operation %s (%s sequence %d)",
            operation_id,
            request.stream,
            request.sequence,
            extra={"consumer": consumer.durable, "event_id": str(envelope.event_id), "status": outcome},
        )
        return ControlReply(service=self.service, ok=True, outcome=outcome, **ids)

    async def _record_failure(
        self, consumer: Consumer, operations: OperationsLog, audit: dict[str, Any], failure: str
    ) -> None:
        """A refused repair is audited too, in a transaction of its own (the handler's was
        rolled back). Best effort: the operator gets the answer either way."""
        try:
            async with consumer.sessions() as session, session.begin():
                await operations.record(session, outcome=failure, **audit)
        except Exception as exc:
            log.error("reapply failure not recorded", extra={"consumer": consumer.durable, "error": type(exc).__name__})
