"""JetStream streams (DESIGN A4). One owner declares each stream; others only bind."""

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    owner: str  # the service that declares it; "all" for the shared dead-letter stream


STREAMS: dict[str, StreamSpec] = {
    spec.name: spec
    for spec in (
        StreamSpec("IOP_INTAKE", ("iop.intake.>",), "intake"),
        StreamSpec("IOP_SCHEDULING", ("iop.scheduling.>",), "scheduling"),
        StreamSpec("IOP_NOTIFICATIONS", ("iop.notifications.>",), "notifications"),
        StreamSpec("IOP_RESTRICTED", ("iop.restricted.>",), "intake"),
        # Every consumer may dead-letter, so every service ensures this one stream
        # from this single definition (identical config: no drift between owners).
        StreamSpec("IOP_DLQ", ("iop.dlq.>",), "all"),
    )
}


def stream_for_subject(subject: str) -> str:
    for spec in STREAMS.values():
        if any(subject.startswith(s.removesuffix(">")) for s in spec.subjects):
            return spec.name
    raise ValueError(f"no stream holds {subject!r}")


def owned_streams(service: str) -> list[StreamSpec]:
    return [s for s in STREAMS.values() if s.owner in (service, "all")]


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


async def ensure_streams(js: JetStreamContext, specs: list[StreamSpec], duplicate_window_seconds: float) -> None:
    for spec in specs:
        config = stream_config(spec, duplicate_window_seconds)
        try:
            await js.stream_info(spec.name)
        except NotFoundError:
            await js.add_stream(config)
        else:
            await js.update_stream(config)
