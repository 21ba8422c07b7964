"""Subject scheme (DESIGN A4): iop.<producer>.<event_name>.<site_id>."""

import re
from typing import NamedTuple

SITE_ID_PATTERN = re.compile(r"^[a-z0-9-]{2,40}$")
EVENT_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
PRODUCERS = frozenset({"intake", "scheduling", "notifications"})
_CAMEL_BOUNDARY = re.compile(r"(?<!^)(?=[A-Z])")

ROOT = "iop"
RESTRICTED = "restricted"
DLQ = "dlq"


def event_name(event_type: str) -> str:
    """`PatientEnrolled` -> `patient_enrolled`."""
    return _CAMEL_BOUNDARY.sub("_", event_type).lower()


def event_subject(producer: str, event_type: str, site_id: str, *, restricted: bool = False) -> str:
    if not SITE_ID_PATTERN.match(site_id):
        raise ValueError(f"invalid site id {site_id!r}")
    parts = [ROOT, RESTRICTED] if restricted else [ROOT]
    return ".".join([*parts, producer, event_name(event_type), site_id])


def dlq_subject(consumer_service: str, name: str, site_id: str) -> str:
    return ".".join([ROOT, DLQ, consumer_service, name, site_id])


class ParsedSubject(NamedTuple):
    producer: str
    event_name: str
    site_id: str
    restricted: bool


def parse_subject(subject: str) -> ParsedSubject:
    tokens = subject.split(".")
    restricted = len(tokens) == 5 and tokens[1] == RESTRICTED
    if restricted:
        tokens = [tokens[0], *tokens[2:]]
    if (
        len(tokens) != 4
        or tokens[0] != ROOT
        or tokens[1] not in PRODUCERS
        or not EVENT_NAME_PATTERN.match(tokens[2])
        or not SITE_ID_PATTERN.match(tokens[3])
    ):
        raise ValueError(f"not an iopnet event subject: {subject!r}")
    return ParsedSubject(tokens[1], tokens[2], tokens[3], restricted)
