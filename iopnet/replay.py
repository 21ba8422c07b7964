"""`iopnet events replay`: re-drive one durable consumer from a point in its stream;
`iopnet events reapply`: one stored event applied again on purpose, audited.

A re-drive never writes to a stream. The durable itself is moved back: the service that
owns it, asked over the control plane (shared/messaging/control.py, `redrive`), suspends
its consumer, resets the durable to the start sequence (from `--from-seq`, or the first
event stored at or after `--since`) and resumes. The events then come again through the
consumer's ordinary path, in order, and its inbox skips what it has applied: after the
operator clears a projection, the same re-drive rebuilds it. Nobody else sees anything
(no copies on the bus, no new Nats-Msg-Ids). `ops` resets nothing itself: it publishes
no event and holds no consumer permission; the service acts with its own user.

An integration's durable (`<integration>-<STREAM>-<site>`) belongs to the integration:
its own credentials reset it. `redrive_instructions` says how.

Replay skips what the inbox holds. When an effect was lost although the inbox recorded
the event (a bug since fixed, a state edited by hand), `reapply` asks one service to
apply that stored event again anyway: its handlers converge on what the event says, and
the service writes who asked, when, which event and why in its `operations` table.
"""

import asyncio
import json
import re
import time
from collections.abc import Callable
from datetime import datetime

import nats.errors
from nats.aio.client import Client

from shared.messaging.connection import connect_once
from shared.messaging.control import (
    ConsumerStateRequest,
    ControlReply,
    Operation,
    ReapplyRequest,
    RedriveRequest,
    control_subject,
)
from shared.settings import SERVICES

REPLAYABLE = ("IOP_INTAKE", "IOP_SCHEDULING", "IOP_NOTIFICATIONS", "IOP_RESTRICTED")
CONTROL_TIMEOUT = 120.0
# How often the operator's progress bar asks the service where its durable stands.
WATCH_INTERVAL_SECONDS = 0.2


class ReplayFailed(Exception):
    """The re-drive (or re-apply) was refused or did not happen; the text is safe to print."""


def service_of(durable: str) -> str | None:
    """The service that owns `durable` (`<service>-<STREAM>[-<lane>]`), or None for a
    durable of someone else's (an integration's)."""
    service, _, rest = durable.partition("-")
    return service if service in SERVICES and rest.startswith("IOP_") else None


def stream_of(durable: str) -> str | None:
    """The stream named in a durable's name (`…-IOP_INTAKE-…`), if any."""
    match = re.search(r"(?:^|-)(IOP_[A-Z_]+?)(?:-|$)", durable)
    return match.group(1) if match else None


def redrive_instructions(durable: str, *, from_seq: int | None, since: datetime | None) -> str:
    """What an integration does to re-drive its own durable (ops may not touch it). Its
    allow-list (iopnet/natsd.py integration_permissions) lets it delete, create (with its
    one filter) and reset its own durables, and read nothing else of the stream."""
    stream = stream_of(durable) or "<STREAM>"
    if from_seq is not None:
        start, policy = f"sequence {from_seq}", f'"deliver_policy": "by_start_sequence", "opt_start_seq": {from_seq}'
        reset = f'     (or request $JS.API.CONSUMER.RESET.{stream}.{durable} with {{"seq": {from_seq}}});\n'
    else:
        assert since is not None
        start = f"the first event stored at or after {since.isoformat()}"
        policy = f'"deliver_policy": "by_start_time", "opt_start_time": "{since.isoformat()}"'
        reset = ""
    return (
        f"{durable} is not a durable of an iopnet service: it belongs to an integration, and only\n"
        f"the integration's own NATS credentials may change it (ops publishes nothing and may not).\n"
        f"To re-drive it from {start}, the integration:\n"
        f"  1. stops its subscriber (unacknowledged messages are redelivered anyway);\n"
        f"  2. deletes the durable ($JS.API.CONSUMER.DELETE.{stream}.{durable}) and creates it again\n"
        f"     with the same one filter subject and {{{policy}}}\n"
        f"{reset}"
        f"  3. starts its subscriber again and de-duplicates by event_id, as it always must\n"
        f"     (docs/events.md, examples/subscriber.py --since).\n"
        f"The stream is not touched, and no other subscriber sees anything.\n"
    )


async def _ask(nc: Client, service: str, operation: Operation, body: bytes) -> ControlReply:
    try:
        response = await nc.request(control_subject(service, operation), body, timeout=CONTROL_TIMEOUT)
    except nats.errors.NoRespondersError:
        raise ReplayFailed(f"the {service} service is not running: start it and try again") from None
    except nats.errors.TimeoutError:
        raise ReplayFailed(f"the {service} service did not answer within {CONTROL_TIMEOUT:.0f}s") from None
    return ControlReply.model_validate(json.loads(response.data))


async def redrive(
    url: str,
    request: RedriveRequest,
    *,
    progress: Callable[[ControlReply], None] | None = None,
    timeout: float | None = None,
) -> tuple[ControlReply, ControlReply]:
    """Ask the owning service to re-drive `request.durable`; unless a dry run, follow
    its progress until the durable has caught up. Returns (the service's answer, the
    last state seen). Raises ReplayFailed with a reason safe to print."""
    service = service_of(request.durable)
    if service is None:
        raise ValueError(f"{request.durable} is not a durable of an iopnet service")
    nc = await connect_once(url)
    try:
        answer = await _ask(nc, service, "redrive", request.model_dump_json().encode())
        if not answer.ok:
            raise ReplayFailed(f"{service}: {answer.error}")
        if progress is not None:
            progress(answer)
        if request.dry_run:
            return answer, answer
        state = await _follow(nc, service, answer, progress, timeout)
        return answer, state
    finally:
        await nc.close()


def caught_up(state: ControlReply, last_seq: int) -> bool:
    """Nothing unacknowledged, and nothing pending (or only what came after `last_seq`)."""
    settled = (state.num_ack_pending or 0) == 0
    return settled and ((state.num_pending or 0) == 0 or (state.ack_floor_seq or 0) >= last_seq)


async def _follow(
    nc: Client,
    service: str,
    answer: ControlReply,
    progress: Callable[[ControlReply], None] | None,
    timeout: float | None,
) -> ControlReply:
    assert answer.durable is not None and answer.last_seq is not None
    body = ConsumerStateRequest(durable=answer.durable).model_dump_json().encode()
    deadline = None if timeout is None else time.monotonic() + timeout

    async def read() -> ControlReply:
        state = await _ask(nc, service, "consumer_state", body)
        if not state.ok:
            raise ReplayFailed(f"{service}: {state.error}")
        if progress is not None:
            progress(state)
        return state

    # The answer is the state of the moment the durable was reset: the consumer may have
    # gone through everything since. So the answer is never the last state; the service
    # is asked at least once.
    state = await read()
    while not caught_up(state, answer.last_seq):
        if deadline is not None and time.monotonic() > deadline:
            raise ReplayFailed(f"{answer.durable} had not caught up after {timeout:.0f}s: {state.num_pending} pending")
        await asyncio.sleep(WATCH_INTERVAL_SECONDS)  # a progress poll: nothing to wait on but the server's count
        state = await read()
    return state


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
