"""JetStream streams (DESIGN A4). One owner declares each stream; others only bind."""

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    owner: str  # the service that declares it (creates and updates it)
    # Services that create it if it is missing but never change it (the broker lets
    # only the owner update a stream: iopnet/natsd.py).
    creators: tuple[str, ...] = ()
    # The stream lives in the NATS account of the restricted connection (contact details).
    restricted: bool = False


DLQ_STREAM = "IOP_DLQ"

STREAMS: dict[str, StreamSpec] = {
    spec.name: spec
    for spec in (
        StreamSpec("IOP_INTAKE", ("iop.intake.>",), "intake"),
        StreamSpec("IOP_SCHEDULING", ("iop.scheduling.>",), "scheduling"),
        StreamSpec("IOP_NOTIFICATIONS", ("iop.notifications.>",), "notifications"),
        # Its reader owns it: notifications' every start brings its config back to this
        # one (no republish, no subjects added), and intake, whose events it stores,
        # only creates it if it is missing, so intake never waits for notifications.
        StreamSpec("IOP_RESTRICTED", ("iop.restricted.>",), "notifications", ("intake",), restricted=True),
        # Every consumer may dead-letter, so each service creates this stream if it is
        # missing (from this one definition); only intake updates it.
        StreamSpec(DLQ_STREAM, ("iop.dlq.>",), "intake", ("scheduling", "notifications")),
        # Consent-gated feeds for outside systems, `iop.feed.<integration>.>`: intake
        # forwards into each an event about a patient only under that patient's consent
        # (shared/messaging/integrations.py, services/intake/handlers.py).
        StreamSpec("IOP_FEED", ("iop.feed.>",), "intake"),
    )
}


def stream_for_subject(subject: str) -> str:
    for spec in STREAMS.values():
        if any(subject.startswith(s.removesuffix(">")) for s in spec.subjects):
            return spec.name
    raise ValueError(f"no stream holds {subject!r}")


def owned_streams(service: str) -> list[StreamSpec]:
    """The streams `service` declares: those it owns, and those it creates if missing."""
    return [s for s in STREAMS.values() if service == s.owner or service in s.creators]


def stream_config(spec: StreamSpec, duplicate_window_seconds: float) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        duplicate_window=duplicate_window_seconds,
        num_replicas=1,
    )


async def ensure_streams(
    js: JetStreamContext,
    specs: list[StreamSpec],
    duplicate_window_seconds: float,
    *,
    update: bool = True,
    service: str | None = None,
) -> None:
    """Create each stream if it is missing, and bring an existing one to this config
    if `update` (and, given `service`, only where `service` owns it)."""
    for spec in specs:
        owns = update and (service is None or spec.owner == service)
        config = stream_config(spec, duplicate_window_seconds)
        try:
            await js.stream_info(spec.name)
        except NotFoundError:
            await js.add_stream(config)
        else:
            if owns:
                await js.update_stream(config)
