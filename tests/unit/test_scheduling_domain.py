"""Scheduling rules, rule by rule: templates, DST-safe expansion, ISO weeks in site
time, hours verdicts, waitlist order."""

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.scheduling import domain
from services.scheduling.domain import Block, WeekHours
from shared.domain_errors import DomainError


def block(weekday: int = 1, start: str = "09:00", minutes: int = 60, kind: str = "group_therapy", capacity: int = 12):
    return Block(weekday, domain.parse_start(start), minutes, kind, "Group", capacity)


def test_valid_iop_day_passes() -> None:
    day = [block(1, "09:00", 30, "check_in_group"), block(1, "09:30", 90), block(1, "11:00", 60, "workshop"),
           block(1, "12:00", 30, "wrap_up"), block(3, "17:00", 50, "individual_therapy", 1)]  # fmt: skip
    domain.validate_template(day)


@pytest.mark.parametrize(
    ("blocks", "field"),
    [
        ([block(1, "09:00", 90), block(1, "10:00", 60)], "blocks.1"),
        ([block(1, "04:30", 60)], "blocks.0"),
        ([block(1, "22:30", 60)], "blocks.0"),
        ([block(2, "10:00", 60, capacity=0)], "blocks.0.capacity"),
        ([block(2, "10:00", 50, "individual_therapy", 3)], "blocks.0.capacity"),
        ([], "blocks"),
    ],
)
def test_invalid_templates_are_rejected(blocks: list[Block], field: str) -> None:
    with pytest.raises(DomainError) as error:
        domain.validate_template(blocks)
    assert error.value.field == field


def test_back_to_back_blocks_do_not_overlap() -> None:
    domain.validate_template([block(1, "09:00", 60), block(1, "10:00", 60), block(2, "09:00", 60)])


def test_block_ending_exactly_at_23_is_allowed() -> None:
    domain.validate_template([block(5, "22:00", 60)])


@pytest.mark.parametrize(
    ("zone", "before", "after"),
    [
        # America/New_York: spring forward 2027-03-14, fall back 2027-11-07.
        ("America/New_York", date(2027, 3, 8), date(2027, 3, 15)),
        ("America/New_York", date(2027, 11, 1), date(2027, 11, 8)),
        # Australia/Sydney (southern hemisphere): DST ends 2027-04-04, starts 2027-10-03.
        ("Australia/Sydney", date(2027, 3, 29), date(2027, 4, 5)),
        ("Australia/Sydney", date(2027, 9, 27), date(2027, 10, 4)),
    ],
)
def test_sessions_keep_wall_clock_time_across_dst(zone: str, before: date, after: date) -> None:
    occurrences = domain.expand([block(1, "09:00", 90)], zone, before, after)
    assert [o.local_date for o in occurrences] == [before, after]
    local = [o.starts_at.astimezone(ZoneInfo(zone)) for o in occurrences]
    assert [t.time() for t in local] == [time(9, 0), time(9, 0)]
    assert all(o.ends_at - o.starts_at == timedelta(minutes=90) for o in occurrences)
    offsets = {o.starts_at.astimezone(ZoneInfo(zone)).utcoffset() for o in occurrences}
    assert len(offsets) == 2, "the UTC offset changes, the wall-clock time does not"
    assert all(o.starts_at.tzinfo == UTC for o in occurrences)


def test_sunday_evening_in_los_angeles_is_monday_in_utc_but_the_same_iso_week() -> None:
    sunday_evening = datetime(2026, 11, 29, 22, 0, tzinfo=ZoneInfo("America/Los_Angeles"))
    assert sunday_evening.astimezone(UTC).date() == date(2026, 11, 30)
    assert domain.iso_week_of(sunday_evening, "America/Los_Angeles") == "2026-W48"
    assert domain.iso_week_of(sunday_evening, "UTC") == "2026-W49"


def test_week_bounds_are_site_local_midnights() -> None:
    start, end = domain.week_bounds("2027-W11", "America/New_York")  # the week DST begins
    assert start.astimezone(ZoneInfo("America/New_York")).replace(tzinfo=None) == datetime(2027, 3, 15, 0, 0)
    assert end - start == timedelta(days=7)
    start, end = domain.week_bounds("2027-W10", "America/New_York")
    assert end - start == timedelta(days=7, hours=-1)  # 23-hour Sunday


def test_attended_hours_count_present_and_late_only() -> None:
    assert domain.attended_hours([("present", 90), ("late", 60), ("absent", 0), ("excused", 0)]) == 2.5


def test_hours_verdicts() -> None:
    end = datetime(2026, 12, 7, 5, tzinfo=UTC)
    midweek = end - timedelta(days=3)
    assert domain.hours_verdict(WeekHours("2026-W49", 3, 6, 9), midweek, end) is None  # reachable
    assert domain.hours_verdict(WeekHours("2026-W49", 3, 5.5, 9), midweek, end) == "at_risk"
    assert domain.hours_verdict(WeekHours("2026-W49", 8.5, 0, 9), end, end) == "shortfall"
    assert domain.hours_verdict(WeekHours("2026-W49", 9, 0, 9), end, end) is None


def test_booking_and_waitlist_order() -> None:
    assert domain.booking_decision(11, 12) == "booked"
    assert domain.booking_decision(12, 12) == "waitlisted"
    assert domain.waitlist_position([]) == 1
    assert domain.waitlist_position([1, 2, 5]) == 6


def test_workshop_topics_rotate_weekly() -> None:
    workshop = Block(3, time(11), 60, "workshop", "Workshop", 12, ("Stress management", "Relapse prevention"))
    first, second = date(2026, 12, 2), date(2026, 12, 9)
    assert workshop.title_for(first) != workshop.title_for(second)
    assert workshop.title_for(first) == workshop.title_for(first + timedelta(days=14))


def test_targets_follow_asam_level_2_1() -> None:
    assert domain.weekly_hours_target("adult") == 9.0
    assert domain.weekly_hours_target("adolescent") == 6.0


# --- the accepted calendar (issue 8: bad dates are a 422, never a 500) ---------------------


@pytest.mark.parametrize("day", [date(1, 1, 1), date(1999, 12, 31), date(2100, 1, 1), date(9999, 12, 31)])
def test_days_outside_the_calendar_are_refused(day: date) -> None:
    with pytest.raises(DomainError):
        domain.check_day(day)


def test_the_calendar_edges_are_accepted_and_compute() -> None:
    assert domain.check_day(domain.FIRST_DAY) == date(2000, 1, 1)
    assert domain.check_day(domain.LAST_DAY) == date(2099, 12, 31)
    # The latest wall time plus the longest slot, read in the zone furthest behind UTC.
    latest = domain.local_instant(domain.LAST_DAY, time(23, 59), ZoneInfo("Pacific/Pago_Pago"))
    assert latest + timedelta(minutes=480) > datetime(2100, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        datetime(9999, 12, 31, 22, 0),
        datetime(2100, 1, 1, 0, 0),
        datetime(1999, 12, 31, 23, 59),
        datetime(2026, 12, 1, 10, 0, tzinfo=UTC),  # a wall time takes the site's offset, not one given
        datetime(2026, 12, 1, 10, 0, tzinfo=ZoneInfo("America/New_York")),
    ],
)
def test_wall_times_outside_the_calendar_or_with_an_offset_are_refused(value: datetime) -> None:
    with pytest.raises(DomainError):
        domain.check_wall_time(value)


def test_a_wall_time_in_the_calendar_is_accepted() -> None:
    assert domain.check_wall_time(datetime(2099, 12, 31, 22, 0)) == datetime(2099, 12, 31, 22, 0)


@pytest.mark.parametrize(
    "week",
    ["2026-W54", "2027-W53", "2026-W00", "0000-W01", "9999-W52", "1999-W52", "2100-W01", "2026-w07", "2026-W7",
     "26-W07", " 2026-W07", "2026-W07 ", "\u0662\u0660\u0662\u0666-W07", ""],
)  # fmt: skip
def test_iso_weeks_that_do_not_exist_or_lie_outside_the_calendar_are_refused(week: str) -> None:
    with pytest.raises(DomainError) as error:
        domain.check_iso_week(week)
    assert error.value.field == "week"


@pytest.mark.parametrize("week", ["2026-W53", "2020-W53", "2000-W01", "2099-W53", "2026-W07"])
def test_iso_weeks_that_exist_are_accepted(week: str) -> None:
    assert domain.check_iso_week(week) == week
    start, end = domain.week_bounds(week, "America/New_York")
    assert end - start >= timedelta(days=7) - timedelta(hours=1)


def test_week_bounds_refuse_a_week_that_does_not_exist() -> None:
    with pytest.raises(DomainError):
        domain.week_bounds("2026-W54", "UTC")


def test_calendar_range_defaults_to_a_week_from_today() -> None:
    today = date(2026, 11, 27)
    assert domain.calendar_range(None, None, today) == (today, date(2026, 12, 3))
    assert domain.calendar_range(date(2026, 12, 1), None, today) == (date(2026, 12, 1), date(2026, 12, 7))
    assert domain.calendar_range(None, today, today) == (today, today)
    assert domain.calendar_range(today, today + timedelta(days=62), today)[1] == date(2027, 1, 28)


@pytest.mark.parametrize(
    ("first", "last"),
    [(date(2026, 12, 2), date(2026, 12, 1)), (date(2026, 1, 1), date(2026, 3, 5)), (None, date(2026, 11, 26))],
)
def test_calendar_range_refuses_backwards_or_long_ranges(first: date | None, last: date) -> None:
    with pytest.raises(DomainError) as error:
        domain.calendar_range(first, last, date(2026, 11, 27))
    assert error.value.field == "to"
