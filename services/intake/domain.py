"""Intake rules, free of I/O: sites, patients, enrollments."""

import secrets
import unicodedata
from datetime import date, datetime
from enum import StrEnum
from typing import Literal
from uuid import NAMESPACE_URL, UUID, uuid5
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from shared.domain_errors import DomainError
from shared.messaging.integrations import CONTEXT_EVENTS

MRN_ALPHABET = "ACDEFGHJKLMNPQRTUVWXY3479"  # no look-alikes (0/O, 1/I, 5/S, 8/B)


class IllegalTransition(DomainError):
    """A change the record's current state does not allow (an enrollment, consent or
    goal lifecycle has no such step): always a conflict, never bad input."""

    def __init__(self, message: str) -> None:
        super().__init__("conflict", message)


# Files in /usr/share/zoneinfo that are not IANA zone names a site could be in.
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


def validate_timezone(name: str) -> str:
    # ZoneInfo alone accepts file paths; the system's zone list also holds a few non-zones.
    if name in _NOT_ZONES or name.startswith(("posix/", "right/")) or name not in available_timezones():
        raise DomainError("invalid", f"unknown IANA timezone {name!r}", field="timezone")
    try:
        ZoneInfo(name)
    except ZoneInfoNotFoundError:
        raise DomainError("invalid", f"unknown IANA timezone {name!r}", field="timezone") from None
    return name


def validate_birth_date(birth_date: date, today: date) -> date:
    if birth_date > today:
        raise DomainError("invalid", "birth date is in the future", field="birth_date")
    if birth_date.year < today.year - 130:
        raise DomainError("invalid", "birth date is implausibly old", field="birth_date")
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


def check_person_name(name: str) -> str:
    """A given or family name must hold a letter once compatibility forms are folded (NFKC)
    and format characters (category Cf: zero-width space and joiners, word joiner, BOM) are
    dropped: a name of invisible characters only is no name, and folds to nothing.

    The name is kept as written: joiners are part of the spelling in some scripts.
    Control characters (line breaks, NUL) have no place in a name."""
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise DomainError("invalid", "a name may not hold control characters")
    visible = (c for c in unicodedata.normalize("NFKC", name) if unicodedata.category(c) != "Cf")
    if not any(unicodedata.category(c).startswith("L") for c in visible):
        raise DomainError("invalid", "a name must hold at least one letter")
    return name


def check_channel_address(preferred: str | None, phone: str | None, email: str | None) -> None:
    """A patient reached by SMS or email needs that address on record."""
    if preferred == "sms" and not phone:
        raise DomainError("invalid", "preferred_channel sms needs a phone number", field="preferred_channel")
    if preferred == "email" and not email:
        raise DomainError("invalid", "preferred_channel email needs an email address", field="preferred_channel")


MIN_SEARCH_KEY = 2


def search_key(text: str) -> str:
    """The folded text a name search matches on. Punctuation, wildcards and invisible
    characters fold away: a key shorter than two letters or digits would match (and list)
    nearly every patient of the caller's sites."""
    key = normalize_name(text)
    if len(key) < MIN_SEARCH_KEY:
        raise DomainError("invalid", "a name search needs at least two letters or digits", field="name")
    return key


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
        raise DomainError("invalid", "start date is more than a year away", field="start_date")
    if (today - start_date).days > 30:
        raise DomainError("invalid", "start date is more than 30 days in the past", field="start_date")
    return start_date


class LevelChange(StrEnum):
    STEP_DOWN = "step_down"
    STEP_UP = "step_up"


LEVEL_ORDER = ("1.0", "2.1", "2.5")


def level_change(current: str, target: str) -> LevelChange:
    """Moving between ASAM levels within an episode: recorded as history, never silent."""
    if current == target:
        raise IllegalTransition(f"the enrollment is already at level {current}")
    return LevelChange.STEP_UP if LEVEL_ORDER.index(target) > LEVEL_ORDER.index(current) else LevelChange.STEP_DOWN


# --- daily check-ins: risk ------------------------------------------------------------


class Risk(StrEnum):
    LOW = "low"
    ELEVATED = "elevated"
    URGENT = "urgent"


def score_risk(
    *, mood: int, craving: int, used_since_last: bool, safety_concern: bool, previous_cravings: list[int]
) -> tuple[Risk, list[str]]:
    """Risk of one daily check-in, with the rules that fired (for the clinician's view).

    urgent:   a safety concern, or use since the last check-in with craving >= 8;
    elevated: craving >= 7, any use, mood <= 3, or craving rising over three check-ins
              in a row (the two before this one, oldest first, then this one, each
              strictly higher than the one before);
    low:      otherwise.
    `previous_cravings` are earlier check-ins of the episode, oldest first.
    """
    urgent = []
    if safety_concern:
        urgent.append("safety_concern")
    if used_since_last and craving >= 8:
        urgent.append("use_with_high_craving")
    if urgent:
        return Risk.URGENT, urgent
    elevated = []
    if craving >= 7:
        elevated.append("high_craving")
    if used_since_last:
        elevated.append("use_since_last")
    if mood <= 3:
        elevated.append("low_mood")
    last_three = [*previous_cravings[-2:], craving]
    if len(last_three) == 3 and last_three[0] < last_three[1] < last_three[2]:
        elevated.append("craving_rising")
    if elevated:
        return Risk.ELEVATED, elevated
    return Risk.LOW, []


# --- consent (42 CFR Part 2, sec. 2.31) -------------------------------------------------


class ConsentState(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


def consent_state(
    *, revoked_at: datetime | None, expires_on: date | None, expires_event: str | None, today: date,
    episode_ended: bool,
) -> ConsentState:  # fmt: skip
    """Revocation wins; then a date or an event ("end of treatment") ends the consent."""
    if revoked_at is not None:
        return ConsentState.REVOKED
    if expires_on is not None and today > expires_on:
        return ConsentState.EXPIRED
    if expires_event == "end_of_treatment" and episode_ended:
        return ConsentState.EXPIRED
    return ConsentState.ACTIVE


def check_consent_dates(signed_at: datetime, expires_on: date | None, expires_event: str | None, now: datetime) -> None:
    if signed_at > now:
        raise DomainError("invalid", "signed_at is in the future", field="signed_at")
    if (expires_on is None) == (expires_event is None):
        raise DomainError("invalid", "give exactly one of expires_on or expires_event", field="expires_on")
    if expires_on is not None and expires_on < signed_at.date():
        raise DomainError("invalid", "the consent would expire before it was signed", field="expires_on")


def check_revocation(state: ConsentState) -> None:
    if state is not ConsentState.ACTIVE:
        raise IllegalTransition(f"a consent that is {state} cannot be revoked")


# --- recovery plan --------------------------------------------------------------------


GOAL_STATUSES = ("active", "met", "dropped")


def plan_id_of(enrollment_id: str) -> UUID:
    """One plan per episode, with a stable id: no row needed to name it."""
    return uuid5(NAMESPACE_URL, f"iopnet:plan:{enrollment_id}")


def check_goal_status_change(current: str, target: str) -> None:
    """Goals can be met or dropped, and reopened; a no-op change is refused."""
    if target not in GOAL_STATUSES:
        raise DomainError("invalid", f"unknown goal status {target!r}", field="status")
    if current == target:
        raise IllegalTransition(f"the goal is already {current}")


# --- integrations (issue 11) ------------------------------------------------------------------

ConsentPurpose = Literal[
    "treatment", "care_coordination", "appointment_reminders", "payment", "court_reporting", "research"
]


def check_integration_basis(basis: str, purpose: str | None) -> None:
    """Under basis `consent` an event is forwarded only under a patient's consent for a
    purpose: the integration must say which. A QSOA covers the services it names: no purpose."""
    if basis == "consent" and purpose is None:
        raise DomainError("invalid", "basis consent needs a purpose", fields={"purpose": "required for basis consent"})
    if basis == "qsoa" and purpose is not None:
        raise DomainError("invalid", "basis qsoa takes no purpose", fields={"purpose": "only for basis consent"})


# --- consent-gated feeds and the accounting of disclosures (issue 11) ---------------------------

FEED_CONTEXT_EVENTS = CONTEXT_EVENTS  # shared/messaging/integrations.py


def feed_subject(integration_id: str, subject: str) -> str:
    """`iop.intake.patient_enrolled.site-a` -> `iop.feed.<integration>.intake.patient_enrolled.site-a`."""
    root, _, rest = subject.partition(".")
    return f"{root}.feed.{integration_id}.{rest}"


def consent_covers_event(*, state: ConsentState, recorded_at: datetime, occurred_at: datetime) -> bool:
    """A consent lets an event about its patient through if it is active now (a
    revocation stops the feed at once, a backlog included) and was on record when the
    event happened (nothing from before the patient agreed)."""
    return state is ConsentState.ACTIVE and recorded_at <= occurred_at
