"""Enroll, grant a Part 2 consent, submit an urgent check-in as the patient: a plain
nats-py subscriber sees CheckInSubmitted with risk urgent and none of the free text."""

from datetime import UTC, date, datetime

import httpx

from iopnet.testing import BusRecorder, eventually
from tests.conftest import auth
from tests.e2e.test_enrollment_flow import publish_program

FREE_TEXT = ("Stay away from the old crowd", "Lost my job today", "Marguerite", "Okonkwo-Bell")


async def test_urgent_check_in_reaches_the_bus_without_free_text(network) -> None:
    site_id = "columbus-east"
    bus = await BusRecorder(network.nats_url, network.observed_subjects).start()
    desk = auth("front_desk", [site_id])
    intake = network.url("intake")
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            site = {"site_id": site_id, "name": "Columbus East", "timezone": "America/New_York"}
            assert (await http.post(f"{intake}/sites", json=site, headers=auth("network_admin"))).status_code == 201
            program_id = await publish_program(http, network.url("scheduling"), site_id)
            patient = {
                "site_id": site_id,
                "given_name": FREE_TEXT[2],
                "family_name": FREE_TEXT[3],
                "birth_date": "1988-08-08",
                "email": "mob@example.org",
                "preferred_channel": "email",
            }
            patient_id = (await http.post(f"{intake}/patients", json=patient, headers=desk)).json()["patient_id"]
            enrollment = {
                "program_id": program_id,
                "level_of_care": "2.1",
                "cohort": "adult",
                "start_date": str(date.today()),
                "referral_source": "court",
            }

            async def enrolled():
                response = await http.post(f"{intake}/patients/{patient_id}/enrollments", json=enrollment, headers=desk)
                return response if response.status_code == 201 else None

            await eventually(enrolled, what="intake to know the program")
            consent = {
                "recipient": "class:treating_providers",
                "purpose": "care_coordination",
                "information": "Check-in results and attendance",
                "expires_event": "end_of_treatment",
                "signed_at": datetime.now(UTC).isoformat(),
            }
            me = auth("patient", [], patient_id)
            assert (
                await http.post(f"{intake}/patients/{patient_id}/consents", json=consent, headers=me)
            ).status_code == 201
            check_in = {
                "mood": 2,
                "craving": 9,
                "used_since_last": True,
                "safety_concern": True,
                "substances": ["alcohol"],
                "goals": FREE_TEXT[0],
                "challenges": FREE_TEXT[1],
            }
            submitted = await http.post(
                f"{intake}/patients/{patient_id}/check-ins",
                json=check_in,
                headers={**me, "Idempotency-Key": "e2e-urgent-1"},
            )
            assert submitted.status_code == 201, submitted.text
            assert submitted.json()["risk"] == "urgent"
            [message] = await bus.wait_for_event("CheckInSubmitted", timeout=20)
            await bus.wait_for_event("ConsentGranted", timeout=20)
    finally:
        await bus.stop()
    envelope = message.envelope()
    assert message.subject == f"iop.intake.check_in_submitted.{site_id}"
    assert envelope["data"]["risk"] == "urgent"
    assert envelope["data"]["patient_id"] == patient_id
    assert set(envelope["data"]) == {
        "check_in_id",
        "patient_id",
        "enrollment_id",
        "submitted_at",
        "mood",
        "craving",
        "used_since_last",
        "safety_concern",
        "risk",
    }
    for seen in bus.messages:
        assert not any(text in seen.data.decode() for text in FREE_TEXT), seen.subject
        assert "alcohol" not in seen.data.decode()
