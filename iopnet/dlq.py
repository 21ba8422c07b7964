"""Operations on the dead-letter stream IOP_DLQ (as the `ops` NATS user on `iopnet run`)."""

from typing import Any

import nats
import nats.errors
from nats.js.errors import NotFoundError

DLQ_STREAM = "IOP_DLQ"


async def list_dead_letters(url: str, limit: int) -> list[dict[str, Any]]:
    nc = await nats.connect(url)
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
                    "deliveries": headers.get("Iop-Deliveries"),
                    "dead_lettered_at": headers.get("Iop-Dead-Lettered-At"),
                }
            )
        return letters
    finally:
        await nc.close()


async def retry_dead_letter(url: str, sequence: int) -> str:
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            violations.append(str(exc))

    nc = await nats.connect(url, error_cb=on_error)
    try:
        js = nc.jetstream()
        msg = await js.get_msg(DLQ_STREAM, sequence)
        headers = msg.headers or {}
        subject = headers["Iop-Original-Subject"]
        # A fresh Nats-Msg-Id: the original id may still be in the duplicate window.
        try:
            await js.publish(subject, msg.data or b"", headers={"Nats-Msg-Id": f"retry:{sequence}"})
        except nats.errors.TimeoutError:
            # A denied publish gets no ack, only the server's -ERR (e.g. `ops` may not
            # publish `iop.restricted.>`): say so instead of a bare timeout.
            if any(subject.lower() in violation.lower() for violation in violations):
                raise PermissionError(f"this NATS user may not publish to {subject}") from None
            raise
        return subject
    finally:
        await nc.close()
