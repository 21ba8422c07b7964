"""Operators' requests to one service: re-apply a dead letter, replay a stream.

Why a request to the consuming service rather than a re-publish: the broker lets only a
producer publish its own subjects (iopnet/natsd.py), so nobody else can put an event on
the bus; and a re-published copy would reach every subscriber, other systems included,
as a new message. Here the consumer that dead-lettered (or lost) an event re-reads the
producer's stored original from its stream by sequence and applies it through its
inbox: exactly the stored message, to that consumer only, at most once.

Subjects: `iop.ctl.<service>.dlq_retry` and `iop.ctl.<service>.replay` (core NATS
request/reply; only `ops` may publish them, and each service hears only its own).
"""

import logging
from typing import Any, Literal

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field, ValidationError

from shared.messaging.consumer import Consumer, HandlerError

log = logging.getLogger("iopnet.control")

CONTROL_ROOT = "iop.ctl"
DLQ_STREAM = "IOP_DLQ"
Operation = Literal["dlq_retry", "replay"]


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

    async def retry(self, request: DeadLetterRetry) -> ControlReply:
        try:
            letter = await self.main_js.get_msg(DLQ_STREAM, request.dlq_sequence)
        except NotFoundError:
            return self._refuse("no such dead letter")
        # Only this service may publish under iop.dlq.<service>. (the broker says so), so
        # the subject proves whose dead letter it is; the headers then say where the
        # original is, and the original, not the dead letter's copy, is what is applied.
        if not letter.subject.startswith(f"iop.dlq.{self.service}."):
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
            if request.subject and not subject_matches(request.subject, message.subject):
                continue
            try:
                outcome = await consumer.apply_stored(message.data or b"")
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
