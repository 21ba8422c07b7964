"""The whole network as separate processes: a nats-server and `iopnet serve` x3."""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from iopnet.natsd import NatsServer, free_port
from iopnet.testing import wait_until
from tests.conftest import TEST_SECRET

SERVICES = ("intake", "scheduling", "notifications")


@dataclass
class Network:
    nats: NatsServer
    urls: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]]
    env: dict[str, str]
    logs: Path


def start_service(name: str, env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child process
    return subprocess.Popen(
        [sys.executable, "-m", "iopnet.cli", "serve", name], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def wait_ready(urls: dict[str, str], processes: dict[str, subprocess.Popen[bytes]], timeout: float = 60) -> None:
    def all_ready() -> bool:
        with httpx.Client(timeout=1) as client:
            for name, url in urls.items():
                assert processes[name].poll() is None, f"{name} exited with {processes[name].returncode}"
                try:
                    if client.get(f"{url}/readyz").status_code != 200:
                        return False
                except httpx.HTTPError:
                    return False
        return True

    wait_until(all_ready, timeout=timeout, what="all services ready")


def stop_service(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    nats = NatsServer(tmp_path / "nats", port=free_port()).start()
    ports = {name: free_port() for name in SERVICES}
    env = {
        **os.environ,
        "IOPNET_NATS_URL": nats.url,
        "IOPNET_DATA_DIR": str(tmp_path / "data"),
        "IOPNET_JWT_SECRET": TEST_SECRET,
        **{f"IOPNET_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    }
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    processes = {name: start_service(name, env, tmp_path) for name in SERVICES}
    network = Network(nats, urls, processes, env, tmp_path)
    try:
        wait_ready(urls, processes)
        yield network
    finally:
        codes = {name: stop_service(p) for name, p in network.processes.items() if p.poll() is None}
        nats.stop()
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it: exit status -15.
        assert all(code in (0, -signal.SIGTERM) for code in codes.values()), f"unclean service exit: {codes}"
        for name in codes:
            assert "Application shutdown complete" in (tmp_path / f"{name}.log").read_text(), name
