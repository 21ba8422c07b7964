"""A program published at scheduling, a patient enrolled through intake, bookings on the
bus, attendance and completion: all three services as separate processes.

The session is placed at the next whole minute in a site whose local time allows it, and the
test waits (with a deadline) until attendance is accepted, i.e. until it has started."""

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import httpx

from iopnet.testing import BusRecorder, eventually
from tests.conftest import auth

ZONES = ("America/New_York", "Europe/London", "Asia/Tokyo", "Australia/Sydney", "America/Los_Angeles", "Asia/Kolkata")


def site_zone_and_start() -> tuple[str, datetime]:
    for zone in ZONES:
        # The next whole minute at least 20 s away: time to publish and book before it starts.
        start = (datetime.now(ZoneInfo(zone)) + timedelta(seconds=80)).replace(second=0, microsecond=0)
        if 5 <= start.hour < 22:
            return zone, start
    raise AssertionError("no candidate zone is within clinic hours")


async def test_program_enrollment_booking_attendance_completion(network) -> None:
    zone, start = site_zone_and_start()
    site_id = "e2e-site"
    bus = await BusRecorder(network.nats_url, network.observed_subjects).start()
    admin, site_admin = auth("network_admin"), auth("site_admin", [site_id])
    desk, clinician = auth("front_desk", [site_id]), auth("clinician", [site_id])
    intake, scheduling = network.url("intake"), network.url("scheduling")
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            site = {"site_id": site_id, "name": "E2E", "timezone": zone}
            assert (await http.post(f"{intake}/sites", json=site, headers=admin)).status_code == 201

            async def site_known() -> bool:
                return any(
                    s["site_id"] == site_id for s in (await http.get(f"{scheduling}/sites", headers=desk)).json()
                )

            await eventually(site_known, what="scheduling learned the site")
            block = {"weekday": start.isoweekday(), "start": start.strftime("%H:%M"), "minutes": 15,
                     "kind": "check_in_group", "title": "Morning check-in"}  # fmt: skip
            program = await http.post(
                f"{scheduling}/programs",
                json={"site_id": site_id, "name": "Adult IOP", "cohort": "adult", "blocks": [block]},
                headers=site_admin,
            )
            assert program.status_code == 201, program.text
            program_id = program.json()["program_id"]

            async def program_known() -> bool:  # intake learns it from ProgramPublished
                listed = (await http.get(f"{intake}/programs", headers=desk)).json()
                return any(p["program_id"] == program_id for p in listed)

            await eventually(program_known, what="intake learned the program")

            patient = {"site_id": site_id, "given_name": "Robin", "family_name": "Okafor", "birth_date": "1984-02-29",
                       "email": "robin@example.org", "preferred_channel": "email"}  # fmt: skip
            patient_id = (await http.post(f"{intake}/patients", json=patient, headers=desk)).json()["patient_id"]
            enrollment = {"program_id": program_id, "level_of_care": "2.1", "cohort": "adult",
                          "start_date": start.date().isoformat(), "referral_source": "self"}  # fmt: skip
            enrolled = await http.post(f"{intake}/patients/{patient_id}/enrollments", json=enrollment, headers=desk)
            assert enrolled.status_code == 201, enrolled.text

            booked = await bus.wait_for(
                lambda m: "patient_booked" in m.subject and m.envelope()["data"]["patient_id"] == patient_id,
                timeout=20,
            )
            first = booked[0].envelope()["data"]
            assert datetime.fromisoformat(first["starts_at"]).astimezone(ZoneInfo(zone)) == start
            session_id = first["session_id"]
            record = {"records": [{"patient_id": patient_id, "status": "present", "minutes": 15}]}

            async def attendance_accepted() -> bool:
                response = await http.post(f"{scheduling}/sessions/{session_id}/attendance", json=record,
                                           headers=clinician)  # fmt: skip
                assert response.status_code in (200, 422), response.text
                return response.status_code == 200

            await eventually(attendance_accepted, timeout=200, interval=1.0, what="the session to start")
            completed = await http.post(f"{scheduling}/sessions/{session_id}/complete", headers=clinician)
            assert completed.status_code == 200, completed.text
            [done] = await bus.wait_for_event("SessionCompleted", timeout=20)
            [attended] = await bus.wait_for_event("AttendanceRecorded", timeout=20)
    finally:
        await bus.stop()
    assert done.envelope()["data"]["session_id"] == session_id
    assert done.envelope()["data"]["present_count"] == 1
    assert attended.envelope()["data"] == {"session_id": session_id, "patient_id": patient_id, "status": "present",
                                           "minutes": 15}  # fmt: skip
    assert booked[0].envelope()["correlation_id"] == enrolled_correlation(bus, enrolled.json()["enrollment_id"])


def enrolled_correlation(bus: BusRecorder, enrollment_id: str) -> str:
    [message] = bus.matching(
        lambda m: "patient_enrolled" in m.subject and m.envelope()["data"]["enrollment_id"] == enrollment_id
    )
    return str(message.envelope()["correlation_id"])
