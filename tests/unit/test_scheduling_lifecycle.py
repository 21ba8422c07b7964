"""Scheduling's episode lifecycle rules (services/scheduling/domain.py): an end that
arrives before its enrollment opens the episode ended, the first end of an episode
stays, and only an active episode holds places."""

from datetime import date

import pytest

from services.scheduling import domain
from services.scheduling.domain import EpisodeEnd

DISCHARGED = EpisodeEnd("discharged", date(2026, 12, 3))
TRANSFERRED = EpisodeEnd("transferred", date(2026, 12, 4))


def test_an_enrollment_without_a_known_end_opens_active() -> None:
    assert domain.opening_status(None) == "active"


@pytest.mark.parametrize("end", [DISCHARGED, TRANSFERRED])
def test_an_enrollment_whose_end_came_first_opens_ended(end: EpisodeEnd) -> None:
    status = domain.opening_status(end)
    assert status == end.status
    assert not domain.holds_places(status)


@pytest.mark.parametrize(
    ("current", "end", "expected"),
    [
        ("active", DISCHARGED, "discharged"),
        ("active", TRANSFERRED, "transferred"),
        ("transferred", DISCHARGED, "transferred"),  # the first end stays
        ("discharged", TRANSFERRED, "discharged"),
        ("discharged", DISCHARGED, "discharged"),  # a redelivery or a reapply
    ],
)
def test_an_end_applies_to_an_active_episode_only(current: str, end: EpisodeEnd, expected: str) -> None:
    assert domain.status_after_end(current, end) == expected


def test_only_an_active_episode_holds_places() -> None:
    assert domain.holds_places("active")
    assert not domain.holds_places("discharged")
    assert not domain.holds_places("transferred")
