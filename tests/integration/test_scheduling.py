"""Scheduling against a real nats-server and a real database: its projections of intake's
events, idempotency under redelivery, and the dead-letter path."""

from datetime import date
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import func, select

from iopnet.testing import eventually
from services.scheduling import store
from services.scheduling.app import create_app
from shared.contracts import new_envelope
from shared.contracts.events import PatientEnrolled, SiteRegistered
from tests.conftest import auth, dead_letters, make_settings, publish, publish_raw, running

CLINICIAN = auth("clinician", ["columbus-east"])


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, scheduling_database_url=database_url))


def enrolled(cohort: str = "adult", site_id: str = "columbus-east"):
    event = PatientEnrolled(
        patient_id=uuid4(),
        enrollment_id=uuid4(),
        program_id="adult-iop-am",
        level_of_care="2.1",
        cohort=cohort,
        start_date=date(2026, 12, 1),
        referral_source="self",
    )
    return new_envelope(event, site_id=site_id)


async def rows(app, table) -> int:
    async with app.state.runtime.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(table))).scalar_one())


async def test_projects_sites_and_enrollments(app, nats_server) -> None:
    site = new_envelope(SiteRegistered(name="Columbus East", timezone="America/New_York"), site_id="columbus-east")
    adult, teen = enrolled("adult"), enrolled("adolescent")
    async with running(app) as client:
        await publish(nats_server.url, site, adult, teen)
        adult_id = adult.data["enrollment_id"]

        async def projected():
            response = await client.get(f"/enrollments/{adult_id}", headers=CLINICIAN)
            return response if response.status_code == 200 else None

        body = (await eventually(projected, what="enrollment projected")).json()
        assert body["patient_id"] == adult.data["patient_id"]
        assert body["weekly_hours_target"] == 9.0
        teen_body = (await client.get(f"/enrollments/{teen.data['enrollment_id']}", headers=CLINICIAN)).json()
        assert teen_body["weekly_hours_target"] == 6.0
        sites = (await client.get("/sites", headers=CLINICIAN)).json()
        assert sites == [{"site_id": "columbus-east", "name": "Columbus East", "timezone": "America/New_York"}]

        assert (await client.get(f"/enrollments/{adult_id}", headers=auth("clinician", ["dayton"]))).status_code == 404
        assert (await client.get(f"/enrollments/{adult_id}")).status_code == 401
        assert (
            await client.get(f"/enrollments/{adult_id}", headers=auth("integration", ["columbus-east"]))
        ).status_code == 403
        # The two reads, and the refused one from another site (DESIGN B5).
        async with app.state.runtime.sessions() as session:
            audited = (await session.execute(select(store.audit.c.action).order_by(store.audit.c.id))).scalars().all()
        assert audited == ["enrollment.read", "enrollment.read", "enrollment.read.denied"]


async def test_same_event_twice_has_one_effect(app, nats_server) -> None:
    envelope = enrolled()
    async with running(app) as client:
        await publish(nats_server.url, envelope)
        # Re-published under another Nats-Msg-Id, as after the duplicate window.
        await publish(nats_server.url, envelope, msg_id_prefix="again-")
        consumer = await eventually(lambda: _consumer(app), what="consumer bound")

        async def both_seen() -> bool:
            return consumer.stats.applied + consumer.stats.skipped_duplicates == 2

        await eventually(both_seen, what="both deliveries processed")
        assert consumer.stats.applied == 1
        assert consumer.stats.skipped_duplicates == 1
        assert await rows(app, store.enrollments) == 1
        assert await rows(app, store.inbox.table) == 1
        assert (await client.get("/healthz")).status_code == 200


async def test_poison_messages_are_dead_lettered_and_do_not_block(app, nats_server) -> None:
    good = enrolled()
    async with running(app):
        await publish_raw(nats_server.url, "iop.intake.patient_enrolled.columbus-east", b"{not json")
        bad_data = enrolled().model_dump(mode="json")
        bad_data["data"]["cohort"] = "toddler"
        import json

        await publish_raw(nats_server.url, "iop.intake.patient_enrolled.columbus-east", json.dumps(bad_data).encode())
        await publish(nats_server.url, good)

        async def applied():
            async with app.state.runtime.sessions() as session:
                return await store.get_enrollment(session, good.data["enrollment_id"])

        await eventually(applied, what="the good event applied after two poison ones")

        async def two_letters():
            letters = await dead_letters(nats_server.url)
            return letters if len(letters) == 2 else None

        letters = await eventually(two_letters, what="two dead letters")
    subjects = {subject for subject, _, _ in letters}
    assert subjects == {"iop.dlq.scheduling.patient_enrolled.columbus-east"}
    reasons = [headers["Iop-Dlq-Reason"] for _, headers, _ in letters]
    # Each says why, in its own words (the exact texts are the consumer's: issue 8 makes
    # them fixed, never input), and both name the failure as an invalid event.
    assert all(r.startswith("invalid event") for r in reasons), reasons
    assert len(set(reasons)) == 2, reasons
    assert all(h["Iop-Consumer"] == "scheduling-IOP_INTAKE" for _, h, _ in letters)
    assert letters[0][2] == b"{not json"  # the original bytes, for inspection and retry
    assert await rows(app, store.enrollments) == 1


async def _consumer(app):
    consumers = app.state.runtime.consumers
    return consumers[0] if consumers and consumers[0].bound.is_set() else None
