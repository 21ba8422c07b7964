"""ensure_streams against real nats-servers: an existing stream (as an older version made
it: one replica, no limits) is brought to the configured retention and replicas by its
owner's next start, on one server and on a three-node cluster; others leave it alone."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.js.api import StorageType, StreamConfig

from iopnet.natsd import NatsCluster, NatsServer
from iopnet.testing import eventually
from shared.messaging.connection import connect_once
from shared.messaging.streams import STREAMS, Retention, StreamLimits, ensure_streams

HOUR = 3600.0


def old_config(name: str) -> StreamConfig:
    """What ensure_streams declared before retention limits and replicas were settings."""
    spec = STREAMS[name]
    return StreamConfig(
        name=name, subjects=list(spec.subjects), storage=StorageType.FILE, duplicate_window=120, num_replicas=1
    )


async def test_limits_are_applied_to_an_existing_stream_by_its_owner_only(own_nats_server: NatsServer) -> None:
    nc = await connect_once(own_nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(old_config("IOP_INTAKE"))
        await js.publish("iop.intake.s.PatientRegistered", b"{}")
        before = (await js.stream_info("IOP_INTAKE")).config
        assert not before.max_age and before.max_bytes in (None, -1)

        limits = StreamLimits(
            events=Retention(24 * HOUR, 50_000_000),
            dlq=Retention(48 * HOUR, 10_000_000),
            feed=Retention(HOUR, 1_000_000),
        )
        # scheduling does not own IOP_INTAKE: nothing changes.
        await ensure_streams(js, [STREAMS["IOP_INTAKE"]], 120, service="scheduling", limits=limits)
        assert (await js.stream_info("IOP_INTAKE")).config.max_bytes == before.max_bytes

        specs = [STREAMS["IOP_INTAKE"], STREAMS["IOP_DLQ"], STREAMS["IOP_FEED"]]
        await ensure_streams(js, specs, 120, service="intake", limits=limits)
        intake = await js.stream_info("IOP_INTAKE")
        assert (intake.config.max_age, intake.config.max_bytes) == (24 * HOUR, 50_000_000)
        assert intake.state.messages == 1, "an update keeps what the stream holds"
        dlq = (await js.stream_info("IOP_DLQ")).config
        feed = (await js.stream_info("IOP_FEED")).config
        assert (dlq.max_age, dlq.max_bytes) == (48 * HOUR, 10_000_000)
        assert (feed.max_age, feed.max_bytes) == (HOUR, 1_000_000)

        # A later start with other settings changes them again (limits lowered too).
        smaller = StreamLimits(events=Retention(HOUR, 1_000_000))
        await ensure_streams(js, [STREAMS["IOP_INTAKE"]], 120, service="intake", limits=smaller)
        intake = await js.stream_info("IOP_INTAKE")
        assert (intake.config.max_age, intake.config.max_bytes) == (HOUR, 1_000_000)
    finally:
        await nc.close()


async def test_default_limits_come_from_the_environment(
    own_nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The services call ensure_streams without `limits`: their environment decides."""
    monkeypatch.setenv("IOPNET_STREAM_MAX_AGE_DAYS", "2")
    monkeypatch.setenv("IOPNET_DLQ_MAX_BYTES", "5000000")
    nc = await connect_once(own_nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, [STREAMS["IOP_SCHEDULING"], STREAMS["IOP_DLQ"]], 120)
        assert (await js.stream_info("IOP_SCHEDULING")).config.max_age == 2 * 24 * HOUR
        assert (await js.stream_info("IOP_DLQ")).config.max_bytes == 5_000_000
    finally:
        await nc.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "cluster", 3).start()
    try:
        yield cluster
    finally:
        cluster.stop(kill=True)


async def test_replicas_raised_on_a_cluster_keep_the_stream(cluster: NatsCluster) -> None:
    """A stream created with one replica (before IOPNET_STREAM_REPLICAS=3) gets three at
    its owner's next start, keeps its messages, and is then read from another node."""
    nc = await connect_once(cluster.url)
    try:
        js = nc.jetstream()
        await js.add_stream(old_config("IOP_SCHEDULING"))
        for index in range(5):
            await js.publish(f"iop.scheduling.s.ProgramPublished.{index}", b"{}")
        await ensure_streams(
            js, [STREAMS["IOP_SCHEDULING"]], 120, service="scheduling", limits=StreamLimits(replicas=3)
        )

        async def replicated() -> bool:
            info = await js.stream_info("IOP_SCHEDULING")
            peers = info.cluster.replicas if info.cluster and info.cluster.replicas else []
            return info.config.num_replicas == 3 and len(peers) == 2 and all(p.current for p in peers)

        await eventually(replicated, timeout=30, interval=0.2, what="three current replicas")
        assert (await js.stream_info("IOP_SCHEDULING")).state.messages == 5
    finally:
        await nc.close()

    # The stream leader's node killed: the others elect one and still hold all five.
    leader = (await _info(cluster.url, "IOP_SCHEDULING")).cluster.leader  # type: ignore[union-attr]
    index = next(i for i, node in enumerate(cluster.nodes) if node.server_name == leader)
    cluster.stop_node(index, kill=True)
    survivors = ",".join(node.url for i, node in enumerate(cluster.nodes) if i != index)

    async def read_after_election() -> int:
        try:
            info = await _info(survivors, "IOP_SCHEDULING")
        except Exception:  # no leader yet: JetStream answers 503, or the request times out
            return 0
        return int(info.state.messages) if info.cluster and info.cluster.leader else 0

    assert await eventually(read_after_election, timeout=30, interval=0.2, what="a new leader") == 5


async def _info(url: str, stream: str):  # type: ignore[no-untyped-def]
    nc = await connect_once(url)
    try:
        return await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
