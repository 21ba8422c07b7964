"""What a late event may still change in notifications (services/notifications/domain.py):
an end before its enrollment, the later of a booking's events, a cancelled session, and
which episodes let session messages be planned."""

from datetime import UTC, date, datetime, timedelta

import pytest

from services.notifications import domain
from services.notifications.domain import EpisodeEnd

T0 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
LATER = T0 + timedelta(seconds=1)
DISCHARGED = EpisodeEnd("discharged", date(2026, 12, 3))


def test_an_enrollment_whose_discharge_came_first_opens_discharged() -> None:
    assert domain.opening_status(DISCHARGED) == "discharged"
    assert domain.opening_status(None) == "active"


def test_the_first_end_of_an_episode_stays() -> None:
    assert domain.status_after_end("active", DISCHARGED) == "discharged"
    assert domain.status_after_end("transferred", DISCHARGED) == "transferred"


@pytest.mark.parametrize(
    ("statuses", "allowed"),
    [
        ([], True),  # nothing known yet: the enrollment may come later on its own stream
        (["active"], True),
        (["discharged", "active"], True),  # readmitted
        (["discharged"], False),
        (["transferred", "discharged"], False),
    ],
)
def test_session_messages_are_planned_unless_every_episode_ended(statuses: list[str], allowed: bool) -> None:
    assert domain.may_plan_for(statuses) is allowed


@pytest.mark.parametrize(
    ("stored_at", "stored_status", "incoming_at", "incoming_status", "applies"),
    [
        (None, None, T0, "booked", True),
        (LATER, "cancelled", T0, "booked", False),  # the booking arrives after its cancellation
        (T0, "cancelled", LATER, "booked", True),  # re-booked later: applies
        (LATER, "booked", T0, "cancelled", False),  # an old cancellation after a re-booking
        (T0, "booked", LATER, "cancelled", True),
        (T0, "booked", T0, "cancelled", True),  # a tie: the cancellation wins
        (T0, "cancelled", T0, "booked", False),
        (T0, "booked", T0, "booked", True),  # the same event again (a repair) converges
    ],
)
def test_the_later_booking_event_wins(
    stored_at: datetime | None, stored_status: str | None, incoming_at: datetime, incoming_status: str, applies: bool
) -> None:
    assert domain.booking_event_applies(stored_at, stored_status, incoming_at, incoming_status) is applies


@pytest.mark.parametrize(
    ("stored", "incoming", "kept"),
    [
        (None, "scheduled", "scheduled"),
        ("scheduled", "cancelled", "cancelled"),
        ("cancelled", "scheduled", "cancelled"),
    ],
)
def test_a_cancelled_session_stays_cancelled(stored: str | None, incoming: str, kept: str) -> None:
    assert domain.session_status_after(stored, incoming) == kept
