"""The access matrix of intake: every role, on its own site and on another site, against
every patient-record endpoint, with the status DESIGN A3 promises (404 for another
site's record, 403 for a role that may not act, 401 without a token)."""

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from services.intake.app import create_app
from tests.conftest import auth, make_settings, running
from tests.integration.test_intake_care import DESK, SITE, enrolled_patient, setup_network

ROLES = ("network_admin", "site_admin", "clinician", "front_desk", "patient", "integration")
STAFF = {"network_admin", "site_admin", "clinician", "front_desk"}
CLINICAL = {"network_admin", "site_admin", "clinician"}


def expect(allowed: set[str], ok: int, *, patient_self: bool) -> dict[str, tuple[int, int]]:
    """(status on own site / own record, status on another site / someone else's record)."""
    table = {}
    for role in ROLES:
        may = role in allowed or (role == "patient" and patient_self)
        if not may:
            table[role] = (403, 403)
        elif role == "network_admin":
            table[role] = (ok, ok)  # sites are ignored for network admins
        else:
            table[role] = (ok, 404)
    return table


CHECK_IN = {"mood": 6, "craving": 2, "used_since_last": False, "safety_concern": False}
CONSENT = {"recipient": "class:treating_providers", "purpose": "treatment", "information": "Progress notes",
           "expires_event": "end_of_treatment", "signed_at": datetime(2026, 1, 1, tzinfo=UTC).isoformat()}  # fmt: skip

ENDPOINTS = [
    ("GET", "/patients/{pid}", None, expect(STAFF, 200, patient_self=True)),
    ("PATCH", "/patients/{pid}", {"language": "es"}, expect(STAFF, 200, patient_self=False)),
    ("POST", "/patients/{pid}/enrollments",
     {"program_id": "unknown-program", "level_of_care": "2.1", "cohort": "adult", "start_date": str(date.today()),
      "referral_source": "self"}, expect(STAFF, 422, patient_self=False)),
    ("GET", "/patients/{pid}/consents", None, expect(STAFF, 200, patient_self=True)),
    ("POST", "/patients/{pid}/consents", CONSENT, expect(STAFF, 201, patient_self=True)),
    ("POST", "/patients/{pid}/check-ins", CHECK_IN, expect(STAFF, 201, patient_self=True)),
    ("GET", "/patients/{pid}/check-ins", None, expect(STAFF, 200, patient_self=True)),
    ("GET", "/enrollments/{eid}", None, expect(STAFF, 200, patient_self=True)),
    ("GET", "/enrollments/{eid}/plan", None, expect(STAFF, 200, patient_self=True)),
    ("POST", "/enrollments/{eid}/plan/goals", {"text": "Sleep by 11"}, expect(CLINICAL, 201, patient_self=False)),
    ("POST", "/enrollments/{eid}/level", {"level_of_care": "2.1"}, expect(CLINICAL, 409, patient_self=False)),
]  # fmt: skip


def token_for(role: str, own: bool, patient_id: str) -> dict[str, str]:
    site = SITE if own else "dayton-north"
    if role == "patient":
        return auth("patient", [], patient_id if own else "3c4d5e6f-0000-4000-8000-000000000001")
    return auth(role, [site])  # type: ignore[arg-type]


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, intake_database_url=database_url))


async def test_access_matrix(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, enrollment_id = await enrolled_patient(client)
        failures = []
        for method, template, body, table in ENDPOINTS:
            path = template.format(pid=patient_id, eid=enrollment_id)
            anonymous = await client.request(method, path, json=body)
            if anonymous.status_code != 401:
                failures.append(f"{method} {template} without token: {anonymous.status_code}")
            for role, (own_status, other_status) in table.items():
                for own, wanted in ((True, own_status), (False, other_status)):
                    response = await client.request(method, path, json=body, headers=token_for(role, own, patient_id))
                    if response.status_code != wanted:
                        where = "own" if own else "other"
                        failures.append(f"{method} {template} as {role} ({where}): {response.status_code} != {wanted}")
        assert failures == [], "\n".join(failures)


async def test_lists_are_scoped_not_refused(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, _ = await enrolled_patient(client)
        mrn = (await client.get(f"/patients/{patient_id}", headers=DESK)).json()["mrn"]
        for role in ("site_admin", "clinician", "front_desk"):
            own = await client.get("/patients", params={"mrn": mrn}, headers=auth(role, [SITE]))
            other = await client.get("/patients", params={"mrn": mrn}, headers=auth(role, ["dayton-north"]))
            assert [p["patient_id"] for p in own.json()] == [patient_id], role
            assert other.json() == [], role
        own_audit = await client.get("/audit", params={"patient_id": patient_id}, headers=auth("site_admin", [SITE]))
        other_audit = await client.get("/audit", params={"patient_id": patient_id},
                                       headers=auth("site_admin", ["dayton-north"]))  # fmt: skip
        assert own_audit.json()
        assert other_audit.json() == []
        assert (await client.get("/audit", headers=auth("clinician", [SITE]))).status_code == 403
        sites = await client.get("/sites", headers=auth("front_desk", [SITE]))
        assert [s["site_id"] for s in sites.json()] == [SITE]
        assert (await client.post("/sites", json={"site_id": "x-1", "name": "X", "timezone": "UTC"},
                                  headers=auth("site_admin", [SITE]))).status_code == 403  # fmt: skip
