"""Intake rules, free of I/O: sites, patients, enrollments."""

import secrets
import unicodedata
from datetime import date
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

MRN_ALPHABET = "ACDEFGHJKLMNPQRTUVWXY3479"  # no look-alikes (0/O, 1/I, 5/S, 8/B)


class DomainError(ValueError):
    """A rule was broken; `field` names the input at fault, if one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class IllegalTransition(DomainError):
    pass


# Files in /usr/share/zoneinfo that are not IANA zone names a site could be in.
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


def validate_timezone(name: str) -> str:
    # ZoneInfo alone accepts file paths; the system's zone list also holds a few non-zones.
    if name in _NOT_ZONES or name.startswith(("posix/", "right/")) or name not in available_timezones():
        raise DomainError(f"unknown IANA timezone {name!r}", field="timezone")
    try:
        ZoneInfo(name)
    except ZoneInfoNotFoundError:
        raise DomainError(f"unknown IANA timezone {name!r}", field="timezone") from None
    return name


def validate_birth_date(birth_date: date, today: date) -> date:
    if birth_date > today:
        raise DomainError("birth date is in the future", field="birth_date")
    if birth_date.year < today.year - 130:
        raise DomainError("birth date is implausibly old", field="birth_date")
    return birth_date


def new_mrn() -> str:
    """A network-wide medical record number: 'IOP-' and 8 unambiguous characters."""
    return "IOP-" + "".join(secrets.choice(MRN_ALPHABET) for _ in range(8))


def normalize_name(name: str) -> str:
    """Case, accents and punctuation folded, for duplicate detection and search.

    Letters of every script are kept: folding to ASCII would make all Cyrillic or CJK
    names equal to each other.
    """
    decomposed = unicodedata.normalize("NFKD", name)
    without_marks = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(c for c in without_marks.casefold() if c.isalnum())


class EnrollmentStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    DISCHARGED = "discharged"
    TRANSFERRED = "transferred"


OPEN_STATUSES = frozenset({EnrollmentStatus.PENDING, EnrollmentStatus.ACTIVE})
TRANSITIONS: dict[EnrollmentStatus, frozenset[EnrollmentStatus]] = {
    EnrollmentStatus.PENDING: frozenset(
        {EnrollmentStatus.ACTIVE, EnrollmentStatus.DISCHARGED, EnrollmentStatus.TRANSFERRED}
    ),
    EnrollmentStatus.ACTIVE: frozenset({EnrollmentStatus.DISCHARGED, EnrollmentStatus.TRANSFERRED}),
    EnrollmentStatus.DISCHARGED: frozenset(),
    EnrollmentStatus.TRANSFERRED: frozenset(),
}


def initial_status(start_date: date, today: date) -> EnrollmentStatus:
    """An episode that starts later is pending until its start date."""
    return EnrollmentStatus.ACTIVE if start_date <= today else EnrollmentStatus.PENDING


def check_transition(current: EnrollmentStatus, target: EnrollmentStatus) -> EnrollmentStatus:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(f"an enrollment cannot go from {current} to {target}")
    return target


def check_can_enroll(open_enrollments: int) -> None:
    if open_enrollments:
        raise IllegalTransition("the patient already has an open enrollment")


def check_start_date(start_date: date, today: date) -> date:
    if (start_date - today).days > 365:
        raise DomainError("start date is more than a year away", field="start_date")
    if (today - start_date).days > 30:
        raise DomainError("start date is more than 30 days in the past", field="start_date")
    return start_date
