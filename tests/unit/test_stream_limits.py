"""Stream replicas and retention from the settings (IOPNET_STREAM_*, IOPNET_DLQ_*, IOPNET_FEED_*)."""

import pytest
from pydantic import ValidationError

from shared.messaging.streams import STREAMS, Retention, StreamLimits, stream_config
from shared.settings import Settings

DAY = 86400.0


def test_defaults_one_replica_and_a_limit_on_every_stream() -> None:
    limits = StreamLimits.from_settings(Settings(_env_file=None))
    assert limits == StreamLimits()
    for spec in STREAMS.values():
        config = stream_config(spec, 120, limits)
        assert config.num_replicas == 1
        assert config.max_age and config.max_age > 0, spec.name
        assert config.max_bytes and config.max_bytes > 0, spec.name
        assert config.max_age > 120, "the duplicate window fits in the retention"
    assert stream_config(STREAMS["IOP_INTAKE"], 120, limits).max_age == 90 * DAY
    assert stream_config(STREAMS["IOP_DLQ"], 120, limits).max_age == 180 * DAY
    assert stream_config(STREAMS["IOP_FEED"], 120, limits).max_age == 30 * DAY
    # What each node reserves for the six streams fits the deployed store (8 GiB).
    reserved = sum(limits.retention(name).max_bytes for name in STREAMS)
    assert reserved <= 8 * 1024**3


def test_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOPNET_STREAM_REPLICAS", "3")
    monkeypatch.setenv("IOPNET_STREAM_MAX_AGE_DAYS", "7")
    monkeypatch.setenv("IOPNET_STREAM_MAX_BYTES", "1000000")
    monkeypatch.setenv("IOPNET_DLQ_MAX_AGE_DAYS", "1.5")
    monkeypatch.setenv("IOPNET_FEED_MAX_BYTES", "2000000")
    limits = StreamLimits.from_settings(Settings())
    assert limits.replicas == 3
    assert limits.events == Retention(7 * DAY, 1_000_000)
    assert limits.dlq.max_age_seconds == 1.5 * DAY
    assert limits.feed.max_bytes == 2_000_000
    restricted = stream_config(STREAMS["IOP_RESTRICTED"], 120, limits)
    assert (restricted.num_replicas, restricted.max_age, restricted.max_bytes) == (3, 7 * DAY, 1_000_000)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("IOPNET_STREAM_REPLICAS", "0"), ("IOPNET_STREAM_REPLICAS", "6"), ("IOPNET_STREAM_MAX_BYTES", "0")],
)
def test_refused_values(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        Settings()
