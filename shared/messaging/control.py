"""Operators' requests to one service: re-apply a dead letter, replay a stream, and
re-apply one stored event that the inbox already holds (a repair, audited).

Why a request to the consuming service rather than a re-publish: the broker lets only a
producer publish its own subjects (iopnet/natsd.py), so nobody else can put an event on
the bus; and a re-published copy would reach every subscriber, other systems included,
as a new message. Here the consumer that dead-lettered (or lost) an event re-reads the
producer's stored original from its stream by sequence and applies it through its
inbox: exactly the stored message, to that consumer only, at most once.

Subjects: `iop.ctl.<service>.dlq_retry`, `iop.ctl.<service>.replay` and
`iop.ctl.<service>.reapply` (core NATS request/reply; only `ops` may publish them, and
each service hears only its own).

`reapply` is the repair for an effect that was lost although the inbox recorded the
event (a bug since fixed, a state edited by hand): the stored event is applied again
even though the inbox holds it, in one transaction with a row in the service's
`operations` table that says who asked, when, which event and why. The handlers are
state-based (they converge on what the event says), so applying one again changes only
what is missing. The reason is kept in the database, never in a log line.
"""

import logging
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import uuid4

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field, StringConstraints, ValidationError
from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts import Envelope, Event, UnknownEventType
from shared.db import UtcDateTime
from shared.messaging.consumer import Consumer, Handler, HandlerError
from shared.messaging.streams import DLQ_STREAM

log = logging.getLogger("iopnet.control")

CONTROL_ROOT = "iop.ctl"
OPERATIONS_TABLE = "operations"
Operation = Literal["dlq_retry", "replay", "reapply"]
# Who asked: a login name, never free text. Why: bounded, one line, no control characters
# (it lands in a database column that an auditor reads, not in a log).
Operator = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._@-]{1,64}$")]
Reason = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=3, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
]
StreamName = Annotated[str, StringConstraints(pattern=r"^IOP_[A-Z_]{1,36}$")]


def control_subject(service: str, operation: Operation) -> str:
    return f"{CONTROL_ROOT}.{service}.{operation}"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` is one token, a final `>` is one or more."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


class DeadLetterRetry(BaseModel):
    dlq_sequence: int = Field(ge=1)


class ReplayRequest(BaseModel):
    stream: str
    from_seq: int = Field(ge=1)
    to_seq: int | None = Field(default=None, ge=1)
    subject: str | None = None
    # One reply per chunk, so the operator sees progress and no request runs for long.
    limit: int = Field(default=500, ge=1, le=5000)


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


def _describe(exc: Exception) -> str:
    # A HandlerError's text is written to be shown; anything else (a driver error quotes
    # its SQL parameters, which may hold PHI) is named by its class only.
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, HandlerError) else type(exc).__name__


class ControlPlane:
    def __init__(self, service: str, main_js: JetStreamContext, consumers: list[Consumer]) -> None:
        self.service = service
        self.main_js = main_js
        self.consumers = consumers

    async def start(self, nc: Client) -> None:
        await nc.subscribe(f"{CONTROL_ROOT}.{self.service}.*", cb=self._on_request)

    async def _on_request(self, msg: Msg) -> None:
        operation = msg.subject.rsplit(".", 1)[-1]
        try:
            if operation == "dlq_retry":
                reply = await self.retry(DeadLetterRetry.model_validate_json(msg.data))
            elif operation == "replay":
                reply = await self.replay(ReplayRequest.model_validate_json(msg.data))
            elif operation == "reapply":
                reply = await self.reapply(ReapplyRequest.model_validate_json(msg.data))
            else:
                reply = self._refuse("unknown operation")
        except ValidationError:
            reply = self._refuse("invalid request")
        except Exception as exc:  # the operator gets an answer, never a timeout
            log.error("control request failed", extra={"reason": operation, "error": type(exc).__name__})
            reply = self._refuse(f"failed: {type(exc).__name__}")
        if msg.reply:
            await msg.respond(reply.model_dump_json().encode())

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

    @staticmethod
    async def _apply_in_its_lane(lanes: list[Consumer], data: bytes) -> str:
        """Applied by the lane that handles it; "not_handled" if none does."""
        for consumer in lanes:
            outcome = await consumer.apply_stored(data)
            if outcome != "not_handled":
                return outcome
        return "not_handled"

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

    async def replay(self, request: ReplayRequest) -> ControlReply:
        consumer = self._consumer(stream=request.stream)
        if consumer is None:
            return ControlReply(service=self.service, ok=True, consumed=False)
        state = (await consumer.js.stream_info(request.stream)).state
        last = min(request.to_seq or state.last_seq, state.last_seq)
        first = max(request.from_seq, state.first_seq, 1)
        end = min(last, first + request.limit - 1)
        reply = ControlReply(service=self.service, ok=True, next_seq=end + 1, last_seq=last)
        for sequence in range(first, end + 1):
            try:
                message = await consumer.js.get_msg(request.stream, sequence)
            except NotFoundError:
                continue  # removed by retention
            if request.subject and not subject_matches(request.subject, message.subject or ""):
                continue
            try:
                outcome = await self._apply_in_its_lane(self._lanes(request.stream), message.data or b"")
            except HandlerError as exc:
                reply.failed.append(Failure(sequence=sequence, reason=str(exc)))
                continue
            if outcome == "applied":
                reply.applied += 1
            elif outcome == "duplicate":
                reply.duplicates += 1
            else:
                reply.not_handled += 1
        reply.ok = not reply.failed
        return reply

    async def reapply(self, request: ReapplyRequest) -> ControlReply:
        """Apply the stored event at (stream, sequence) again, even though the inbox holds
        it, with an audit row in the same transaction. An event the inbox does not hold
        yet is recorded there (so its delivery later is skipped): it is applied once more
        either way, never twice by accident."""
        consumer = self._consumer(stream=request.stream)
        if consumer is None:
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
