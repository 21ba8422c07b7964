"""`iopnet events replay`: re-publish stored events so consumers re-apply what they miss.

For repair after a consumer's database was restored from an older backup (or a bug fix
that needs events applied again): each stored event is published again to its own
subject under a fresh Nats-Msg-Id. Every consumer's inbox skips the events it has already
applied, so a replay changes only what was missing. The restricted stream cannot be
replayed by the `ops` user (the broker refuses it), and dead letters have `dlq retry`.
"""

from typing import Any

import nats
from nats.js.errors import NotFoundError

REPLAYABLE = ("IOP_INTAKE", "IOP_SCHEDULING", "IOP_NOTIFICATIONS")


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` is one token, a final `>` is one or more."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


async def replay_events(
    url: str, stream: str, first_seq: int, last_seq: int | None = None, subject: str | None = None
) -> list[dict[str, Any]]:
    if stream not in REPLAYABLE:
        raise ValueError(f"{stream} cannot be replayed; one of {', '.join(REPLAYABLE)}")
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        state = (await js.stream_info(stream)).state
        # Fixed before publishing: the copies land in the same stream, past this point.
        last = min(last_seq or state.last_seq, state.last_seq)
        replayed = []
        for seq in range(max(first_seq, state.first_seq, 1), last + 1):
            try:
                message = await js.get_msg(stream, seq)
            except NotFoundError:
                continue  # removed by retention
            if subject and not subject_matches(subject, message.subject):
                continue
            await js.publish(message.subject, message.data or b"", headers={"Nats-Msg-Id": f"replay:{stream}:{seq}"})
            replayed.append({"sequence": seq, "subject": message.subject})
        return replayed
    finally:
        await nc.close()
