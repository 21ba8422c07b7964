"""Intake's use cases where they add a rule of their own (services/intake/usecases.py):
activation goes through the enrollment lifecycle, and a broken domain rule becomes the
error the API answers with. The rest is pinned end to end in tests/integration."""

from datetime import date, timedelta
from typing import Any, cast

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from services.intake import usecases
from services.intake.domain import IllegalTransition
from shared.domain_errors import DomainError

TODAY = date(2025, 3, 9)


class Recorder:
    """A session that records statements; `rowcount` is what each one reports changed."""

    def __init__(self, rowcount: int = 1) -> None:
        self.statements: list[Any] = []
        self.rowcount = rowcount

    async def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        self.statements.append(statement)
        return self


def episode(status: str) -> dict[str, Any]:
    return {"enrollment_id": "00000000-0000-4000-8000-000000000001", "status": status}


@pytest.mark.parametrize("status", ["active", "discharged", "transferred"])
async def test_activation_refuses_an_episode_that_is_not_pending(status: str) -> None:
    session = Recorder()
    with pytest.raises(IllegalTransition):
        await usecases.activate(cast(AsyncSession, session), episode(status))
    assert session.statements == []


async def test_activation_changes_a_pending_episode_and_records_it() -> None:
    session = Recorder()
    assert await usecases.activate(cast(AsyncSession, session), episode("pending"))
    assert [type(s).__name__ for s in session.statements] == ["Update", "Insert"]


async def test_activation_leaves_an_episode_that_changed_since_it_was_read() -> None:
    session = Recorder(rowcount=0)  # a discharge committed between the read and the update
    assert not await usecases.activate(cast(AsyncSession, session), episode("pending"))
    assert [type(s).__name__ for s in session.statements] == ["Update"]


def test_a_broken_rule_is_invalid_input_on_the_field_it_names() -> None:
    with pytest.raises(DomainError) as raised:
        usecases.check_enrollment(TODAY + timedelta(days=366), TODAY)
    assert raised.value.kind == "invalid"
    assert raised.value.fields == {"start_date": "start date is more than a year away"}
