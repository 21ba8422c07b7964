"""The console's pure rules: language choice, idle sign-out, where a person lands, and
that every text exists in both languages."""

from datetime import UTC, datetime, timedelta

from services.console.domain import (
    CRISIS_LINES,
    LANGUAGES,
    TEXTS,
    Person,
    attended_minutes,
    home_for,
    idle_expired,
    language_from,
    local_time,
    token_expired,
    trend,
)


def person(role: str) -> Person:
    later = datetime.now(UTC) + timedelta(hours=1)
    return Person("someone", role, ("a-site",), None, "token", later, "oidc")


def test_the_chosen_language_wins_then_the_browsers_then_english() -> None:
    assert language_from("es-MX,es;q=0.9,en;q=0.8", None) == "es"
    assert language_from("es-MX,es;q=0.9", "en") == "en"
    assert language_from("fr-FR,de;q=0.8", None) == "en"
    assert language_from(None, "xx") == "en"


def test_a_session_ends_after_the_idle_time_or_with_its_token() -> None:
    now = datetime.now(UTC)
    assert not idle_expired(now - timedelta(minutes=14), now, timedelta(minutes=15))
    assert idle_expired(now - timedelta(minutes=16), now, timedelta(minutes=15))
    assert not token_expired(person("clinician"), now)
    assert token_expired(person("clinician"), now + timedelta(hours=2))


def test_each_role_lands_on_its_screen() -> None:
    assert home_for(person("clinician")) == "/alerts"
    assert home_for(person("site_admin")) == "/alerts"
    assert home_for(person("front_desk")) == "/today"
    assert home_for(person("patient")) == "/me"


def test_every_text_and_the_crisis_lines_exist_in_english_and_spanish() -> None:
    assert all(set(texts) == set(LANGUAGES) and all(texts.values()) for texts in TEXTS.values())
    assert set(CRISIS_LINES) == set(LANGUAGES)
    assert all(any(code == "988" for code, _ in lines) for lines in CRISIS_LINES.values())


def test_one_tap_records_the_minutes_the_hours_report_counts() -> None:
    assert attended_minutes("present", 90) == 90
    assert attended_minutes("late", 90) == 75
    assert attended_minutes("late", 10) == 0
    assert attended_minutes("absent", 90) == 0 and attended_minutes("excused", 90) == 0


def test_the_trend_chart_puts_mood_and_craving_on_one_scale_oldest_first() -> None:
    chart = trend([(10, 0), (1, 10)], width=112, height=120, pad=6)
    assert chart.count == 2
    assert chart.mood == "6.0,6.0 106.0,103.2"  # 10 at the top, then 1 near the bottom
    assert chart.craving == "6.0,114.0 106.0,6.0"  # 0 at the bottom, then 10 at the top
    assert trend([]).mood == "" and trend([]).count == 0
    assert trend([(5, 5)]).mood.count(",") == 1  # one check-in: one point


def test_times_show_on_the_clinics_wall_clock() -> None:
    assert local_time("2026-11-28T01:30:00+00:00", "America/New_York") == "2026-11-27 20:30"
    assert local_time("2026-11-28T01:30:00+00:00", "America/New_York", with_date=False) == "20:30"
    assert local_time("2026-11-28T01:30:00+00:00", None) == "2026-11-28 01:30"
    assert local_time("2026-11-28T01:30:00+00:00", "Not/AZone") == "2026-11-28 01:30"
