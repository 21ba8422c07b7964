"""The local network (`iopnet run`, `iopnet bench`) starts the processes that do routine
work only at a lower CPU priority, so that on one busy host the safety work and the
requests people wait for get the cores first (issue 10); a process applies it itself
(IOPNET_CPU_NICE, shared.runtime.run_at_niceness)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from iopnet.network import ROUTINE_NICENESS, SAFETY_LANE_INSTANCE, LocalNetwork
from shared.runtime import session_niceness
from shared.settings import Settings

POSTGRES = "postgresql+asyncpg://iopnet@127.0.0.1:5999/{}"


def settings(tmp_path: Path, *, postgres: bool) -> Settings:
    urls = {f"{name}_database_url": POSTGRES.format(name) for name in ("intake", "scheduling", "notifications")}
    return Settings(data_dir=tmp_path / "data", nats_url="nats://127.0.0.1:4999", **(urls if postgres else {}))


def niceness_given(network: LocalNetwork) -> dict[str, str | None]:
    return {instance: network.instance_env(instance).get("IOPNET_CPU_NICE") for instance in network.instances}


def test_scheduling_and_the_routine_lane_yield_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOPNET_CPU_NICE", raising=False)
    split = LocalNetwork(settings(tmp_path, postgres=True), safety_lane_process=True)
    routine = str(ROUTINE_NICENESS)
    assert niceness_given(split) == {
        "intake": None, "scheduling": routine, "notifications": routine, SAFETY_LANE_INSTANCE: None
    }  # fmt: skip
    # One notifications process reads the safety lane too: it keeps the full priority.
    single = LocalNetwork(settings(tmp_path, postgres=False), console=True)
    assert niceness_given(single) == {"intake": None, "scheduling": routine, "notifications": None, "console": None}


def test_a_niceness_the_caller_set_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOPNET_CPU_NICE", "0")  # e.g. a host where the services have it alone
    network = LocalNetwork(settings(tmp_path, postgres=False))
    assert set(niceness_given(network).values()) == {"0"}


def niceness_after(niceness: int, *, started_at: int = 0) -> int:
    """The niceness of a fresh process started at `started_at` that asks for `niceness`."""
    program = (
        "import os; from shared.runtime import run_at_niceness; "
        f"run_at_niceness({niceness}); print(os.getpriority(os.PRIO_PROCESS, 0))"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=(lambda: os.nice(started_at)) if started_at else None,
    )
    return int(done.stdout)


def test_a_process_raises_its_niceness_and_keeps_a_higher_one() -> None:
    assert os.getpriority(os.PRIO_PROCESS, 0) < 7, "this test needs to run below niceness 7"
    assert niceness_after(7) == 7
    assert niceness_after(0) == os.getpriority(os.PRIO_PROCESS, 0)
    assert niceness_after(7, started_at=12) >= 12  # lowering it would need a privilege


def autogroup_after(niceness: int, *, own_session: bool) -> int | None:
    """The autogroup niceness of a fresh process that asks for `niceness`."""
    program = (
        "from shared.runtime import run_at_niceness, session_niceness; "
        f"run_at_niceness({niceness}); print(session_niceness())"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, start_new_session=own_session
    )
    return None if done.stdout.strip() == "None" else int(done.stdout)


def test_a_process_leading_its_own_session_gives_the_session_its_niceness_and_never_the_callers() -> None:
    # Autogroups: the kernel shares the cores between sessions first, so the niceness of a
    # process leading its own session (as `iopnet run` starts each) is its session's.
    ours = session_niceness()
    assert ours is None or ours < 7, "this test needs a session below niceness 7"
    assert autogroup_after(7, own_session=True) == 7
    # In the caller's session (a terminal's, this test's), it would slow all of it: left alone.
    # Where that session is in the root group (a CI runner started from init), it has none.
    assert autogroup_after(7, own_session=False) == ours
    assert session_niceness() == ours


def test_a_session_in_the_root_group_reads_as_having_no_autogroup_niceness(tmp_path: Path) -> None:
    # A session in the root group (init's, a CI runner's started from it) reads empty: once
    # that made `run_at_niceness` fail with an IndexError.
    (tmp_path / "85").mkdir()
    (tmp_path / "85" / "autogroup").write_text("/autogroup-85 nice 3\n")
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "autogroup").write_text("")
    assert session_niceness(85, proc=tmp_path) == 3
    assert session_niceness(1, proc=tmp_path) is None
    assert session_niceness(2, proc=tmp_path) is None  # a kernel without autogroups
