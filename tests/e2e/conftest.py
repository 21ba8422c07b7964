"""The whole network as separate processes: a nats-server and `iopnet serve` x3."""

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from iopnet.natsd import free_port
from iopnet.network import LocalNetwork
from shared.settings import Settings
from tests.conftest import TEST_SECRET


@pytest.fixture
def network(tmp_path: Path) -> Iterator[LocalNetwork]:
    settings = Settings(
        data_dir=tmp_path / "data",
        nats_url=None,
        jwt_secret=TEST_SECRET,
        embedded_nats_port=free_port(),
        intake_port=free_port(),
        scheduling_port=free_port(),
        notifications_port=free_port(),
    )
    network = LocalNetwork(settings, log_dir=tmp_path)
    try:
        network.start()
        yield network
    finally:
        codes = network.stop()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: exit status -15.
    assert all(code in (0, -signal.SIGTERM) for code in codes.values()), f"unclean service exit: {codes}"
    for name in codes:
        assert "Application shutdown complete" in (tmp_path / f"{name}.log").read_text(), name
