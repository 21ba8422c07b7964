"""Additive-only contract (DESIGN A): the models against the committed JSON Schemas.

`compatibility_problems(committed, current)` lists every way `current` would break a
reader or a replay of `committed`: a property removed or renamed, a type/format/$ref/
pattern changed, an enum narrowed, an anyOf member added or dropped, a field made
required. Adding an optional field or an enum value is fine.
"""

import copy
from typing import Any

import pytest

from shared.contracts.events import EVENT_TYPES
from shared.contracts.schemas import SCHEMA_DIR, committed_schemas, current_schemas

Schema = dict[str, Any]
_MISSING = object()


def _members(schema: Schema) -> list[Schema]:
    return schema.get("anyOf", [schema])


def _types(schema: Schema) -> set[str]:
    kind = schema.get("type")
    return set(kind) if isinstance(kind, list) else {kind} if kind else set()


def _ref(schema: Schema) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


def _enum(schema: Schema) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    return schema.get("enum")


def value_problems(old: Schema, new: Schema, where: str) -> list[str]:
    old_members, new_members = _members(old), _members(new)
    if len(old_members) > 1 or len(new_members) > 1:
        problems = []
        for member in old_members:
            if all(value_problems(member, n, where) for n in new_members):
                problems.append(f"{where}: anyOf member {member} dropped or changed")
        for member in new_members:
            if all(value_problems(o, member, where) for o in old_members):
                problems.append(f"{where}: anyOf member {member} added")
        return problems
    problems = []
    if _types(old) != _types(new):
        problems.append(f"{where}: type {sorted(_types(old))} -> {sorted(_types(new))}")
    for key in ("format", "pattern"):
        if old.get(key) != new.get(key):
            problems.append(f"{where}: {key} {old.get(key)!r} -> {new.get(key)!r}")
    if _ref(old) != _ref(new):
        problems.append(f"{where}: $ref {_ref(old)!r} -> {_ref(new)!r}")
    old_enum, new_enum = _enum(old), _enum(new)
    if new_enum is not None:
        lost = [v for v in old_enum or [] if v not in new_enum]
        if old_enum is None or lost:
            problems.append(f"{where}: enum narrowed, lost {lost or 'open values'}")
    if "items" in old:
        problems += value_problems(old["items"], new.get("items", {}), f"{where}[]")
    if "properties" in old:
        problems += object_problems(old, new, where)
    return problems


def object_problems(old: Schema, new: Schema, where: str) -> list[str]:
    problems = []
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name, prop in old_props.items():
        if name not in new_props:
            problems.append(f"{where}.{name}: removed")
        else:
            problems += value_problems(prop, new_props[name], f"{where}.{name}")
    for name in sorted(set(new.get("required", [])) - set(old.get("required", []))):
        kind = "optional field made required" if name in old_props else "new field is required"
        problems.append(f"{where}.{name}: {kind}")
    return problems


def compatibility_problems(old: Schema, new: Schema) -> list[str]:
    """Why `new` is not an additive evolution of `old` (empty: compatible)."""
    title = old.get("title", "schema")
    problems = object_problems(old, new, title)
    new_defs = new.get("$defs", {})
    for name, definition in old.get("$defs", {}).items():
        if name not in new_defs:
            problems.append(f"{title}.$defs.{name}: removed")
        else:
            problems += value_problems(definition, new_defs[name], f"{title}.$defs.{name}")
    return problems


# --- the real contract -------------------------------------------------------------

COMMITTED = committed_schemas()
CURRENT = current_schemas()


def test_schemas_are_committed():
    assert SCHEMA_DIR.is_dir()
    assert "Envelope" in COMMITTED
    assert len(COMMITTED) >= len(EVENT_TYPES)


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_every_event_has_a_committed_schema(event_type):
    assert (SCHEMA_DIR / f"{event_type}.json").is_file()
    assert event_type in COMMITTED


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_no_committed_schema_lost_its_model(name):
    assert name in CURRENT, f"{name} was removed or renamed: events are never removed from the contract"


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_current_model_is_compatible_with_committed_schema(name):
    assert compatibility_problems(COMMITTED[name], CURRENT[name]) == []


# --- the checker on hand-made schemas ------------------------------------------------

BASE: Schema = {
    "title": "Sample",
    "type": "object",
    "properties": {
        "patient_id": {"type": "string", "format": "uuid"},
        "status": {"type": "string", "enum": ["present", "late", "absent"]},
        "version": {"type": "integer", "const": 1, "default": 1},
        "reason": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "goals": {"type": "array", "items": {"$ref": "#/$defs/Goal"}},
        "starts_at": {"type": "string", "format": "date-time"},
    },
    "required": ["patient_id", "status", "goals", "starts_at"],
    "$defs": {
        "Goal": {
            "title": "Goal",
            "type": "object",
            "properties": {
                "goal_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": ["active", "met"]},
            },
            "required": ["goal_id", "status"],
        }
    },
}


def changed(edit) -> Schema:
    schema = copy.deepcopy(BASE)
    edit(schema)
    return schema


def props(schema: Schema) -> Schema:
    return schema["properties"]


def test_identical_schema_is_compatible():
    assert compatibility_problems(BASE, copy.deepcopy(BASE)) == []


def test_adding_an_optional_field_is_compatible():
    new = changed(lambda s: props(s).update(site_note_id={"type": "string", "format": "uuid"}))
    assert compatibility_problems(BASE, new) == []


def test_widening_an_enum_is_compatible():
    new = changed(lambda s: props(s)["status"]["enum"].append("excused"))
    assert compatibility_problems(BASE, new) == []


def test_cosmetic_changes_are_compatible():
    def edit(s: Schema) -> None:
        props(s)["status"]["title"] = "Attendance status"
        props(s)["reason"]["description"] = "why"
        s["required"] = list(reversed(s["required"]))

    assert compatibility_problems(BASE, changed(edit)) == []


def test_adding_an_optional_field_to_a_nested_model_is_compatible():
    new = changed(lambda s: props(s["$defs"]["Goal"]).update(weight={"type": "integer"}))
    assert compatibility_problems(BASE, new) == []


def _rename(s: Schema) -> None:
    props(s)["patient"] = props(s).pop("patient_id")
    s["required"] = ["patient" if r == "patient_id" else r for r in s["required"]]


BREAKING = {
    "remove a field": lambda s: props(s).pop("starts_at"),
    "remove an optional field": lambda s: props(s).pop("reason"),
    "rename a field": _rename,
    "change a type": lambda s: props(s)["patient_id"].update(type="integer"),
    "change a format": lambda s: props(s)["starts_at"].update(format="date"),
    "drop a format": lambda s: props(s)["patient_id"].pop("format"),
    "narrow an enum": lambda s: props(s)["status"]["enum"].remove("late"),
    "change a const": lambda s: props(s)["version"].update(const=2),
    "make an optional field required": lambda s: s["required"].append("reason"),
    "add a required field": lambda s: (
        props(s).update(extra={"type": "string"}),
        s["required"].append("extra"),
    ),
    "make a field nullable": lambda s: props(s).update(
        starts_at={"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}
    ),
    "drop null from an optional field": lambda s: props(s).update(reason={"type": "string"}),
    "change an anyOf member": lambda s: props(s)["reason"]["anyOf"].__setitem__(0, {"type": "integer"}),
    "retarget a $ref": lambda s: props(s)["goals"]["items"].update({"$ref": "#/$defs/Objective"}),
    "change array items": lambda s: props(s)["goals"].update(items={"type": "string"}),
    "remove a nested field": lambda s: props(s["$defs"]["Goal"]).pop("status"),
    "narrow a nested enum": lambda s: props(s["$defs"]["Goal"])["status"]["enum"].remove("met"),
    "remove a definition": lambda s: s["$defs"].pop("Goal"),
}


@pytest.mark.parametrize("change", sorted(BREAKING))
def test_breaking_change_is_reported(change):
    assert compatibility_problems(BASE, changed(BREAKING[change])), change


def test_problems_name_the_field():
    problems = compatibility_problems(BASE, changed(BREAKING["remove a field"]))
    assert problems == ["Sample.starts_at: removed"]


def test_checker_catches_a_break_in_a_real_event():
    new = copy.deepcopy(CURRENT["PatientEnrolled"])
    del new["properties"]["referral_source"]
    new["properties"]["cohort"]["enum"] = ["adult"]
    problems = compatibility_problems(COMMITTED["PatientEnrolled"], new)
    assert any("referral_source: removed" in p for p in problems)
    assert any("cohort: enum narrowed" in p for p in problems)
