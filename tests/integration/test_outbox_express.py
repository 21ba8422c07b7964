"""The outbox's express lane (issue 10): a committed safety event reaches the bus at once,
even while the relay is held up (under load, its read of the outbox queues behind every
request for the database); routine events still wait for the relay; a safety event of a
rolled-back transaction never leaves; the relay then marks the early one sent without
publishing it again. Real nats-server, SQLite and PostgreSQL."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from faststream.nats import NatsBroker
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from iopnet.testing import eventually
from shared.contracts import Envelope
from shared.contracts.events import CheckInSubmitted, PatientEnrolled
from shared.messaging import Outbox, OutboxRelay
from shared.messaging.broker import close, jetstream
from shared.messaging.streams import STREAMS, ensure_streams
from tests.conftest import connected_broker, outbox_alone, stream_count

SITE = "columbus-east"


def enrolled(patient_id: UUID | None = None) -> PatientEnrolled:
    return PatientEnrolled(
        patient_id=patient_id or uuid4(), enrollment_id=uuid4(), program_id="adult-iop-am", level_of_care="2.1",
        cohort="adult", start_date=date(2026, 12, 1), referral_source="self",
    )  # fmt: skip


def urgent(patient_id: UUID | None = None) -> CheckInSubmitted:
    return CheckInSubmitted(
        check_in_id=uuid4(), patient_id=patient_id or uuid4(), enrollment_id=uuid4(), submitted_at=datetime.now(UTC),
        mood=2, craving=9, used_since_last=True, safety_concern=True, risk="urgent",
    )  # fmt: skip


async def intake_stream_order(url: str, broker: NatsBroker, count: int) -> list[UUID]:
    """The event ids on IOP_INTAKE in stream order, once `count` are there."""

    async def all_there() -> bool:
        return await stream_count(url, "IOP_INTAKE") == count

    await eventually(all_there, what=f"{count} events on IOP_INTAKE")
    js = jetstream(broker)
    return [
        Envelope.model_validate_json((await js.get_msg("IOP_INTAKE", seq)).data).event_id for seq in range(1, count + 1)
    ]


class Rollback(Exception):
    pass


@dataclass
class HeldRelay:
    """An outbox and its relay on a real database and nats-server; the relay's reads of
    the outbox wait for `held` (the express lane does not)."""

    outbox: Outbox
    sessions: async_sessionmaker[AsyncSession]
    broker: NatsBroker
    relay: OutboxRelay
    held: asyncio.Event

    async def committed(self, event: Any) -> Envelope:
        """`event` staged in a transaction of its own, committed."""
        async with self.sessions() as session, session.begin():
            return await self.outbox.emit(session, event, SITE)


@pytest.fixture
async def held_relay(nats_server, database_url: str) -> AsyncIterator[HeldRelay]:
    outbox, engine, sessions = await outbox_alone(database_url)
    broker = await connected_broker(nats_server.url)
    await ensure_streams(jetstream(broker), [STREAMS["IOP_INTAKE"]], 120)
    relay = OutboxRelay(outbox, sessions, lambda: broker)
    held = asyncio.Event()
    read_and_publish = relay.relay_batch

    async def held_relay_batch() -> int:
        await held.wait()
        return await read_and_publish()

    relay.relay_batch = held_relay_batch  # type: ignore[method-assign]
    running = asyncio.create_task(relay.run())
    try:
        yield HeldRelay(outbox, sessions, broker, relay, held)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await close(broker)
        await engine.dispose()


async def test_a_safety_event_leaves_on_commit_while_the_relay_is_held(nats_server, held_relay: HeldRelay) -> None:
    outbox, sessions, relay, held = held_relay.outbox, held_relay.sessions, held_relay.relay, held_relay.held
    relayed: list[str] = []  # event ids the relay itself published
    publish = relay._publish

    async def recording_publish(publisher: Any, rows: list[Any]) -> tuple[int, str | None]:
        if rows and hasattr(rows[0], "seq"):  # outbox rows: the relay (the lane passes Express items)
            relayed.extend(row.event_id for row in rows)
        return await publish(publisher, rows)

    relay._publish = recording_publish  # type: ignore[method-assign]
    async with sessions() as session, session.begin():
        routine: Envelope = await outbox.emit(session, enrolled(), SITE)
        safety: Envelope = await outbox.emit(session, urgent(), SITE)

    async def staged_then_rolled_back() -> None:
        async with sessions() as session, session.begin():
            await outbox.emit(session, urgent(), SITE)
            raise Rollback

    with pytest.raises(Rollback):
        await staged_then_rolled_back()

    async def on_the_bus() -> bool:
        return await stream_count(nats_server.url, "IOP_INTAKE") == 1

    await eventually(on_the_bus, what="the urgent check-in on the bus while the relay is held")
    assert relay.express_published == 1 and relay.published == 0  # not the routine one, not the rolled back one
    # /metrics counts what this process put on the bus, the lane's publishes too.
    assert relay.published_by_event == {"check_in_submitted": 1}

    held.set()

    async def all_sent() -> bool:
        async with sessions() as session:
            unsent = select(func.count()).where(outbox.table.c.sent_at.is_(None))
            return (await session.execute(unsent)).scalar_one() == 0

    await eventually(all_sent, what="the relay to mark both rows sent")
    assert await stream_count(nats_server.url, "IOP_INTAKE") == 2
    assert relayed == [str(routine.event_id)]  # the early one marked sent, not published twice
    assert str(safety.event_id) not in relayed and relay.published == 2
    assert relay.published_by_event == {"check_in_submitted": 1, "patient_enrolled": 1}  # each once
    async with sessions() as session:
        rows = (await session.execute(select(outbox.table.c.event_id))).scalars().all()
    assert len(rows) == 2  # the rolled-back one was never staged for good


async def test_a_safety_event_does_not_overtake_an_earlier_event_of_its_patient(
    nats_server, held_relay: HeldRelay
) -> None:
    """The lane overtakes other patients' routine events only: a check-in committed right
    after its patient's routine event (held by the relay) goes after that one, while
    another patient's check-in leaves at once. An outside system's feed, read in stream
    order, so never sees a patient's check-in before the consent that lets it through."""
    relay = held_relay.relay
    patient = uuid4()
    routine = await held_relay.committed(enrolled(patient))
    behind = await held_relay.committed(urgent(patient))
    other = await held_relay.committed(urgent())

    async def on_the_bus() -> bool:
        return await stream_count(nats_server.url, "IOP_INTAKE") == 1

    await eventually(on_the_bus, what="the other patient's check-in on the bus while the relay is held")
    held_relay.held.set()

    order = await intake_stream_order(nats_server.url, held_relay.broker, 3)
    assert order == [other.event_id, routine.event_id, behind.event_id]
    assert not relay.express.waiting  # nothing left behind


async def test_a_patients_next_safety_event_waits_behind_one_still_left_to_the_relay(
    nats_server, held_relay: HeldRelay
) -> None:
    """A check-in left to the relay behind its patient's routine event is itself an
    earlier event of that patient: when the routine one is on the bus and the check-in
    not yet (the relay's batch was read before the check-in committed), the patient's
    next check-in must not leave by the lane ahead of it."""
    relay = held_relay.relay
    patient = uuid4()
    routine = await held_relay.committed(enrolled(patient))
    first = await held_relay.committed(urgent(patient))
    relay.express.on_the_bus([str(routine.event_id)])  # as the relay reports a batch without `first`
    second = await held_relay.committed(urgent(patient))
    assert str(second.event_id) in relay.express.waiting  # not on its way by the lane
    held_relay.held.set()

    order = await intake_stream_order(nats_server.url, held_relay.broker, 3)
    assert order == [routine.event_id, first.event_id, second.event_id]
    assert not relay.express.waiting
