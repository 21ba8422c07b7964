"""JetStream streams (DESIGN A4). One owner declares each stream; others only bind."""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError, ServiceUnavailableError

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger("iopnet.nats")


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
FEED_STREAM = "IOP_FEED"

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


@dataclass(frozen=True)
class Retention:
    """How long and how much a stream keeps (JetStream limits; the oldest go first)."""

    max_age_seconds: float
    max_bytes: int


@dataclass(frozen=True)
class StreamLimits:
    """Replicas and retention of the streams (settings IOPNET_STREAM_REPLICAS,
    IOPNET_STREAM_MAX_AGE_DAYS/_MAX_BYTES, IOPNET_DLQ_…, IOPNET_FEED_…). Every service
    gets the same from the same environment: any of them may create a stream it needs."""

    replicas: int = 1
    events: Retention = Retention(90 * 86400.0, 1024**3)
    dlq: Retention = Retention(180 * 86400.0, 256 * 1024**2)
    feed: Retention = Retention(30 * 86400.0, 1024**3)

    @classmethod
    def from_settings(cls, settings: "Settings") -> "StreamLimits":
        day = 86400.0
        return cls(
            replicas=settings.stream_replicas,
            events=Retention(settings.stream_max_age_days * day, settings.stream_max_bytes),
            dlq=Retention(settings.dlq_max_age_days * day, settings.dlq_max_bytes),
            feed=Retention(settings.feed_max_age_days * day, settings.feed_max_bytes),
        )

    def retention(self, stream: str) -> Retention:
        return {DLQ_STREAM: self.dlq, FEED_STREAM: self.feed}.get(stream, self.events)


def stream_config(
    spec: StreamSpec, duplicate_window_seconds: float, limits: StreamLimits | None = None
) -> StreamConfig:
    limits = limits or StreamLimits()
    retention = limits.retention(spec.name)
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        duplicate_window=duplicate_window_seconds,
        num_replicas=limits.replicas,
        max_age=retention.max_age_seconds,
        max_bytes=retention.max_bytes,
    )


# A cluster answers 503 while it elects a stream's (or its meta) leader, after a node
# was lost, and a request may time out while a fresh cluster places its first streams
# (5 s passed here, on two busy cores): a start that meets either asks again, for this long.
ELECTION_WAIT_SECONDS = 60.0


async def ensure_streams(
    js: JetStreamContext,
    specs: list[StreamSpec],
    duplicate_window_seconds: float,
    *,
    update: bool = True,
    service: str | None = None,
    limits: StreamLimits | None = None,
) -> None:
    """Create each stream if it is missing, and bring an existing one to this config
    if `update` (and, given `service`, only where `service` owns it): its replicas and
    retention follow the settings, so a change takes effect at the owner's next start.

    `limits` defaults to the settings of this process's environment (IOPNET_STREAM_…),
    which the service was started with."""
    if limits is None:
        from shared.settings import Settings

        limits = StreamLimits.from_settings(Settings())
    for spec in specs:
        owns = update and (service is None or spec.owner == service)
        config = stream_config(spec, duplicate_window_seconds, limits)
        deadline = time.monotonic() + ELECTION_WAIT_SECONDS
        delay = 0.1
        while True:
            try:
                await _ensure(js, config, owns)
                break
            except (ServiceUnavailableError, nats.errors.TimeoutError) as error:
                if time.monotonic() + delay > deadline:
                    raise
                log.info(
                    "jetstream not answering yet; retrying", extra={"stream": spec.name, "error": type(error).__name__}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def _ensure(js: JetStreamContext, config: StreamConfig, update: bool) -> None:
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
    else:
        if update:
            await js.update_stream(config)
