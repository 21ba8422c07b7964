"""The AsyncAPI 3 document each service serves at /asyncapi, built from the contracts.

Every schema lives under `components.schemas`, named after its pydantic model, and is
referenced from there: pydantic's nested `$defs` (TemplateBlock, GoalStatus) would
otherwise sit inside a payload with references to `#/$defs/…`, which resolve against
the document root and are broken (tests/contract/test_asyncapi.py validates each
committed document with the AsyncAPI parser).
"""

from typing import Any

from pydantic import BaseModel

from shared.contracts.envelope import Envelope
from shared.contracts.events import EVENT_TYPES
from shared.contracts.subjects import RESTRICTED, ROOT, event_name

REF_TEMPLATE = "#/components/schemas/{model}"
READABLE_BY_NOTIFICATIONS_ONLY = (
    "Carries contact details. Published into the NATS account RESTRICTED, which only intake "
    "(publish) and notifications (consume) have users in: no other service, operator or "
    "integration can subscribe to it or read its stream."
)
NATS_MSG_ID = {
    "type": "object",
    "properties": {
        "Nats-Msg-Id": {
            "type": "string",
            "format": "uuid",
            "description": "The envelope's event_id: JetStream drops a re-published copy within its "
            "duplicate window; consumers de-duplicate on event_id after it.",
        }
    },
    "required": ["Nats-Msg-Id"],
}


def _address(event_type: str) -> str:
    cls = EVENT_TYPES[event_type]
    prefix = [ROOT, RESTRICTED] if cls.restricted else [ROOT]
    return ".".join([*prefix, cls.producer, event_name(event_type), "{site_id}"])


def _hoist(model: type[BaseModel], schemas: dict[str, Any]) -> None:
    """`model`'s schema and the models it nests, each once, under components.schemas."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema


def _message_schema(event_type: str) -> dict[str, Any]:
    """The envelope whose `data` is this event."""
    return {
        "allOf": [
            {"$ref": REF_TEMPLATE.format(model=Envelope.__name__)},
            {
                "type": "object",
                "properties": {
                    "event_type": {"const": event_type},
                    "data": {"$ref": REF_TEMPLATE.format(model=event_type)},
                },
            },
        ]
    }


def asyncapi_document(service: str, subscribes: list[str], version: str = "0.1.0") -> dict[str, Any]:
    publishes = sorted(t for t, cls in EVENT_TYPES.items() if cls.producer == service)
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    _hoist(Envelope, schemas)
    for event_type in sorted({*publishes, *subscribes}):
        cls = EVENT_TYPES[event_type]
        _hoist(cls, schemas)
        schemas[f"{event_type}Message"] = _message_schema(event_type)
        messages[event_type] = {
            "name": event_type,
            "contentType": "application/json",
            "headers": NATS_MSG_ID,
            "payload": {"$ref": REF_TEMPLATE.format(model=f"{event_type}Message")},
        }
        channels[event_type] = {
            "address": _address(event_type),
            "parameters": {"site_id": {"description": "site slug [a-z0-9-]{2,40}"}},
            "messages": {event_type: {"$ref": f"#/components/messages/{event_type}"}},
        }
        if cls.restricted:
            channels[event_type]["description"] = READABLE_BY_NOTIFICATIONS_ONLY
    for event_type in publishes:
        operations[f"publish{event_type}"] = {"action": "send", "channel": {"$ref": f"#/channels/{event_type}"}}
    for event_type in sorted(subscribes):
        operations[f"consume{event_type}"] = {"action": "receive", "channel": {"$ref": f"#/channels/{event_type}"}}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": f"iopnet {service}",
            "version": version,
            "description": "Events over NATS JetStream: subject iop.<producer>.<event>.<site_id>, "
            "a JSON envelope, Nats-Msg-Id = event_id (DESIGN A4).",
        },
        "defaultContentType": "application/json",
        "servers": {
            "embedded": {
                "host": "127.0.0.1:4223",
                "protocol": "nats",
                "description": "`iopnet run`'s embedded nats-server with JetStream",
                "security": [{"$ref": "#/components/securitySchemes/natsUser"}],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "natsUser": {
                    "type": "userPassword",
                    "description": "One NATS user per service, operator and integration, each with an "
                    "allow-list of subjects (README, Privacy)",
                }
            },
        },
    }
