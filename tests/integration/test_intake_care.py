"""Intake's care record against a real nats-server and a real database: duplicates,
updates and search; the episode lifecycle; Part 2 consents; check-ins with risk and
Idempotency-Key; recovery plans. Events are read off the bus as other systems see them."""

import asyncio
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event as sqlalchemy_event

from iopnet.testing import BusRecorder, eventually
from services.intake import api, store, usecases
from services.intake.app import create_app
from shared import clock
from shared.auth import Principal
from shared.group_commit import GroupCommit
from tests.conftest import auth, make_settings, program_published, publish, running

SITE, OTHER = "columbus-east", "dayton-north"
ADMIN = auth("network_admin")
DESK = auth("front_desk", [SITE])
CLINICIAN = auth("clinician", [SITE])
TOMORROW = date.today() + timedelta(days=1)
CALM = {"mood": 7, "craving": 2, "used_since_last": False, "safety_concern": False}


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, intake_database_url=database_url))


async def setup_network(app, client, nats_url: str) -> None:
    for site_id in (SITE, OTHER):
        body = {"site_id": site_id, "name": site_id.title(), "timezone": "America/New_York"}
        assert (await client.post("/sites", json=body, headers=ADMIN)).status_code == 201
        await publish(nats_url, program_published(site_id, f"{site_id}-adult"))
        await publish(nats_url, program_published(site_id, f"{site_id}-teen", cohort="adolescent"))

    async def known() -> bool:
        async with app.state.runtime.sessions() as session:
            return len(await store.list_programs(session, None)) == 4

    await eventually(known, what="four programs projected")


def patient_body(given: str = "Lucía", family: str = "Ñúñez", born: str = "1991-07-04", **extra) -> dict:
    return {
        "site_id": SITE,
        "given_name": given,
        "family_name": family,
        "birth_date": born,
        "phone": "+16145550177",
        "email": "lucia@example.org",
        "preferred_channel": "email",
        **extra,
    }


def episode_body() -> dict:
    """An adult episode at SITE starting today."""
    return {
        "program_id": f"{SITE}-adult",
        "level_of_care": "2.1",
        "cohort": "adult",
        "start_date": str(date.today()),
        "referral_source": "physician",
    }


async def enrolled_patient(client, **extra) -> tuple[str, str]:
    patient_id = (await client.post("/patients", json=patient_body(**extra), headers=DESK)).json()["patient_id"]
    response = await client.post(f"/patients/{patient_id}/enrollments", json=episode_body(), headers=DESK)
    assert response.status_code == 201, response.text
    return patient_id, response.json()["enrollment_id"]


async def test_duplicates_are_caught_at_the_callers_sites_and_queued_elsewhere(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        first = await client.post("/patients", json=patient_body(), headers=DESK)
        assert first.status_code == 201
        same = await client.post("/patients", json=patient_body("LUCIA", "Nunez"), headers=DESK)
        assert same.status_code == 409
        assert same.json()["error"]["fields"]["patient_id"] == first.json()["patient_id"]
        audit = await client.get(
            "/audit", params={"patient_id": first.json()["patient_id"]}, headers=auth("site_admin", [SITE])
        )
        assert "patient.duplicate_match" in {a["action"] for a in audit.json()}
        elsewhere = await client.post(
            "/patients", json={**patient_body("lucia", "nuñez"), "site_id": OTHER}, headers=auth("front_desk", [OTHER])
        )
        # Site B learns nothing from site A's records: created as any stranger would be,
        # and the match waits in the network admins' queue (tests/integration/test_intake_insider.py).
        assert elsewhere.status_code == 201
        assert first.json()["patient_id"] not in elsewhere.text
        [queued] = (await client.get("/potential-duplicates", headers=ADMIN)).json()
        assert (queued["patient_id"], queued["match_patient_id"]) == (
            elsewhere.json()["patient_id"],
            first.json()["patient_id"],
        )
        twin = await client.post("/patients", json=patient_body(confirmed_not_duplicate=True), headers=DESK)
        assert twin.status_code == 201
        assert twin.json()["mrn"] != first.json()["mrn"]


async def test_update_and_search(app, nats_server, bus: BusRecorder) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id = (await client.post("/patients", json=patient_body(), headers=DESK)).json()["patient_id"]
        changed = await client.patch(
            f"/patients/{patient_id}", json={"phone": "+16145550999", "preferred_channel": "sms"}, headers=DESK
        )
        assert changed.status_code == 200
        assert changed.json()["phone"] == "+16145550999"
        contacts = await bus.wait_for_event("PatientContactChanged", count=2)
        assert contacts[-1].subject.startswith("iop.restricted.intake.")
        assert contacts[-1].envelope()["data"]["phone"] == "+16145550999"
        clear = await client.patch(f"/patients/{patient_id}", json={"email": None}, headers=DESK)
        assert clear.status_code == 200  # sms is preferred now, so the email may go
        bad = await client.patch(f"/patients/{patient_id}", json={"phone": None}, headers=DESK)
        assert bad.status_code == 422  # sms needs a phone
        assert (
            await client.patch(f"/patients/{patient_id}", json={"birth_date": "2999-01-01"}, headers=DESK)
        ).status_code == 422

        by_name = await client.get("/patients", params={"name": "nunez"}, headers=DESK)
        assert [p["patient_id"] for p in by_name.json()] == [patient_id]
        mrn = changed.json()["mrn"]
        assert [p["patient_id"] for p in (await client.get("/patients", params={"mrn": mrn}, headers=DESK)).json()] == [
            patient_id
        ]
        assert (
            await client.get("/patients", params={"name": "nunez"}, headers=auth("front_desk", [OTHER]))
        ).json() == []
        assert (await client.get("/patients", headers=DESK)).status_code == 422
        audit = (
            await client.get("/audit", params={"patient_id": patient_id}, headers=auth("site_admin", [SITE]))
        ).json()
        assert {"patient.create", "patient.update", "patient.search"} <= {a["action"] for a in audit}


async def test_enrollment_rules_and_lifecycle(app, nats_server, bus: BusRecorder) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id = (await client.post("/patients", json=patient_body(), headers=DESK)).json()["patient_id"]
        base = {"level_of_care": "2.1", "cohort": "adult", "start_date": str(TOMORROW), "referral_source": "self"}
        path = f"/patients/{patient_id}/enrollments"
        for program, cohort in (
            ("no-such-program", "adult"),
            (f"{OTHER}-adult", "adult"),
            (f"{SITE}-adult", "adolescent"),
        ):
            response = await client.post(path, json={**base, "program_id": program, "cohort": cohort}, headers=DESK)
            assert response.status_code == 422, (program, cohort)
        pending = await client.post(path, json={**base, "program_id": f"{SITE}-adult"}, headers=DESK)
        assert pending.json()["status"] == "pending"
        enrollment_id = pending.json()["enrollment_id"]
        again = await client.post(path, json={**base, "program_id": f"{SITE}-adult"}, headers=DESK)
        assert again.status_code == 409

        async with app.state.runtime.sessions() as session, session.begin():
            tomorrow_noon = datetime.combine(TOMORROW, datetime.min.time(), UTC) + timedelta(hours=17)
            assert await usecases.activate_due_enrollments(session, tomorrow_noon) == 1
        step = await client.post(
            f"/enrollments/{enrollment_id}/level",
            json={"level_of_care": "1.0", "reason": "progress"},
            headers=CLINICIAN,
        )
        assert step.status_code == 200
        assert [h["kind"] for h in step.json()["history"]] == ["created", "activated", "step_down"]
        assert (
            await client.post(f"/enrollments/{enrollment_id}/level", json={"level_of_care": "1.0"}, headers=CLINICIAN)
        ).status_code == 409
        assert (
            await client.post(f"/enrollments/{enrollment_id}/level", json={"level_of_care": "2.5"}, headers=DESK)
        ).status_code == 403

        moved = await client.post(
            f"/enrollments/{enrollment_id}/transfer",
            json={"to_site_id": OTHER, "to_program_id": f"{OTHER}-adult", "effective_on": str(TOMORROW)},
            headers=auth("clinician", [SITE, OTHER]),  # a transfer needs the receiving site too
        )
        assert moved.status_code == 201, moved.text
        new_episode = moved.json()["enrollment_id"]
        assert moved.json()["site_id"] == OTHER
        transfers = await bus.wait_for_event("PatientTransferred", count=2)
        assert {m.subject.rsplit(".", 1)[1] for m in transfers} == {SITE, OTHER}  # both sites' subscribers see it
        [_, reenrolled] = await bus.wait_for_event("PatientEnrolled", count=2)
        assert reenrolled.envelope()["correlation_id"] == transfers[0].envelope()["correlation_id"]
        old = (await client.get(f"/enrollments/{enrollment_id}", headers=auth("clinician", [SITE, OTHER]))).json()
        assert old["status"] == "transferred"
        assert (
            await client.get(f"/patients/{patient_id}", headers=CLINICIAN)
        ).status_code == 404  # now at the other site
        other_clinician = auth("clinician", [OTHER])
        both = auth("clinician", [SITE, OTHER])
        closed = await client.post(
            f"/enrollments/{enrollment_id}/discharge",
            json={"reason": "completed", "discharged_on": str(date.today())},
            headers=both,
        )
        assert closed.status_code == 409  # a transferred episode cannot be discharged
        discharged = await client.post(
            f"/enrollments/{new_episode}/discharge",
            json={"reason": "completed", "discharged_on": str(date.today())},
            headers=other_clinician,
        )
        assert discharged.status_code == 200, discharged.text
        [event] = await bus.wait_for_event("PatientDischarged")
        assert event.envelope()["data"]["reason"] == "completed"
        assert (
            await client.post(
                f"/enrollments/{new_episode}/discharge",
                json={"reason": "completed", "discharged_on": str(date.today())},
                headers=other_clinician,
            )
        ).status_code == 409


async def test_consents_grant_expire_and_revoke(app, nats_server, bus: BusRecorder) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, enrollment_id = await enrolled_patient(client)
        signed = datetime.now(UTC) - timedelta(minutes=5)
        body = {
            "recipient": "class:treating_providers",
            "purpose": "care_coordination",
            "information": "Attendance and progress notes",
            "expires_event": "end_of_treatment",
            "signed_at": signed.isoformat(),
        }
        granted = await client.post(f"/patients/{patient_id}/consents", json=body, headers=DESK)
        assert granted.status_code == 201, granted.text
        dated = {
            **body,
            "expires_event": None,
            "expires_on": str(date.today() + timedelta(days=90)),
            "purpose": "appointment_reminders",
            "recipient": "org:iopnet-notifications",
        }
        reminders = await client.post(
            f"/patients/{patient_id}/consents", json=dated, headers=auth("patient", [], patient_id)
        )
        assert reminders.status_code == 201
        for bad in (
            {"recipient": "Dr. Jane Smith"},
            {"recipient": "person:jane-doe"},
            {"expires_event": None},
            {"signed_at": "2999-01-01T00:00:00Z"},
            {"purpose": "marketing"},
        ):
            assert (
                await client.post(f"/patients/{patient_id}/consents", json={**body, **bad}, headers=DESK)
            ).status_code == 422, bad
        [event, _] = await bus.wait_for_event("ConsentGranted", count=2)
        assert "Attendance" not in event.data.decode()  # the description stays in intake

        revoked = await client.post(
            f"/consents/{reminders.json()['consent_id']}/revoke",
            json={"note": "no more texts"},
            headers=auth("patient", [], patient_id),
        )
        assert revoked.status_code == 200
        assert revoked.json()["state"] == "revoked"
        assert (
            await client.post(f"/consents/{reminders.json()['consent_id']}/revoke", json={}, headers=DESK)
        ).status_code == 409
        [revocation] = await bus.wait_for_event("ConsentRevoked")
        assert "no more texts" not in revocation.data.decode()
        await client.post(
            f"/enrollments/{enrollment_id}/discharge",
            json={"reason": "completed", "discharged_on": str(date.today())},
            headers=CLINICIAN,
        )
        states = {
            c["purpose"]: c["state"]
            for c in (await client.get(f"/patients/{patient_id}/consents", headers=DESK)).json()
        }
        assert states == {"care_coordination": "expired", "appointment_reminders": "revoked"}
        other = await client.post(
            f"/consents/{granted.json()['consent_id']}/revoke", json={}, headers=auth("front_desk", [OTHER])
        )
        assert other.status_code == 404


async def test_check_ins_score_risk_and_keep_free_text_off_the_bus(app, nats_server, bus: BusRecorder) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, enrollment_id = await enrolled_patient(client)
        me = auth("patient", [], patient_id)
        path = f"/patients/{patient_id}/check-ins"
        calm = {
            "mood": 7,
            "craving": 2,
            "used_since_last": False,
            "safety_concern": False,
            "sleep_hours": 7.5,
            "goals": "Walk after dinner",
            "challenges": "Argument with my brother",
        }
        rising = [{**calm, "craving": c} for c in (3, 4)]
        results = [await client.post(path, json=body, headers=me) for body in (calm, *rising)]
        assert [r.json()["risk"] for r in results] == ["low", "low", "elevated"]
        assert results[-1].json()["risk_reasons"] == ["craving_rising"]
        urgent = await client.post(
            path, json={**calm, "used_since_last": True, "craving": 9, "substances": ["alcohol"]}, headers=CLINICIAN
        )
        assert urgent.json()["risk"] == "urgent"
        for bad in ({"craving": 11}, {"mood": 0}, {"sleep_hours": 25}, {"substances": ["bananas"]}):
            assert (await client.post(path, json={**calm, **bad}, headers=me)).status_code == 422, bad
        stranger = auth("patient", [], "6f1c8c8e-2a35-4c2b-9c57-1b1e2f3a4b5c")
        assert (await client.post(path, json=calm, headers=stranger)).status_code == 404
        assert (await client.post(path, json=calm, headers=auth("integration", [SITE]))).status_code == 403

        submitted = await bus.wait_for_event("CheckInSubmitted", count=4)
        assert [m.envelope()["data"]["risk"] for m in submitted] == ["low", "low", "elevated", "urgent"]
        for message in submitted:
            text = message.data.decode()
            assert "Walk after dinner" not in text
            assert "brother" not in text
            assert "alcohol" not in text
            assert message.envelope()["data"]["enrollment_id"] == enrollment_id
        history = (await client.get(path, headers=CLINICIAN)).json()
        assert history[0]["challenges"] == "Argument with my brother"
        assert history[0]["substances"] == ["alcohol"]


async def test_idempotency_key_gives_one_check_in_under_concurrent_retries(app, nats_server, bus: BusRecorder) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, _ = await enrolled_patient(client)
        me = {**auth("patient", [], patient_id), "Idempotency-Key": "phone-7f3a-0001"}
        body = {"mood": 5, "craving": 4, "used_since_last": False, "safety_concern": False}
        answers = await asyncio.gather(
            *(client.post(f"/patients/{patient_id}/check-ins", json=body, headers=me) for _ in range(5))
        )
        assert {a.status_code for a in answers} == {201}
        assert len({a.json()["check_in_id"] for a in answers}) == 1
        other_body = await client.post(f"/patients/{patient_id}/check-ins", json={**body, "mood": 6}, headers=me)
        assert other_body.status_code == 409
        async with app.state.runtime.sessions() as session:
            assert len(await store.patient_check_ins(session, patient_id)) == 1
        await bus.wait_for_event("CheckInSubmitted")
        fresh = await client.post(
            f"/patients/{patient_id}/check-ins", json=body, headers={**me, "Idempotency-Key": "phone-7f3a-0002"}
        )
        assert fresh.json()["check_in_id"] != answers[0].json()["check_in_id"]


async def test_check_ins_arriving_together_share_one_transaction_and_each_is_answered_as_alone(
    app, nats_server, bus: BusRecorder
) -> None:
    """Issue 10: check-ins that arrive together are written in one transaction with
    multi-row statements (api.write_check_ins); each is answered as it would be alone,
    and one refused costs the others nothing."""
    inserts: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.startswith("INSERT INTO check_ins"):
            inserts.append(statement)

    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        names = ("Ana", "Bea", "Cruz", "Dora", "Eli", "Fen")
        enrolled = [
            await enrolled_patient(client, given=n, family="Ortiz", born=f"199{i}-01-0{i + 1}")
            for i, n in enumerate(names)
        ]
        rising_id, rising_episode = enrolled[0]
        for craving in (3, 4):  # then 5 in the group: rising over three check-ins
            await client.post(f"/patients/{rising_id}/check-ins", json={**CALM, "craving": craving}, headers=CLINICIAN)
        replayed_id = enrolled[1][0]
        key = {"Idempotency-Key": "tablet-0001"}
        first = await client.post(f"/patients/{replayed_id}/check-ins", json=CALM, headers={**CLINICIAN, **key})
        unenrolled = (
            await client.post("/patients", json=patient_body("Gil", "Ortiz", "1980-02-02"), headers=DESK)
        ).json()
        others = (
            await client.post(
                "/patients", json={**patient_body("Hal", "Ortiz", "1981-03-03"), "site_id": OTHER}, headers=ADMIN
            )
        ).json()
        engine = app.state.runtime.engine.sync_engine
        sqlalchemy_event.listen(engine, "before_cursor_execute", count)
        group: GroupCommit = app.state.check_ins
        transactions_before = group.transactions
        try:
            calls = [
                (rising_id, {**CALM, "craving": 5}, CLINICIAN),
                (replayed_id, CALM, {**CLINICIAN, **key}),  # a retry: the first answer again
                (unenrolled["patient_id"], CALM, CLINICIAN),  # 409: no open enrollment
                (others["patient_id"], CALM, CLINICIAN),  # 404: a site the caller does not serve
                *((patient_id, {**CALM, "safety_concern": True}, CLINICIAN) for patient_id, _ in enrolled[2:]),
            ]
            answers = await asyncio.gather(
                *(client.post(f"/patients/{pid}/check-ins", json=body, headers=headers) for pid, body, headers in calls)
            )
        finally:
            sqlalchemy_event.remove(engine, "before_cursor_execute", count)
        transactions = group.transactions - transactions_before
        assert [a.status_code for a in answers] == [201, 201, 409, 404, 201, 201, 201, 201]
        assert answers[0].json()["risk"] == "elevated" and answers[0].json()["risk_reasons"] == ["craving_rising"]
        assert answers[0].json()["enrollment_id"] == rising_episode
        assert answers[1].json() == first.json()
        assert {a.json()["risk"] for a in answers[4:]} == {"urgent"}
        # Eight requests, at most a first alone and the seven that queued behind it.
        assert transactions <= 2 < len(calls) and group.largest_group > 1
        assert len(inserts) == transactions  # one multi-row INSERT per group, not one per check-in
        submitted = await bus.wait_for_event("CheckInSubmitted", count=3 + 5)
        fresh = {str(a.json()["check_in_id"]) for a in answers if a.status_code == 201} - {first.json()["check_in_id"]}
        assert fresh <= {m.envelope()["data"]["check_in_id"] for m in submitted}
        async with app.state.runtime.sessions() as session:
            assert len(await store.patient_check_ins(session, replayed_id)) == 1
            audit = await store.audit_rows(session, None, patient_id=others["patient_id"])
        assert "check_in.submit.denied" in {row["action"] for row in audit}


async def test_registrations_and_enrollments_arriving_together_share_a_transaction_and_a_refusal_keeps_its_audit(
    app, nats_server
) -> None:
    """Issue 10: on SQLite, routine requests that arrive together are written in one
    transaction (shared.http.RoutineWrites), each answered once it has committed; one
    refused among them is answered as alone, its audit row kept, and costs the others
    nothing. On PostgreSQL each has a transaction of its own, with the same answers."""
    writes = app.state.writes
    sqlite = writes.group is not None

    def transactions() -> int:
        return writes.group.transactions if sqlite else 0

    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        names = ("Ana", "Bea", "Cruz", "Dora", "Eli")
        bodies = [patient_body(n, "Ortiz", f"199{i}-01-0{i + 1}") for i, n in enumerate(names)]
        before = transactions()
        registered = await asyncio.gather(*(client.post("/patients", json=b, headers=DESK) for b in bodies))
        assert [a.status_code for a in registered] == [201] * len(bodies)
        if sqlite:  # five requests: at most a first alone and the four that queued behind it
            assert transactions() - before <= 2 and writes.group.largest_group > 1
        patient_ids = [a.json()["patient_id"] for a in registered]

        elsewhere = {**patient_body("Hal", "Ortiz", "1981-03-03"), "site_id": OTHER}
        outsider = (await client.post("/patients", json=elsewhere, headers=ADMIN)).json()["patient_id"]
        episode = episode_body()
        # Five enrollments and, among them, one for a patient at a site the desk does not serve.
        targets = [*patient_ids[:2], outsider, *patient_ids[2:]]
        enrolled = await asyncio.gather(
            *(client.post(f"/patients/{pid}/enrollments", json=episode, headers=DESK) for pid in targets)
        )
        assert [a.status_code for a in enrolled] == [201, 201, 404, 201, 201, 201]
        assert enrolled[2].json()["error"]["code"] == "not_found"
        # A duplicate among new registrations: 409 naming the match, the others registered.
        crowd = [patient_body("Fen", "Ortiz", "1985-05-05"), bodies[0], patient_body("Gus", "Ortiz", "1986-06-06")]
        answers = await asyncio.gather(*(client.post("/patients", json=b, headers=DESK) for b in crowd))
        assert [a.status_code for a in answers] == [201, 409, 201]
        async with app.state.runtime.sessions() as session:
            for patient_id in patient_ids:
                assert len(await store.patient_enrollments(session, patient_id)) == 1
            assert await store.patient_enrollments(session, outsider) == []
            denied = await store.audit_rows(session, None, patient_id=outsider)
            matched = await store.audit_rows(session, None, patient_id=patient_ids[0])
        assert "enrollment.create.denied" in {row["action"] for row in denied}
        assert "patient.duplicate_match" in {row["action"] for row in matched}


async def test_a_key_raced_by_another_replica_answers_with_the_winners_check_in(app, nats_server, monkeypatch) -> None:
    """Another intake replica commits the same Idempotency-Key between our read of the
    keys and our INSERT (simulated: our first read misses it): ours rolls back and
    answers what the winner did."""
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, _ = await enrolled_patient(client)
        headers = {**CLINICIAN, "Idempotency-Key": "kiosk-0042"}
        path = f"/patients/{patient_id}/check-ins"
        winner = await client.post(path, json=CALM, headers=headers)
        reads = 0
        real = store.get_idempotent_many

        async def read_before_the_winner_committed(session, keys):
            nonlocal reads
            reads += 1
            return {} if reads == 1 else await real(session, keys)

        monkeypatch.setattr(store, "get_idempotent_many", read_before_the_winner_committed)
        loser = await client.post(path, json=CALM, headers=headers)
        assert reads == 2
        assert loser.status_code == 201 and loser.json() == winner.json()
        async with app.state.runtime.sessions() as session:
            assert len(await store.patient_check_ins(session, patient_id)) == 1


async def test_a_group_scores_each_check_in_with_the_earlier_ones_of_the_group(app, nats_server) -> None:
    """The same episode twice in one group: the second is scored with the first counted."""
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, _ = await enrolled_patient(client)
        await client.post(f"/patients/{patient_id}/check-ins", json={**CALM, "craving": 3}, headers=CLINICIAN)
        principal = Principal(sub="clinician-1", role="clinician", sites=[SITE])
        async with app.state.runtime.sessions() as session, session.begin():
            subject = (await usecases.check_in_subjects(session, [patient_id]))[patient_id]
            assert subject.recent_cravings == [3]
            group = [
                usecases.Submission(principal, subject, api.CheckInIn(**{**CALM, "craving": c}).model_dump())
                for c in (4, 5)
            ]
            recorded = await usecases.record_check_ins(session, group, clock.now)
    assert [r["risk"] for r in recorded] == ["low", "elevated"]
    assert recorded[1]["risk_reasons"] == ["craving_rising"]


async def test_recovery_plan_keeps_goal_text_in_intake(app, nats_server, bus: BusRecorder) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, enrollment_id = await enrolled_patient(client)
        plan = await client.post(
            f"/enrollments/{enrollment_id}/plan/goals",
            json={
                "text": "Call my sponsor every evening",
                "target": "5 of 7 days",
                "review_on": str(date.today() + timedelta(days=14)),
            },
            headers=CLINICIAN,
        )
        assert plan.status_code == 201, plan.text
        goal_id = plan.json()["goals"][0]["goal_id"]
        assert (
            await client.post(f"/enrollments/{enrollment_id}/plan/goals", json={"text": "x"}, headers=DESK)
        ).status_code == 403
        check_in = {
            "mood": 6,
            "craving": 3,
            "used_since_last": False,
            "safety_concern": False,
            "goal_progress": [{"goal_id": goal_id, "note": "Called twice this week"}],
        }
        assert (
            await client.post(
                f"/patients/{patient_id}/check-ins", json=check_in, headers=auth("patient", [], patient_id)
            )
        ).status_code == 201
        met = await client.patch(
            f"/goals/{goal_id}", json={"status": "met", "note": "Consistent for two weeks"}, headers=CLINICIAN
        )
        assert met.status_code == 200
        assert (await client.patch(f"/goals/{goal_id}", json={"status": "met"}, headers=CLINICIAN)).status_code == 409
        read = (await client.get(f"/enrollments/{enrollment_id}/plan", headers=auth("patient", [], patient_id))).json()
        [goal] = read["goals"]
        assert goal["status"] == "met"
        assert [p["note"] for p in goal["progress"]] == ["Called twice this week", "Consistent for two weeks"]
        updates = await bus.wait_for_event("TreatmentPlanUpdated", count=2)
        assert updates[-1].envelope()["data"]["goals"] == [{"goal_id": goal_id, "status": "met"}]
        assert all("sponsor" not in m.data.decode() for m in updates)


async def test_site_update_republishes_site_registered(app, nats_server, bus: BusRecorder) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        moved = await client.patch(
            f"/sites/{SITE}", json={"timezone": "America/Chicago", "address": "1 Main St"}, headers=ADMIN
        )
        assert moved.status_code == 200
        assert moved.json()["address"] == "1 Main St"
        assert (
            await client.patch(f"/sites/{SITE}", json={"timezone": "Mars/Olympus"}, headers=ADMIN)
        ).status_code == 422
        assert (
            await client.patch(f"/sites/{SITE}", json={"name": "X"}, headers=auth("site_admin", [SITE]))
        ).status_code == 403
        assert (await client.patch("/sites/nowhere", json={"name": "X"}, headers=ADMIN)).status_code == 404
        registered = await bus.wait_for(lambda m: m.subject == f"iop.intake.site_registered.{SITE}", count=2)
        assert registered[-1].envelope()["data"]["timezone"] == "America/Chicago"


async def test_concurrent_enrollments_leave_one_open_episode(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id = (await client.post("/patients", json=patient_body(), headers=DESK)).json()["patient_id"]
        body = {
            "program_id": f"{SITE}-adult",
            "level_of_care": "2.1",
            "cohort": "adult",
            "start_date": str(date.today()),
            "referral_source": "self",
        }
        answers = await asyncio.gather(
            *(client.post(f"/patients/{patient_id}/enrollments", json=body, headers=DESK) for _ in range(4))
        )
        assert sorted(a.status_code for a in answers) == [201, 409, 409, 409]
        async with app.state.runtime.sessions() as session:
            assert len(await store.patient_enrollments(session, patient_id)) == 1


async def test_an_enrollment_reads_its_patient_once_with_the_lock(app, nats_server) -> None:
    """Issue 10: an enrollment reads the patient once, with their row locked (the lock that
    keeps a patient to one open episode), not once to check who may see them and again to
    lock; and the enrollment it writes is not read back."""
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(" ".join(statement.split()))

    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id = (await client.post("/patients", json=patient_body(), headers=DESK)).json()["patient_id"]
        engine = app.state.runtime.engine.sync_engine
        sqlalchemy_event.listen(engine, "before_cursor_execute", count)
        try:
            created = await client.post(f"/patients/{patient_id}/enrollments", json=episode_body(), headers=DESK)
        finally:
            sqlalchemy_event.remove(engine, "before_cursor_execute", count)
        assert created.status_code == 201, created.text
        stored = (await client.get(f"/enrollments/{created.json()['enrollment_id']}", headers=DESK)).json()
    reads = [s for s in statements if s.startswith("SELECT patients.") and "WHERE patients.patient_id =" in s]
    assert len(reads) == 1, reads
    if app.state.runtime.engine.dialect.name == "postgresql":
        assert reads[0].endswith("FOR UPDATE")
    # The enrollment is answered by its own INSERT ... RETURNING, not read back.
    assert not [s for s in statements if s.startswith("SELECT enrollments.") and "enrollments.enrollment_id =" in s]
    # ... and what it answers is what is stored.
    assert {key: stored[key] for key in created.json()} == created.json()


async def test_an_idempotency_key_answers_only_its_own_caller(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        patient_id, _ = await enrolled_patient(client)
        body = {"mood": 2, "craving": 9, "used_since_last": True, "safety_concern": False}
        first = await client.post(
            f"/patients/{patient_id}/check-ins", json=body, headers={**CLINICIAN, "Idempotency-Key": "k-1"}
        )
        assert first.status_code == 201
        outsider = {**auth("clinician", [OTHER]), "Idempotency-Key": "k-1"}
        assert (await client.post(f"/patients/{patient_id}/check-ins", json=body, headers=outsider)).status_code == 404
        other_body = {**body, "mood": 5}
        assert (
            await client.post(f"/patients/{patient_id}/check-ins", json=other_body, headers=outsider)
        ).status_code == 404
        replayed = await client.post(
            f"/patients/{patient_id}/check-ins", json=body, headers={**CLINICIAN, "Idempotency-Key": "k-1"}
        )
        assert replayed.json() == first.json()
        audit = (
            await client.get("/audit", params={"patient_id": patient_id}, headers=auth("site_admin", [SITE]))
        ).json()
        assert "check_in.replay" in {a["action"] for a in audit}


async def test_two_desks_registering_one_person_at_once_make_one_record(app, nats_server) -> None:
    async with running(app) as client:
        await setup_network(app, client, nats_server.url)
        answers = await asyncio.gather(*(client.post("/patients", json=patient_body(), headers=DESK) for _ in range(4)))
        assert sorted(a.status_code for a in answers) == [201, 409, 409, 409]
