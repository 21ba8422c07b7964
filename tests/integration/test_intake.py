"""Intake against a real nats-server and a real database (SQLite and PostgreSQL)."""

import json
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from iopnet.testing import BusRecorder, eventually
from services.intake import store
from services.intake.app import create_app
from tests.conftest import auth, make_settings, program_published, publish, running

SITE = {"site_id": "columbus-east", "name": "Columbus East", "timezone": "America/New_York"}
PATIENT = {
    "site_id": "columbus-east",
    "given_name": "Marisol",
    "family_name": "Quintanilla",
    "birth_date": "1988-04-12",
    "phone": "+16145550142",
    "email": "marisol.q@example.org",
    "preferred_channel": "sms",
    "language": "es",
}
PHI_VALUES = ("Marisol", "Quintanilla", "1988-04-12", "+16145550142", "marisol.q@example.org")
ADMIN = auth("network_admin")
FRONT_DESK = auth("front_desk", ["columbus-east"])


def enrollment_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "program_id": "adult-iop-am",
        "level_of_care": "2.1",
        "cohort": "adult",
        "start_date": (date.today() + timedelta(days=3)).isoformat(),
        "referral_source": "physician",
    }
    body.update(overrides)
    return body


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, intake_database_url=database_url))


async def with_program(app, nats_url: str, site_id: str = "columbus-east", program_id: str = "adult-iop-am") -> None:
    """Scheduling publishes the program; intake's projection must know it before enrolling."""
    await publish(nats_url, program_published(site_id, program_id))

    async def known():
        async with app.state.runtime.sessions() as session:
            return await store.get_program(session, program_id)

    await eventually(known, what=f"program {program_id} projected")


async def count(app, table) -> int:
    async with app.state.runtime.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(table))).scalar_one())


async def test_enrollment_publishes_events_with_phi_only_on_restricted(app, nats_server, bus: BusRecorder) -> None:
    async with running(app) as client:
        assert (await client.post("/sites", json=SITE, headers=ADMIN)).status_code == 201
        await with_program(app, nats_server.url)
        created = await client.post("/patients", json=PATIENT, headers=FRONT_DESK)
        assert created.status_code == 201, created.text
        patient_id = created.json()["patient_id"]
        assert created.json()["mrn"].startswith("IOP-")
        enrolled = await client.post(f"/patients/{patient_id}/enrollments", json=enrollment_body(), headers=FRONT_DESK)
        assert enrolled.status_code == 201, enrolled.text
        enrollment_id = enrolled.json()["enrollment_id"]
        assert enrolled.json()["status"] == "pending"  # starts in three days

        [site_event] = await bus.wait_for_event("SiteRegistered")
        [contact] = await bus.wait_for_event("PatientContactChanged")
        [enrollment] = await bus.wait_for_event("PatientEnrolled")

    assert site_event.subject == "iop.intake.site_registered.columbus-east"
    assert contact.subject == "iop.restricted.intake.patient_contact_changed.columbus-east"
    assert contact.envelope()["data"]["phone"] == "+16145550142"
    assert enrollment.subject == "iop.intake.patient_enrolled.columbus-east"
    envelope = enrollment.envelope()
    assert envelope["producer"] == "intake" and envelope["schema_version"] == 1
    assert envelope["data"]["patient_id"] == patient_id
    assert envelope["data"]["enrollment_id"] == enrollment_id
    assert enrollment.headers["Nats-Msg-Id"] == envelope["event_id"]
    for message in bus.messages:
        if not message.subject.startswith("iop.restricted."):
            for value in PHI_VALUES:
                assert value not in message.data.decode(), f"{value} leaked on {message.subject}"


async def test_patient_read_is_audited_and_scoped(app) -> None:
    async with running(app) as client:
        await client.post("/sites", json=SITE, headers=ADMIN)
        await client.post("/sites", json={**SITE, "site_id": "dayton-north"}, headers=ADMIN)
        patient_id = (await client.post("/patients", json=PATIENT, headers=FRONT_DESK)).json()["patient_id"]

        read = await client.get(f"/patients/{patient_id}", headers=auth("clinician", ["columbus-east"]))
        assert read.status_code == 200 and read.json()["given_name"] == "Marisol"
        other_site = await client.get(f"/patients/{patient_id}", headers=auth("clinician", ["dayton-north"]))
        assert other_site.status_code == 404
        missing = await client.get(f"/patients/{'0' * 8}-0000-0000-0000-{'0' * 12}", headers=FRONT_DESK)
        assert missing.status_code == 404
        assert other_site.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
        own = await client.get(f"/patients/{patient_id}", headers=auth("patient", [], patient_id))
        assert own.status_code == 200
        stranger = auth("patient", [], "11111111-1111-1111-1111-111111111111")
        assert (await client.get(f"/patients/{patient_id}", headers=stranger)).status_code == 404
        assert (
            await client.get(f"/patients/{patient_id}", headers=auth("integration", ["columbus-east"]))
        ).status_code == 403
        assert (await client.get(f"/patients/{patient_id}")).status_code == 401
        bad = {"Authorization": "Bearer not-a-jwt"}
        assert (await client.get(f"/patients/{patient_id}", headers=bad)).status_code == 401

        audit = await client.get(
            "/audit", params={"patient_id": patient_id}, headers=auth("site_admin", ["columbus-east"])
        )
        assert audit.status_code == 200
        actions = [(row["action"], row["role"]) for row in audit.json()]
        assert ("patient.create", "front_desk") in actions
        assert ("patient.read", "clinician") in actions
        assert ("patient.read", "patient") in actions
        assert ("patient.read.denied", "clinician") in actions
        other_admin = await client.get("/audit", headers=auth("site_admin", ["dayton-north"]))
        assert all(row["site_id"] == "dayton-north" for row in other_admin.json())
        assert (await client.get("/audit", headers=FRONT_DESK)).status_code == 403


async def test_a_taken_mrn_is_drawn_again_and_the_patient_registered_once(app, monkeypatch) -> None:
    """The MRN's unique index decides, in the insert itself: a draw that collides writes
    nothing, and the next draw registers the patient (one row, one contact event)."""
    async with running(app) as client:
        await client.post("/sites", json=SITE, headers=ADMIN)
        first = (await client.post("/patients", json=PATIENT, headers=FRONT_DESK)).json()
        draws = iter([first["mrn"], first["mrn"], "IOP-FRESH123"])
        monkeypatch.setattr("services.intake.domain.new_mrn", lambda: next(draws))
        other = {**PATIENT, "given_name": "Rosalind", "birth_date": "1990-02-03"}
        second = await client.post("/patients", json=other, headers=FRONT_DESK)
        assert second.status_code == 201, second.text
        assert second.json()["mrn"] == "IOP-FRESH123"
        assert next(draws, None) is None  # the taken MRN was drawn twice, then the fresh one
        assert await count(app, store.patients) == 2
        assert await count(app, store.outbox.table) == 3  # SiteRegistered, two contacts


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"birth_date": "2999-01-01"}, "birth_date"),
        ({"site_id": "Not A Slug"}, "site_id"),
        ({"phone": "555"}, "phone"),
        ({"preferred_channel": "pigeon"}, "preferred_channel"),
        ({"given_name": ""}, "given_name"),
        ({"favourite_colour": "blue"}, "favourite_colour"),
    ],
)
async def test_invalid_patient_is_422_and_writes_nothing(app, change: dict, field: str) -> None:
    async with running(app) as client:
        await client.post("/sites", json=SITE, headers=ADMIN)
        response = await client.post("/patients", json={**PATIENT, **change}, headers=FRONT_DESK)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid"
        assert field in json.dumps(error["fields"]) or field in error["message"]
        assert "Marisol" not in response.text  # the rejected input is never echoed
        assert await count(app, store.patients) == 0
        assert await count(app, store.outbox.table) == 1  # only SiteRegistered


async def test_bad_requests(app, nats_server) -> None:
    async with running(app) as client:
        await with_program(app, nats_server.url)
        assert (await client.post("/sites", json=SITE, headers=FRONT_DESK)).status_code == 403
        assert (await client.post("/sites", json=SITE)).status_code == 401
        assert (await client.post("/sites", json={**SITE, "timezone": "Mars/Base"}, headers=ADMIN)).status_code == 422
        assert (await client.post("/sites", json=SITE, headers=ADMIN)).status_code == 201
        duplicate = await client.post("/sites", json=SITE, headers=ADMIN)
        assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "conflict"
        not_json = await client.post(
            "/patients", content=b"{not json", headers={**FRONT_DESK, "content-type": "application/json"}
        )
        assert not_json.status_code == 422
        huge = {**PATIENT, "given_name": "x" * 100_000}
        assert (await client.post("/patients", json=huge, headers=FRONT_DESK)).status_code == 413
        other_site = await client.post("/patients", json={**PATIENT, "site_id": "dayton-north"}, headers=FRONT_DESK)
        assert other_site.status_code == 404
        patient_id = (await client.post("/patients", json=PATIENT, headers=FRONT_DESK)).json()["patient_id"]
        first = await client.post(f"/patients/{patient_id}/enrollments", json=enrollment_body(), headers=FRONT_DESK)
        assert first.status_code == 201
        second = await client.post(f"/patients/{patient_id}/enrollments", json=enrollment_body(), headers=FRONT_DESK)
        assert second.status_code == 409
        bad_level = await client.post(
            f"/patients/{patient_id}/enrollments", json=enrollment_body(level_of_care="9"), headers=FRONT_DESK
        )
        assert bad_level.status_code == 422
        assert await count(app, store.enrollments) == 1


async def test_health_and_docs(app) -> None:
    async with running(app) as client:
        assert (await client.get("/healthz")).json()["status"] == "ok"
        ready = await client.get("/readyz")
        # The broker connects in the background; readiness follows within moments.
        from iopnet.testing import eventually

        async def is_ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(is_ready, what="intake ready")
        assert ready.status_code in (200, 503)
        # It says who answers: a process that took another's port cannot pass for it.
        assert (await client.get("/readyz")).json()["service"] == "intake"
        assert (await client.get("/docs")).status_code == 200
        assert "/patients" in (await client.get("/openapi.json")).json()["paths"]
        asyncapi = (await client.get("/asyncapi")).json()
        assert asyncapi["channels"]["PatientEnrolled:publish"]["address"] == "iop.intake.patient_enrolled.{site_id}"
