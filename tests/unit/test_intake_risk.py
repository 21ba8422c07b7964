"""Check-in risk scoring, rule by rule (services/intake/domain.py: score_risk), and the
consent and episode rules around it."""

from datetime import UTC, date, datetime

import pytest

from services.intake import domain
from services.intake.domain import ConsentState, Risk


def score(mood=6, craving=2, used=False, safety=False, previous=()):
    return domain.score_risk(
        mood=mood, craving=craving, used_since_last=used, safety_concern=safety, previous_cravings=list(previous)
    )


def test_calm_day_is_low() -> None:
    assert score() == (Risk.LOW, [])


def test_safety_concern_is_urgent_whatever_else() -> None:
    assert score(mood=9, craving=0, safety=True) == (Risk.URGENT, ["safety_concern"])


def test_use_with_craving_8_or_more_is_urgent() -> None:
    assert score(used=True, craving=8) == (Risk.URGENT, ["use_with_high_craving"])
    assert score(used=True, craving=10, safety=True)[1] == ["safety_concern", "use_with_high_craving"]


def test_use_with_craving_7_is_elevated_not_urgent() -> None:
    assert score(used=True, craving=7) == (Risk.ELEVATED, ["high_craving", "use_since_last"])


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"craving": 7}, "high_craving"),
        ({"used": True, "craving": 1}, "use_since_last"),
        ({"mood": 3}, "low_mood"),
        ({"craving": 4, "previous": (2, 3)}, "craving_rising"),
    ],
)
def test_each_elevated_rule_alone(kwargs: dict, reason: str) -> None:
    assert score(**kwargs) == (Risk.ELEVATED, [reason])


@pytest.mark.parametrize(
    "previous",
    [(3, 3), (2,), (), (5, 4), (1, 2, 6)],  # flat, too short, none, falling, last two not below
)
def test_craving_not_rising_three_in_a_row(previous: tuple[int, ...]) -> None:
    assert score(craving=4, previous=previous)[0] is Risk.LOW


def test_mood_4_and_craving_6_stay_low() -> None:
    assert score(mood=4, craving=6) == (Risk.LOW, [])


def test_consent_states() -> None:
    today = date(2026, 12, 1)
    base = {"revoked_at": None, "expires_on": None, "expires_event": "end_of_treatment", "today": today}
    assert domain.consent_state(**base, episode_ended=False) is ConsentState.ACTIVE
    assert domain.consent_state(**base, episode_ended=True) is ConsentState.EXPIRED
    revoked = {**base, "revoked_at": datetime(2026, 11, 30, tzinfo=UTC)}
    assert domain.consent_state(**revoked, episode_ended=False) is ConsentState.REVOKED
    dated = {**base, "expires_event": None, "expires_on": date(2026, 11, 30)}
    assert domain.consent_state(**dated, episode_ended=False) is ConsentState.EXPIRED
    assert domain.consent_state(**{**dated, "today": date(2026, 11, 30)}, episode_ended=False) is ConsentState.ACTIVE


def test_consent_dates() -> None:
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    with pytest.raises(domain.DomainError):
        domain.check_consent_dates(datetime(2026, 12, 2, tzinfo=UTC), None, "end_of_treatment", now)
    with pytest.raises(domain.DomainError):
        domain.check_consent_dates(now, None, None, now)
    with pytest.raises(domain.DomainError):
        domain.check_consent_dates(now, date(2026, 12, 31), "end_of_treatment", now)
    with pytest.raises(domain.DomainError):
        domain.check_consent_dates(now, date(2026, 11, 1), None, now)
    domain.check_consent_dates(now, date(2026, 12, 31), None, now)
    with pytest.raises(domain.IllegalTransition):
        domain.check_revocation(ConsentState.REVOKED)


def test_level_changes() -> None:
    assert domain.level_change("2.1", "1.0") is domain.LevelChange.STEP_DOWN
    assert domain.level_change("2.1", "2.5") is domain.LevelChange.STEP_UP
    with pytest.raises(domain.IllegalTransition):
        domain.level_change("2.1", "2.1")


def test_goal_status_changes() -> None:
    domain.check_goal_status_change("active", "met")
    domain.check_goal_status_change("met", "active")
    with pytest.raises(domain.IllegalTransition):
        domain.check_goal_status_change("met", "met")
