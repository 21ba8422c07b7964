"""Subject scheme of DESIGN A4: iop[.restricted].<producer>.<event_name>.<site_id>."""

import pytest

from shared.contracts.events import EVENT_TYPES
from shared.contracts.subjects import dlq_subject, event_name, event_subject, parse_subject


@pytest.mark.parametrize(
    ("event_type", "expected"),
    [
        ("PatientEnrolled", "patient_enrolled"),
        ("SiteRegistered", "site_registered"),
        ("CheckInSubmitted", "check_in_submitted"),
        ("HoursAtRisk", "hours_at_risk"),
        ("CareTeamAlerted", "care_team_alerted"),
        ("Single", "single"),
    ],
)
def test_event_name_is_snake_case(event_type, expected):
    assert event_name(event_type) == expected


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_every_catalog_event_name_is_a_clean_subject_token(event_type):
    name = event_name(event_type)
    assert name == name.lower()
    assert "." not in name
    assert not name.startswith("_")
    assert "__" not in name
    assert name.replace("_", "") == event_type.lower()


def test_public_subject():
    assert event_subject("intake", "PatientEnrolled", "columbus-east") == "iop.intake.patient_enrolled.columbus-east"


def test_restricted_subject():
    assert (
        event_subject("intake", "PatientContactChanged", "columbus-east", restricted=True)
        == "iop.restricted.intake.patient_contact_changed.columbus-east"
    )


@pytest.mark.parametrize("site_id", ["ab", "a" * 40, "site-1", "0-0"])
def test_valid_site_ids_accepted(site_id):
    assert event_subject("scheduling", "SessionScheduled", site_id).endswith(f".{site_id}")


@pytest.mark.parametrize(
    "site_id",
    ["", "a", "a" * 41, "Columbus", "columbus_east", "columbus.east", "columbus east", "site>", "site*", "é-site"],
)
def test_bad_site_ids_rejected(site_id):
    with pytest.raises(ValueError, match="site id"):
        event_subject("intake", "PatientEnrolled", site_id)


def test_dlq_subject():
    assert (
        dlq_subject("notifications", "patient_enrolled", "columbus-east")
        == "iop.dlq.notifications.patient_enrolled.columbus-east"
    )


@pytest.mark.parametrize("restricted", [False, True])
@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_parse_subject_round_trip(event_type, restricted):
    producer = EVENT_TYPES[event_type].producer
    parsed = parse_subject(event_subject(producer, event_type, "columbus-east", restricted=restricted))
    assert parsed.producer == producer
    assert parsed.event_name == event_name(event_type)
    assert parsed.site_id == "columbus-east"
    assert parsed.restricted is restricted


@pytest.mark.parametrize(
    "subject",
    [
        "",
        "iop",
        "iop.intake.patient_enrolled",
        "nats.intake.patient_enrolled.columbus-east",
        "iop.intake.patient_enrolled.Columbus",
        "iop.intake.patient_enrolled.x",
        "iop.intake.patient_enrolled.columbus-east.extra",
        "iop.restricted.intake.patient_contact_changed.columbus-east.extra",
        "iop.dlq.notifications.patient_enrolled.columbus-east",
        "iop.intake.patient_enrolled.>",
        "iop.intake.patient_enrolled.*",
    ],
)
def test_parse_subject_rejects_bad_subjects(subject):
    with pytest.raises(ValueError, match="not an iopnet event subject"):
        parse_subject(subject)


@pytest.mark.parametrize(
    "subject",
    [
        "iop.restricted.patient_enrolled.columbus-east",  # 'restricted' taken as the producer
        "iop.billing.patient_enrolled.columbus-east",  # not a producer of DESIGN A4
        "iop.intake..columbus-east",  # empty event name
    ],
)
def test_parse_subject_rejects_unknown_producer_or_empty_name(subject):
    with pytest.raises(ValueError, match="not an iopnet event subject"):
        parse_subject(subject)
