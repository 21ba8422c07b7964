"""Operations on the dead-letter stream IOP_DLQ (as the `ops` NATS user on `iopnet run`).

`ops` reads the dead letters but publishes no event: a retry asks the consumer that
dead-lettered the message to re-read the original from its stream and apply it
(shared/messaging/control.py), so the retry reaches that consumer only, with exactly the
stored message, and a forged dead letter of another service is refused by the service.
"""

import json
from typing import Any

import nats.errors
from nats.js.errors import NotFoundError

from shared.messaging.connection import connect_once
from shared.messaging.control import DLQ_STREAM, ControlReply, DeadLetterRetry, control_subject

CONTROL_TIMEOUT = 60.0


async def list_dead_letters(url: str, limit: int) -> list[dict[str, Any]]:
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
        for seq in range(first, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(DLQ_STREAM, seq)
            except NotFoundError:
                continue
            headers = msg.headers or {}
            letters.append(
                {
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
            )
        return letters
    finally:
        await nc.close()


class RetryRefused(Exception):
    """The service answered, and did not apply the event (the reason is safe to print)."""


async def retry_dead_letter(url: str, sequence: int) -> ControlReply:
    """Ask the service that dead-lettered message `sequence` to apply its original again."""
    nc = await connect_once(url)
    try:
        try:
            letter = await nc.jetstream().get_msg(DLQ_STREAM, sequence)
        except NotFoundError:
            raise RetryRefused(f"no dead letter {sequence} in {DLQ_STREAM}") from None
        service = (letter.subject or "").split(".")[2]  # iop.dlq.<service>.<event>.<site>
        request = DeadLetterRetry(dlq_sequence=sequence).model_dump_json().encode()
        try:
            response = await nc.request(control_subject(service, "dlq_retry"), request, timeout=CONTROL_TIMEOUT)
        except nats.errors.NoRespondersError:
            raise RetryRefused(f"the {service} service is not running: start it and retry") from None
        reply = ControlReply.model_validate(json.loads(response.data))
        if not reply.ok:
            raise RetryRefused(f"{service}: {reply.error}")
        return reply
    finally:
        await nc.close()
