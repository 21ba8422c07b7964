"""`iopnet events replay --consumer NAME --since TIME | --from-seq N`: the service that
owns a durable resets it to a start point and consumes again; its inbox skips what it has
applied. Against a real nats-server and a real database (SQLite and PostgreSQL).

What must hold: no effect applied twice, a projection the operator cleared rebuilt by the
same re-drive, the stream's message count unchanged (nothing is re-published), and a dry
run that changes nothing at all."""

import asyncio
from datetime import UTC, date, datetime
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import delete, func, select

from iopnet.natsd import PERMISSIONS, NatsServer, free_port, load_or_create_credentials
from iopnet.replay import ReplayFailed, _follow, caught_up, redrive, redrive_instructions, service_of, stream_of
from iopnet.testing import BusRecorder, eventually
from services.scheduling import store
from services.scheduling.app import create_app
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import CheckInSubmitted, PatientEnrolled, SiteRegistered
from shared.messaging.connection import connect_once
from shared.messaging.control import ControlReply, RedriveRequest
from shared.messaging.streams import STREAMS, ensure_streams
from tests.conftest import make_settings, publish, running, stream_count

SITE = "columbus-east"
DURABLE = "scheduling-IOP_INTAKE"


def enrolled() -> Envelope:
    event = PatientEnrolled(patient_id=uuid4(), enrollment_id=uuid4(), program_id="p-1", level_of_care="2.1",
                            cohort="adult", start_date=date(2026, 12, 1), referral_source="self")  # fmt: skip
    return new_envelope(event, site_id=SITE)


def site() -> Envelope:
    return new_envelope(SiteRegistered(name="Columbus East", timezone="America/New_York"), site_id=SITE)


def check_in() -> Envelope:
    """An intake event scheduling does not consume: outside its durable's filter."""
    event = CheckInSubmitted(check_in_id=uuid4(), patient_id=uuid4(), enrollment_id=uuid4(),
                             submitted_at=datetime.now(UTC), mood=6, craving=2, used_since_last=False,
                             safety_concern=False, risk="low")  # fmt: skip
    return new_envelope(event, site_id=SITE)


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, scheduling_database_url=database_url))


async def count(app, table, *where) -> int:
    async with app.state.runtime.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(table).where(*where))).scalar_one())


async def projected(app, enrollments: int) -> None:
    async def done() -> bool:
        return await count(app, store.enrollments) == enrollments

    await eventually(done, what=f"{enrollments} enrollments projected")


async def durable_state(url: str) -> tuple[int, int, int, int, int]:
    """What a dry run must leave alone: delivered, ack floor, pending, unacked, redelivered."""
    nc = await connect_once(url)
    try:
        info = await nc.jetstream().consumer_info("IOP_INTAKE", DURABLE)
        return (info.delivered.stream_seq, info.ack_floor.stream_seq, info.num_pending, info.num_ack_pending,
                info.num_redelivered)  # fmt: skip
    finally:
        await nc.close()


async def redrive_and_wait(url: str, **start) -> tuple[ControlReply, ControlReply, list[ControlReply]]:
    seen: list[ControlReply] = []
    answer, final = await redrive(url, RedriveRequest(durable=DURABLE, **start), progress=seen.append, timeout=30)
    return answer, final, seen


async def test_a_redrive_applies_nothing_twice_and_rebuilds_a_cleared_projection(app, nats_server) -> None:
    events = [site(), enrolled(), enrolled(), check_in(), enrolled()]
    bus = await BusRecorder(nats_server.url, ("iop.>",)).start()
    try:
        async with running(app):
            await publish(nats_server.url, *events)
            await projected(app, 3)
            stored = await stream_count(nats_server.url, "IOP_INTAKE")
            staged = await count(app, store.outbox.table)
            seen_on_bus = len(bus.messages)

            # Everything applied already: the re-drive goes through all of it, applies nothing.
            answer, final, progress = await redrive_and_wait(nats_server.url, from_seq=1)
            assert (answer.durable, answer.stream, answer.start_seq) == (DURABLE, "IOP_INTAKE", 1)
            assert answer.covered == 4  # the check-in is not in scheduling's filter
            assert (final.applied - answer.applied, final.duplicates - answer.duplicates) == (0, 4)
            assert (final.num_pending, final.num_ack_pending) == (0, 0)
            assert progress[0] is answer and progress[-1] is final
            assert await count(app, store.enrollments) == 3
            assert await count(app, store.outbox.table) == staged  # no effect twice

            # The operator clears the projection (and the durable's inbox rows): the same
            # re-drive rebuilds it, each event once.
            async with app.state.runtime.sessions() as session, session.begin():
                await session.execute(delete(store.enrollments))
                await session.execute(delete(store.sites))
                await session.execute(delete(store.inbox.table).where(store.inbox.table.c.consumer == DURABLE))
            assert await count(app, store.enrollments) == 0
            answer, final, _ = await redrive_and_wait(nats_server.url, from_seq=1)
            assert (final.applied - answer.applied, final.duplicates - answer.duplicates) == (4, 0)
            assert await count(app, store.enrollments) == 3
            assert await count(app, store.sites) == 1
            assert await count(app, store.inbox.table, store.inbox.table.c.consumer == DURABLE) == 4

            # And once more: all of it is in the inbox again.
            answer, final, _ = await redrive_and_wait(nats_server.url, from_seq=1)
            assert (final.applied - answer.applied, final.duplicates - answer.duplicates) == (0, 4)
            assert await count(app, store.enrollments) == 3

            # The stream was never written to, and nobody saw a copy on the bus.
            assert await stream_count(nats_server.url, "IOP_INTAKE") == stored == len(events)
            assert [m.subject for m in bus.messages[seen_on_bus:] if m.subject.startswith("iop.intake.")] == []
    finally:
        await bus.stop()


async def test_redrives_back_to_back_each_go_through_everything_again(app, nats_server) -> None:
    """A re-drive to sequence 1 right after the acks of the one before: nats-server may
    then report the durable's old position (ack floor at the end, nothing unacked) with
    the reset's messages all pending, and a follower took that for caught up before
    anything was re-applied (a CI run read (0, 0) for a re-drive that skipped 4). Each
    answer must stand where the reset put it, and each re-drive must skip all four."""
    async with running(app):
        await publish(nats_server.url, site(), enrolled(), enrolled(), check_in(), enrolled())
        await projected(app, 3)
        outcomes = []
        for _ in range(12):
            answer, final, _ = await redrive_and_wait(nats_server.url, from_seq=1)
            outcomes.append((answer.ack_floor_seq, answer.num_pending, answer.covered,
                             final.applied - answer.applied, final.duplicates - answer.duplicates))  # fmt: skip
        assert outcomes == [(0, 4, 4, 0, 4)] * 12


async def test_a_redrive_done_before_its_answer_was_read_still_reports_what_it_applied(app, nats_server) -> None:
    """The service's answer holds its counters and the durable's position as of the
    reset; a quick consumer goes through everything before the answer is read, so an
    answer that already looks caught up must not be taken for the last state. Following
    it must still ask where things stand: a CI run read (0 applied, 0 duplicates) for a
    re-drive that skipped 4."""
    async with running(app):
        await publish(nats_server.url, site(), enrolled())
        await projected(app, 1)
        consumer = next(c for c in app.state.runtime.consumers if c.durable == DURABLE)
        as_of_the_reset = ControlReply(service="scheduling", ok=True, durable=DURABLE, stream="IOP_INTAKE",
                                       last_seq=2, num_pending=0, num_ack_pending=0, ack_floor_seq=2)  # fmt: skip
        nc = await connect_once(nats_server.url)
        try:
            seen: list[ControlReply] = []
            final = await _follow(nc, "scheduling", as_of_the_reset, seen.append, timeout=10)
        finally:
            await nc.close()
        assert final is not as_of_the_reset and seen == [final]
        assert (final.applied, final.duplicates) == (consumer.stats.applied, 0) == (2, 0)


async def test_a_redrive_since_a_time_restores_only_what_was_lost(app, nats_server) -> None:
    before = [site(), enrolled()]
    async with running(app):
        await publish(nats_server.url, *before)
        await projected(app, 1)
        since = datetime.now(UTC)
        lost, kept = enrolled(), enrolled()
        await publish(nats_server.url, lost, kept)
        await projected(app, 3)
        # As if the database were restored from a backup taken before `lost` was applied.
        async with app.state.runtime.sessions() as session, session.begin():
            await session.execute(
                delete(store.enrollments).where(store.enrollments.c.enrollment_id == lost.data["enrollment_id"])
            )
            await session.execute(delete(store.inbox.table).where(store.inbox.table.c.event_id == str(lost.event_id)))

        answer, final, _ = await redrive_and_wait(nats_server.url, since=since)
        assert answer.start_seq == 3 and answer.covered == 2
        assert (final.applied - answer.applied, final.duplicates - answer.duplicates) == (1, 1)
        assert await count(app, store.enrollments) == 3
        assert await stream_count(nats_server.url, "IOP_INTAKE") == 4


async def test_a_dry_run_says_what_it_would_do_and_changes_nothing(app, nats_server) -> None:
    async with running(app):
        await publish(nats_server.url, site(), enrolled(), check_in(), enrolled(), check_in())
        await projected(app, 2)
        state = await durable_state(nats_server.url)
        inbox = await count(app, store.inbox.table)
        consumer = app.state.runtime.consumers[0]
        stats = (consumer.stats.applied, consumer.stats.skipped_duplicates)

        answer, final = await redrive(nats_server.url, RedriveRequest(durable=DURABLE, from_seq=2, dry_run=True))
        assert final is answer
        assert (answer.start_seq, answer.last_seq, answer.covered) == (2, 5, 2)  # two enrollments from seq 2
        assert "iop.intake.patient_enrolled.*" in answer.filter_subjects
        far = await redrive(nats_server.url, RedriveRequest(durable=DURABLE, since=datetime.now(UTC), dry_run=True))
        assert (far[0].start_seq, far[0].covered) == (6, 0)  # nothing stored since now

        assert await durable_state(nats_server.url) == state
        assert await stream_count(nats_server.url, "IOP_INTAKE") == 5
        assert await count(app, store.inbox.table) == inbox
        assert (consumer.stats.applied, consumer.stats.skipped_duplicates) == stats


async def test_refusals_say_why(app, nats_server) -> None:
    async with running(app):
        await publish(nats_server.url, site())
        await projected(app, 0)

        async def bound() -> bool:
            return app.state.runtime.consumers[0].bound.is_set()

        await eventually(bound, what="the durable bound")
        with pytest.raises(ReplayFailed, match="scheduling: IOP_INTAKE ends at sequence 1"):
            await redrive(nats_server.url, RedriveRequest(durable=DURABLE, from_seq=9))
        with pytest.raises(ReplayFailed, match="scheduling: this service has no durable scheduling-IOP_SCHEDULING"):
            await redrive(nats_server.url, RedriveRequest(durable="scheduling-IOP_SCHEDULING", from_seq=1))
        with pytest.raises(ReplayFailed, match="the notifications service is not running"):
            await redrive(nats_server.url, RedriveRequest(durable="notifications-IOP_INTAKE", from_seq=1))
        with pytest.raises(ValueError, match="not a durable of an iopnet service"):
            await redrive(nats_server.url, RedriveRequest(durable="ehr-IOP_INTAKE-columbus-east", from_seq=1))
    with pytest.raises(ValueError, match="exactly one of"):
        RedriveRequest(durable=DURABLE)


def test_an_integrations_durable_gets_instructions_not_a_reset() -> None:
    assert service_of("scheduling-IOP_INTAKE") == "scheduling"
    assert service_of("notifications-IOP_INTAKE-safety") == "notifications"
    assert service_of("ehr-IOP_INTAKE-columbus-east") is None
    assert service_of("intake") is None
    assert stream_of("ehr-IOP_SCHEDULING-columbus-east") == "IOP_SCHEDULING"
    text = redrive_instructions("ehr-IOP_INTAKE-columbus-east", from_seq=None, since=datetime(2026, 1, 2, tzinfo=UTC))
    # Only what the integration's allow-list lets it do: delete and create its durable, or reset it.
    assert "$JS.API.STREAM.MSG.GET" not in text
    assert "$JS.API.CONSUMER.DELETE.IOP_INTAKE.ehr-IOP_INTAKE-columbus-east" in text
    assert '"opt_start_time": "2026-01-02T00:00:00+00:00"' in text
    by_seq = redrive_instructions("ehr-IOP_INTAKE-columbus-east", from_seq=7, since=None)
    assert '"opt_start_seq": 7' in by_seq and "$JS.API.CONSUMER.RESET.IOP_INTAKE.ehr-IOP_INTAKE-columbus-east" in by_seq


async def test_a_redrive_while_events_keep_arriving_loses_none(app, nats_server) -> None:
    """The consumer is suspended for the reset, not stopped: what arrives meanwhile is
    applied after it resumes, once."""
    async with running(app):
        await publish(nats_server.url, site(), *[enrolled() for _ in range(20)])
        await projected(app, 20)
        more = [enrolled() for _ in range(20)]
        publishing = asyncio.create_task(publish(nats_server.url, *more))
        answer, final, _ = await redrive_and_wait(nats_server.url, from_seq=1)
        assert answer.start_seq == 1 and answer.last_seq is not None and caught_up(final, answer.last_seq)
        await publishing
        await projected(app, 40)
        assert await count(app, store.inbox.table, store.inbox.table.c.consumer == DURABLE) == 41
        assert await stream_count(nats_server.url, "IOP_INTAKE") == 41


async def test_a_redrive_under_the_brokers_allow_lists(tmp_path: Path) -> None:
    """On the configuration `iopnet run` gives its server: the request from `ops`, the
    reset by scheduling's own user. Needs `$JS.API.CONSUMER.RESET.IOP_INTAKE.scheduling-
    IOP_INTAKE` in scheduling's publish allow-list (iopnet/natsd.py); without it the
    service says which permission is missing, and nothing has changed."""
    nats_dir = tmp_path / "nats"
    server = NatsServer(nats_dir, port=free_port(), users=load_or_create_credentials(nats_dir)).start()
    try:
        database = f"sqlite+aiosqlite:///{tmp_path / 'scheduling.db'}"
        app = create_app(make_settings(server.user_url("scheduling"), tmp_path, scheduling_database_url=database))
        async with running(app):
            await _publish_as_intake(server.user_url("intake"), site(), enrolled(), enrolled())
            await projected(app, 2)
            ops = server.user_url("ops")
            dry, _ = await redrive(ops, RedriveRequest(durable=DURABLE, from_seq=1, dry_run=True))
            assert dry.covered == 3
            permitted = f"$JS.API.CONSUMER.RESET.IOP_INTAKE.{DURABLE}" in PERMISSIONS["scheduling"].publish
            if permitted:
                answer, final = await redrive(ops, RedriveRequest(durable=DURABLE, from_seq=1), timeout=30)
                assert (final.applied - answer.applied, final.duplicates - answer.duplicates) == (0, 3)
            else:
                with pytest.raises(ReplayFailed, match=r"needs permission to publish it"):
                    await redrive(ops, RedriveRequest(durable=DURABLE, from_seq=1), timeout=30)
            assert await stream_count(server.user_url("scheduling"), "IOP_INTAKE") == 3
            assert await count(app, store.enrollments) == 2
            # The consumer resumed either way: a new event is applied.
            await _publish_as_intake(server.user_url("intake"), enrolled())
            await projected(app, 3)
    finally:
        server.stop(kill=True)


async def _publish_as_intake(url: str, *envelopes: Envelope) -> None:
    nc = await connect_once(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, [STREAMS["IOP_INTAKE"]], 120, service="intake")
        for envelope in envelopes:
            await js.publish(envelope.subject, envelope.to_bytes(), headers={"Nats-Msg-Id": str(envelope.event_id)})
    finally:
        await nc.close()
