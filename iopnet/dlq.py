"""Operations on the dead-letter stream IOP_DLQ (as the `ops` NATS user on `iopnet run`).

`ops` reads the dead letters but publishes no event: a retry asks the consumer that
dead-lettered the message to re-read the original from its stream and apply it
(shared/messaging/control.py), so the retry reaches that consumer only, with exactly the
stored message, and a forged dead letter of another service is refused by the service.

`purge` removes dead letters once an operator has dealt with them: one by sequence
(`$JS.API.STREAM.MSG.DELETE.IOP_DLQ`) or all of them, or one service's
(`$JS.API.STREAM.PURGE.IOP_DLQ` with a subject filter). The broker lets `ops` do that on
IOP_DLQ only, and no other stream; a broker that does not (an older iopnet/natsd.py)
answers nothing, and the purge says which permission is missing. The originals stay in
their streams: a purge loses no event, only the record that it failed.
"""

import contextlib
import json
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from shared.messaging.connection import connect_once
from shared.messaging.control import DLQ_STREAM, ControlReply, DeadLetterRetry, control_subject
from shared.settings import SERVICES

CONTROL_TIMEOUT = 60.0
API_TIMEOUT = 5.0


class DeadLetterError(Exception):
    """A dead-letter command that could not be done; the text is safe to print."""


class RetryRefused(DeadLetterError):
    """The service answered, and did not apply the event (the reason is safe to print)."""


def _summary(seq: int, msg: RawStreamMsg) -> dict[str, Any]:
    headers = msg.headers or {}
    return {
        "sequence": seq,
        "subject": msg.subject,
        "reason": headers.get("Iop-Dlq-Reason"),
        "consumer": headers.get("Iop-Consumer"),
        "original_subject": headers.get("Iop-Original-Subject"),
        "original_stream": headers.get("Iop-Original-Stream"),
        "original_sequence": headers.get("Iop-Original-Sequence"),
        "deliveries": headers.get("Iop-Deliveries"),
        "dead_lettered_at": headers.get("Iop-Dead-Lettered-At"),
    }


async def list_dead_letters(
    url: str, limit: int, *, progress: Callable[[int, int], None] | None = None
) -> list[dict[str, Any]]:
    """The newest `limit` dead letters, oldest first; `progress(done, total)` as they are read."""
    nc = await connect_once(url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(DLQ_STREAM)
        except NotFoundError:
            return []
        if info.state.messages == 0:
            return []
        first = max(info.state.first_seq, info.state.last_seq - limit + 1, 1)
        letters = []
        total = info.state.last_seq - first + 1
        for done, seq in enumerate(range(first, info.state.last_seq + 1), start=1):
            with contextlib.suppress(NotFoundError):  # purged
                letters.append(_summary(seq, await js.get_msg(DLQ_STREAM, seq)))
            if progress is not None:
                progress(done, total)
        return letters
    finally:
        await nc.close()


async def show_dead_letter(url: str, sequence: int) -> dict[str, Any]:
    """One dead letter whole: its headers (reason, where the original is) and its payload
    (the envelope; a restricted one's is withheld, and a poison message's is shown as text)."""
    nc = await connect_once(url)
    try:
        try:
            msg = await nc.jetstream().get_msg(DLQ_STREAM, sequence)
        except NotFoundError:
            raise DeadLetterError(f"no dead letter {sequence} in {DLQ_STREAM}") from None
    finally:
        await nc.close()
    letter = _summary(sequence, msg)
    letter["headers"] = dict(msg.headers or {})
    data = msg.data or b""
    try:
        letter["envelope"] = json.loads(data)
    except ValueError:
        letter["payload_bytes"] = len(data)
        withheld = letter["headers"].get("Iop-Payload-Withheld")
        if withheld:
            letter["payload_withheld"] = withheld  # kept in its own stream, not readable by ops
        elif data:
            letter["payload"] = data.decode(errors="replace")
    return letter


async def retry_dead_letter(url: str, sequence: int) -> ControlReply:
    """Ask the service that dead-lettered message `sequence` to apply its original again."""
    nc = await connect_once(url)
    try:
        try:
            letter = await nc.jetstream().get_msg(DLQ_STREAM, sequence)
        except NotFoundError:
            raise RetryRefused(f"no dead letter {sequence} in {DLQ_STREAM}") from None
        tokens = (letter.subject or "").split(".")  # iop.dlq.<service>.<event>.<site>
        service = tokens[2] if len(tokens) > 2 else ""
        if service not in SERVICES:
            raise RetryRefused(f"dead letter {sequence} names no iopnet service ({letter.subject})")
        request = DeadLetterRetry(dlq_sequence=sequence).model_dump_json().encode()
        try:
            response = await nc.request(control_subject(service, "dlq_retry"), request, timeout=CONTROL_TIMEOUT)
        except nats.errors.NoRespondersError:
            raise RetryRefused(f"the {service} service is not running: start it and retry") from None
        except nats.errors.TimeoutError:
            raise RetryRefused(f"the {service} service did not answer within {CONTROL_TIMEOUT:.0f}s") from None
        reply = ControlReply.model_validate(json.loads(response.data))
        if not reply.ok:
            raise RetryRefused(f"{service}: {reply.error}")
        return reply
    finally:
        await nc.close()


async def _api(nc: Client, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    """A JetStream API request; a refused permission (no answer) says which one is missing."""
    try:
        response: Msg = await nc.request(subject, json.dumps(body).encode(), timeout=API_TIMEOUT)
    except nats.errors.TimeoutError:
        raise DeadLetterError(
            f"the broker did not answer {subject}: this NATS user needs permission to publish it "
            "(iopnet/natsd.py, the ops user)"
        ) from None
    answer: dict[str, Any] = json.loads(response.data)
    return answer


async def purge_dead_letters(
    url: str,
    *,
    sequences: list[int] | None = None,
    service: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Remove the dead letters `sequences`, or every one of `service`'s, or (neither
    given) all of them. Returns how many were removed."""
    if sequences and service:
        raise ValueError("give sequences or a service, not both")
    if service is not None and service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    nc = await connect_once(url)
    try:
        if sequences:
            removed = 0
            for done, seq in enumerate(sequences, start=1):
                answer = await _api(nc, f"$JS.API.STREAM.MSG.DELETE.{DLQ_STREAM}", {"seq": seq})
                if "error" in answer:
                    raise DeadLetterError(f"dead letter {seq}: {answer['error'].get('description', 'refused')}")
                removed += 1
                if progress is not None:
                    progress(done, len(sequences))
            return removed
        body = {"filter": f"iop.dlq.{service}.>"} if service else {}
        answer = await _api(nc, f"$JS.API.STREAM.PURGE.{DLQ_STREAM}", body)
        if "error" in answer:
            if answer["error"].get("code") == 404:
                return 0  # no dead letter was ever written
            raise DeadLetterError(f"{DLQ_STREAM}: {answer['error'].get('description', 'refused')}")
        return int(answer.get("purged", 0))
    finally:
        await nc.close()
