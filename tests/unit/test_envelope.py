"""Envelope of DESIGN A4: ids, causality, wire round trip of every event type."""

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from shared.contracts.envelope import Envelope, UnknownEventType, caused_by, new_envelope
from shared.contracts.events import EVENT_TYPES, Event, PatientContactChanged, PatientEnrolled

SITE = "columbus-east"
P, E, S, X = (str(uuid4()) for _ in range(4))  # patient, enrollment, session, any other id
WHEN = "2025-03-09T14:30:00Z"

# One valid `data` per event type (DESIGN A5). A new event type must add a sample here.
SAMPLES: dict[str, dict[str, Any]] = {
    "SiteRegistered": {"name": "Columbus East", "timezone": "America/New_York"},
    "PatientEnrolled": {
        "patient_id": P, "enrollment_id": E, "program_id": "adult-iop", "level_of_care": "2.1",
        "cohort": "adult", "start_date": "2025-03-10", "referral_source": "self",
    },
    "PatientContactChanged": {
        "patient_id": P, "phone": "+16145550100", "email": "pat@example.org",
        "preferred_channel": "sms", "language": "es",
    },
    "ConsentGranted": {
        "consent_id": X, "patient_id": P, "recipient": "billing", "purpose": "payment",
        "expires_on": "2026-01-01",
    },
    "ConsentRevoked": {
        "consent_id": X, "patient_id": P, "recipient": "billing", "purpose": "payment", "expires_on": None,
    },
    "CheckInSubmitted": {
        "check_in_id": X, "patient_id": P, "enrollment_id": E, "submitted_at": WHEN, "mood": 6,
        "craving": 2, "used_since_last": False, "safety_concern": False, "risk": "low",
    },
    "TreatmentPlanUpdated": {
        "patient_id": P, "enrollment_id": E, "plan_id": X,
        "goals": [{"goal_id": str(uuid4()), "status": "active"}, {"goal_id": str(uuid4()), "status": "met"}],
    },
    "PatientTransferred": {
        "patient_id": P, "enrollment_id": E, "from_site_id": SITE, "to_site_id": "dayton-north",
        "to_program_id": "adult-iop", "effective_on": "2025-04-01",
    },
    "PatientDischarged": {
        "patient_id": P, "enrollment_id": E, "reason": "completed", "discharged_on": "2025-06-01",
    },
    "ProgramPublished": {
        "program_id": "adult-iop", "name": "Adult evening", "level_of_care": "2.1", "cohort": "adult",
        "weekly_hours_target": 9.0,
        "template": [
            {"weekday": 1, "start": "18:00", "minutes": 60, "kind": "check_in_group", "title": "Check-in",
             "capacity": 12},
            {"weekday": 3, "start": "18:00", "minutes": 90, "kind": "group_therapy", "title": "Group",
             "capacity": 12},
        ],
    },
    "SessionScheduled": {
        "session_id": S, "program_id": "adult-iop", "kind": "workshop", "title": "Stress management",
        "starts_at": WHEN, "ends_at": "2025-03-09T15:30:00Z", "capacity": 10,
    },
    "SessionCancelled": {
        "session_id": S, "program_id": "adult-iop", "kind": "wrap_up", "title": "Wrap-up",
        "starts_at": WHEN, "ends_at": "2025-03-09T15:00:00Z", "capacity": 10,
    },
    "PatientBooked": {"booking_id": X, "session_id": S, "patient_id": P, "starts_at": WHEN},
    "BookingCancelled": {
        "booking_id": X, "session_id": S, "patient_id": P, "starts_at": WHEN, "reason": "session_cancelled",
    },
    "PatientWaitlisted": {"session_id": S, "patient_id": P, "position": 2},
    "AttendanceRecorded": {"session_id": S, "patient_id": P, "status": "late", "minutes": 45},
    "SessionCompleted": {
        "session_id": S, "kind": "individual_therapy", "started_at": WHEN,
        "ended_at": "2025-03-09T15:20:00Z", "present_count": 1, "absent_count": 0,
    },
    "HoursAtRisk": {
        "patient_id": P, "enrollment_id": E, "iso_week": "2025-W10", "attended_hours": 3.0,
        "remaining_booked_hours": 4.5, "target_hours": 9.0,
    },
    "WeeklyHoursShortfall": {
        "patient_id": P, "enrollment_id": E, "iso_week": "2025-W10", "attended_hours": 6.5, "target_hours": 9.0,
    },
    "NotificationSent": {
        "notification_id": X, "recipient_kind": "patient", "channel": "sms", "template": "welcome",
        "cause_event_id": str(uuid4()), "attempts": 1,
    },
    "NotificationFailed": {
        "notification_id": X, "recipient_kind": "care_team", "channel": "webhook", "template": "alert",
        "cause_event_id": str(uuid4()), "attempts": 5,
    },
    "CareTeamAlerted": {
        "alert_id": X, "patient_id": P, "reason": "urgent_check_in", "severity": "urgent",
        "cause_event_id": str(uuid4()),
    },
    "IntegrationRegistered": {
        "integration_id": "acme-ehr", "sites": ["columbus-east"], "basis": "consent", "purpose": "research",
    },
    "IntegrationRevoked": {"integration_id": "acme-ehr"},
    "DisclosureRecorded": {
        "patient_id": P, "recipient": "org:acme-ehr", "purpose": "research", "channel": "webhook",
        "event_type": "CheckInSubmitted", "event_id": X, "disclosed_at": "2025-03-10T14:00:00Z",
    },
}  # fmt: skip


def sample(event_type: str) -> Event:
    return EVENT_TYPES[event_type].model_validate(SAMPLES[event_type])


def test_every_event_type_has_a_sample():
    assert set(SAMPLES) == set(EVENT_TYPES)


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_round_trip_every_event_type(event_type):
    event = sample(event_type)
    envelope = new_envelope(event, site_id=SITE)

    raw = envelope.to_bytes()
    back = Envelope.from_bytes(raw)

    assert back == envelope
    assert back.event_type == event_type
    assert back.producer == EVENT_TYPES[event_type].producer
    assert back.event() == event
    assert type(back.event()) is EVENT_TYPES[event_type]
    wire = json.loads(raw)
    assert set(wire) == {
        "event_id", "event_type", "schema_version", "occurred_at", "producer", "site_id",
        "correlation_id", "causation_id", "data",
    }  # fmt: skip
    assert wire["schema_version"] == 1
    assert wire["data"] == json.loads(event.model_dump_json())


def test_new_envelope_starts_a_new_chain():
    envelope = new_envelope(sample("PatientEnrolled"), site_id=SITE)
    assert isinstance(envelope.event_id, UUID)
    assert envelope.correlation_id == envelope.event_id
    assert envelope.causation_id is None
    assert envelope.site_id == SITE
    assert envelope.producer == "intake"


def test_new_envelope_ids_are_unique():
    event = sample("PatientEnrolled")
    assert new_envelope(event, site_id=SITE).event_id != new_envelope(event, site_id=SITE).event_id


def test_new_envelope_keeps_given_correlation_and_causation():
    correlation, causation = uuid4(), uuid4()
    envelope = new_envelope(sample("PatientEnrolled"), site_id=SITE, correlation_id=correlation, causation_id=causation)
    assert envelope.correlation_id == correlation
    assert envelope.causation_id == causation
    assert envelope.event_id not in (correlation, causation)


def test_caused_by_passes_correlation_on_and_points_at_the_cause():
    root = new_envelope(sample("CheckInSubmitted"), site_id=SITE)
    reaction = caused_by(root, sample("CareTeamAlerted"))
    second = caused_by(reaction, sample("NotificationSent"))

    assert reaction.correlation_id == root.correlation_id == root.event_id
    assert reaction.causation_id == root.event_id
    assert reaction.event_id != root.event_id
    assert reaction.site_id == SITE
    assert reaction.producer == "notifications"
    assert second.correlation_id == root.correlation_id
    assert second.causation_id == reaction.event_id


def test_caused_by_may_change_site():
    root = new_envelope(sample("PatientTransferred"), site_id=SITE)
    reaction = caused_by(root, sample("PatientBooked"), site_id="dayton-north")
    assert reaction.site_id == "dayton-north"
    assert reaction.correlation_id == root.correlation_id
    assert reaction.causation_id == root.event_id


def test_occurred_at_is_rfc3339_utc_with_z():
    est = timezone(timedelta(hours=-5))
    envelope = new_envelope(
        sample("PatientEnrolled"), site_id=SITE, occurred_at=datetime(2025, 3, 9, 9, 30, 15, tzinfo=est)
    )
    occurred = json.loads(envelope.to_bytes())["occurred_at"]
    assert occurred.endswith("Z")
    assert occurred.startswith("2025-03-09T14:30:15")
    assert datetime.fromisoformat(occurred) == datetime(2025, 3, 9, 14, 30, 15, tzinfo=UTC)


def test_default_occurred_at_is_now_utc():
    before = datetime.now(UTC)
    envelope = new_envelope(sample("PatientEnrolled"), site_id=SITE)
    assert before <= envelope.occurred_at <= datetime.now(UTC)
    assert json.loads(envelope.to_bytes())["occurred_at"].endswith("Z")


def test_naive_occurred_at_rejected():
    with pytest.raises(ValidationError, match="occurred_at"):
        new_envelope(sample("PatientEnrolled"), site_id=SITE, occurred_at=datetime(2025, 3, 9, 9, 30))


def test_naive_occurred_at_rejected_on_the_wire():
    wire = json.loads(new_envelope(sample("PatientEnrolled"), site_id=SITE).to_bytes())
    wire["occurred_at"] = "2025-03-09T09:30:00"
    with pytest.raises(ValidationError, match="occurred_at"):
        Envelope.from_bytes(json.dumps(wire).encode())


def test_bad_site_id_rejected():
    with pytest.raises(ValidationError, match="site_id"):
        new_envelope(sample("PatientEnrolled"), site_id="Columbus East")


def _wire(**changes: Any) -> bytes:
    wire = json.loads(new_envelope(sample("PatientEnrolled"), site_id=SITE).to_bytes())
    wire.update(changes)
    return json.dumps(wire).encode()


def test_unknown_event_type_raises_unknown_event_type():
    envelope = Envelope.from_bytes(_wire(event_type="PatientAbducted"))
    with pytest.raises(UnknownEventType):
        envelope.event_class()
    with pytest.raises(UnknownEventType):
        envelope.event()
    with pytest.raises(UnknownEventType):
        _ = envelope.subject


def test_unknown_event_type_is_a_value_error():
    assert issubclass(UnknownEventType, ValueError)


@pytest.mark.parametrize(
    "data",
    [
        {**SAMPLES["PatientEnrolled"], "patient_id": "not-a-uuid"},
        {**SAMPLES["PatientEnrolled"], "cohort": "senior"},
        {**SAMPLES["PatientEnrolled"], "start_date": "yesterday"},
        {k: v for k, v in SAMPLES["PatientEnrolled"].items() if k != "enrollment_id"},
    ],
)
def test_invalid_data_raises_validation_error(data):
    envelope = Envelope.from_bytes(_wire(data=data))
    with pytest.raises(ValidationError):
        envelope.event()


@pytest.mark.parametrize(("field", "value"), [("mood", 0), ("mood", 11), ("craving", -1), ("craving", 11)])
def test_check_in_scales_are_bounded(field, value):
    envelope = new_envelope(sample("CheckInSubmitted"), site_id=SITE)
    broken = Envelope.from_bytes(_wire(event_type="CheckInSubmitted", data={**envelope.data, field: value}))
    with pytest.raises(ValidationError, match=field):
        broken.event()


def test_unknown_data_fields_are_ignored_for_additive_changes():
    envelope = Envelope.from_bytes(_wire(data={**SAMPLES["PatientEnrolled"], "added_later": 1}))
    assert envelope.event() == sample("PatientEnrolled")


def test_unknown_envelope_fields_are_ignored():
    envelope = Envelope.from_bytes(_wire(trace_id="abc"))
    assert envelope.event() == sample("PatientEnrolled")


@pytest.mark.parametrize(
    ("field", "value"),
    [("schema_version", 2), ("producer", "billing"), ("event_id", "nope"), ("correlation_id", None)],
)
def test_bad_envelope_fields_rejected(field, value):
    with pytest.raises(ValidationError, match=field):
        Envelope.from_bytes(_wire(**{field: value}))


def test_envelope_is_immutable():
    envelope = new_envelope(sample("PatientEnrolled"), site_id=SITE)
    with pytest.raises(ValidationError):
        envelope.site_id = "dayton-north"  # type: ignore[misc]


def test_public_subject():
    envelope = new_envelope(sample("PatientEnrolled"), site_id=SITE)
    assert envelope.subject == f"iop.intake.patient_enrolled.{SITE}"


def test_restricted_event_goes_on_the_restricted_subject():
    envelope = new_envelope(sample("PatientContactChanged"), site_id=SITE)
    assert PatientContactChanged.restricted is True
    assert PatientEnrolled.restricted is False
    assert envelope.subject == f"iop.restricted.intake.patient_contact_changed.{SITE}"
    assert Envelope.from_bytes(envelope.to_bytes()).subject == envelope.subject
