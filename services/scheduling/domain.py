"""Scheduling rules, free of I/O: templates, DST-safe session times, ISO weeks in site
time, capacity and waitlist order, and treatment-hours arithmetic."""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Literal
from zoneinfo import ZoneInfo

from shared.contracts.events import Cohort
from shared.domain_errors import DomainError

# ASAM level 2.1 (IOP): at least 9 hours a week for adults, 6 for adolescents.
WEEKLY_HOURS_TARGET: dict[str, float] = {"adult": 9.0, "adolescent": 6.0}
EARLIEST = time(5, 0)
LATEST = time(23, 0)
GROUP_CAPACITY = 12
HORIZON_DAYS = 28
GROUP_KINDS = frozenset({"check_in_group", "group_therapy", "workshop", "wrap_up"})
COUNTED_STATUSES = frozenset({"present", "late"})
# The calendar accepted at the edges. Python's dates end at years 1 and 9999, and the
# service adds to every day it is given (a week's Monday + 7 days, a slot + its minutes,
# the site's UTC offset): bounding the input keeps all of that inside the range. Nothing
# is scheduled before the network existed or in the next century.
FIRST_DAY = date(2000, 1, 1)
LAST_DAY = date(2099, 12, 31)
CALENDAR_MAX_DAYS = 62
ISO_WEEK = re.compile(r"([0-9]{4})-W([0-9]{2})")  # ASCII digits: \d matches every script's digits


def weekly_hours_target(cohort: Cohort) -> float:
    return WEEKLY_HOURS_TARGET[cohort]


@dataclass(frozen=True)
class Block:
    """One weekly slot of a program's template, in the site's wall-clock time."""

    weekday: int  # ISO: 1 = Monday
    start: time
    minutes: int
    kind: str
    title: str
    capacity: int
    topics: tuple[str, ...] = ()

    @property
    def end(self) -> time:
        minutes = self.start.hour * 60 + self.start.minute + self.minutes
        return time(minutes // 60, minutes % 60) if minutes < 24 * 60 else time(23, 59, 59)

    @property
    def key(self) -> str:
        return f"{self.weekday}-{self.start.strftime('%H%M')}-{self.kind}"

    def title_for(self, local_date: date) -> str:
        """Workshops rotate through their topics, one topic per ISO week."""
        if not self.topics:
            return self.title
        week = local_date.isocalendar().week
        return f"{self.title}: {self.topics[week % len(self.topics)]}"


def parse_start(value: str) -> time:
    try:
        hours, minutes = (int(part) for part in value.split(":"))
        return time(hours, minutes)
    except ValueError:
        raise DomainError("invalid", f"start {value!r} is not HH:MM", field="start") from None


def validate_template(blocks: Sequence[Block]) -> None:
    """Blocks lie within 05:00-23:00 local, have capacity >= 1 and never overlap."""
    if not blocks:
        raise DomainError("invalid", "a program needs at least one block", field="blocks")
    for index, block in enumerate(blocks):
        end_minutes = block.start.hour * 60 + block.start.minute + block.minutes
        if block.start < EARLIEST or end_minutes > LATEST.hour * 60:
            raise DomainError(
                "invalid",
                f"block {index} ({block.start:%H:%M}, {block.minutes} min) falls outside 05:00-23:00",
                field=f"blocks.{index}",
            )
        if block.capacity < 1:
            raise DomainError("invalid", f"block {index} capacity must be at least 1", field=f"blocks.{index}.capacity")
        if block.kind == "individual_therapy" and block.capacity != 1:
            raise DomainError(
                "invalid", f"block {index}: individual therapy holds one patient", field=f"blocks.{index}.capacity"
            )
    by_day = sorted(enumerate(blocks), key=lambda item: (item[1].weekday, item[1].start))
    for (_, first), (second_index, second) in pairwise(by_day):
        if first.weekday == second.weekday and _minutes(second.start) < _minutes(first.start) + first.minutes:
            raise DomainError(
                "invalid",
                f"block {second_index} overlaps another block on weekday {second.weekday}",
                field=f"blocks.{second_index}",
            )


def _minutes(value: time) -> int:
    return value.hour * 60 + value.minute


@dataclass(frozen=True)
class Occurrence:
    block: Block
    local_date: date
    starts_at: datetime  # UTC
    ends_at: datetime  # UTC


def local_instant(local_date: date, wall: time, zone: ZoneInfo) -> datetime:
    """The UTC instant of a site-local wall-clock time. fold=0: a wall time inside a
    spring-forward gap is read with the offset before the change (so it lands later by
    the gap, as a clock would show it), an ambiguous fall-back time is the first one."""
    return datetime.combine(local_date, wall).replace(tzinfo=zone, fold=0).astimezone(UTC)


def expand(blocks: Iterable[Block], timezone: str, first: date, last: date) -> list[Occurrence]:
    """Sessions of a weekly template for site-local dates first..last (inclusive).

    Each session keeps its wall-clock time across DST changes: the UTC instant moves.
    """
    zone = ZoneInfo(timezone)
    occurrences = []
    day = first
    blocks = list(blocks)
    while day <= last:
        for block in blocks:
            if block.weekday == day.isoweekday():
                starts = local_instant(day, block.start, zone)
                ends = local_instant(day, block.end, zone) if block.minutes else starts
                occurrences.append(Occurrence(block, day, starts, ends))
        day += timedelta(days=1)
    return sorted(occurrences, key=lambda o: o.starts_at)


def site_today(now: datetime, timezone: str) -> date:
    return now.astimezone(ZoneInfo(timezone)).date()


def iso_week_of(instant: datetime, timezone: str) -> str:
    """The ISO week of an instant, read on the site's own calendar."""
    local = instant.astimezone(ZoneInfo(timezone)).date()
    year, week, _ = local.isocalendar()
    return f"{year}-W{week:02d}"


def check_day(value: date) -> date:
    """A day within FIRST_DAY..LAST_DAY (messages never echo the input)."""
    if not FIRST_DAY <= value <= LAST_DAY:
        raise DomainError("invalid", f"a date must lie between {FIRST_DAY} and {LAST_DAY}")
    return value


def check_wall_time(value: datetime) -> datetime:
    """A site-local wall time: no offset (the site's timezone supplies it), a day in range."""
    if value.tzinfo is not None:
        raise DomainError("invalid", "a site-local wall time carries no offset")
    check_day(value.date())
    return value


def monday_of(iso_week: str) -> date:
    """The Monday of an ISO week 'YYYY-Www' that exists (W53 only in long years)."""
    match = ISO_WEEK.fullmatch(iso_week)
    if match is None:
        raise DomainError("invalid", "an ISO week is written YYYY-Www, e.g. 2026-W07", field="week")
    try:
        return date.fromisocalendar(int(match[1]), int(match[2]), 1)
    except ValueError:
        raise DomainError("invalid", "that year has no such ISO week", field="week") from None


def check_iso_week(iso_week: str) -> str:
    """An ISO week that exists and starts within the accepted calendar."""
    if not FIRST_DAY <= monday_of(iso_week) <= LAST_DAY:
        raise DomainError("invalid", f"a week must start between {FIRST_DAY} and {LAST_DAY}", field="week")
    return iso_week


def calendar_range(first: date | None, last: date | None, today: date) -> tuple[date, date]:
    """The days a calendar query covers: from `first` (default today) to `last` (default
    a week on), at most CALENDAR_MAX_DAYS apart."""
    start = first or today
    end = last or start + timedelta(days=6)
    if end < start or (end - start).days > CALENDAR_MAX_DAYS:
        raise DomainError(
            "invalid", f"'to' must be on or after 'from' and at most {CALENDAR_MAX_DAYS} days later", field="to"
        )
    return start, end


def week_bounds(iso_week: str, timezone: str) -> tuple[datetime, datetime]:
    """[Monday 00:00, next Monday 00:00) site-local, as UTC instants."""
    monday = monday_of(iso_week)
    zone = ZoneInfo(timezone)
    return local_instant(monday, time(0), zone), local_instant(monday + timedelta(days=7), time(0), zone)


def attended_hours(records: Iterable[tuple[str, int]]) -> float:
    """Hours that count toward the week: minutes of present or late attendance."""
    return round(sum(minutes for status, minutes in records if status in COUNTED_STATUSES) / 60, 2)


@dataclass(frozen=True)
class WeekHours:
    iso_week: str
    attended: float
    remaining_booked: float
    target: float

    @property
    def reachable(self) -> bool:
        return self.attended + self.remaining_booked + 1e-9 >= self.target

    @property
    def met(self) -> bool:
        return self.attended + 1e-9 >= self.target


def hours_verdict(week: WeekHours, now: datetime, week_end: datetime) -> str | None:
    """'at_risk' mid-week when the target can no longer be reached with what is booked;
    'shortfall' once the week has closed below target; else None."""
    if now >= week_end:
        return None if week.met else "shortfall"
    return None if week.reachable else "at_risk"


# --- episode lifecycle ------------------------------------------------------------------

ACTIVE = "active"
EndStatus = Literal["discharged", "transferred"]


@dataclass(frozen=True)
class EpisodeEnd:
    """A discharge or a transfer-out of one enrollment, as its event tells it."""

    status: EndStatus
    ended_on: date


def opening_status(end: EpisodeEnd | None) -> str:
    """The status an enrollment opens with. Events of one stream can arrive out of order
    (after a consumer restart, unacked messages come back only after ack_wait, behind
    later ones): an end that arrived first was remembered, and the late enrollment then
    opens already ended, so it is never booked."""
    return end.status if end is not None else ACTIVE


def status_after_end(current: str, end: EpisodeEnd) -> str:
    """An active episode takes the end; an ended one keeps its first end (a transfer's
    second copy, a discharge of a transferred episode, a redelivery)."""
    return end.status if current == ACTIVE else current


def holds_places(status: str) -> bool:
    """Only an active episode is booked; an ended one holds no future booking or
    waitlist place."""
    return status == ACTIVE


def waitlist_position(existing_positions: Iterable[int]) -> int:
    return max(existing_positions, default=0) + 1


def booking_decision(booked: int, capacity: int) -> str:
    return "booked" if booked < capacity else "waitlisted"
