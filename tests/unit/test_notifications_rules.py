"""Notification rules free of I/O (services/notifications/domain.py): the consent gate,
quiet and business hours in site time (DST included), reminder times, absence streaks,
retry backoff, webhook signatures and the escalation order."""

import hashlib
import hmac
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.notifications import domain
from services.notifications.domain import AttendanceMark, Consent, Window

NY = "America/New_York"
QUIET = Window(time(21), time(8))
TODAY = date(2026, 6, 10)


def local(zone: str, y: int, m: int, d: int, hh: int, mm: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=ZoneInfo(zone)).astimezone(UTC)


# --- consent ----------------------------------------------------------------------------------


def consent(recipient="org:iopnet-notifications", purpose="appointment_reminders", expires_on=None, revoked=False):
    return Consent(recipient, purpose, expires_on, revoked)


@pytest.mark.parametrize(
    ("recipient", "purpose", "covers"),
    [
        ("org:iopnet-notifications", "appointment_reminders", True),
        ("class:treating_providers", "care_coordination", True),
        (" CLASS:Treating_Providers ", "Care_Coordination", True),
        ("org:iopnet-notifications", "payment", False),
        ("org:acme-employer", "appointment_reminders", False),
        ("class:treating_providers", "research", False),
        ("org:county-court", "court_reporting", False),
    ],
)
def test_which_consents_cover_patient_messages(recipient, purpose, covers):
    assert domain.consent_covers(recipient, purpose) is covers


@pytest.mark.parametrize("live", [True, False])
def test_an_active_covering_consent_allows(live):
    assert domain.consent_verdict([consent()], TODAY, live=live) == "allow"
    assert domain.consent_verdict([consent(expires_on=TODAY)], TODAY, live=live) == "allow"


def test_live_channels_hold_messages_without_consent():
    assert domain.consent_verdict([], TODAY, live=True) == "hold"
    assert domain.consent_verdict([consent(purpose="payment")], TODAY, live=True) == "hold"
    expired = consent(expires_on=TODAY - timedelta(days=1))
    assert domain.consent_verdict([expired], TODAY, live=True) == "hold"


def test_the_console_sends_without_consent_on_record_but_never_after_a_refusal():
    assert domain.consent_verdict([], TODAY, live=False) == "allow"
    assert domain.consent_verdict([consent(revoked=True)], TODAY, live=False) == "refused"
    assert domain.consent_verdict([consent(revoked=True)], TODAY, live=True) == "refused"


def test_another_active_consent_survives_a_revocation():
    both = [consent(revoked=True), consent("class:treating_providers", "care_coordination")]
    assert domain.consent_verdict(both, TODAY, live=True) == "allow"


# --- quiet hours and business hours -------------------------------------------------------------


@pytest.mark.parametrize(
    ("wall", "expected_wall"),
    [
        ((22, 30), (8, 0)),
        ((3, 0), (8, 0)),
        ((7, 59), (8, 0)),
        ((8, 0), (8, 0)),
        ((12, 0), (12, 0)),
        ((20, 59), (20, 59)),
    ],
)
def test_quiet_hours_defer_to_their_end_in_site_time(wall, expected_wall):
    instant = local(NY, 2026, 6, 10, *wall)
    deferred = domain.after_quiet_hours(instant, NY, QUIET).astimezone(ZoneInfo(NY))
    assert (deferred.hour, deferred.minute) == expected_wall
    assert deferred >= instant
    if wall[0] >= 21:
        assert deferred.date() == date(2026, 6, 11)


def test_quiet_hours_are_read_in_each_sites_own_zone():
    instant = datetime(2026, 6, 10, 23, 0, tzinfo=UTC)  # 19:00 in New York, 08:00 in Tokyo
    assert domain.after_quiet_hours(instant, NY, QUIET) == instant
    assert domain.after_quiet_hours(instant, "Asia/Tokyo", QUIET) == instant
    late = datetime(2026, 6, 11, 3, 0, tzinfo=UTC)  # 23:00 in New York, 12:00 in Tokyo
    assert domain.after_quiet_hours(late, NY, QUIET) == local(NY, 2026, 6, 11, 8)
    assert domain.after_quiet_hours(late, "Asia/Tokyo", QUIET) == late


def test_quiet_hours_end_at_eight_on_the_clock_across_a_dst_change():
    # New York springs forward on 2026-03-08: the quiet night is an hour shorter.
    night = local(NY, 2026, 3, 7, 23)
    assert domain.after_quiet_hours(night, NY, QUIET) == local(NY, 2026, 3, 8, 8)
    assert local(NY, 2026, 3, 8, 8) - night == timedelta(hours=8)
    autumn = local(NY, 2026, 10, 31, 23)  # falls back on 2026-11-01
    assert local(NY, 2026, 11, 1, 8) - autumn == timedelta(hours=10)
    assert domain.after_quiet_hours(autumn, NY, QUIET) == local(NY, 2026, 11, 1, 8)


def test_an_empty_window_is_never_quiet():
    assert not Window(time(0), time(0)).contains(time(3))
    assert domain.after_quiet_hours(local(NY, 2026, 6, 10, 3), NY, Window(time(0), time(0))) == local(
        NY, 2026, 6, 10, 3
    )


def test_business_hours_wait_for_the_next_opening():
    hours, weekdays = Window(time(9), time(17)), (1, 2, 3, 4, 5)
    wednesday_noon = local(NY, 2026, 6, 10, 12)
    assert domain.next_business_time(wednesday_noon, NY, hours, weekdays) == wednesday_noon
    assert domain.next_business_time(local(NY, 2026, 6, 10, 7), NY, hours, weekdays) == local(NY, 2026, 6, 10, 9)
    assert domain.next_business_time(local(NY, 2026, 6, 10, 18), NY, hours, weekdays) == local(NY, 2026, 6, 11, 9)
    friday_evening = local(NY, 2026, 6, 12, 17, 30)
    assert domain.next_business_time(friday_evening, NY, hours, weekdays) == local(NY, 2026, 6, 15, 9)
    around_the_clock = Window(time(0), time(0))
    assert domain.next_business_time(friday_evening, NY, around_the_clock, range(1, 8)) == friday_evening


# --- reminders ----------------------------------------------------------------------------------


def test_reminders_24h_and_2h_before_in_site_time():
    starts = local(NY, 2026, 6, 12, 10)
    planned = domain.plan_reminders(starts, [1440, 120], NY, QUIET, local(NY, 2026, 6, 10, 9), honour_quiet_hours=True)
    assert [(p.template, p.due_at) for p in planned] == [
        ("reminder_24h", local(NY, 2026, 6, 11, 10)),
        ("reminder_2h", local(NY, 2026, 6, 12, 8)),
    ]
    assert all(p.expires_at == starts for p in planned)


def test_a_reminder_in_quiet_hours_moves_to_their_end_or_is_dropped():
    now = local(NY, 2026, 6, 1, 12)
    nine = local(NY, 2026, 6, 12, 9)  # 2 h before is 07:00: quiet, moved to 08:00
    [day, early] = domain.plan_reminders(nine, [1440, 120], NY, QUIET, now, honour_quiet_hours=True)
    assert early.due_at == local(NY, 2026, 6, 12, 8)
    assert day.due_at == local(NY, 2026, 6, 11, 9)
    eight = local(NY, 2026, 6, 12, 8)  # 2 h before is 06:00: the end of quiet hours is the start
    assert [p.template for p in domain.plan_reminders(eight, [1440, 120], NY, QUIET, now, honour_quiet_hours=True)] == [
        "reminder_24h"
    ]
    on_console = domain.plan_reminders(nine, [1440, 120], NY, QUIET, now, honour_quiet_hours=False)
    assert on_console[1].due_at == local(NY, 2026, 6, 12, 7)


def test_reminders_already_past_when_booked_are_not_planned():
    starts = local(NY, 2026, 6, 12, 10)
    late_booking = local(NY, 2026, 6, 12, 9)  # 1 h before: both reminder times have passed
    assert domain.plan_reminders(starts, [1440, 120], NY, QUIET, late_booking, honour_quiet_hours=True) == []
    same_day = local(NY, 2026, 6, 12, 7)
    assert [
        p.template for p in domain.plan_reminders(starts, [1440, 120], NY, QUIET, same_day, honour_quiet_hours=True)
    ] == ["reminder_2h"]


def test_configured_offsets_name_their_reminders():
    starts = local(NY, 2026, 6, 20, 12)
    planned = domain.plan_reminders(
        starts, [2880, 90, 90], NY, QUIET, local(NY, 2026, 6, 1, 12), honour_quiet_hours=True
    )
    assert [p.template for p in planned] == ["reminder_48h", "reminder_90m"]


def test_reminder_values_are_site_local_date_and_time():
    assert domain.reminder_values(local("Asia/Tokyo", 2026, 6, 12, 9, 30), "Asia/Tokyo") == {
        "date": "2026-06-12",
        "time": "09:30",
    }


# --- absences -----------------------------------------------------------------------------------


def marks(*statuses: str) -> list[AttendanceMark]:
    base = datetime(2026, 6, 1, 13, tzinfo=UTC)
    return [AttendanceMark(f"s{i}", base + timedelta(days=i), s) for i, s in enumerate(statuses)]


@pytest.mark.parametrize(
    ("statuses", "runs"),
    [
        (("absent",), []),
        (("absent", "present", "absent"), []),
        (("absent", "absent"), [["s0", "s1"]]),
        (("present", "absent", "excused", "absent"), [["s1", "s3"]]),
        (("absent", "late", "absent", "absent", "absent"), [["s2", "s3", "s4"]]),
        (("absent", "absent", "present", "absent", "absent"), [["s0", "s1"], ["s3", "s4"]]),
    ],
)
def test_two_absences_in_a_row_by_session_time(statuses, runs):
    assert domain.absence_streaks(marks(*statuses)) == runs


def test_absences_are_ordered_by_session_time_not_by_arrival():
    recorded = list(reversed(marks("absent", "present", "absent", "absent")))
    assert domain.absence_streaks(recorded) == [["s2", "s3"]]


# --- delivery -----------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_and_a_cap():
    assert domain.backoff_seconds(1, 2.0, 600, 1.0) == 2.0
    assert domain.backoff_seconds(3, 2.0, 600, 1.0) == 8.0
    assert domain.backoff_seconds(3, 2.0, 600, 0.0) == 4.0  # never below half
    assert domain.backoff_seconds(20, 2.0, 600, 1.0) == 600
    delays = {domain.backoff_seconds(4, 2.0, 600, j / 10) for j in range(5, 11)}
    assert len(delays) == 6 and min(delays) >= 8 and max(delays) <= 16


def test_webhook_signature_is_hmac_sha256_over_timestamp_dot_body():
    body = b'{"event_type":"CareTeamAlerted"}'
    expected = hmac.new(b"s3cret-s3cret-s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert domain.webhook_signature("s3cret-s3cret-s3cret", "1700000000", body) == expected
    assert domain.webhook_signature("other-secret-xxxxxx", "1700000000", body) != expected


def test_escalation_walks_the_roster_in_order_then_stops():
    assert domain.next_roster_index(-1, 3) == 0
    assert domain.next_roster_index(0, 3) == 1
    assert domain.next_roster_index(2, 3) is None
    assert domain.next_roster_index(-1, 0) is None


def test_member_ids_are_stable_and_hide_the_address():
    one = domain.member_id("site-a", "email", "Nurse@Example.org ")
    assert one == domain.member_id("site-a", "email", "nurse@example.org")
    assert "example" not in one and len(one) == 32
    assert one != domain.member_id("site-b", "email", "nurse@example.org")
