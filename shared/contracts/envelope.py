"""The envelope every message carries (DESIGN A4)."""

from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.contracts.events import EVENT_TYPES, Event, Producer, SiteId
from shared.contracts.subjects import event_subject


class UnknownEventType(ValueError):
    pass


class Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: UUID
    event_type: str
    schema_version: Literal[1] = 1
    occurred_at: datetime
    producer: Producer
    site_id: SiteId
    correlation_id: UUID
    causation_id: UUID | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a UTC offset")
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _producer_owns_event(self) -> "Envelope":
        known = EVENT_TYPES.get(self.event_type)
        if known is not None and known.producer != self.producer:
            raise ValueError(f"{self.event_type} is produced by {known.producer}, not {self.producer}")
        return self

    @property
    def subject(self) -> str:
        return event_subject(self.producer, self.event_type, self.site_id, restricted=self.event_class().restricted)

    def event_class(self) -> type[Event]:
        try:
            return EVENT_TYPES[self.event_type]
        except KeyError:
            raise UnknownEventType(f"unknown event type {self.event_type!r}") from None

    def event(self) -> Event:
        """The typed `data`; raises pydantic.ValidationError when it breaks the contract."""
        return self.event_class().model_validate(self.data)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Envelope":
        return cls.model_validate_json(raw)


def new_envelope(
    event: Event,
    *,
    site_id: str,
    correlation_id: UUID | None = None,
    causation_id: UUID | None = None,
    occurred_at: datetime | None = None,
) -> Envelope:
    """Wrap an event; a new chain starts a new correlation id, a reaction passes it on."""
    event_id = uuid4()
    return Envelope(
        event_id=event_id,
        event_type=type(event).__name__,
        occurred_at=occurred_at or datetime.now(UTC),
        producer=event.producer,
        site_id=site_id,
        correlation_id=correlation_id or event_id,
        causation_id=causation_id,
        data=event.model_dump(mode="json"),
    )


def caused_by(cause: Envelope, event: Event, *, site_id: str | None = None) -> Envelope:
    """An event produced in reaction to `cause`: same correlation, cause as causation."""
    return new_envelope(
        event,
        site_id=site_id or cause.site_id,
        correlation_id=cause.correlation_id,
        causation_id=cause.event_id,
    )
