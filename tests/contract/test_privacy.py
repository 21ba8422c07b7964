"""No PHI on the public bus (DESIGN A4): only restricted events carry contact details,
and every event lands on its producer's stream."""

from typing import Any

import pytest

from shared.contracts.events import EVENT_TYPES, DisclosureRecorded, PatientContactChanged
from shared.contracts.subjects import event_subject
from shared.messaging.streams import STREAMS, stream_for_subject

PHI_FIELDS = frozenset(
    {
        "given_name", "family_name", "name_normalized", "birth_date", "dob", "phone", "email", "address",
        "notes", "note", "text", "comment", "comments", "challenges", "substances", "goal_text",
        "description",
    }
)  # fmt: skip
PRODUCER_STREAMS = {"intake": "IOP_INTAKE", "scheduling": "IOP_SCHEDULING", "notifications": "IOP_NOTIFICATIONS"}
PUBLIC = sorted(name for name, cls in EVENT_TYPES.items() if not cls.restricted)


def property_names(schema: dict[str, Any]) -> set[str]:
    """Every property name anywhere in a JSON Schema, nested models and $defs included."""
    names: set[str] = set()
    if isinstance(schema, dict):
        for name, sub in schema.get("properties", {}).items():
            names.add(name)
            names |= property_names(sub)
        for key, value in schema.items():
            if key != "properties":
                names |= property_names(value)
    elif isinstance(schema, list):
        for item in schema:
            names |= property_names(item)
    return names


def test_property_names_sees_nested_models():
    schema = {
        "properties": {"goals": {"type": "array", "items": {"$ref": "#/$defs/Goal"}}},
        "$defs": {"Goal": {"properties": {"text": {"type": "string"}}}},
    }
    assert property_names(schema) == {"goals", "text"}


def test_phi_check_would_catch_a_leak():
    leaky = {"properties": {"patient_id": {}, "extra": {"anyOf": [{"properties": {"email": {}}}]}}}
    assert property_names(leaky) & PHI_FIELDS == {"email"}


def test_the_restricted_set_is_contact_details_and_disclosure_reports():
    # Contact details (intake -> notifications), and who received a patient's records
    # under their consent (notifications -> intake, for the accounting of disclosures).
    assert {cls for cls in EVENT_TYPES.values() if cls.restricted} == {PatientContactChanged, DisclosureRecorded}


def test_restricted_event_is_the_one_that_carries_contact_details():
    assert {"phone", "email"} <= set(PatientContactChanged.model_fields)


@pytest.mark.parametrize("event_type", PUBLIC)
def test_public_event_carries_no_phi(event_type):
    cls = EVENT_TYPES[event_type]
    assert set(cls.model_fields).isdisjoint(PHI_FIELDS)
    assert property_names(cls.model_json_schema()).isdisjoint(PHI_FIELDS)


def test_goals_travel_without_text():
    goal = EVENT_TYPES["TreatmentPlanUpdated"].model_json_schema()["$defs"]["GoalStatus"]
    assert set(goal["properties"]) == {"goal_id", "status"}


@pytest.mark.parametrize("event_type", PUBLIC)
def test_public_event_names_patients_by_uuid_only(event_type):
    schema = EVENT_TYPES[event_type].model_json_schema()
    patient_fields = {name for name in schema["properties"] if "patient" in name}
    assert patient_fields <= {"patient_id"}
    if patient_fields:
        assert schema["properties"]["patient_id"]["format"] == "uuid"


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_producer_is_a_service(event_type):
    assert EVENT_TYPES[event_type].producer in PRODUCER_STREAMS


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_event_lands_on_its_producers_stream(event_type):
    cls = EVENT_TYPES[event_type]
    subject = event_subject(cls.producer, event_type, "columbus-east", restricted=cls.restricted)
    expected = "IOP_RESTRICTED" if cls.restricted else PRODUCER_STREAMS[cls.producer]
    assert stream_for_subject(subject) == expected


def test_restricted_stream_is_separate_from_the_public_intake_stream():
    subject = event_subject("intake", "PatientContactChanged", "columbus-east", restricted=True)
    assert stream_for_subject(subject) == "IOP_RESTRICTED"
    assert stream_for_subject(event_subject("intake", "PatientContactChanged", "columbus-east")) == "IOP_INTAKE"
    assert STREAMS["IOP_RESTRICTED"].subjects == ("iop.restricted.>",)


def test_no_stream_holds_foreign_subjects():
    with pytest.raises(ValueError, match="no stream"):
        stream_for_subject("iop.billing.invoice_sent.columbus-east")
