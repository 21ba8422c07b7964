"""`iopnet bench` with a tiny load completes and reports every figure it promises
(issue 10), and so does `iopnet bench-consumer` (issue 9). No timing is asserted:
timings are the benchmark's output, not a test's."""

import json
import os
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from iopnet.bench import BenchConfig, main
from iopnet.bench_consumer import run
from iopnet.bench_load import local_postgres_server
from iopnet.network import ROUTINE_NICENESS
from tests.conftest import _postgres_admin_url


def test_a_tiny_bench_run_reports_every_figure(tmp_path: Path) -> None:
    config = BenchConfig(patients=12, sites=2, concurrency=4, check_in_rate=40, results_dir=tmp_path)
    path = main(config)
    results = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 10_000  # the plot was drawn

    counts = results["counts"]
    assert counts["enrollments_accepted"] == 12 and counts["check_ins_accepted"] == 12
    assert counts["refused"] == {}
    assert counts["urgent_check_ins"] >= 1 and counts["care_team_alerted"] >= counts["urgent_check_ins"]
    assert counts["welcomes_sent"] == 12
    latency = results["latency_ms"]
    for name in ("enroll_http_ms", "check_in_to_bus_ms", "enrollment_to_welcome_sent_ms", "outbox_lag_ms"):
        assert latency[name]["n"] >= 12 and latency[name]["p50"] <= latency[name]["p99"]
    # Each welcome's time is also given stage by stage (intake's outbox, notifications, its outbox).
    stages = ("welcome_enrollment_to_bus_ms", "welcome_on_bus_to_sent_ms", "welcome_sent_to_bus_ms")
    assert [latency[name]["n"] for name in stages] == [counts["welcomes_sent"]] * 3
    urgent = (
        latency["urgent_to_care_team_alerted_during_drain_ms"]["n"]
        + latency["urgent_to_care_team_alerted_after_drain_ms"]["n"]
    )
    assert urgent == counts["urgent_check_ins"]
    # The last stage too: every urgent check-in's on-call message went out.
    assert counts["on_call_messaged"] == counts["urgent_check_ins"]
    assert latency["urgent_to_care_team_messaged_during_drain_ms"]["n"] <= counts["urgent_check_ins"]
    assert set(results["waves"]) == {"enrollment", "check_in_offered", "check_in_flat_out"}
    assert results["raw_baseline"]["consume_per_s"] > 0 and results["raw_baseline"]["publish_per_s"] > 0
    assert set(results["consumers"]) == {"intake", "scheduling", "notifications"}
    assert results["consumers"]["notifications"]["applied"] >= 12 + 12  # enrollments and check-ins at least
    cost = results["request_cost"]
    assert set(cost) == {"healthz", "check_in", "enrollment"}
    for figures in cost.values():
        assert figures["requests"] == 12 and figures["per_s"] > 0
        assert set(figures["cpu_ms_per_request"]) == {
            "intake", "scheduling", "notifications", "nats-server", "load-generator"
        }  # fmt: skip
        assert all(ms >= 0 for ms in figures["cpu_ms_per_request"].values())
    # CPU time is counted in 10 ms ticks: 12 /healthz may round to 0, 12 check-ins do not.
    assert cost["check_in"]["cpu_ms_per_request"]["intake"] > 0
    # An enrollment is counted until its welcome is sent: scheduling books it, notifications plans and sends.
    assert all(cost["enrollment"]["cpu_ms_per_request"][name] > 0 for name in ("intake", "notifications"))
    assert all(figures["settled"] for figures in cost.values())  # the cost phase's welcomes too
    assert set(results["processes"]) == {"intake", "scheduling", "notifications", "nats-server", "load-generator"}
    assert all(p["peak_rss_mb"] > 0 for p in results["processes"].values())
    # Scheduling does routine work only: it yields the cores to the services carrying safety
    # work (IOPNET_CPU_NICE, set by the local network; `ps -o ni` shows the same).
    niceness = {name: p["niceness"] for name, p in results["processes"].items()}
    assert niceness["scheduling"] == ROUTINE_NICENESS
    assert niceness["intake"] == niceness["notifications"] == niceness["load-generator"]
    assert niceness["intake"] < ROUTINE_NICENESS


@pytest.mark.postgres
def test_on_postgresql_the_safety_lane_runs_in_a_process_of_its_own(tmp_path: Path) -> None:
    """`iopnet bench --postgres`: notifications' safety lane in `notifications-safety`
    (IOPNET_LANES=safety), the rest in `notifications`; every check-in read there, the
    alerts raised, the welcomes sent by the other. Here with intake in two processes
    (`--replicas intake=2`), the requests going round them."""
    admin = _postgres_admin_url()
    if admin is None:
        pytest.skip("PostgreSQL case skipped: set IOPNET_TEST_POSTGRES_URL or run Docker for testcontainers")
    config = BenchConfig(
        patients=12, sites=2, concurrency=4, check_in_rate=40, results_dir=tmp_path, postgres=admin,
        replicas={"intake": 2},
    )  # fmt: skip
    results = json.loads(main(config).read_text())
    assert results["config"]["database"] == "postgresql" and results["config"]["safety_process"] is True
    assert results["config"]["replicas"] == {"intake": 2} and "intake-2" in results["processes"]
    counts = results["counts"]
    assert counts["check_ins_accepted"] == 12 and counts["welcomes_sent"] == 12
    assert counts["care_team_alerted"] >= counts["urgent_check_ins"] >= 1
    consumers = results["consumers"]
    assert consumers["notifications-safety"]["applied"] >= 12  # the check-ins (and the cost probe's)
    assert consumers["notifications"]["applied"] >= 12  # the enrollments
    assert "notifications-safety" in results["processes"]
    # The routine lane's process and scheduling yield the cores; the safety lane and intake do not.
    niceness = {name: p["niceness"] for name, p in results["processes"].items()}
    assert niceness["notifications"] == niceness["scheduling"] == ROUTINE_NICENESS
    assert niceness["notifications-safety"] == niceness["intake"] < ROUTINE_NICENESS
    # The database server shares the cores: its CPU in the run is reported when it runs here
    # (the machine's own server, as on CI; not one in a container, whose port is forwarded).
    server = local_postgres_server(make_url(admin).host, make_url(admin).port or 5432)
    if os.environ.get("IOPNET_TEST_POSTGRES_URL"):
        assert server is not None, "the PostgreSQL server of IOPNET_TEST_POSTGRES_URL runs on this machine"
    if server is not None:
        assert results["processes"]["postgresql"]["cpu_seconds"] > 0
        assert results["processes"]["postgresql"]["peak_rss_mb"] is None  # its processes share memory


async def test_a_tiny_consumer_bench_drains_every_message_with_each_consumer() -> None:
    """`iopnet bench-consumer`: each of the three consumers drains the same events; no
    timing asserted, only that every rate and ratio is reported from a full drain."""
    results = await run(messages=40, rounds=1)
    for name in ("raw_msgs_per_s", "raw_batched_inbox_msgs_per_s", "iopnet_msgs_per_s"):
        assert len(results[name]) == 1 and results[name][0] > 0
    assert results["ratio_iopnet_to_raw"] > 0 and results["ratio_iopnet_to_raw_batched_inbox"] > 0
