"""JSON Schema of every event, committed under schemas/ and checked by tests/contract.

`python -m shared.contracts.schemas` rewrites the committed files; run it only for an
additive change (the contract test refuses removals, renames and type changes).
"""

import json
from pathlib import Path
from typing import Any

from shared.contracts.envelope import Envelope
from shared.contracts.events import EVENT_TYPES

SCHEMA_DIR = Path(__file__).parent / "schemas"


def current_schemas() -> dict[str, dict[str, Any]]:
    schemas = {name: cls.model_json_schema() for name, cls in sorted(EVENT_TYPES.items())}
    schemas["Envelope"] = Envelope.model_json_schema()
    return schemas


def committed_schemas() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(SCHEMA_DIR.glob("*.json"))}


def write_schemas() -> None:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, schema in current_schemas().items():
        (SCHEMA_DIR / f"{name}.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_schemas()
