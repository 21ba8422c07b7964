"""Intake tried as a hostile insider with a valid token would try it (issue 8, parts 4
and 5), against the real app, a real nats-server and SQLite and PostgreSQL:

- no answer at one site differs because of another site's records: a registration that
  matches another site's patient is created as for a stranger, and the match goes to a
  potential-duplicate queue only network admins see, list and resolve (audited);
- a transfer needs the destination site, and an unseen, unknown or program-less
  destination all answer alike;
- every read of, and every denied attempt at, a patient record leaves an audit row;
- bad input answers 422 with the error object, never a 500 or a silent 200."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from services.intake import store
from services.intake.app import create_app
from tests.conftest import auth, make_settings, running
from tests.integration.test_intake_access import CHECK_IN, ENDPOINTS
from tests.integration.test_intake_care import (
    ADMIN,
    CLINICIAN,
    DESK,
    OTHER,
    SITE,
    TOMORROW,
    enrolled_patient,
    patient_body,
    setup_network,
)

OTHER_DESK = auth("front_desk", [OTHER])
BOTH_CLINICIAN = auth("clinician", [SITE, OTHER])
QUEUE = "/potential-duplicates"


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, intake_database_url=database_url))


async def audit_actions(client, patient_id: str) -> list[tuple[str, str, str]]:
    rows = (await client.get("/audit", params={"patient_id": patient_id}, headers=ADMIN)).json()
    return [(r["action"], r["role"], r["site_id"]) for r in rows]


async def audit_count(app) -> int:
    async with app.state.runtime.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(store.audit))).scalar_one())


def error_code(response: Any) -> str | None:
    """The A6 error object's code, or None for any other answer (a list, plain text)."""
    if response.headers.get("content-type") != "application/json":
        return None
    body = response.json()
    return body.get("error", {}).get("code") if isinstance(body, dict) else None


def shape(response: Any) -> tuple[int, list[str], list[str]]:
    """What a caller can tell two answers apart by, short of the new record's own ids."""
    body = response.json()
    return response.status_code, sorted(body), sorted(k for k, v in body.items() if v is None)


# --- 4. what one site learns about another ------------------------------------------------


async def test_a_match_at_another_site_answers_as_for_a_stranger(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        first = (await client.post("/patients", json=patient_body(), headers=DESK)).json()

        namesake = await client.post(
            "/patients", json={**patient_body("LUCIA", "Nunez"), "site_id": OTHER}, headers=OTHER_DESK
        )
        stranger = await client.post(
            "/patients", json={**patient_body("Wendell", "Okafor"), "site_id": OTHER}, headers=OTHER_DESK
        )
        assert namesake.status_code == stranger.status_code == 201, namesake.text
        assert shape(namesake) == shape(stranger)
        for leaked in (first["patient_id"], first["mrn"], SITE):
            assert leaked not in namesake.text
        # Nothing at site B tells its staff either: not its audit trail, not a search.
        other_admin = auth("site_admin", [OTHER])
        b_audit = (await client.get("/audit", headers=other_admin)).json()
        assert {r["action"] for r in b_audit} == {"patient.create"}
        assert all(r["patient_id"] != first["patient_id"] for r in b_audit)
        found = await client.get("/patients", params={"name": "lucia nunez"}, headers=OTHER_DESK)
        assert [p["patient_id"] for p in found.json()] == [namesake.json()["patient_id"]]

        queue = await client.get(QUEUE, headers=ADMIN)
        assert queue.status_code == 200, queue.text
        [row] = queue.json()
        assert row["patient_id"] == namesake.json()["patient_id"] and row["site_id"] == OTHER
        assert row["match_patient_id"] == first["patient_id"] and row["match_site_id"] == SITE
        assert row["status"] == "open" and row["resolution"] is None and row["created_at"]
        assert "Lucía" not in queue.text and "1991-07-04" not in queue.text  # ids and sites, no identity


async def test_same_site_duplicates_still_answer_409_and_queue_only_unseen_matches(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        at_b = (await client.post("/patients", json={**patient_body(), "site_id": OTHER}, headers=OTHER_DESK)).json()
        at_a = await client.post("/patients", json=patient_body("LUCIA", "NUNEZ"), headers=DESK)
        assert at_a.status_code == 201  # site A cannot see site B's record
        again = await client.post("/patients", json=patient_body(), headers=DESK)
        assert again.status_code == 409
        assert again.json()["error"]["fields"]["patient_id"] == at_a.json()["patient_id"]
        assert at_b["patient_id"] not in again.text  # only the caller's own site's record is named
        twin = await client.post("/patients", json=patient_body(confirmed_not_duplicate=True), headers=DESK)
        assert twin.status_code == 201
        both_desk = auth("front_desk", [SITE, OTHER])
        assert (await client.post("/patients", json=patient_body(), headers=both_desk)).status_code == 409

        queue = (await client.get(QUEUE, headers=ADMIN)).json()
        pairs = {(r["patient_id"], r["match_patient_id"]) for r in queue}
        # A desk's confirmation covers the records it was shown, never the unseen ones.
        assert pairs == {
            (at_a.json()["patient_id"], at_b["patient_id"]),
            (twin.json()["patient_id"], at_b["patient_id"]),
        }


async def test_the_potential_duplicate_queue_is_for_network_admins_audited_and_resolved_once(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        first = (await client.post("/patients", json=patient_body(), headers=DESK)).json()["patient_id"]
        second = (await client.post("/patients", json={**patient_body(), "site_id": OTHER}, headers=OTHER_DESK)).json()
        second_id = second["patient_id"]
        for role, sites in (("site_admin", [SITE, OTHER]), ("clinician", [SITE]), ("front_desk", [OTHER]),
                            ("integration", [SITE]), ("patient", [])):  # fmt: skip
            headers = auth(role, sites, first if role == "patient" else None)  # type: ignore[arg-type]
            listed = await client.get(QUEUE, headers=headers)
            assert listed.status_code == 403 and listed.json()["error"]["code"] == "forbidden", role
        assert (await client.get(QUEUE)).status_code == 401

        [row] = (await client.get(QUEUE, headers=ADMIN)).json()
        for patient_id, site in ((first, SITE), (second_id, OTHER)):
            assert ("patient.duplicate_review", "network_admin", site) in await audit_actions(client, patient_id)
        for role in ("site_admin", "front_desk"):
            refused = await client.post(f"{QUEUE}/{row['duplicate_id']}/link", headers=auth(role, [SITE, OTHER]))
            assert refused.status_code == 403, role

        linked = await client.post(f"{QUEUE}/{row['duplicate_id']}/link", headers=ADMIN)
        assert linked.status_code == 200, linked.text
        assert linked.json()["status"] == "resolved" and linked.json()["resolution"] == "linked"
        for second_try in ("link", "dismiss"):
            again = await client.post(f"{QUEUE}/{row['duplicate_id']}/{second_try}", headers=ADMIN)
            assert again.status_code == 409 and again.json()["error"]["code"] == "conflict", second_try
        for patient_id, site in ((first, SITE), (second_id, OTHER)):
            assert ("patient.duplicate_link", "network_admin", site) in await audit_actions(client, patient_id)
        assert (await client.get(QUEUE, headers=ADMIN)).json() == []  # open ones by default
        [resolved] = (await client.get(QUEUE, params={"status": "resolved"}, headers=ADMIN)).json()
        assert resolved["resolution"] == "linked" and resolved["resolved_at"]

        third = await client.post(
            "/patients", json={**patient_body(), "site_id": OTHER, "confirmed_not_duplicate": True}, headers=OTHER_DESK
        )
        [open_row] = (await client.get(QUEUE, headers=ADMIN)).json()
        assert open_row["patient_id"] == third.json()["patient_id"]
        dismissed = await client.post(f"{QUEUE}/{open_row['duplicate_id']}/dismiss", headers=ADMIN)
        assert dismissed.status_code == 200 and dismissed.json()["resolution"] == "dismissed"
        assert (await client.post(f"{QUEUE}/{open_row['duplicate_id']}/link", headers=ADMIN)).status_code == 409
        assert ("patient.duplicate_dismiss", "network_admin", OTHER) in await audit_actions(
            client, third.json()["patient_id"]
        )
        missing = await client.post(f"{QUEUE}/{'0' * 8}-0000-4000-8000-{'0' * 12}/dismiss", headers=ADMIN)
        assert missing.status_code == 404
        assert (await client.get(QUEUE, params={"status": "bogus"}, headers=ADMIN)).status_code == 422


async def test_a_transfer_needs_the_destination_site_and_unknowns_answer_alike(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        _, enrollment_id = await enrolled_patient(client)
        path = f"/enrollments/{enrollment_id}/transfer"

        def to(site: str, program: str) -> dict[str, str]:
            return {"to_site_id": site, "to_program_id": program, "effective_on": str(TOMORROW)}

        answers = {
            "unserved site": await client.post(path, json=to(OTHER, f"{OTHER}-adult"), headers=CLINICIAN),
            "unserved unknown site": await client.post(path, json=to("nowhere-east", "x"), headers=CLINICIAN),
            "unknown site": await client.post(path, json=to("nowhere-east", f"{OTHER}-adult"), headers=ADMIN),
            "unknown program": await client.post(path, json=to(OTHER, "no-such-program"), headers=BOTH_CLINICIAN),
            "other site's program": await client.post(path, json=to(OTHER, f"{SITE}-adult"), headers=BOTH_CLINICIAN),
        }
        bodies = {what: (r.status_code, r.json()) for what, r in answers.items()}
        assert len({repr(b) for b in bodies.values()}) == 1, bodies
        status, body = bodies["unserved site"]
        assert status == 422 and body["error"]["code"] == "invalid"
        still = await client.get(f"/enrollments/{enrollment_id}", headers=CLINICIAN)
        assert still.json()["status"] == "active"  # nothing moved

        moved = await client.post(path, json=to(OTHER, f"{OTHER}-adult"), headers=BOTH_CLINICIAN)
        assert moved.status_code == 201, moved.text
        assert moved.json()["site_id"] == OTHER


async def test_every_patient_record_read_and_denial_is_audited(app, nats_server) -> None:
    """Each patient-record endpoint, once allowed and once refused (another site's
    clinician): both leave an audit row naming the patient."""
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, enrollment_id = await enrolled_patient(client)
        own, other = auth("site_admin", [SITE]), auth("site_admin", [OTHER])
        missing = []
        for method, template, body, _ in ENDPOINTS:
            path = template.format(pid=patient_id, eid=enrollment_id)
            for headers, denied in ((own, False), (other, True)):
                before = await audit_count(app)
                answer = await client.request(method, path, json=body, headers=headers)
                if answer.status_code >= 400 and answer.status_code != 404:
                    continue  # refused as invalid input before anything was read
                actions = [a for a, _, _ in (await audit_actions(client, patient_id))]
                if await audit_count(app) <= before or actions[-1].endswith(".denied") != denied:
                    missing.append(f"{method} {template} ({'denied' if denied else 'allowed'}): {actions[-1:]}")
        assert missing == [], "\n".join(missing)


async def test_an_older_episode_at_an_unseen_site_is_refused_with_an_audit_row(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, enrollment_id = await enrolled_patient(client)
        body = {"to_site_id": OTHER, "to_program_id": f"{OTHER}-adult", "effective_on": str(TOMORROW)}
        moved = await client.post(f"/enrollments/{enrollment_id}/transfer", json=body, headers=BOTH_CLINICIAN)
        assert moved.status_code == 201, moved.text
        # The patient is now at site B; site B's staff may read them, not site A's old episode.
        refused = await client.get(f"/enrollments/{enrollment_id}", headers=auth("clinician", [OTHER]))
        assert refused.status_code == 404
        assert ("enrollment.read.denied", "clinician", SITE) in await audit_actions(client, patient_id)


# --- 5. bad input never gives a 500 ---------------------------------------------------------


INVISIBLE = ("\u200b", "\u200d\u2060", "\ufeff", "\u200b\ufeff\u200d", " \u2060 ")


async def test_bad_input_answers_422_with_the_error_object(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, enrollment_id = await enrolled_patient(client)
        plan = await client.post(f"/enrollments/{enrollment_id}/plan/goals", json={"text": "Sleep"}, headers=CLINICIAN)
        goal_id = plan.json()["goals"][0]["goal_id"]
        consent = {"recipient": "class:treating_providers", "purpose": "treatment", "information": "Notes",
                   "expires_event": "end_of_treatment",
                   "signed_at": (datetime.now(UTC) - timedelta(days=1)).isoformat()}  # fmt: skip
        granted = await client.post(f"/patients/{patient_id}/consents", json=consent, headers=DESK)
        consent_id = granted.json()["consent_id"]
        auditor = auth("site_admin", [SITE])
        cases: list[tuple[str, str, dict[str, Any] | None, dict[str, str] | None, dict[str, str]]] = [
            ("PATCH", f"/sites/{SITE}", {"name": None}, None, ADMIN),
            ("PATCH", f"/sites/{SITE}", {"timezone": None}, None, ADMIN),
            ("PATCH", f"/goals/{goal_id}", {"text": None}, None, CLINICIAN),
            ("PATCH", f"/goals/{goal_id}", {"status": None}, None, CLINICIAN),
            *(("POST", f"/patients/{patient_id}/consents", {**consent, "signed_at": when}, None, DESK)
              for when in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2020-01-01T00:00:00", 0, "0",
                           "1800-01-01T00:00:00Z")),
            ("POST", f"/consents/{consent_id}/revoke", {"revoked_at": "0001-01-01T00:00:00+14:00"}, None, DESK),
            ("POST", f"/consents/{consent_id}/revoke", {"revoked_at": 0.5}, None, DESK),
            *(("GET", "/audit", None, {edge: when}, auditor)
              for edge in ("from", "to")
              for when in ("2020-01-01T00:00:00", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0.5",
                           "0", "1e10")),
            *(("GET", "/patients", None, {"birth_date": born}, DESK) for born in ("0", "1", "0.5", "1e5")),
            ("POST", "/patients", {**patient_body(), "birth_date": 0}, None, DESK),
            *(("GET", "/patients", None, {"name": name}, DESK) for name in ("--", "_%", "!!", "%%%", "\u200b\u200b")),
            *(("POST", "/patients", {**patient_body(), field: name}, None, DESK)
              for field in ("given_name", "family_name") for name in INVISIBLE),
            *(("PATCH", f"/patients/{patient_id}", {field: name}, None, DESK)
              for field in ("given_name", "family_name") for name in INVISIBLE),
            # PostgreSQL text cannot hold NUL: refused at the boundary, on every backend.
            ("POST", "/patients", patient_body("Ana\x00", "Baker"), None, DESK),
            ("PATCH", f"/patients/{patient_id}", {"family_name": "B\x00"}, None, DESK),
            ("PATCH", f"/sites/{SITE}", {"address": "Main St\x00"}, None, ADMIN),
            ("POST", f"/enrollments/{enrollment_id}/plan/goals", {"text": "x\x00y"}, None, CLINICIAN),
            ("POST", f"/patients/{patient_id}/check-ins", {**CHECK_IN, "challenges": "\x00"}, None, DESK),
            ("POST", f"/patients/{patient_id}/consents", {**consent, "information": "\x00"}, None, DESK),
            ("GET", "/programs", None, {"site_id": "a\x00"}, DESK),
            ("PATCH", "/sites/a%00b", {"name": "X"}, None, ADMIN),
        ]  # fmt: skip
        wrong = []
        for method, path, body, params, headers in cases:
            try:
                answer = await client.request(method, path, json=body, params=params, headers=headers)
            except Exception as error:  # the in-process transport re-raises what would be a 500
                wrong.append(f"{method} {path} {body or params}: raised {type(error).__name__}")
                continue
            if answer.status_code != 422 or error_code(answer) != "invalid":
                wrong.append(f"{method} {path} {body or params}: {answer.status_code} {answer.text[:120]}")
        assert wrong == [], "\n".join(wrong)
        assert len((await client.get("/patients", params={"name": "nunez"}, headers=DESK)).json()) == 1


async def test_good_input_next_to_the_bad_still_works(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, _ = await enrolled_patient(client)
        auditor = auth("site_admin", [SITE])
        for edge in ("from", "to"):
            for when in ("2020-01-01T00:00:00Z", "2020-01-01T00:00:00+14:00", "2020-01-01T00:00:00.5-05:00"):
                answer = await client.get("/audit", params={edge: when}, headers=auditor)
                assert answer.status_code == 200, (edge, when, answer.text)
        window = await client.get(
            "/audit", params={"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"}, headers=auditor
        )
        assert patient_id in {r["patient_id"] for r in window.json()}
        by_birth = await client.get("/patients", params={"birth_date": "1991-07-04"}, headers=DESK)
        assert [p["patient_id"] for p in by_birth.json()] == [patient_id]
        # Format characters inside a real name are kept (a joiner is part of some scripts).
        joined = await client.post("/patients", json=patient_body("Ana\u200d", "Ba\u200bker"), headers=DESK)
        assert joined.status_code == 201, joined.text
        renamed = await client.patch(f"/patients/{patient_id}", json={"given_name": "Lucia"}, headers=DESK)
        assert renamed.status_code == 200
        assert (await client.patch(f"/sites/{SITE}", json={"name": "Columbus E."}, headers=ADMIN)).status_code == 200
        signed = (datetime.now(UTC) - timedelta(hours=1)).astimezone().isoformat()
        consent = {"recipient": "class:treating_providers", "purpose": "treatment", "information": "Notes",
                   "expires_event": "end_of_treatment", "signed_at": signed}  # fmt: skip
        granted = await client.post(f"/patients/{patient_id}/consents", json=consent, headers=DESK)
        assert granted.status_code == 201, granted.text
