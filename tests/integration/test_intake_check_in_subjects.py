"""What a check-in group reads before it scores (services/intake/store.py,
check_in_subjects), on SQLite and PostgreSQL: each patient with their open episode and that
episode's last cravings, in one statement, where three were one round trip each."""

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.intake import store
from shared.db import create_engine, insert_rows
from tests.conftest import Statements

OPEN = ["pending", "active"]
START = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(store.metadata.create_all)
    yield async_sessionmaker(engine, expire_on_commit=False)
    await engine.dispose()


def patient(patient_id: str) -> dict[str, Any]:
    return {
        "patient_id": patient_id, "site_id": "north", "mrn": f"MRN-{patient_id}", "given_name": "A",
        "family_name": "B", "name_key": f"b a {patient_id}", "birth_date": date(1990, 1, 1), "phone": None,
        "email": None, "preferred_channel": "sms", "language": "en", "created_at": START, "updated_at": None,
    }  # fmt: skip


def episode(enrollment_id: str, patient_id: str, status: str, created_days_ago: int) -> dict[str, Any]:
    return {
        "enrollment_id": enrollment_id, "patient_id": patient_id, "site_id": "north", "program_id": "iop-1",
        "level_of_care": "2.1", "cohort": "morning", "start_date": date(2026, 11, 2),
        "referral_source": "self", "status": status, "correlation_id": f"c-{enrollment_id}",
        "created_at": START - timedelta(days=created_days_ago), "ended_on": None,
    }  # fmt: skip


def check_in(enrollment_id: str, patient_id: str, craving: int, day: int) -> dict[str, Any]:
    return {
        "check_in_id": f"{enrollment_id}-{day}", "patient_id": patient_id, "enrollment_id": enrollment_id,
        "site_id": "north", "submitted_at": START + timedelta(days=day), "submitted_by": "p",
        "submitted_role": "patient", "mood": 3, "craving": craving, "used_since_last": False, "substances": "[]",
        "sleep_hours": None, "safety_concern": False, "goals": None, "challenges": None, "risk": "low",
        "risk_reasons": "[]",
    }  # fmt: skip


async def test_each_patient_comes_with_their_open_episode_and_its_last_cravings_in_one_statement(sessions) -> None:
    async with sessions() as session, session.begin():
        await insert_rows(
            session, store.sites, [{"site_id": "north", "name": "North", "timezone": "UTC", "created_at": START}]
        )
        await insert_rows(session, store.patients, [patient(p) for p in ("p-trend", "p-new", "p-done")])
        await insert_rows(
            session,
            store.enrollments,
            [
                episode("e-before", "p-trend", "discharged", created_days_ago=200),
                episode("e-now", "p-trend", "active", created_days_ago=10),
                episode("e-new", "p-new", "pending", created_days_ago=1),
                episode("e-done", "p-done", "discharged", created_days_ago=90),
            ],
        )
        await insert_rows(
            session,
            store.check_ins,
            [
                # The earlier episode's cravings are later in time here: they still are not this one's.
                check_in("e-before", "p-trend", craving=9, day=5),
                check_in("e-now", "p-trend", craving=2, day=1),
                check_in("e-now", "p-trend", craving=4, day=2),
                check_in("e-now", "p-trend", craving=6, day=3),
                check_in("e-done", "p-done", craving=7, day=1),
            ],
        )
    async with sessions() as session, session.begin():
        async with Statements(session) as statements:
            subjects = await store.check_in_subjects(session, ["p-trend", "p-new", "p-done", "p-unknown"], OPEN)
        assert len(statements.sent) == 1

    assert set(subjects) == {"p-trend", "p-new", "p-done"}  # an unknown patient is absent
    trend = subjects["p-trend"]
    assert trend.patient["mrn"] == "MRN-p-trend"
    assert trend.patient["birth_date"] == date(1990, 1, 1)
    assert trend.episode is not None and trend.episode["enrollment_id"] == "e-now"
    assert trend.episode["created_at"] == START - timedelta(days=10)
    assert trend.recent_cravings == [4, 6]  # the last two of the open episode, oldest first
    new = subjects["p-new"]
    assert new.episode is not None and new.episode["status"] == "pending"
    assert new.recent_cravings == []
    done = subjects["p-done"]
    assert done.episode is None and done.recent_cravings == []  # no open episode: nothing to score against


async def test_an_episodes_last_cravings_come_from_its_index_however_long_its_history(tmp_path) -> None:
    # A patient months into their program has made a check-in a day: the trend reads two rows
    # of the index, not every check-in (a window over all of them took 9-21 ms for 64 patients).
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'intake.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(store.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as session, session.begin():
        await insert_rows(
            session, store.sites, [{"site_id": "north", "name": "North", "timezone": "UTC", "created_at": START}]
        )
        await insert_rows(session, store.patients, [patient("p-long")])
        await insert_rows(session, store.enrollments, [episode("e-long", "p-long", "active", created_days_ago=1)])
        await insert_rows(session, store.check_ins, [check_in("e-long", "p-long", day % 10, day) for day in range(120)])
    async with sessions() as session, session.begin():
        subjects = await store.check_in_subjects(session, ["p-long"], OPEN)
        assert subjects["p-long"].recent_cravings == [8, 9]  # days 118 and 119
        statement = store._CHECK_IN_SUBJECTS.params(patient_ids=["p-long"], open_statuses=OPEN)
        compiled = str(statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
        plan = " | ".join(row[3] for row in await session.execute(text(f"EXPLAIN QUERY PLAN {compiled}")))
    await engine.dispose()
    assert "SEARCH check_ins USING INDEX ix_check_ins_episode_recent" in plan, plan
    assert "SCAN check_ins" not in plan, plan
