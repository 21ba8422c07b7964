"""Services in several processes on the local network (`iopnet bench --replicas`): how
many of each, parsed from the command line, and refused where they cannot work."""

from pathlib import Path
from typing import cast

import pytest
from typer.testing import CliRunner

from iopnet.bench import BenchConfig, Clinics
from iopnet.bench_http import LoadClient
from iopnet.cli import app as cli
from iopnet.network import SAFETY_LANE_INSTANCE, LocalNetwork, service_replicas
from tests.unit.test_network_priority import settings


def test_replicas_read_as_one_count_for_all_or_a_count_per_service() -> None:
    assert service_replicas("2") == {"intake": 2, "scheduling": 2, "notifications": 2}
    assert service_replicas(" intake=3, notifications=2 ") == {"intake": 3, "notifications": 2}


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("0", "from 1 to 8"),
        ("intake=9", "from 1 to 8"),
        ("billing=2", "'billing' is not a service"),
        ("intake=two", "write N, or service=N"),
        ("intake", "write N, or service=N"),
    ],
)
def test_a_bad_replica_count_is_refused_with_what_to_write(given: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        service_replicas(given)


def test_each_service_gets_the_processes_it_was_given(tmp_path: Path) -> None:
    network = LocalNetwork(
        settings(tmp_path, postgres=True), replicas={"intake": 3, "notifications": 2}, safety_lane_process=True
    )
    assert network.replicas("intake") == ["intake", "intake-2", "intake-3"]
    assert network.replicas("scheduling") == ["scheduling"]
    # The safety lane stays one process of its own; the routine lanes are shared by two.
    assert network.replicas("notifications") == ["notifications", "notifications-2", SAFETY_LANE_INSTANCE]
    assert {network.lanes[i] for i in ("notifications", "notifications-2")} == {"routine"}
    ports = [port for _, port in network.instances.values()]
    assert len(ports) == len(set(ports)), "each process listens on a port of its own"


def test_several_processes_of_a_service_on_sqlite_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need PostgreSQL"):
        LocalNetwork(settings(tmp_path, postgres=False), replicas={"intake": 2})
    LocalNetwork(settings(tmp_path, postgres=False), replicas={"intake": 1})  # one is what SQLite takes


def test_the_bench_sends_its_requests_round_intakes_processes(tmp_path: Path) -> None:
    network = LocalNetwork(settings(tmp_path, postgres=True), replicas={"intake": 2})
    clinics = Clinics(network, cast("LoadClient", None), BenchConfig())  # no request is sent here
    answered_by = [clinics.url("intake", "/patients") for _ in range(4)]
    first, second = network.url("intake"), network.url("intake-2")
    assert answered_by == [f"{first}/patients", f"{second}/patients"] * 2
    assert clinics.url("scheduling", "/programs") == f"{network.url('scheduling')}/programs"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--replicas", "intake=2"], "needs --postgres"),
        (["--replicas", "intake=x", "--postgres", "postgresql://postgres@127.0.0.1:5999/x"], "write N, or service=N"),
    ],
)
def test_the_bench_command_refuses_replicas_it_cannot_run(args: list[str], says: str) -> None:
    refused = CliRunner().invoke(cli, ["bench", *args])  # refused before any process starts
    assert refused.exit_code == 2 and says in " ".join(refused.output.split())
