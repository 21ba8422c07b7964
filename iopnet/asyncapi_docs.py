"""The three services' AsyncAPI documents, committed under docs/asyncapi/ for integrators
and tooling. `make schemas` (python -m iopnet.asyncapi_docs) writes them;
tests/contract/test_asyncapi.py fails when a committed one is stale or invalid.

Built from the same contracts and subscriptions the services serve at /asyncapi."""

import json
from pathlib import Path
from typing import Any

from shared.contracts.asyncapi import asyncapi_document
from shared.settings import SERVICES

DOCS_DIR = Path(__file__).resolve().parents[1] / "docs" / "asyncapi"


def subscribed_event_types(service: str) -> list[str]:
    # Imported here: the subscriptions live in the services, which the CLI loads only when needed.
    if service == "intake":
        from services.intake.handlers import SUBSCRIPTIONS
    elif service == "scheduling":
        from services.scheduling.handlers import SUBSCRIPTIONS
    else:
        from services.notifications.handlers import SUBSCRIPTIONS
    return sorted({event_type for subscription in SUBSCRIPTIONS for event_type in subscription.event_types()})


def documents() -> dict[str, dict[str, Any]]:
    return {service: asyncapi_document(service, subscribed_event_types(service)) for service in SERVICES}


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


def main() -> None:
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    for service, document in documents().items():
        (DOCS_DIR / f"{service}.json").write_text(render(document))
        print(f"wrote {DOCS_DIR / f'{service}.json'}")


if __name__ == "__main__":
    main()
