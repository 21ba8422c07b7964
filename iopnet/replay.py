"""`iopnet events replay`: a consumer whose database lost recent work gets it back;
`iopnet events reapply`: one stored event applied again on purpose, audited.

For repair after a consumer's database was restored from an older backup (or a bug fix
that needs events applied again): each service that consumes the stream re-reads the
stored events by sequence and applies them through its inbox, which skips what it has
already applied (shared/messaging/control.py). Nothing is published: other subscribers
see no copies, and the restricted stream is replayed by notifications itself.

Replay skips what the inbox holds. When an effect was lost although the inbox recorded
the event (a bug since fixed, a state edited by hand), `reapply` asks one service to
apply that stored event again anyway: its handlers converge on what the event says, and
the service writes who asked, when, which event and why in its `operations` table.
"""

import json
from collections.abc import Callable
from typing import Any

import nats.errors

from shared.messaging.connection import connect_once
from shared.messaging.control import ControlReply, ReapplyRequest, ReplayRequest, control_subject
from shared.settings import SERVICES

REPLAYABLE = ("IOP_INTAKE", "IOP_SCHEDULING", "IOP_NOTIFICATIONS", "IOP_RESTRICTED")
CONTROL_TIMEOUT = 120.0


class ReplayFailed(Exception):
    pass


async def replay_events(
    url: str,
    stream: str,
    first_seq: int,
    last_seq: int | None = None,
    subject: str | None = None,
    *,
    services: tuple[str, ...] = SERVICES,
    chunk: int = 500,
    progress: Callable[[ControlReply], None] | None = None,
) -> list[dict[str, Any]]:
    """One summary per service that consumes `stream`: applied, duplicates (skipped by
    the inbox), not handled (event types it does not consume) and failures."""
    if stream not in REPLAYABLE:
        raise ValueError(f"{stream} cannot be replayed; one of {', '.join(REPLAYABLE)}")
    nc = await connect_once(url)
    summaries = []
    try:
        for service in services:
            totals: dict[str, Any] = {"service": service, "applied": 0, "duplicates": 0, "not_handled": 0, "failed": []}
            seq = first_seq
            while True:
                request = ReplayRequest(stream=stream, from_seq=seq, to_seq=last_seq, subject=subject, limit=chunk)
                try:
                    response = await nc.request(
                        control_subject(service, "replay"), request.model_dump_json().encode(), timeout=CONTROL_TIMEOUT
                    )
                except nats.errors.NoRespondersError:
                    raise ReplayFailed(f"the {service} service is not running: start it and replay again") from None
                reply = ControlReply.model_validate(json.loads(response.data))
                if not reply.consumed:
                    break
                if reply.error and not reply.failed:
                    raise ReplayFailed(f"{service}: {reply.error}")
                totals["applied"] += reply.applied
                totals["duplicates"] += reply.duplicates
                totals["not_handled"] += reply.not_handled
                totals["failed"] += [f.model_dump() for f in reply.failed]
                if progress is not None:
                    progress(reply)
                assert reply.next_seq is not None and reply.last_seq is not None
                if reply.next_seq > reply.last_seq:
                    break
                seq = reply.next_seq
            if reply.consumed:
                summaries.append(totals)
        return summaries
    finally:
        await nc.close()


async def reapply_event(url: str, service: str, request: ReapplyRequest) -> ControlReply:
    """Ask `service` to apply the stored event (request.stream, request.sequence) again,
    though its inbox holds it. Raises ReplayFailed with a reason safe to print."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    if request.stream not in REPLAYABLE:
        raise ValueError(f"{request.stream} cannot be re-applied; one of {', '.join(REPLAYABLE)}")
    nc = await connect_once(url)
    try:
        try:
            response = await nc.request(
                control_subject(service, "reapply"), request.model_dump_json().encode(), timeout=CONTROL_TIMEOUT
            )
        except nats.errors.NoRespondersError:
            raise ReplayFailed(f"the {service} service is not running: start it and reapply again") from None
    finally:
        await nc.close()
    reply = ControlReply.model_validate(json.loads(response.data))
    if not reply.consumed:
        raise ReplayFailed(f"{service} does not consume {request.stream}")
    if not reply.ok:
        raise ReplayFailed(f"{service}: {reply.error}")
    return reply
