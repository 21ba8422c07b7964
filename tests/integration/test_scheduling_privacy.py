"""Scheduling's audit trail against a real nats-server and a real database (SQLite and
PostgreSQL), through its HTTP API (DESIGN B5, issue 8 part 4): every read of a patient's
scheduling data is audited, and so is every refused attempt from another site — which
still answers the same 404 as an id that does not exist and changes nothing else."""

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from iopnet.testing import eventually
from services.scheduling import store, usecases
from services.scheduling.app import create_app
from shared.contracts import new_envelope
from shared.contracts.events import SiteRegistered
from tests.conftest import auth, make_settings, publish, running

SITE = "columbus-east"
OTHER = "dayton-north"
TZ = "America/New_York"
# A clinician who serves another site only: a valid insider, not a stranger.
INTRUDER = auth("clinician", [OTHER])
CLINICIAN = auth("clinician", [SITE])
GROUP_DAY = [
    {"start": "09:00", "minutes": 90, "kind": "group_therapy", "title": "Group therapy", "capacity": 12},
    {"start": "11:00", "minutes": 120, "kind": "workshop", "title": "Workshop", "capacity": 12},
]


def spec(days: tuple[int, ...] = (1, 3, 5)) -> dict[str, Any]:
    """An adult ASAM 2.1 program: 3.5 hours on each of `days` (10.5 a week, target 9)."""
    blocks = [{**b, "weekday": d} for d in days for b in GROUP_DAY]
    return {"name": "Adult IOP", "track": "main", "cohort": "adult", "level_of_care": "2.1",
            "weekly_hours_target": None, "blocks": blocks}  # fmt: skip


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, scheduling_database_url=database_url))


async def with_site(app, nats_url: str) -> dict[str, Any]:
    await publish(nats_url, new_envelope(SiteRegistered(name="Columbus East", timezone=TZ), site_id=SITE))

    async def known():
        async with app.state.runtime.sessions() as session:
            return await store.get_site(session, SITE)

    return await eventually(known, what="site projected")


async def enroll(session, program: dict[str, Any], start: date, now: datetime) -> dict[str, Any]:
    """An active enrollment (as the PatientEnrolled handler stores it), booked into the
    program's group sessions from `now` on."""
    enrollment_id = str(uuid4())
    await store.add_enrollment(
        session, enrollment_id=enrollment_id, patient_id=str(uuid4()), site_id=SITE,
        program_id=program["program_id"], level_of_care="2.1", cohort="adult", start_date=start,
        weekly_hours_target=program["weekly_hours_target"], status="active", enrolled_event_id=str(uuid4()),
        correlation_id=str(uuid4()),
    )  # fmt: skip
    enrollment = await store.get_enrollment(session, enrollment_id)
    assert enrollment is not None
    await usecases.book_enrollment(session, enrollment, None, now)
    return enrollment


async def audit_rows(app) -> list[dict[str, Any]]:
    async with app.state.runtime.sessions() as session:
        query = select(store.audit).order_by(store.audit.c.id)
        return [dict(r) for r in (await session.execute(query)).mappings()]


async def counts(app) -> dict[str, int]:
    """Rows per table, audit excepted: what a refused attempt must leave as it was."""
    async with app.state.runtime.sessions() as session:
        return {
            table.name: int((await session.execute(select(func.count()).select_from(table))).scalar_one())
            for table in store.metadata.sorted_tables
            if table is not store.audit
        }


async def seeded(app, nats_url: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A site with a program, one enrolled patient booked into its sessions, and the
    patient's first booked session: (program, enrollment, session)."""
    site = await with_site(app, nats_url)
    today = datetime.now(ZoneInfo(TZ)).date()
    async with app.state.runtime.sessions() as session, session.begin():
        program = await usecases.publish_program(session, site, spec(), today)
        evening = await usecases.publish_program(session, site, {**spec(), "track": "evening"}, today)
        enrollment = await enroll(session, program, today, datetime.now(UTC))
        bookings = await store.enrollment_bookings(session, enrollment["enrollment_id"])
    assert bookings, "the patient is booked into the program's sessions"
    return evening, enrollment, {"session_id": bookings[0]["session_id"]}


async def test_refused_attempts_at_another_sites_patient_are_audited_and_answer_404(app, nats_server) -> None:
    async with running(app) as client:
        evening, enrollment, target = await seeded(app, nats_server.url)
        patient_id, enrollment_id = enrollment["patient_id"], enrollment["enrollment_id"]
        session_id = target["session_id"]
        attendance = {"records": [{"patient_id": patient_id, "status": "present", "minutes": 60}]}
        # (method, path, body, the same path with unknown ids, the audited action)
        attempts = [
            ("GET", f"/patients/{patient_id}/bookings", None, f"/patients/{uuid4()}/bookings", "schedule.read"),
            ("GET", f"/enrollments/{enrollment_id}", None, f"/enrollments/{uuid4()}", "enrollment.read"),
            ("GET", f"/enrollments/{enrollment_id}/hours", None, f"/enrollments/{uuid4()}/hours", "hours.read"),
            ("GET", f"/sessions/{session_id}", None, f"/sessions/{uuid4()}", "roster.read"),
            ("POST", f"/sessions/{session_id}/attendance", attendance, f"/sessions/{uuid4()}/attendance",
             "attendance.record"),
            ("POST", f"/sessions/{session_id}/complete", None, f"/sessions/{uuid4()}/complete", "session.complete"),
            ("POST", f"/sessions/{session_id}/bookings", {"enrollment_id": enrollment_id},
             f"/sessions/{uuid4()}/bookings", "booking.create"),
            ("POST", f"/enrollments/{enrollment_id}/track", {"program_id": evening["program_id"]},
             f"/enrollments/{uuid4()}/track", "enrollment.switch_track"),
        ]  # fmt: skip
        before = await counts(app)
        for method, path, body, unknown_path, action in attempts:
            seen = len(await audit_rows(app))
            refused = await client.request(method, path, json=body, headers=INTRUDER)
            unknown = await client.request(method, unknown_path, json=body, headers=INTRUDER)
            assert refused.status_code == 404, (path, refused.text)
            assert refused.json() == unknown.json(), path  # no existence leak
            assert refused.json()["error"]["code"] == "not_found"
            new = await audit_rows(app)
            # One row for the refusal; the unknown id names no patient and writes none.
            assert [(r["action"], r["patient_id"], r["site_id"], r["actor"], r["role"]) for r in new[seen:]] == [
                (f"{action}.denied", patient_id, SITE, "tester", "clinician")
            ], path
        assert await counts(app) == before  # refused: no attendance, booking, track switch, event


async def test_a_patient_reading_another_patients_schedule_is_audited(app, nats_server) -> None:
    async with running(app) as client:
        _, enrollment, _ = await seeded(app, nats_server.url)
        other_patient = auth("patient", [], patient_id=str(uuid4()))
        for path, action in (
            (f"/patients/{enrollment['patient_id']}/bookings", "schedule.read.denied"),
            (f"/enrollments/{enrollment['enrollment_id']}/hours", "hours.read.denied"),
        ):
            assert (await client.get(path, headers=other_patient)).status_code == 404
            last = (await audit_rows(app))[-1]
            assert (last["action"], last["patient_id"], last["role"]) == (action, enrollment["patient_id"], "patient")


async def test_every_read_of_a_patients_scheduling_data_is_audited(app, nats_server) -> None:
    async with running(app) as client:
        _, enrollment, target = await seeded(app, nats_server.url)
        patient_id, enrollment_id = enrollment["patient_id"], enrollment["enrollment_id"]
        own = auth("patient", [], patient_id=patient_id)
        reads = [
            (f"/patients/{patient_id}/bookings", CLINICIAN, "schedule.read", "clinician"),
            (f"/patients/{patient_id}/bookings", own, "schedule.read", "patient"),
            (f"/enrollments/{enrollment_id}", CLINICIAN, "enrollment.read", "clinician"),
            (f"/enrollments/{enrollment_id}/hours", CLINICIAN, "hours.read", "clinician"),
            (f"/enrollments/{enrollment_id}/hours", own, "hours.read", "patient"),
            (f"/sessions/{target['session_id']}", CLINICIAN, "roster.read", "clinician"),
        ]
        for path, headers, action, role in reads:
            seen = len(await audit_rows(app))
            response = await client.get(path, headers=headers)
            assert response.status_code == 200, (path, response.text)
            new = [(r["action"], r["patient_id"], r["site_id"], r["role"]) for r in (await audit_rows(app))[seen:]]
            assert new == [(action, patient_id, SITE, role)], path


async def test_hours_report_audits_each_patient_it_names(app, nats_server) -> None:
    """A closed week: one patient met the target, one fell short. The report names the
    one who fell short; that patient, and only that one, gets an audit row."""
    async with running(app) as client:
        site = await with_site(app, nats_server.url)
        today = datetime.now(ZoneInfo(TZ)).date()
        monday = today - timedelta(days=today.isoweekday() - 1 + 14)  # two weeks ago: closed
        week_end = datetime.combine(monday + timedelta(days=7), datetime.min.time(), ZoneInfo(TZ))
        async with app.state.runtime.sessions() as session, session.begin():
            program = await usecases.publish_program(session, site, spec(), monday)
            before_start = datetime.combine(monday, datetime.min.time(), ZoneInfo(TZ))
            met = await enroll(session, program, monday, before_start)
            short = await enroll(session, program, monday, before_start)
            for row in await store.enrollment_bookings(session, met["enrollment_id"]):
                if row["starts_at"] < week_end:
                    minutes = int((row["ends_at"] - row["starts_at"]).total_seconds() // 60)
                    records = [{"patient_id": met["patient_id"], "status": "present", "minutes": minutes}]
                    target = await store.get_session(session, row["session_id"])
                    await usecases.record_attendance(session, target, records, "clinician-1", week_end)
        year, week, _ = monday.isocalendar()
        seen = len(await audit_rows(app))
        report = await client.get(f"/sites/{SITE}/hours-report?week={year}-W{week:02d}", headers=CLINICIAN)
        assert report.status_code == 200, report.text
        assert report.json()["site"]["at_risk"] == [short["enrollment_id"]]
        new = [(r["action"], r["patient_id"], r["site_id"]) for r in (await audit_rows(app))[seen:]]
        assert new == [("hours_report.read", short["patient_id"], SITE)]

        # From another site: the same 404 as a site that does not exist, and the probe is kept.
        refused = await client.get(f"/sites/{SITE}/hours-report", headers=INTRUDER)
        unknown = await client.get("/sites/nowhere-east/hours-report", headers=INTRUDER)
        assert refused.status_code == 404
        assert refused.json() == unknown.json()
        last = (await audit_rows(app))[-1]
        assert (last["action"], last["site_id"], last["role"]) == ("hours_report.read.denied", SITE, "clinician")
