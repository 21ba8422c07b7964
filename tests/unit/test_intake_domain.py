"""Intake rules (services/intake/domain.py), rule by rule."""

import re
from datetime import date, timedelta
from itertools import product

import pytest

from services.intake.domain import (
    MRN_ALPHABET,
    DomainError,
    EnrollmentStatus,
    IllegalTransition,
    check_can_enroll,
    check_person_name,
    check_start_date,
    check_transition,
    initial_status,
    new_mrn,
    normalize_name,
    search_key,
    validate_birth_date,
    validate_timezone,
)

TODAY = date(2025, 3, 9)
S = EnrollmentStatus

# --- timezone -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["America/New_York", "America/Chicago", "America/Los_Angeles", "Europe/Berlin", "UTC"])
def test_valid_iana_timezone_accepted(name):
    assert validate_timezone(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "Mars/Base",
        "localtime",
        "posixrules",
        "posix/Europe/Paris",
        "",
        "america/new_york",
        "EST5EDT ",
        "/etc/localtime",
        "../etc/passwd",
        "+05:00",
    ],
)
def test_bad_timezone_rejected_with_field(name):
    with pytest.raises(DomainError) as caught:
        validate_timezone(name)
    assert caught.value.field == "timezone"


# --- birth date -----------------------------------------------------------------


@pytest.mark.parametrize("birth", [TODAY, date(1990, 6, 1), date(TODAY.year - 130, 1, 1)])
def test_plausible_birth_date_accepted(birth):
    assert validate_birth_date(birth, TODAY) == birth


@pytest.mark.parametrize("birth", [TODAY + timedelta(days=1), date(2030, 1, 1)])
def test_future_birth_date_rejected(birth):
    with pytest.raises(DomainError, match="future") as caught:
        validate_birth_date(birth, TODAY)
    assert caught.value.field == "birth_date"


@pytest.mark.parametrize("birth", [date(TODAY.year - 131, 12, 31), date(1800, 1, 1)])
def test_birth_date_over_130_years_rejected(birth):
    with pytest.raises(DomainError, match="old") as caught:
        validate_birth_date(birth, TODAY)
    assert caught.value.field == "birth_date"


# --- MRN ------------------------------------------------------------------------


def test_mrn_format():
    pattern = re.compile(rf"^IOP-[{re.escape(MRN_ALPHABET)}]{{8}}$")
    for _ in range(200):
        assert pattern.match(new_mrn())


def test_mrn_alphabet_has_no_look_alikes():
    assert not set("0O1I5S8B") & set(MRN_ALPHABET)
    assert MRN_ALPHABET.upper() == MRN_ALPHABET
    assert len(set(MRN_ALPHABET)) == len(MRN_ALPHABET)


def test_mrns_never_contain_look_alikes():
    body = "".join(new_mrn()[4:] for _ in range(200))
    assert not set(body) & set("0O1I5S8B")


def test_mrns_are_random():
    assert len({new_mrn() for _ in range(200)}) == 200


# --- names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("José  O'Neil", "jose oneil"),
        ("JOSÉ O’NEIL", "José O'Neil"),
        ("Zoë-Anne", "zoe anne"),
        ("  Müller ", "MULLER"),
        ("François", "francois"),
    ],
)
def test_normalize_name_folds_case_accents_punctuation(a, b):
    assert normalize_name(a) == normalize_name(b)


def test_normalize_name_result():
    assert normalize_name("José  O'Neil") == "joseoneil"


def test_normalize_name_keeps_different_names_apart():
    assert normalize_name("Jose") != normalize_name("Josefa")
    assert normalize_name("Ann") != normalize_name("Anna")


def test_normalize_name_keeps_non_latin_names_apart():
    assert normalize_name("Иван") != normalize_name("Ольга")
    assert normalize_name("Иван") != ""


INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u200b\u200d\u2060\ufeff", "\u00ad", "\u2063"]


@pytest.mark.parametrize("name", [*INVISIBLE, " \u200b ", "-", "'", "1", "42", "\u0301", "\u200b.\u2060"])
def test_a_name_without_a_letter_is_refused(name):
    with pytest.raises(DomainError, match="letter"):
        check_person_name(name)


@pytest.mark.parametrize("name", ["Ana\x00", "Ana\nBaker", "\x07Bo", "Zoë\x7f"])
def test_a_name_with_control_characters_is_refused(name):
    with pytest.raises(DomainError, match="control"):
        check_person_name(name)


@pytest.mark.parametrize(
    "name", ["Lucía", "O'Neil", "Li", "李", "Иван", "\u0645\u0631\u064a\u0645", "Ana\u200d", "\ufeffZoë", "ﬁona"]
)
def test_a_name_with_a_letter_is_kept_as_written(name):
    assert check_person_name(name) == name  # joiners are part of spelling in some scripts


def test_invisible_characters_fold_away():
    assert normalize_name("Ba\u200bker\u2060") == normalize_name("Baker") == "baker"
    assert all(normalize_name(c) == "" for c in INVISIBLE)


@pytest.mark.parametrize("text", ["--", "_%", "!!", "%%%", "%_", "\u200b\u200b", "a-", " a ", "é.", "' '"])
def test_a_search_that_folds_to_less_than_two_characters_is_refused(text):
    with pytest.raises(DomainError) as caught:
        search_key(text)
    assert caught.value.field == "name"


@pytest.mark.parametrize(
    ("text", "key"), [("nunez", "nunez"), ("Ñúñez", "nunez"), ("O'Neil", "oneil"), ("李明", "李明"), ("%nu_", "nu")]
)
def test_a_search_key_is_the_folded_name(text, key):
    assert search_key(text) == key


# --- enrollment lifecycle -------------------------------------------------------

ALLOWED = {
    (S.PENDING, S.ACTIVE),
    (S.PENDING, S.DISCHARGED),
    (S.PENDING, S.TRANSFERRED),
    (S.ACTIVE, S.DISCHARGED),
    (S.ACTIVE, S.TRANSFERRED),
}
ALL_PAIRS = set(product(EnrollmentStatus, repeat=2))


def test_status_values():
    assert {s.value for s in EnrollmentStatus} == {"pending", "active", "discharged", "transferred"}


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED))
def test_allowed_transition(current, target):
    assert check_transition(current, target) == target


@pytest.mark.parametrize(("current", "target"), sorted(ALL_PAIRS - ALLOWED))
def test_illegal_transition(current, target):
    with pytest.raises(IllegalTransition):
        check_transition(current, target)


def test_illegal_transition_is_a_domain_error():
    assert issubclass(IllegalTransition, DomainError)


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (TODAY + timedelta(days=1), S.PENDING),
        (TODAY + timedelta(days=200), S.PENDING),
        (TODAY, S.ACTIVE),
        (TODAY - timedelta(days=3), S.ACTIVE),
    ],
)
def test_initial_status(start, expected):
    assert initial_status(start, TODAY) == expected


def test_can_enroll_without_open_enrollment():
    assert check_can_enroll(0) is None


@pytest.mark.parametrize("open_enrollments", [1, 2])
def test_cannot_enroll_twice(open_enrollments):
    with pytest.raises(IllegalTransition, match="open enrollment"):
        check_can_enroll(open_enrollments)


@pytest.mark.parametrize("days", [-30, -1, 0, 1, 365])
def test_start_date_within_bounds(days):
    start = TODAY + timedelta(days=days)
    assert check_start_date(start, TODAY) == start


@pytest.mark.parametrize("days", [-31, -400, 366, 1000])
def test_start_date_out_of_bounds(days):
    with pytest.raises(DomainError) as caught:
        check_start_date(TODAY + timedelta(days=days), TODAY)
    assert caught.value.field == "start_date"
