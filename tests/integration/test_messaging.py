"""The shared consumer against a real nats-server and database: a failing handler is
retried (not terminated, DESIGN B7), succeeds once, and a handler that keeps failing is
dead-lettered after max_deliver while the next event still flows."""

import asyncio
import itertools
import json
import threading
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path
from uuid import uuid4

import anyio
from sqlalchemy import MetaData
from sqlalchemy import event as sqlalchemy_event

from iopnet.testing import cancelled, eventually
from shared.contracts import new_envelope
from shared.contracts.events import PatientBooked, PatientContactChanged, PatientEnrolled
from shared.db import create_engine, session_factory
from shared.messaging import Consumer, HandlerError, Inbox, Subscription
from shared.messaging.broker import close, jetstream
from shared.messaging.consumer import Delivered
from shared.messaging.streams import STREAMS, ensure_streams
from shared.priority import PriorityGate
from tests.conftest import applied_in_order, connected_broker, dead_letters, publish, publish_raw


def enrolled(program_id: str):
    event = PatientEnrolled(
        patient_id=uuid4(),
        enrollment_id=uuid4(),
        program_id=program_id,
        level_of_care="2.1",
        cohort="adult",
        start_date=date(2026, 12, 1),
        referral_source="self",
    )
    return new_envelope(event, site_id="columbus-east")


async def run_until_applied(consumer: Consumer, count: int) -> None:
    """Run the consumer until it has applied `count` events; then stop it and close its broker."""
    task = asyncio.create_task(consumer.run())
    try:

        async def all_applied() -> bool:
            return consumer.stats.applied == count

        await eventually(all_applied, what=f"{count} events applied")
    finally:
        await cancelled(task)
        await close(consumer.broker)


async def test_failing_handler_is_retried_then_dead_lettered(nats_server, inbox_db, tmp_path: Path) -> None:
    inbox, sessions = inbox_db
    attempts: Counter[str] = Counter()
    applied: list[str] = []

    async def handler(session, envelope, event) -> None:
        attempts[event.program_id] += 1
        if event.program_id == "always-fails":
            raise HandlerError("downstream rejected the event")
        if event.program_id == "fails-twice" and attempts[event.program_id] <= 2:
            raise RuntimeError("transient")
        applied.append(event.program_id)

    broker = await connected_broker(nats_server.url)
    consumer = Consumer(
        "probe",
        Subscription("IOP_INTAKE", {PatientEnrolled: handler}),
        sessions,
        inbox,
        broker,
        max_deliver=3,
        nak_delay_seconds=0.05,
        ack_wait_seconds=5,
    )
    await publish(nats_server.url, enrolled("fails-twice"), enrolled("always-fails"), enrolled("fine"))
    task = asyncio.create_task(consumer.run())
    try:

        async def settled() -> bool:
            return applied == ["fails-twice", "fine"] and consumer.stats.dead_lettered == 1

        await eventually(settled, what="retries and a dead letter")
    finally:
        await cancelled(task)
        await close(broker)

    assert attempts["fails-twice"] == 3  # retried after errors, not terminated
    assert attempts["always-fails"] == 3  # exactly max_deliver tries
    [(subject, headers, _)] = await dead_letters(nats_server.url)
    assert subject == "iop.dlq.probe.patient_enrolled.columbus-east"
    assert headers["Iop-Dlq-Reason"] == "failed 3 times: HandlerError: downstream rejected the event"
    assert headers["Iop-Deliveries"] == "3"
    assert headers["Iop-Original-Subject"] == "iop.intake.patient_enrolled.columbus-east"


async def test_consumer_outlives_idle_periods(nats_server, inbox_db) -> None:
    """nats-py raises asyncio's TimeoutError from an empty fetch; the loop must survive it."""
    inbox, sessions = inbox_db
    applied: list[str] = []

    async def handler(session, envelope, event) -> None:
        applied.append(event.program_id)

    await publish(nats_server.url, enrolled("first"))
    broker = await connected_broker(nats_server.url)
    consumer = Consumer(
        "idler",
        Subscription("IOP_INTAKE", {PatientEnrolled: handler}),
        sessions,
        inbox,
        broker,
        idle_wait_seconds=0.05,
    )
    task = asyncio.create_task(consumer.run())
    try:

        async def idled_a_while() -> bool:
            return consumer.stats.idle_fetches >= 10

        await eventually(idled_a_while, what="ten empty fetches")
        assert not task.done()
        await publish(nats_server.url, enrolled("after-idle"))

        async def both() -> bool:
            return applied == ["first", "after-idle"]

        await eventually(both, what="event after idling applied")
    finally:
        await cancelled(task)
        await close(broker)


async def test_restricted_dead_letters_withhold_the_payload(nats_server, inbox_db) -> None:
    """IOP_DLQ is for ops: a poison contact change must not copy a phone number there."""
    inbox, sessions = inbox_db

    async def handler(session, envelope, event) -> None:
        raise AssertionError("never called: the message does not parse")

    broker = await connected_broker(nats_server.url)
    consumer = Consumer(
        "probe", Subscription("IOP_RESTRICTED", {PatientContactChanged: handler}), sessions, inbox, broker
    )
    poison = b'{"event_type": "PatientContactChanged", "data": {"phone": "+16145550123"}}'
    await publish_raw(nats_server.url, "iop.restricted.intake.patient_contact_changed.columbus-east", poison)
    task = asyncio.create_task(consumer.run())
    try:

        async def dead_lettered() -> bool:
            return consumer.stats.dead_lettered == 1

        await eventually(dead_lettered, what="the poison contact change dead-lettered")
    finally:
        await cancelled(task)
        await close(broker)
    [(subject, headers, payload)] = await dead_letters(nats_server.url)
    assert subject == "iop.dlq.probe.patient_contact_changed.columbus-east"
    assert payload == b""
    assert headers["Iop-Payload-Withheld"] == "restricted"
    assert headers["Iop-Original-Stream"] == "IOP_RESTRICTED"


async def test_dead_letter_reasons_are_fixed_texts_never_input(nats_server, inbox_db) -> None:
    """A reason reaches the ops-readable DLQ and the log: it must not echo what the
    sender wrote (an event type or a key can be any text, a name included)."""
    inbox, sessions = inbox_db

    async def handler(session, envelope, event) -> None:
        raise AssertionError("never called: neither message applies")

    broker = await connected_broker(nats_server.url)
    consumer = Consumer("probe", Subscription("IOP_INTAKE", {PatientEnrolled: handler}), sessions, inbox, broker)
    unknown = enrolled("p-1").model_dump(mode="json") | {"event_type": "JaneDoeAt555-0123"}
    invalid = enrolled("p-1").model_dump(mode="json")
    invalid["data"] = {"Jane Doe 555-0123": True, "cohort": "Jane Doe"}
    subject = "iop.intake.patient_enrolled.columbus-east"
    for body in (unknown, invalid):
        await publish_raw(nats_server.url, subject, json.dumps(body).encode())
    task = asyncio.create_task(consumer.run())
    try:

        async def dead_lettered() -> bool:
            return consumer.stats.dead_lettered == 2

        await eventually(dead_lettered, what="both dead-lettered")
    finally:
        await cancelled(task)
        await close(broker)
    reasons = [headers["Iop-Dlq-Reason"] for _, headers, _ in await dead_letters(nats_server.url)]
    assert reasons[0] == "unknown event type"
    assert reasons[1].startswith("invalid event: ")
    assert not [r for r in reasons if "Jane" in r or "555" in r], reasons


async def test_a_backlog_is_applied_in_few_transactions_and_in_order(nats_server, inbox_db) -> None:
    inbox, sessions = inbox_db
    seen: list[str] = []

    async def handler(session, envelope, event) -> None:
        seen.append(event.program_id)

    backlog = [enrolled(f"p{index:02d}") for index in range(20)]
    await publish(nats_server.url, *backlog)  # all waiting before the consumer starts
    broker = await connected_broker(nats_server.url)
    consumer = Consumer("batcher", Subscription("IOP_INTAKE", {PatientEnrolled: handler}), sessions, inbox,
                        broker, batch=64)  # fmt: skip
    await run_until_applied(consumer, 20)
    assert seen == [f"p{index:02d}" for index in range(20)]
    assert consumer.stats.transactions <= 3  # the first alone, the backlog batched


async def test_a_batch_reaches_its_handler_without_a_worker_thread(nats_server, inbox_db, monkeypatch) -> None:
    """FastDepends resolves a `Context()` parameter with a synchronous call it runs in a
    worker thread: the consumer's FastStream handler takes none (the headers come with the
    decoded events), so a batch goes from the fetch to its commit in the event loop alone."""
    inbox, sessions = inbox_db
    hops: list[str] = []
    to_worker_thread = anyio.to_thread.run_sync

    async def counted(func, *args, **kwargs):  # a spy: the call still goes through
        hops.append(getattr(func, "__qualname__", repr(func)))
        return await to_worker_thread(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    applied_in: set[int] = set()

    async def handler(session, envelope, event) -> None:
        applied_in.add(threading.get_ident())

    await publish(nats_server.url, *(enrolled(f"p{index:02d}") for index in range(10)))
    broker = await connected_broker(nats_server.url)
    consumer = Consumer("loop-only", Subscription("IOP_INTAKE", {PatientEnrolled: handler}), sessions, inbox,
                        broker, batch=64)  # fmt: skip
    await run_until_applied(consumer, 10)
    assert consumer.stats.transactions < 10  # batches went through FastStream's pipeline
    assert hops == []
    assert applied_in == {threading.get_ident()}


async def test_a_slow_backlog_commits_in_bounded_transactions_and_in_order(nats_server, inbox_db) -> None:
    """A routine batch commits once it has run its time budget and goes on in a new
    transaction: on SQLite (one writer) whoever waits for the database (a low-risk
    check-in, the dispatcher) waits for one bounded transaction, not 64 events' worth."""
    inbox, sessions = inbox_db
    seen: list[str] = []

    async def handler(session, envelope, event) -> None:
        await asyncio.sleep(0.03)  # the event's own work
        seen.append(event.program_id)

    backlog = [enrolled(f"p{index:02d}") for index in range(12)]
    await publish(nats_server.url, *backlog)
    broker = await connected_broker(nats_server.url)
    consumer = Consumer("budget", Subscription("IOP_INTAKE", {PatientEnrolled: handler}), sessions, inbox,
                        broker, batch=64, transaction_budget_seconds=0.05)  # fmt: skip
    task = asyncio.create_task(consumer.run())
    try:

        async def all_applied() -> bool:
            return consumer.stats.applied == 12

        await eventually(all_applied, what="twelve events applied")
    finally:
        await cancelled(task)
        await close(broker)
    assert seen == [f"p{index:02d}" for index in range(12)]
    # 0.03 s each against a 0.05 s budget: at most two events per transaction.
    assert consumer.stats.transactions >= 6


async def test_a_batch_is_read_ahead_once_in_its_transaction_before_its_handlers(nats_server, inbox_db) -> None:
    """`Subscription.read_ahead` sees a batch's events to apply (not those applied before)
    in their transaction, before any of their handlers; an event fetched alone goes
    straight to its handler."""
    inbox, sessions = inbox_db
    calls: list[tuple[str, object]] = []

    async def read_ahead(session, envelopes) -> None:
        calls.append(("read ahead", (session.get_transaction(), [e.data["program_id"] for e in envelopes])))

    async def handler(session, envelope, event) -> None:
        calls.append((event.program_id, session.get_transaction()))

    first, *backlog = [enrolled(f"p{index}") for index in range(4)]
    subscription = Subscription("IOP_INTAKE", {PatientEnrolled: handler}, read_ahead=read_ahead)
    broker = await connected_broker(nats_server.url)
    consumer = Consumer("ahead", subscription, sessions, inbox, broker, batch=64)
    await publish(nats_server.url, first)
    task = asyncio.create_task(consumer.run())
    try:

        async def first_applied() -> bool:
            return consumer.stats.applied == 1

        await eventually(first_applied, what="the first event applied")
        await consumer.apply([Delivered(first, None), *(Delivered(e, None) for e in backlog)])
    finally:
        await cancelled(task)
        await close(broker)
    assert calls[0] == ("p0", calls[0][1]), "an event alone is not read ahead"
    (what, (transaction, ahead)), *handled = calls[1:]
    assert (what, ahead) == ("read ahead", ["p1", "p2", "p3"]), "the batch less what it applied before"
    assert [name for name, _ in handled] == ["p1", "p2", "p3"]
    assert {t for _, t in handled} == {transaction}, "in the batch's own transaction"


async def test_a_routine_batch_keeps_short_while_safety_work_waits(nats_server, inbox_db) -> None:
    """While the safety lane has work waiting or running (a low-risk check-in too, which
    holds nothing back), a routine batch commits after a fifth of its budget: on SQLite
    that check-in, and an urgent one fetched after it, wait for a short transaction."""
    inbox, sessions = inbox_db
    gate = PriorityGate()

    async def handler(session, envelope, event) -> None:
        await asyncio.sleep(0.03)  # the event's own work

    await publish(nats_server.url, *[enrolled(f"p{index:02d}") for index in range(12)])
    broker = await connected_broker(nats_server.url)
    consumer = Consumer("short", Subscription("IOP_INTAKE", {PatientEnrolled: handler}), sessions, inbox,
                        broker, batch=64, transaction_budget_seconds=0.5, gate=gate)  # fmt: skip
    with gate.safety_work():  # as the safety lane's transaction waiting for the connection
        task = asyncio.create_task(consumer.run())
        try:

            async def all_applied() -> bool:
                return consumer.stats.applied == 12

            await eventually(all_applied, what="twelve events applied")
        finally:
            await cancelled(task)
            await close(broker)
    # 0.5 s would hold the other eleven in one; 0.1 s holds at most four (0.03 s each).
    assert consumer.stats.transactions >= 4, consumer.stats.transactions
    assert not gate.pressing  # nothing was held back


async def test_a_routine_batch_gives_the_loop_a_turn_between_events_so_safety_work_can_press(
    nats_server, inbox_db
) -> None:
    """Handlers whose work never suspends (on SQLite, reads and inserts run in the event
    loop's thread): safety work that arrives during a batch still gets a turn of the loop
    to make itself known, and the batch commits at its next step rather than when its
    budget runs out."""
    inbox, sessions = inbox_db
    gate = PriorityGate()
    release = asyncio.Event()

    async def safety_lane() -> None:  # as the safety consumer entering its transaction
        async with gate.urgent():
            await release.wait()

    transactions: list[int] = []  # each event's session, in order
    arrived_at: list[int] = []  # the event during which the safety work arrived
    # Numbered, not by id(): a session freed at its commit may leave its address to the next.
    numbers = itertools.count()

    async def handler(session, envelope, event) -> None:
        if "test.session" not in session.info:
            session.info["test.session"] = next(numbers)
        transactions.append(session.info["test.session"])  # and nothing that suspends
        if not arrived_at and len(set(transactions)) == 2:  # the first fetch may bring one event
            arrived_at.append(len(transactions) - 1)
            asyncio.create_task(safety_lane())  # noqa: RUF006 - ended by `release`

    await publish(nats_server.url, *[enrolled(f"p{index:02d}") for index in range(12)])
    broker = await connected_broker(nats_server.url)
    consumer = Consumer("turns", Subscription("IOP_INTAKE", {PatientEnrolled: handler}), sessions, inbox,
                        broker, batch=64, transaction_budget_seconds=30.0, gate=gate)  # fmt: skip
    task = asyncio.create_task(consumer.run())
    try:

        async def pressed() -> bool:
            return gate.pressing

        await eventually(pressed, what="the safety work to arrive")
        release.set()

        async def all_applied() -> bool:
            return consumer.stats.applied == 12

        await eventually(all_applied, what="twelve events applied")
    finally:
        release.set()
        await cancelled(task)
        await close(broker)
    [at] = arrived_at
    # Its transaction ended with that event: the rest went in later ones (a 30 s budget,
    # with no turn of the loop for the safety work, would have taken them all).
    assert transactions[at + 1 :]
    assert transactions[at] not in transactions[at + 1 :], transactions


async def test_a_batch_kept_waiting_for_the_database_still_gets_its_budget(nats_server, tmp_path: Path) -> None:
    """The routine budget counts a transaction's own work, not its wait for the
    connection. On SQLite (one pooled connection) another writer's turns keep each batch
    waiting longer than the budget; counting that wait ended every batch after its first
    event, so a backlog went one event per transaction (issue 10: notifications' lanes
    under the enrollment wave)."""
    metadata = MetaData()
    inbox = Inbox(metadata)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'one-connection.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    sessions = session_factory(engine)
    seen: list[str] = []

    async def handler(session, envelope, event) -> None:
        seen.append(event.program_id)

    applied = asyncio.Event()

    async def other_writer() -> None:
        # Another lane on the same connection: turn after turn, each longer than the budget.
        while not applied.is_set():
            async with sessions() as session, session.begin():
                await session.connection()
                await asyncio.sleep(0.2)  # its own work, holding the connection

    await publish(nats_server.url, *[enrolled(f"p{index:02d}") for index in range(20)])
    broker = await connected_broker(nats_server.url)
    consumer = Consumer("waited", Subscription("IOP_INTAKE", {PatientEnrolled: handler}), sessions, inbox,
                        broker, batch=64, transaction_budget_seconds=0.05)  # fmt: skip
    writer = asyncio.create_task(other_writer())
    task = asyncio.create_task(consumer.run())
    try:

        async def all_applied() -> bool:
            return consumer.stats.applied == 20

        await eventually(all_applied, what="twenty events applied", timeout=30)
    finally:
        applied.set()
        await cancelled(task)
        await cancelled(writer)
        await close(broker)
        await engine.dispose()
    assert seen == [f"p{index:02d}" for index in range(20)]
    # The first event alone, then the backlog in one or two (before: about one per event).
    assert consumer.stats.transactions <= 3, consumer.stats.transactions


async def test_a_batch_asks_the_inbox_once_and_applies_an_event_twice_in_it_once(nats_server, inbox_db) -> None:
    """The inbox costs two statements per batch, not two per event (each is a round trip
    to the database), and an event re-published past the duplicate window that lands in
    the same batch as its first copy is still applied once."""
    inbox, sessions = inbox_db
    seen: list[str] = []
    inbox_statements: list[str] = []

    def count_inbox(conn, cursor, statement: str, *args) -> None:
        if "inbox" in statement:
            inbox_statements.append(statement)

    async def handler(session, envelope, event) -> None:
        seen.append(event.program_id)

    engine = sessions.kw["bind"].sync_engine
    sqlalchemy_event.listen(engine, "before_cursor_execute", count_inbox)
    backlog = [enrolled(f"p{index:02d}") for index in range(20)]
    await publish(nats_server.url, *backlog)
    await publish(nats_server.url, backlog[5], msg_id_prefix="again-")  # a second copy on the bus
    broker = await connected_broker(nats_server.url)
    consumer = Consumer("once", Subscription("IOP_INTAKE", {PatientEnrolled: handler}), sessions, inbox,
                        broker, batch=64)  # fmt: skip
    task = asyncio.create_task(consumer.run())
    try:

        async def all_taken() -> bool:
            return consumer.stats.applied + consumer.stats.skipped_duplicates == 21

        await eventually(all_taken, what="twenty-one messages taken")
    finally:
        await cancelled(task)
        await close(broker)
        sqlalchemy_event.remove(engine, "before_cursor_execute", count_inbox)
    assert seen == [f"p{index:02d}" for index in range(20)]
    assert consumer.stats.applied == 20 and consumer.stats.skipped_duplicates == 1
    assert consumer.stats.transactions <= 3
    assert len(inbox_statements) <= 2 * consumer.stats.transactions  # a SELECT and an INSERT each
    assert len(await applied_in_order(sessions, inbox)) == 20


async def test_a_dead_letter_that_cannot_be_stored_holds_the_messages_behind_it(nats_server, inbox_db, caplog) -> None:
    """The dead-letter stream is unavailable when a poison message comes: the consumer
    retries the dead letter in place, so the event behind it waits (order kept) and is
    applied once the dead letter is stored."""
    inbox, sessions = inbox_db
    order: list[str] = []

    async def handler(session, envelope, event) -> None:
        order.append(event.program_id)

    broker = await connected_broker(nats_server.url)
    js = jetstream(broker)
    consumer = Consumer(
        "dlq-down",
        Subscription("IOP_INTAKE", {PatientEnrolled: handler}),
        sessions,
        inbox,
        broker,
        nak_delay_seconds=0.05,
    )
    await publish(nats_server.url, enrolled("first"))
    task = asyncio.create_task(consumer.run())
    try:

        async def first_applied() -> bool:
            return order == ["first"]

        await eventually(first_applied, what="the first event applied")
        await js.delete_stream("IOP_DLQ")  # bound already: the consumer will not re-create it now
        await publish_raw(nats_server.url, "iop.intake.patient_enrolled.columbus-east", b"{not json")
        behind = enrolled("behind-the-poison")  # publish_raw: `publish` would re-create IOP_DLQ
        await publish_raw(nats_server.url, behind.subject, behind.to_bytes())

        async def tried_three_times() -> bool:
            return sum(r.getMessage() == "dead-letter publish failed" for r in caplog.records) >= 3

        await eventually(tried_three_times, what="three tries to store the dead letter")
        assert consumer.stats.dead_lettered == 0
        assert order == ["first"]  # nothing overtook the poison message meanwhile
        await ensure_streams(js, [STREAMS["IOP_DLQ"]], 120)

        async def both_done() -> bool:
            return consumer.stats.dead_lettered == 1 and order == ["first", "behind-the-poison"]

        await eventually(both_done, what="the dead letter stored, then the event behind it")
    finally:
        await cancelled(task)
        await close(broker)
    [(subject, _, _)] = await dead_letters(nats_server.url)
    assert subject == "iop.dlq.dlq-down.patient_enrolled.columbus-east"


async def test_work_that_plans_for_later_waits_for_the_routine_batch_under_way(nats_server, inbox_db) -> None:
    """Two consumers of one process, each with its own connection (PostgreSQL's pool):
    the one that plans for later (notifications' reminders) starts its batch only once
    the routine batch under way (the welcome's) has committed (shared/priority.py)."""
    inbox, sessions = inbox_db
    gate = PriorityGate()
    order: list[str] = []
    release, routine_in = asyncio.Event(), asyncio.Event()

    async def routine(session, envelope, event) -> None:
        routine_in.set()
        await release.wait()
        order.append("routine")

    async def plans_for_later(session, envelope, event) -> None:
        order.append("later")

    booked = PatientBooked(
        booking_id=uuid4(), session_id=uuid4(), patient_id=uuid4(), starts_at=datetime(2026, 12, 1, 9, tzinfo=UTC)
    )
    await publish(nats_server.url, enrolled("p-later"), new_envelope(booked, site_id="columbus-east"))
    broker = await connected_broker(nats_server.url)
    first = Consumer("welcome", Subscription("IOP_INTAKE", {PatientEnrolled: routine}), sessions, inbox, broker,
                     gate=gate)  # fmt: skip
    second = Consumer("reminders", Subscription("IOP_SCHEDULING", {PatientBooked: plans_for_later}, later=True),
                      sessions, inbox, broker, gate=gate)  # fmt: skip
    tasks = [asyncio.create_task(first.run())]
    try:
        await asyncio.wait_for(routine_in.wait(), timeout=10)
        tasks.append(asyncio.create_task(second.run()))

        async def later_waits_or_ran() -> bool:
            return gate.later_waiting == 1 or "later" in order

        await eventually(later_waits_or_ran, what="the later batch to wait (or run)")
        release.set()

        async def both_applied() -> bool:
            return first.stats.applied == 1 and second.stats.applied == 1

        await eventually(both_applied, what="both consumers to apply the event")
    finally:
        release.set()
        for task in tasks:
            await cancelled(task)
        await close(broker)
    assert order == ["routine", "later"]
