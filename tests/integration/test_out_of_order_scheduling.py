"""Scheduling when one patient's events arrive out of order, against a real nats-server
and a real database (SQLite and PostgreSQL).

After a consumer restart, messages it had fetched and not acked come back only after
ack_wait, behind later ones: a PatientDischarged (or PatientTransferred) can be applied
before the PatientEnrolled it ends. The end is remembered, so the late enrollment opens
ended: no booking, no waitlist place, and the episode reads as ended."""

from datetime import date, datetime, timedelta
from pathlib import Path
from uuid import uuid4
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from iopnet.testing import eventually
from services.scheduling import store
from services.scheduling.app import create_app
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import PatientDischarged, PatientEnrolled, PatientTransferred, SiteRegistered
from tests.conftest import auth, make_settings, publish, running

SITE = "columbus-east"
TZ = "America/New_York"
ADMIN = auth("site_admin", [SITE])
STAFF = auth("front_desk", [SITE])
TOMORROW = datetime.now(ZoneInfo(TZ)).date() + timedelta(days=1)
EVERY_DAY = [
    {"weekday": day, "start": "10:00", "minutes": 90, "kind": "group_therapy", "title": "Group", "capacity": 1}
    for day in range(1, 8)
]


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, scheduling_database_url=database_url))


async def open_program(app, client, nats_url: str) -> str:
    await publish(nats_url, new_envelope(SiteRegistered(name="Columbus East", timezone=TZ), site_id=SITE))

    async def site_known():
        async with app.state.runtime.sessions() as session:
            return await store.get_site(session, SITE)

    await eventually(site_known, what="site projected")
    body = {"site_id": SITE, "name": "Adult IOP", "cohort": "adult", "blocks": EVERY_DAY}
    response = await client.post("/programs", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return str(response.json()["program_id"])


def enrolled(program_id: str) -> Envelope:
    event = PatientEnrolled(patient_id=uuid4(), enrollment_id=uuid4(), program_id=program_id, level_of_care="2.1",
                            cohort="adult", start_date=TOMORROW, referral_source="self")  # fmt: skip
    return new_envelope(event, site_id=SITE)


def discharged(enrollment: Envelope) -> Envelope:
    event = PatientDischarged(patient_id=enrollment.data["patient_id"], enrollment_id=enrollment.data["enrollment_id"],
                              reason="completed", discharged_on=date.today())  # fmt: skip
    return new_envelope(event, site_id=SITE)


def transferred(enrollment: Envelope, site_id: str) -> Envelope:
    event = PatientTransferred(
        patient_id=enrollment.data["patient_id"], enrollment_id=enrollment.data["enrollment_id"], from_site_id=SITE,
        to_site_id="dayton-north", to_program_id="dayton-adult", effective_on=date.today(),
    )  # fmt: skip
    return new_envelope(event, site_id=site_id)


async def projected(client, enrollment: Envelope) -> dict:
    async def read():
        response = await client.get(f"/enrollments/{enrollment.data['enrollment_id']}", headers=STAFF)
        return response.json() if response.status_code == 200 else None

    return await eventually(read, what="the enrollment projected")


async def places_of(app, enrollment: Envelope) -> list[dict]:
    async with app.state.runtime.sessions() as session:
        query = select(store.bookings).where(store.bookings.c.enrollment_id == enrollment.data["enrollment_id"])
        return [dict(r) for r in (await session.execute(query)).mappings()]


async def staged(app, event_type: str) -> int:
    async with app.state.runtime.sessions() as session:
        payloads = (await session.execute(select(store.outbox.table.c.payload))).scalars().all()
    return sum(f'"event_type":"{event_type}"' in p.replace(" ", "") for p in payloads)


async def test_a_discharge_that_arrives_first_is_remembered(app, nats_server) -> None:
    async with running(app) as client:
        program_id = await open_program(app, client, nats_server.url)
        control, late = enrolled(program_id), enrolled(program_id)
        # Stream order: the discharge first, its enrollment after it.
        await publish(nats_server.url, control, discharged(late), late)
        episode = await projected(client, late)
        assert (episode["status"], episode["ended_on"]) == ("discharged", date.today().isoformat())
        assert await places_of(app, late) == []  # no booking, no waitlist place
        # The same program booked the patient enrolled in order: the setup books.
        assert (await projected(client, control))["status"] == "active"
        assert {b["status"] for b in await places_of(app, control)} == {"booked"}
        assert await staged(app, "PatientWaitlisted") == 0  # capacity 1: only a second patient would wait


async def test_a_transfer_that_arrives_first_is_remembered(app, nats_server) -> None:
    async with running(app) as client:
        program_id = await open_program(app, client, nats_server.url)
        late = enrolled(program_id)
        # Intake publishes the transfer under both sites' subjects.
        await publish(nats_server.url, transferred(late, SITE), transferred(late, "dayton-north"), late)
        episode = await projected(client, late)
        assert (episode["status"], episode["ended_on"]) == ("transferred", date.today().isoformat())
        assert await places_of(app, late) == []
        async with app.state.runtime.sessions() as session:
            end = await store.get_end(session, late.data["enrollment_id"])
        assert end is not None and end["status"] == "transferred"


async def test_a_discharge_after_a_transfer_keeps_the_first_end(app, nats_server) -> None:
    async with running(app) as client:
        program_id = await open_program(app, client, nats_server.url)
        late = enrolled(program_id)
        await publish(nats_server.url, transferred(late, SITE), discharged(late), late)
        assert (await projected(client, late))["status"] == "transferred"
        assert await places_of(app, late) == []
