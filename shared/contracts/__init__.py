"""What the services know of each other: the envelope, the events, the subjects."""

from shared.contracts.envelope import Envelope, UnknownEventType, caused_by, new_envelope
from shared.contracts.events import EVENT_TYPES, Event
from shared.contracts.subjects import dlq_subject, event_name, event_subject, parse_subject

__all__ = [
    "EVENT_TYPES",
    "Envelope",
    "Event",
    "UnknownEventType",
    "caused_by",
    "dlq_subject",
    "event_name",
    "event_subject",
    "new_envelope",
    "parse_subject",
]
