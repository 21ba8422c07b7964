"""`IOPNET_LANES`: which subscriptions a process consumes, and the configurations refused."""

import os
import subprocess
import sys

import pytest

from services.intake.handlers import SUBSCRIPTIONS as INTAKE
from services.notifications import usecases
from services.notifications.handlers import Handlers
from shared.runtime import lanes_of_this_process
from shared.settings import Settings

POSTGRES = "postgresql+asyncpg://db/notifications"


def notifications() -> list:
    return Handlers(usecases.Policy.from_settings(Settings())).subscriptions()


def test_the_safety_process_reads_the_safety_lane_and_the_routine_one_the_rest() -> None:
    every = notifications()
    safety = lanes_of_this_process("notifications", every, "safety", POSTGRES)
    routine = lanes_of_this_process("notifications", every, "routine", POSTGRES)
    assert [s.durable("notifications") for s in safety] == ["notifications-IOP_INTAKE-safety"]
    assert sorted(s.durable("notifications") for s in safety + routine) == sorted(
        s.durable("notifications") for s in every
    )
    assert lanes_of_this_process("notifications", every, "all", "sqlite+aiosqlite:///x.db") == every


def test_only_scheduling_events_plan_for_later_in_notifications() -> None:
    """Their reminders are due a day ahead: their batches wait behind the consumers of
    contacts and enrollments, which plan the welcome (shared/priority.py, later_work)."""
    later = sorted(s.durable("notifications") for s in notifications() if s.later)
    assert later == ["notifications-IOP_SCHEDULING"]


def test_sqlite_takes_one_process_for_every_lane() -> None:
    with pytest.raises(ValueError, match="IOPNET_LANES=routine needs PostgreSQL"):
        lanes_of_this_process("notifications", notifications(), "routine", "sqlite+aiosqlite:///x.db")


def test_a_service_without_a_safety_lane_is_not_split() -> None:
    with pytest.raises(ValueError, match="intake has no safety lane"):
        lanes_of_this_process("intake", INTAKE, "safety", POSTGRES)


def test_lanes_setting_is_validated() -> None:
    assert Settings(lanes="safety").lanes == "safety"
    with pytest.raises(ValueError, match="lanes"):
        Settings(lanes="urgent")


def test_iopnet_serve_refuses_a_split_on_sqlite_with_a_clear_message(tmp_path) -> None:
    env = {**os.environ, "IOPNET_LANES": "safety", "IOPNET_DATA_DIR": str(tmp_path)}
    env.pop("IOPNET_NOTIFICATIONS_DATABASE_URL", None)  # the default: SQLite in the data dir
    result = subprocess.run(
        [sys.executable, "-m", "iopnet.cli", "serve", "notifications"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "iopnet serve notifications: IOPNET_LANES=safety needs PostgreSQL: on SQLite one process reads every lane"
    )


def _routine_budgets(settings: Settings) -> set[float]:
    from services.scheduling.app import create_app

    return {consumer.transaction_budget_seconds for consumer in create_app(settings).state.runtime.consumers}


def test_a_routine_batch_commits_sooner_on_sqlite_than_on_postgresql(tmp_path) -> None:
    """SQLite's one writer is what a check-in waits for: its routine transactions stay short.
    On PostgreSQL nothing waits for them, and a longer one reads shared rows once for more
    events. A setting overrides either."""
    sqlite = Settings(data_dir=tmp_path)
    postgres = Settings(data_dir=tmp_path, scheduling_database_url=POSTGRES.replace("notifications", "scheduling"))
    assert _routine_budgets(sqlite) == {0.1}
    assert _routine_budgets(postgres) == {0.5}
    assert _routine_budgets(Settings(data_dir=tmp_path, routine_transaction_seconds=0.25)) == {0.25}
    with pytest.raises(ValueError, match="routine_transaction_seconds"):
        Settings(routine_transaction_seconds=0)
