"""`iopnet run` keeps the network up: a service that exits unexpectedly (kill -9 here) is
started again after a backoff, logged, and answers /readyz again; the others never stop.
Once through LocalNetwork's supervisor tick directly, once through `iopnet run` itself."""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from iopnet.natsd import free_port
from iopnet.network import LocalNetwork
from iopnet.testing import LineReader, eventually
from tests.conftest import network_settings


@pytest.fixture
def network(tmp_path: Path) -> Iterator[LocalNetwork]:
    settings = network_settings(tmp_path)
    network = LocalNetwork(settings, log_dir=tmp_path)
    try:
        network.start()
        yield network
    finally:
        network.stop()


def ready(network: LocalNetwork, name: str) -> bool:
    try:
        answer = httpx.get(f"{network.url(name)}/readyz", timeout=1)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200 and answer.json().get("service") == name


async def test_a_killed_service_comes_back_with_backoff(network: LocalNetwork) -> None:
    lines: list[str] = []
    others = {name: network.processes[name].pid for name in ("intake", "notifications")}
    first = network.processes["scheduling"].pid
    assert network.signal_service("scheduling", signal.SIGKILL) == -signal.SIGKILL

    async def back() -> bool:
        network.supervise(lines.append)
        return any(line == "scheduling is ready again" for line in lines)

    await eventually(back, timeout=60, interval=0.1, what="scheduling restarted and ready")
    assert lines[0] == "scheduling exited unexpectedly (killed by SIGKILL); restarting in 1s"
    assert lines[1].startswith("scheduling restarted (pid ") and lines[1].endswith("restart 1 in a row)")
    assert network.processes["scheduling"].pid != first and ready(network, "scheduling")
    assert {name: network.processes[name].pid for name in others} == others  # the others ran on

    # Again at once: the next restart waits longer (a service that cannot start does not spin).
    lines.clear()
    network.signal_service("scheduling", signal.SIGKILL)
    await eventually(back, timeout=60, interval=0.1, what="scheduling back a second time")
    assert lines[0] == "scheduling exited unexpectedly (killed by SIGKILL); restarting in 2s"
    assert network.restarts["scheduling"] == 2


def start_run(tmp_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = {name: free_port() for name in ("INTAKE", "SCHEDULING", "NOTIFICATIONS", "CONSOLE", "EMBEDDED_NATS")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOPNET_")}
    env.update({f"IOPNET_{name}_PORT": str(port) for name, port in ports.items()})
    env["IOPNET_DATA_DIR"] = str(tmp_path / ".data")
    process = subprocess.Popen(
        [sys.executable, "-m", "iopnet.cli", "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    return process, ports


def service_pid(run: subprocess.Popen[bytes], name: str) -> int:
    [child] = [c for c in psutil.Process(run.pid).children() if c.cmdline()[-2:] == ["serve", name]]
    return child.pid


def test_iopnet_run_restarts_a_killed_service(tmp_path: Path) -> None:
    run, ports = start_run(tmp_path)
    output = LineReader(run.stdout)
    try:
        output.wait_for("iopnet is up", timeout=90)
        killed = service_pid(run, "notifications")
        os.kill(killed, signal.SIGKILL)
        printed = output.wait_for("notifications is ready again", timeout=60)
        assert "notifications exited unexpectedly (killed by SIGKILL); restarting in 1s" in printed
        assert "notifications restarted (pid " in printed
        assert run.poll() is None  # the network did not stop
        answer = httpx.get(f"http://127.0.0.1:{ports['NOTIFICATIONS']}/readyz", timeout=5)
        assert answer.status_code == 200 and answer.json()["service"] == "notifications"
        assert service_pid(run, "notifications") != killed
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
        code = run.wait(timeout=60)
    assert code == 0
    assert "iopnet stopped" in output.text()
    assert output.text().count("exited unexpectedly") == 1  # Ctrl-C stops; nothing is restarted
