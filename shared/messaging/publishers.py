"""Every event type a service produces, declared as a FastStream publisher with its
message model: FastStream's AsyncAPI document lists them (channel, operation, payload).

The outbox relay publishes on the same broker's connection, pipelined (every row of a
batch written, then every JetStream ack awaited before a row is marked sent: see
`OutboxRelay._publish` for why not one awaited `broker.publish` per row); dead letters
go through `broker.publish`. These declarations are the specification of what it
publishes, one per event type, as the catalog in shared/contracts defines it.
"""

from functools import cache
from typing import Literal

from faststream.nats import JStream, NatsBroker
from pydantic import BaseModel, create_model

from shared.contracts.envelope import Envelope
from shared.contracts.events import EVENT_TYPES, Event
from shared.contracts.subjects import RESTRICTED, ROOT, event_name
from shared.messaging.streams import stream_for_subject

READABLE_BY_NOTIFICATIONS_ONLY = (
    "Carries contact details. Published into the NATS account RESTRICTED, which only intake "
    "(publish) and notifications (consume) have users in: no other service, operator or "
    "integration can subscribe to it or read its stream."
)


@cache
def message_model(cls: type[Event]) -> type[BaseModel]:
    """The envelope whose `data` is this event: the message on the wire."""
    name = cls.__name__
    model: type[BaseModel] = create_model(
        f"{name}Message",
        __base__=Envelope,
        __doc__=f"The envelope of a {name} event (DESIGN A4).",
        event_type=(Literal[name], name),  # type: ignore[valid-type,arg-type]  # a Literal of this event's name
        data=(cls, ...),
    )
    return model


def address(cls: type[Event]) -> str:
    """The channel, with the site as a parameter (FastStream's `{name}` syntax)."""
    prefix = [ROOT, RESTRICTED] if cls.restricted else [ROOT]
    return ".".join([*prefix, cls.producer, event_name(cls.__name__), "{site_id}"])


def produced_by(service: str) -> list[type[Event]]:
    return [cls for _, cls in sorted(EVENT_TYPES.items()) if cls.producer == service]


def declare_publishers(service: str, broker: NatsBroker, restricted_broker: NatsBroker) -> None:
    for cls in produced_by(service):
        subject = address(cls)
        description = (cls.__doc__ or cls.__name__).strip()
        if cls.restricted:
            description = f"{description}\n\n{READABLE_BY_NOTIFICATIONS_ONLY}"
        (restricted_broker if cls.restricted else broker).publisher(
            subject,
            stream=JStream(stream_for_subject(subject), declare=False),
            schema=message_model(cls),
            title=f"{cls.__name__}:publish",
            description=description,
        )
