"""Notification rules (services/notifications/domain.py): discreet templates and subject lines in
every language (patient and care-team templates alike), channels."""

import re
from string import Template

import pytest

from services.notifications.domain import (
    ALERT_KINDS,
    CARE_TEAM_TEMPLATES,
    DEFAULT_LANGUAGE,
    FORBIDDEN_WORDS,
    PATIENT_TEMPLATES,
    SUBJECTS,
    TEMPLATES,
    UnknownTemplate,
    patient_channel,
    render,
)

SPANISH_FORBIDDEN = (
    "recuperación", "adicción", "tratamiento", "programa", "rehabilitación", "terapia", "clínica",
    "droga", "alcohol",
)  # fmt: skip
WORDS = sorted({*FORBIDDEN_WORDS, *SPANISH_FORBIDDEN})
VARIANTS = [(name, lang) for name, variants in sorted(TEMPLATES.items()) for lang in sorted(variants)]


def _values(text: str) -> dict[str, str]:
    return {key: f"<{key}>" for key in Template(text).get_identifiers()}


def _forbidden_in(text: str) -> list[str]:
    return [w for w in WORDS if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, re.IGNORECASE)]


def test_there_are_templates():
    assert VARIANTS
    assert all(DEFAULT_LANGUAGE in variants for variants in TEMPLATES.values())


@pytest.mark.parametrize(("name", "language"), VARIANTS)
def test_every_template_renders(name, language):
    text = TEMPLATES[name][language]
    values = _values(text)
    rendered = render(name, language, **values)
    assert rendered.strip()
    assert "$" not in rendered
    for placeholder in values.values():
        assert placeholder in rendered


@pytest.mark.parametrize(("name", "language"), VARIANTS)
def test_no_template_names_care(name, language):
    text = TEMPLATES[name][language]
    assert _forbidden_in(text) == []
    assert _forbidden_in(render(name, language, **_values(text))) == []


@pytest.mark.parametrize(
    "text",
    ["Your Recovery plan", "see you at the CLINIC", "tratamiento hoy", "La Clínica", "group therapy.", "IOP"],
)
def test_the_word_check_catches_forbidden_words(text):
    assert _forbidden_in(text)


@pytest.mark.parametrize("text", ["programmer", "Hello! See you on Monday.", "Grouping", "iopx"])
def test_the_word_check_respects_word_boundaries(text):
    assert _forbidden_in(text) == []


def test_forbidden_words_cover_the_design_brief():
    assert {"recovery", "addiction", "rehab", "treatment"} <= set(FORBIDDEN_WORDS)


def test_welcome_renders_start_date():
    assert "2025-03-10" in render("welcome", "en", start_date="2025-03-10")
    assert "2025-03-10" in render("welcome", "es", start_date="2025-03-10")
    assert render("welcome", "es", start_date="x") != render("welcome", "en", start_date="x")


def test_unknown_template_raises():
    with pytest.raises(UnknownTemplate):
        render("no-such-template", "en")


@pytest.mark.parametrize("language", ["fr", "", "EN-gb", "xx"])
def test_unknown_language_falls_back_to_english(language):
    assert render("welcome", language, start_date="Monday") == render("welcome", "en", start_date="Monday")


@pytest.mark.parametrize("live", [True, False])
def test_patient_who_wants_nothing_gets_nothing(live):
    assert patient_channel("none", live) is None


@pytest.mark.parametrize("preferred", ["sms", "email"])
def test_without_live_channels_patient_messages_go_to_console(preferred):
    assert patient_channel(preferred, live_channels=False) == "console"


@pytest.mark.parametrize("preferred", ["sms", "email"])
def test_live_channel_follows_preference(preferred):
    assert patient_channel(preferred, live_channels=True) == preferred


SUBJECT_VARIANTS = [(kind, lang) for kind, variants in sorted(SUBJECTS.items()) for lang in sorted(variants)]


@pytest.mark.parametrize(("kind", "language"), SUBJECT_VARIANTS)
def test_no_subject_line_names_care(kind, language):
    assert _forbidden_in(SUBJECTS[kind][language]) == []


@pytest.mark.parametrize("name", sorted(PATIENT_TEMPLATES))
def test_patient_templates_exist_in_english_and_spanish(name):
    assert {"en", "es"} <= set(TEMPLATES[name])
    assert render(name, "es", **_values(TEMPLATES[name]["es"])) != render(name, "en", **_values(TEMPLATES[name]["en"]))


def test_the_issue_templates_exist():
    assert {"welcome", "reminder_24h", "reminder_2h", "missed_you"} <= PATIENT_TEMPLATES
    assert {"care_urgent_check_in", "care_escalated", "care_two_absences"} <= CARE_TEAM_TEMPLATES
    assert all(template in TEMPLATES for _, template in ALERT_KINDS.values())


@pytest.mark.parametrize("name", sorted(PATIENT_TEMPLATES))
def test_patient_templates_take_no_identifying_values(name):
    for text in TEMPLATES[name].values():
        assert set(Template(text).get_identifiers()) <= {"start_date", "date", "time"}


@pytest.mark.parametrize(("template", "body"), [("reminder_48h", "reminder_24h"), ("reminder_90m", "reminder_2h")])
def test_reminders_at_other_offsets_use_the_closest_wording(template, body):
    assert render(template, "en", date="2026-01-02", time="09:00") == render(
        body, "en", date="2026-01-02", time="09:00"
    )
