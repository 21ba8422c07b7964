"""The console's screens (issue 13) over HTTP, as a browser without scripts uses them,
against the three real services, a real nats-server and a real OpenID Connect provider:
the front desk registers (meeting the duplicate warning), enrolls and sees the bookings
scheduling made; a clinician records attendance with one tap on today's roster and reads
the patient page (episodes, check-ins and their trend, consents granted and revoked,
messages); a site admin also sees the audit trail and the accounting of disclosures, edits
the weekly template, closes a day and sets the care team and reminders; a network admin
adds a site and registers an integration. Each role is kept to its screens, and a
clinician of another site sees nothing of this one."""

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from iopnet.testing import eventually
from shared import clock
from tests.conftest import auth
from tests.console import (
    OTHER,
    SITE,
    a_patient_with_an_enrollment,
    a_site_with_a_program,
    browser,
    csrf,
    sign_in,
)
from tests.oidc import add_user

HTMX = {"HX-Request": "true"}


def patient_link(page: httpx.Response) -> str:
    found = re.search(r'href="/patients/([0-9a-f-]{36})"', page.text)
    assert found, page.text
    return found.group(1)


async def test_the_front_desk_registers_meets_the_duplicate_warning_enrolls_and_sees_the_bookings(
    network: dict[str, Any], issuer: str
) -> None:
    program_id, today = await a_site_with_a_program(network)
    add_user(issuer, "desk.lee", iopnet_role="front_desk", iopnet_sites=[SITE])
    async with browser(network["console"]) as desk:
        landing = await sign_in(desk, "desk.lee")
        assert landing.url.path == "/today"
        form = await desk.get("/patients/new")
        person = {"csrf": csrf(form), "site_id": SITE, "given_name": "Rosa", "family_name": "Delgado",
                  "birth_date": "1988-04-12", "phone": "+16145550123", "preferred_channel": "sms",
                  "language": "es"}  # fmt: skip
        assert (await desk.post("/patients/new", data={**person, "csrf": "forged"})).status_code == 403
        created = await desk.post("/patients/new", data=person)
        assert created.status_code == 200 and re.fullmatch(r"/patients/[0-9a-f-]{36}", created.url.path)
        patient_id = created.url.path.rsplit("/", 1)[1]
        assert "Rosa Delgado" in created.text and "Not enrolled." in created.text

        again = await desk.post("/patients/new", data=person)
        assert again.status_code == 409 and 'id="duplicate"' in again.text
        assert f'href="/patients/{patient_id}"' in again.text  # the record it may be
        assert 'name="confirmed_not_duplicate"' in again.text and 'value="Rosa"' in again.text
        twin = await desk.post("/patients/new", data={**person, "csrf": csrf(again), "confirmed_not_duplicate": "true"})
        assert twin.status_code == 200 and twin.url.path != created.url.path

        enrollment = {"csrf": csrf(created), "program_id": program_id, "level_of_care": "2.1", "cohort": "adult",
                      "start_date": str(today), "referral_source": "physician"}  # fmt: skip
        enrolled = await desk.post(f"/patients/{patient_id}/enroll", data=enrollment)
        assert enrolled.status_code == 200 and program_id in enrolled.text
        assert "active" in enrolled.text and "physician" in enrolled.text

        async def booked() -> bool:
            page = await desk.get(f"/patients/{patient_id}")
            return 'class="booking"' in page.text and "Evening group" in page.text

        await eventually(booked, what="scheduling's bookings on the patient page")
        page = await desk.get(f"/patients/{patient_id}")
        assert 'id="audit"' not in page.text  # the audit trail is for site admins
        roster = await desk.get("/today")
        assert "Evening group" in roster.text and "Rosa Delgado" in roster.text
        assert 'name="status"' not in roster.text  # attendance is the clinicians'
        assert (await desk.get("/programs")).status_code == 403


async def test_a_clinician_records_attendance_with_one_tap_and_reads_the_patient_page(
    network: dict[str, Any], issuer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    patient_id = await a_patient_with_an_enrollment(network)
    add_user(issuer, "dr.rivera", iopnet_role="clinician", iopnet_sites=[SITE])
    add_user(issuer, "dr.other", iopnet_role="clinician", iopnet_sites=[OTHER])
    patient_auth = auth("patient", patient_id=patient_id)
    for mood, craving in ((4, 7), (6, 5), (8, 2)):
        check_in = {"mood": mood, "craving": craving, "used_since_last": False, "safety_concern": False}
        answer = await network["desk"].post(f"/patients/{patient_id}/check-ins", json=check_in, headers=patient_auth)
        assert answer.status_code == 201

    async with browser(network["console"]) as clinician, browser(network["console"]) as elsewhere:
        await sign_in(clinician, "dr.rivera")

        async def on_the_roster() -> bool:
            return "Ada Okafor" in (await clinician.get("/today")).text

        await eventually(on_the_roster, what="the booking on today's roster")
        assert 'name="status"' not in (await clinician.get("/today")).text  # not started: nothing to record yet
        [tonight] = (await network["calendar"].get(f"/sites/{SITE}/sessions", headers=auth("clinician", [SITE]))).json()
        started = datetime.fromisoformat(tonight["starts_at"]) + timedelta(minutes=5)
        monkeypatch.setattr(clock, "now", lambda: started)  # the services' one clock: five minutes into it
        today = await clinician.get("/today")
        session_id = re.search(r'action="/today/sessions/([0-9a-f-]{36})/attendance"', today.text)
        assert session_id
        tap = {"csrf": csrf(today), "patient_id": patient_id, "status": "late"}
        card = await clinician.post(f"/today/sessions/{session_id.group(1)}/attendance", data=tap, headers=HTMX)
        assert card.status_code == 200 and card.text.lstrip().startswith('<section class="card"')
        assert 'value="late" aria-label="Late: Ada Okafor" aria-pressed="true"' in card.text
        monkeypatch.undo()  # back to now (the tests' tokens expire by the services' clock)
        recorded = await network["calendar"].get(f"/sessions/{session_id.group(1)}", headers=auth("clinician", [SITE]))
        [entry] = recorded.json()["roster"]
        assert entry["attendance"] == "late" and entry["minutes"] == 45  # 60 less the late quarter hour

        page = await clinician.get(f"/patients/{patient_id}")
        assert page.status_code == 200 and "Ada Okafor" in page.text
        assert "<svg" in page.text and "<polyline" in page.text and "(3)" in page.text  # the trend of 3 check-ins
        assert page.text.count('class="low"') + page.text.count('class="elevated"') == 3
        assert "Evening group" in page.text and 'id="audit"' not in page.text

        grant = {"csrf": csrf(page), "recipient": "org:county-court", "purpose": "court_reporting",
                 "information": "attendance only", "expires_on": str(date.today() + timedelta(days=90))}  # fmt: skip
        granted = await clinician.post(f"/patients/{patient_id}/consents", data=grant)
        assert granted.status_code == 200 and "org:county-court" in granted.text
        consent_id = re.search(r'consents/([0-9a-f-]{36})/revoke"', granted.text)
        assert consent_id
        revoked = await clinician.post(
            f"/patients/{patient_id}/consents/{consent_id.group(1)}/revoke", data={"csrf": csrf(granted)}
        )
        assert revoked.status_code == 200 and "revoked" in revoked.text

        # Another site's clinician: no record, no roster, no name.
        await sign_in(elsewhere, "dr.other")
        walled = await elsewhere.get(f"/patients/{patient_id}")
        assert walled.status_code == 404 and "Ada" not in walled.text
        assert "Ada Okafor" not in (await elsewhere.get("/today")).text
        assert "Evening group" not in (await elsewhere.get("/programs")).text
        assert (await elsewhere.get(f"/today?site={SITE}")).text.count("Evening group") == 0
        assert (await clinician.get("/settings")).status_code == 403


async def test_a_site_admin_sees_the_audit_trail_edits_the_week_and_sets_the_care_team(
    network: dict[str, Any], issuer: str
) -> None:
    patient_id = await a_patient_with_an_enrollment(network)
    add_user(issuer, "admin.kim", iopnet_role="site_admin", iopnet_sites=[SITE])
    async with browser(network["console"]) as admin:
        await sign_in(admin, "admin.kim")
        page = await admin.get(f"/patients/{patient_id}")
        assert 'id="audit"' in page.text and 'id="disclosures"' in page.text
        assert "admin.kim (site_admin)" in page.text  # this very read is in the trail

        programs = await admin.get("/programs")
        assert "Adult IOP evenings" in programs.text and "Hours report" in programs.text
        template = {"csrf": csrf(programs), "site_id": SITE, "name": "Adolescent afternoons", "cohort": "adolescent",
                    "level_of_care": "2.1", "weekly_hours_target": "6", "weekday_0": "2", "start_0": "15:30",
                    "minutes_0": "90", "kind_0": "group_therapy", "title_0": "Skills group", "weekday_1": "4",
                    "start_1": "15:30", "minutes_1": "90", "kind_1": "workshop", "title_1": "Family workshop",
                    "title_2": ""}  # fmt: skip
        published = await admin.post("/programs", data=template)
        assert published.status_code == 200 and "Adolescent afternoons" in published.text
        assert "Skills group" in published.text and "Family workshop" in published.text
        listed = await network["calendar"].get(
            "/programs", params={"site_id": SITE}, headers=auth("site_admin", [SITE])
        )
        assert {p["name"] for p in listed.json()} == {"Adult IOP evenings", "Adolescent afternoons"}

        closure = {"csrf": csrf(published), "day": str(date.today() + timedelta(days=30)), "reason": "holiday"}
        assert (await admin.post(f"/sites/{SITE}/closures", data=closure)).status_code == 200

        settings = await admin.get("/settings")
        assert "Dr. On Call" in settings.text
        member = {"csrf": csrf(settings), "name": "Nurse Park", "role": "nurse", "channel": "sms",
                  "address": "+16145550199"}  # fmt: skip
        added = await admin.post(f"/settings/{SITE}/care-team", data=member)
        assert added.status_code == 200 and "Saved." in added.text and "Nurse Park" in added.text
        team = await network["notify"].get(f"/sites/{SITE}/care-team", headers=auth("site_admin", [SITE]))
        assert [m["name"] for m in team.json()["members"]] == ["Dr. On Call", "Nurse Park"]  # on-call order kept
        reminders = {"csrf": csrf(added), "reminder_offsets": "1440, 90", "quiet_start": "21:00", "quiet_end": "07:00"}
        saved = await admin.post(f"/settings/{SITE}/notifications", data=reminders)
        assert saved.status_code == 200 and 'value="1440, 90"' in saved.text
        assert (await admin.get("/network")).status_code == 403


async def test_a_network_admin_adds_a_site_and_registers_an_integration(network: dict[str, Any], issuer: str) -> None:
    add_user(issuer, "net.ops", iopnet_role="network_admin")
    async with browser(network["console"]) as admin:
        await sign_in(admin, "net.ops")
        page = await admin.get("/network")
        site = {"csrf": csrf(page), "site_id": "toledo-west", "name": "Toledo West", "timezone": "America/New_York"}
        added = await admin.post("/network/sites", data=site)
        assert added.status_code == 200 and "Toledo West" in added.text
        integration = {"csrf": csrf(added), "integration_id": "county-ehr", "sites": "toledo-west", "basis": "qsoa"}
        registered = await admin.post("/network/integrations", data=integration)
        password = re.search(r'<code id="integration-password">([^<]+)</code>', registered.text)
        assert registered.status_code == 200 and password and len(password.group(1)) >= 16
        again = await admin.get("/network")
        assert password.group(1) not in again.text and "county-ehr" in again.text  # shown once
        revoked = await admin.post("/network/integrations/county-ehr/revoke", data={"csrf": csrf(again)})
        assert revoked.status_code == 200 and "revoked" in revoked.text


async def test_choosing_a_language_returns_to_the_same_screen_and_never_off_site(
    network: dict[str, Any], issuer: str
) -> None:
    add_user(issuer, "net.ops", iopnet_role="network_admin")
    async with browser(network["console"]) as admin:
        await sign_in(admin, "net.ops")
        spanish = await admin.get("/language/es", params={"next": "/network"})
        assert spanish.url.path == "/network" and "Sedes" in spanish.text and '<html lang="es">' in spanish.text
        for elsewhere in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
            answer = await admin.get("/language/en", params={"next": elsewhere}, follow_redirects=False)
            assert answer.headers["location"] == "/"


async def test_a_patient_sees_their_schedule_and_consents_and_revokes_one(network: dict[str, Any], issuer: str) -> None:
    patient_id = await a_patient_with_an_enrollment(network)
    consent = {"recipient": "org:county-court", "purpose": "court_reporting", "information": "attendance only",
               "signed_at": datetime.now(UTC).isoformat(), "expires_event": "end_of_treatment"}  # fmt: skip
    granted = await network["desk"].post(
        f"/patients/{patient_id}/consents", json=consent, headers=auth("front_desk", [SITE])
    )
    assert granted.status_code == 201
    add_user(issuer, "ada", iopnet_role="patient", iopnet_patient_id=patient_id)
    async with browser(network["console"]) as patient:
        page = await sign_in(patient, "ada")
        assert page.url.path == "/me" and "My consents" in page.text and "org:county-court" in page.text

        async def scheduled() -> bool:
            return "Evening group" in (await patient.get("/me")).text

        await eventually(scheduled, what="the patient's schedule")
        page = await patient.get("/me")
        revoked = await patient.post(f"/me/consents/{granted.json()['consent_id']}/revoke", data={"csrf": csrf(page)})
        assert revoked.status_code == 200 and "The consent is revoked." in revoked.text
        assert "revoked" in revoked.text and 'action="/me/consents/' not in revoked.text
        # A patient is kept to their own page.
        assert (await patient.get("/today")).status_code == 403
        assert (await patient.get(f"/patients/{patient_id}")).status_code == 403
