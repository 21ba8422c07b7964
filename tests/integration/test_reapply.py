"""`iopnet events reapply`: an operator applies one stored event again although the
consumer's inbox holds it — the supported repair for an effect lost after the event was
recorded — against a real nats-server and a real database (SQLite and PostgreSQL).

The service re-reads the event from its stream, runs its handler in one transaction
with a row in its `operations` table (who, when, stream, sequence, event id, reason),
adds no inbox row, and its state-based handlers change only what is missing."""

import asyncio
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from uuid import uuid4
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from iopnet.cli import app as cli
from iopnet.natsd import NatsServer, free_port, load_or_create_credentials
from iopnet.replay import ReplayFailed, reapply_event
from iopnet.testing import eventually
from services.notifications import store as notifications_store
from services.notifications.app import create_app as notifications_app
from services.scheduling import store
from services.scheduling.app import create_app
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import CheckInSubmitted, PatientDischarged, PatientEnrolled, SiteRegistered
from shared.messaging.connection import connect_once
from shared.messaging.control import ReapplyRequest
from shared.messaging.streams import STREAMS, ensure_streams
from tests.conftest import auth, make_settings, publish, running
from tests.integration.test_notifications_delivery import Patient, publish_and_settle, register_site, rows

SITE = "columbus-east"
TZ = "America/New_York"
ADMIN = auth("site_admin", [SITE])
STAFF = auth("front_desk", [SITE])
TOMORROW = datetime.now(ZoneInfo(TZ)).date() + timedelta(days=1)
EVERY_DAY = [
    {"weekday": day, "start": "10:00", "minutes": 90, "kind": "group_therapy", "title": "Group", "capacity": 12}
    for day in range(1, 8)
]
REASON = "discharge lost in incident 42"


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, scheduling_database_url=database_url))


async def sequence_of(nats_url: str, stream: str, envelope: Envelope) -> int:
    """The stream sequence the event was stored under (as `iopnet events tail` shows)."""
    nc = await connect_once(nats_url)
    try:
        js = nc.jetstream()
        state = (await js.stream_info(stream)).state
        for seq in range(state.first_seq, state.last_seq + 1):
            if str(envelope.event_id).encode() in (await js.get_msg(stream, seq)).data:
                return seq
    finally:
        await nc.close()
    raise AssertionError("event not in the stream")


def request(stream: str, sequence: int, reason: str = REASON) -> ReapplyRequest:
    return ReapplyRequest(stream=stream, sequence=sequence, reason=reason, requested_by="ops-alice")


async def count(app, table, *where) -> int:
    async with app.state.runtime.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(table).where(*where))).scalar_one())


async def enrolled_and_discharged(app, client, nats_url: str, send=publish) -> tuple[Envelope, Envelope]:
    await send(nats_url, new_envelope(SiteRegistered(name="Columbus East", timezone=TZ), site_id=SITE))

    async def site_known():
        async with app.state.runtime.sessions() as session:
            return await store.get_site(session, SITE)

    await eventually(site_known, what="site projected")
    body = {"site_id": SITE, "name": "Adult IOP", "cohort": "adult", "blocks": EVERY_DAY}
    program = (await client.post("/programs", json=body, headers=ADMIN)).json()
    enrolled = new_envelope(
        PatientEnrolled(patient_id=uuid4(), enrollment_id=uuid4(), program_id=program["program_id"],
                        level_of_care="2.1", cohort="adult", start_date=TOMORROW, referral_source="self"),
        site_id=SITE,
    )  # fmt: skip
    discharged = new_envelope(
        PatientDischarged(patient_id=enrolled.data["patient_id"], enrollment_id=enrolled.data["enrollment_id"],
                          reason="completed", discharged_on=date.today()),
        site_id=SITE,
    )  # fmt: skip
    await send(nats_url, enrolled, discharged)

    async def ended():
        response = await client.get(f"/enrollments/{enrolled.data['enrollment_id']}", headers=STAFF)
        return response.status_code == 200 and response.json()["status"] == "discharged"

    await eventually(ended, what="enrolled, then discharged")
    return enrolled, discharged


async def lose_the_discharge(app, enrollment_id: str) -> None:
    """As if the discharge's effect had been lost after its inbox row was written (the
    state the out-of-order bug left behind): active again, its places held again."""
    async with app.state.runtime.sessions() as session, session.begin():
        await session.execute(
            update(store.enrollments).where(store.enrollments.c.enrollment_id == enrollment_id)
            .values(status="active", ended_on=None)
        )  # fmt: skip
        await session.execute(
            update(store.bookings).where(store.bookings.c.enrollment_id == enrollment_id)
            .values(status="booked", cancel_reason=None)
        )  # fmt: skip


async def test_reapply_repairs_a_lost_discharge_once_and_audits_it(app, nats_server) -> None:
    async with running(app) as client:
        enrolled, discharged = await enrolled_and_discharged(app, client, nats_server.url)
        enrollment_id = enrolled.data["enrollment_id"]
        places = store.bookings.c.enrollment_id == enrollment_id
        booked = await count(app, store.bookings, places)
        assert booked > 0
        await lose_the_discharge(app, enrollment_id)
        inbox_rows, staged = await count(app, store.inbox.table), await count(app, store.outbox.table)
        seq = await sequence_of(nats_server.url, "IOP_INTAKE", discharged)

        reply = await reapply_event(nats_server.url, "scheduling", request("IOP_INTAKE", seq))

        # Answered once applied: no waiting needed.
        assert (reply.ok, reply.outcome, reply.event_id, reply.event_type) == (
            True, "reapplied", str(discharged.event_id), "PatientDischarged",
        )  # fmt: skip
        episode = (await client.get(f"/enrollments/{enrollment_id}", headers=STAFF)).json()
        assert episode["status"] == "discharged"
        assert await count(app, store.bookings, places, store.bookings.c.status != "cancelled") == 0
        assert await count(app, store.inbox.table) == inbox_rows  # no new inbox row
        assert await count(app, store.outbox.table) == staged + booked  # one BookingCancelled each
        async with app.state.runtime.sessions() as session:
            [audit] = (await session.execute(select(store.operations.table))).mappings().all()
        assert audit["operation_id"] == reply.operation_id
        assert (audit["operation"], audit["requested_by"], audit["stream"], audit["sequence"]) == (
            "reapply", "ops-alice", "IOP_INTAKE", seq,
        )  # fmt: skip
        assert (audit["event_id"], audit["event_type"], audit["reason"], audit["outcome"]) == (
            str(discharged.event_id), "PatientDischarged", REASON, "reapplied",
        )  # fmt: skip
        assert audit["consumer"] == "scheduling-IOP_INTAKE" and audit["requested_at"] is not None

        # Again: the handler converges, nothing is cancelled twice; the request is audited.
        again = await reapply_event(nats_server.url, "scheduling", request("IOP_INTAKE", seq))
        assert again.outcome == "reapplied" and again.operation_id != reply.operation_id
        assert await count(app, store.outbox.table) == staged + booked
        assert await count(app, store.operations.table) == 2


async def test_reapplying_an_enrollment_books_nothing_twice(app, nats_server) -> None:
    async with running(app) as client:
        enrolled, discharged = await enrolled_and_discharged(app, client, nats_server.url)
        staged = await count(app, store.outbox.table)
        for envelope in (enrolled, discharged):
            seq = await sequence_of(nats_server.url, "IOP_INTAKE", envelope)
            reply = await reapply_event(nats_server.url, "scheduling", request("IOP_INTAKE", seq))
            assert reply.outcome == "reapplied"
        # The enrollment is discharged: re-applying it books nothing; nothing is staged.
        assert await count(app, store.outbox.table) == staged
        assert (await client.get(f"/enrollments/{enrolled.data['enrollment_id']}", headers=STAFF)).json()[
            "status"
        ] == "discharged"


async def test_reapply_refusals_say_why_and_change_nothing(app, nats_server) -> None:
    async with running(app) as client:
        _, discharged = await enrolled_and_discharged(app, client, nats_server.url)
        seq = await sequence_of(nats_server.url, "IOP_INTAKE", discharged)
        with pytest.raises(ReplayFailed, match="scheduling: no such stored event"):
            await reapply_event(nats_server.url, "scheduling", request("IOP_INTAKE", seq + 1000))
        with pytest.raises(ReplayFailed, match="scheduling does not consume IOP_RESTRICTED"):
            await reapply_event(nats_server.url, "scheduling", request("IOP_RESTRICTED", 1))
        with pytest.raises(ValueError, match="cannot be re-applied"):
            await reapply_event(nats_server.url, "scheduling", request("IOP_DLQ", 1))
        with pytest.raises(ReplayFailed, match="notifications service is not running"):
            await reapply_event(nats_server.url, "notifications", request("IOP_INTAKE", seq))
        assert await count(app, store.operations.table) == 0


async def test_a_failed_reapply_is_rolled_back_and_audited(app, nats_server, monkeypatch) -> None:
    async with running(app) as client:
        enrolled, discharged = await enrolled_and_discharged(app, client, nats_server.url)
        await lose_the_discharge(app, enrolled.data["enrollment_id"])
        seq = await sequence_of(nats_server.url, "IOP_INTAKE", discharged)
        consumer = app.state.runtime.consumers[0]
        handler = consumer.subscription.handlers[PatientDischarged]

        async def fails_after_its_effects(session, envelope, event) -> None:
            await handler(session, envelope, event)
            raise RuntimeError("said something with PHI in it")

        monkeypatch.setitem(consumer.subscription.handlers, PatientDischarged, fails_after_its_effects)
        with pytest.raises(ReplayFailed, match=r"PatientDischarged failed: RuntimeError$"):
            await reapply_event(nats_server.url, "scheduling", request("IOP_INTAKE", seq))
        episode = (await client.get(f"/enrollments/{enrolled.data['enrollment_id']}", headers=STAFF)).json()
        assert episode["status"] == "active"  # rolled back
        async with app.state.runtime.sessions() as session:
            [audit] = (await session.execute(select(store.operations.table))).mappings().all()
        assert audit["outcome"] == "PatientDischarged failed: RuntimeError"


async def test_the_cli_reapplies_and_refuses_a_bad_reason(app, nats_server, monkeypatch) -> None:
    monkeypatch.setenv("IOPNET_NATS_URL", nats_server.url)
    runner = CliRunner()
    async with running(app) as client:
        _, discharged = await enrolled_and_discharged(app, client, nats_server.url)
        seq = await sequence_of(nats_server.url, "IOP_INTAKE", discharged)
        args = ["events", "reapply", "IOP_INTAKE", str(seq), "--service", "scheduling", "--by", "ops-bob"]
        # The CLI runs its own event loop: on a thread, so this loop keeps serving the service.
        result = await asyncio.to_thread(runner.invoke, cli, [*args, "--reason", REASON])
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"scheduling: reapplied PatientDischarged {discharged.event_id} (operation ")
        refused = await asyncio.to_thread(runner.invoke, cli, [*args, "--reason", "two\nlines"])
        assert refused.exit_code == 2 and "invalid reason" in refused.output
        missing = await asyncio.to_thread(
            runner.invoke, cli, [*args[:3], str(seq + 1000), *args[4:], "--reason", REASON]
        )
        assert missing.exit_code == 1 and "no such stored event" in missing.output
        async with app.state.runtime.sessions() as session:
            audits = (await session.execute(select(store.operations.table.c.requested_by))).scalars().all()
        assert audits == ["ops-bob"]


@pytest.fixture
def notifications(nats_server, database_url: str, tmp_path: Path):
    return notifications_app(make_settings(nats_server.url, tmp_path, notifications_database_url=database_url))


async def test_notifications_handlers_converge_when_reapplied(notifications, nats_server) -> None:
    """The welcome and the urgent alert of a patient, re-applied: no second message,
    alert or event; the restricted stream is re-read by notifications itself."""
    app, patient = notifications, Patient()
    urgent = new_envelope(
        CheckInSubmitted(check_in_id=uuid4(), patient_id=patient.patient_id, enrollment_id=patient.enrollment_id,
                         submitted_at=datetime.now(ZoneInfo(TZ)), mood=2, craving=9, used_since_last=True,
                         safety_concern=True, risk="urgent"),
        site_id=SITE,
    )  # fmt: skip
    async with running(app):
        await register_site(app, nats_server.url)
        await publish_and_settle(app, nats_server.url, patient.contact, patient.enrolled, patient.consent, urgent)
        messages, alerts = len(await rows(app)), await count(app, notifications_store.alerts)
        assert messages >= 1 and alerts == 1

        async def due_ones_settled() -> bool:  # each sent message's NotificationSent is staged by then
            now = datetime.now(UTC)
            return all(r["status"] not in ("pending", "sending") or r["due_at"] > now for r in await rows(app))

        await eventually(due_ones_settled, what="the messages due now sent or settled")
        # Events the handlers stage (not the dispatcher's NotificationSent/Failed: a send
        # retried later, under load, stages one of those whatever is re-applied).
        outbox = notifications_store.outbox.table
        handlers_own = outbox.c.subject.not_like("%.notification_sent.%") & outbox.c.subject.not_like(
            "%.notification_failed.%"
        )
        staged = await count(app, outbox, handlers_own)
        for stream, envelope in [
            ("IOP_RESTRICTED", patient.contact), ("IOP_INTAKE", patient.enrolled), ("IOP_INTAKE", urgent),
        ]:  # fmt: skip
            seq = await sequence_of(nats_server.url, stream, envelope)
            reply = await reapply_event(nats_server.url, "notifications", request(stream, seq))
            assert reply.outcome == "reapplied"
        assert len(await rows(app)) == messages
        assert await count(app, notifications_store.alerts) == alerts
        assert await count(app, outbox, handlers_own) == staged
        assert await count(app, notifications_store.operations.table) == 3


async def test_reapply_works_under_the_brokers_allow_lists(tmp_path: Path) -> None:
    """On the configuration `iopnet run` gives its server: scheduling as its own NATS
    user, the request from `ops`, which may ask but publishes no event."""
    nats_dir = tmp_path / "nats"
    server = NatsServer(nats_dir, port=free_port(), users=load_or_create_credentials(nats_dir)).start()
    try:
        database = f"sqlite+aiosqlite:///{tmp_path / 'scheduling.db'}"
        app = create_app(make_settings(server.user_url("scheduling"), tmp_path, scheduling_database_url=database))
        async with running(app) as client:
            intake = server.user_url("intake")
            _, discharged = await enrolled_and_discharged(app, client, intake, send=_publish_as_intake)
            ops = server.user_url("ops")
            # Found here as the consumer may read its stream (ops reads sequences from dlq list).
            seq = await sequence_of(server.user_url("scheduling"), "IOP_INTAKE", discharged)
            stored = (await _stream_state(ops)).messages
            reply = await reapply_event(ops, "scheduling", request("IOP_INTAKE", seq))
            assert (reply.outcome, reply.event_id) == ("reapplied", str(discharged.event_id))
            assert (await _stream_state(ops)).messages == stored  # nothing re-published
            assert await count(app, store.operations.table) == 1
    finally:
        server.stop(kill=True)


async def _publish_as_intake(url: str, *envelopes: Envelope) -> None:
    """As intake's relay does, as its own NATS user: its stream, Nats-Msg-Id = event_id."""
    nc = await connect_once(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, [STREAMS["IOP_INTAKE"]], 120, service="intake")
        for envelope in envelopes:
            await js.publish(envelope.subject, envelope.to_bytes(), headers={"Nats-Msg-Id": str(envelope.event_id)})
    finally:
        await nc.close()


async def _stream_state(url: str):
    nc = await connect_once(url)
    try:
        return (await nc.jetstream().stream_info("IOP_INTAKE")).state
    finally:
        await nc.close()


async def test_intake_reapplies_a_lost_program_and_audits_it(nats_server, database_url: str, tmp_path: Path) -> None:
    """Intake keeps the same operations log: a ProgramPublished whose projection was lost
    is applied again, once, with its row."""
    from services.intake import store as intake_store
    from services.intake.app import create_app as intake_app
    from tests.conftest import program_published

    app = intake_app(make_settings(nats_server.url, tmp_path, intake_database_url=database_url))
    program = program_published(SITE)
    async with running(app):
        await publish(nats_server.url, program)
        table = intake_store.programs

        async def projected() -> bool:
            return await count(app, table) == 1

        await eventually(projected, what="the program projected")
        async with app.state.runtime.sessions() as session, session.begin():
            await session.execute(table.delete())
        sequence = await sequence_of(nats_server.url, "IOP_SCHEDULING", program)
        reply = await reapply_event(nats_server.url, "intake", request("IOP_SCHEDULING", sequence))
        assert reply.ok, reply.error
        assert await count(app, table) == 1
        operations = intake_store.operations.table
        async with app.state.runtime.sessions() as session:
            [row] = (await session.execute(select(operations))).mappings().all()
    assert (row["stream"], row["sequence"], row["event_id"]) == ("IOP_SCHEDULING", sequence, str(program.event_id))
    assert (row["requested_by"], row["reason"]) == ("ops-alice", REASON)
