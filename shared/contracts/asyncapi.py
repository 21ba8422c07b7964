"""The AsyncAPI 3 document each service serves at /asyncapi, built from the contracts."""

from typing import Any

from shared.contracts.envelope import Envelope
from shared.contracts.events import EVENT_TYPES
from shared.contracts.subjects import RESTRICTED, ROOT, event_name


def _address(event_type: str) -> str:
    cls = EVENT_TYPES[event_type]
    prefix = [ROOT, RESTRICTED] if cls.restricted else [ROOT]
    return ".".join([*prefix, cls.producer, event_name(event_type), "{site_id}"])


def asyncapi_document(service: str, subscribes: list[str], version: str = "0.1.0") -> dict[str, Any]:
    publishes = sorted(t for t, cls in EVENT_TYPES.items() if cls.producer == service)
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for event_type in sorted({*publishes, *subscribes}):
        schema = Envelope.model_json_schema()
        schema["properties"]["data"] = EVENT_TYPES[event_type].model_json_schema()
        messages[event_type] = {"name": event_type, "contentType": "application/json", "payload": schema}
        channels[event_type] = {
            "address": _address(event_type),
            "parameters": {"site_id": {"description": "site slug [a-z0-9-]{2,40}"}},
            "messages": {event_type: {"$ref": f"#/components/messages/{event_type}"}},
        }
    for event_type in publishes:
        operations[f"publish{event_type}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{event_type}"},
        }
    for event_type in sorted(subscribes):
        operations[f"consume{event_type}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{event_type}"},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": f"iopnet {service}", "version": version},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }
