"""Enrollment through all three services as separate processes, seen on the bus by a
plain nats-py subscriber. The network's nats-server has users: the subscriber is `ops`,
which sees every public subject and nothing on `iop.restricted.>`."""

from datetime import date, timedelta

import httpx
import pytest
from nats.js.errors import NotFoundError

from iopnet.natsd import RESTRICTED_USERS
from iopnet.testing import BusRecorder, eventually
from tests.conftest import auth, stream_count


async def publish_program(http: httpx.AsyncClient, scheduling: str, site_id: str) -> str:
    """Publish an adult program at scheduling, once scheduling has learned the site."""
    block = {"weekday": 2, "start": "18:00", "minutes": 180, "kind": "group_therapy", "title": "Evening group"}
    body = {"site_id": site_id, "name": "Adult IOP", "track": "evening", "cohort": "adult", "blocks": [block]}

    async def published():
        response = await http.post(f"{scheduling}/programs", json=body, headers=auth("site_admin", [site_id]))
        return response if response.status_code == 201 else None

    return str((await eventually(published, what="scheduling to know the site")).json()["program_id"])


PHI = ("Teodoro", "Villanueva", "1979-06-30", "+13805550199", "teo.v@example.org")


async def test_enrollment_reaches_a_welcome_notification(network) -> None:
    bus = await BusRecorder(network.nats_url, network.observed_subjects).start()
    admin, desk = auth("network_admin"), auth("front_desk", ["columbus-east"])
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            intake = network.url("intake")
            site = {"site_id": "columbus-east", "name": "Columbus East", "timezone": "America/New_York"}
            assert (await http.post(f"{intake}/sites", json=site, headers=admin)).status_code == 201
            program_id = await publish_program(http, network.url("scheduling"), "columbus-east")
            patient = {
                "site_id": "columbus-east",
                "given_name": PHI[0],
                "family_name": PHI[1],
                "birth_date": PHI[2],
                "phone": PHI[3],
                "email": PHI[4],
                "preferred_channel": "sms",
                "language": "en",
            }
            created = await http.post(f"{intake}/patients", json=patient, headers=desk)
            assert created.status_code == 201
            patient_id = created.json()["patient_id"]
            enrollment = {
                "program_id": program_id,
                "level_of_care": "2.1",
                "cohort": "adult",
                "start_date": (date.today() + timedelta(days=1)).isoformat(),
                "referral_source": "employer",
            }

            async def accepted():
                # Intake learns the program from ProgramPublished a moment after scheduling answers.
                response = await http.post(f"{intake}/patients/{patient_id}/enrollments", json=enrollment, headers=desk)
                return response if response.status_code == 201 else None

            enrolled = await eventually(accepted, what="intake to know the program")
            enrollment_id = enrolled.json()["enrollment_id"]

            [enrolled_msg] = await bus.wait_for_event("PatientEnrolled", timeout=20)
            [sent_msg] = await bus.wait_for_event("NotificationSent", timeout=20)

            async def scheduled():
                response = await http.get(f"{network.url('scheduling')}/enrollments/{enrollment_id}", headers=desk)
                return response if response.status_code == 200 else None

            assert (await eventually(scheduled, what="scheduling projection")).json()["patient_id"] == patient_id
            listed = await http.get(f"{network.url('notifications')}/patients/{patient_id}/notifications", headers=desk)
            # Besides the welcome, the bookings scheduling made have their reminders (issue 5).
            assert [n["status"] for n in listed.json() if n["template"] == "welcome"] == ["sent"]
            assert {n["template"] for n in listed.json()} <= {"welcome", "reminder_24h", "reminder_2h"}
    finally:
        await bus.stop()

    assert bus.messages.index(enrolled_msg) < bus.messages.index(sent_msg)
    enrolled_env, sent_env = enrolled_msg.envelope(), sent_msg.envelope()
    assert set(enrolled_env) == {
        "event_id", "event_type", "schema_version", "occurred_at", "producer",
        "site_id", "correlation_id", "causation_id", "data",
    }  # fmt: skip
    assert enrolled_env["occurred_at"].endswith("Z")
    assert sent_env["correlation_id"] == enrolled_env["correlation_id"]
    assert sent_env["causation_id"] == enrolled_env["event_id"]
    assert sent_env["data"]["cause_event_id"] == enrolled_env["event_id"]
    # PatientContactChanged went to IOP_RESTRICTED, in an account `ops` is not in: the
    # broker, not the subscriber, keeps contact details away.
    assert network.nats is not None
    reader = network.nats.user_url(RESTRICTED_USERS["notifications"])
    assert await stream_count(reader, "IOP_RESTRICTED") >= 1
    with pytest.raises(NotFoundError):
        await stream_count(network.nats_url, "IOP_RESTRICTED")
    assert not [m.subject for m in bus.messages if m.subject.startswith("iop.restricted.")]
    assert bus.messages, "public events were seen"
    for message in bus.messages:
        assert not any(value in message.data.decode() for value in PHI), message.subject
    for name in ("intake", "scheduling", "notifications"):
        log = (network.log_dir / f"{name}.log").read_text()
        assert not any(value in log for value in PHI), f"PHI in {name} log"
