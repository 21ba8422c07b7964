"""The whole network as separate processes: a nats-server and `iopnet serve` x3."""

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from iopnet.network import LocalNetwork
from tests.conftest import network_settings


@pytest.fixture
def network(tmp_path: Path) -> Iterator[LocalNetwork]:
    settings = network_settings(tmp_path)
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
