"""Transactional outbox (DESIGN B2).

`Outbox.emit` is the one way a service stages an event: it builds the envelope (in
reply to a cause, continuing a chain, or starting one) and `stage`s it, which writes
it in the caller's transaction. After that transaction
commits, a session hook wakes the relay, which publishes pending rows in order with
`Nats-Msg-Id` = event_id, waits for JetStream's acks, then marks them sent. A crash
between publish and mark re-publishes; JetStream's duplicate window and the consumers'
inbox drop the copy. Nothing is lost: a row stays until JetStream acknowledged it.
"""

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from faststream.nats import NatsBroker
from opentelemetry.trace import SpanKind
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    case,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from shared import clock
from shared.contracts import Envelope, Event, caused_by, new_envelope
from shared.contracts.subjects import RESTRICTED, ROOT
from shared.db import UtcDateTime, dialect_name, in_list, insert_at_commit, rows_changed
from shared.messaging.broker import jetstream
from shared.priority import finishing_work
from shared.tracing import current_context, headers_with_context, span_under, stored_context

log = logging.getLogger("iopnet.outbox")


class CommitSignal:
    """Wakes a background worker after a transaction that gave it work commits.

    `mark(session)` inside the transaction; the session's after_commit hook then sets
    the event. A rolled-back transaction wakes nobody. No polling on the hot path.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], name: str) -> None:
        self._flag = f"iopnet.signal.{name}"
        self._event = asyncio.Event()
        self._event.set()  # first wait returns at once: drain what an earlier run left
        event.listen(sessions.kw["sync_session_class"], "after_commit", self._after_commit)

    def mark(self, session: AsyncSession) -> None:
        session.info[self._flag] = True

    def _after_commit(self, session: Session) -> None:
        if session.info.pop(self._flag, False):
            self._event.set()

    def set(self) -> None:
        self._event.set()

    async def wait(self, tick: float) -> bool:
        """Return when signalled or after `tick` seconds (a retry tick), whichever is
        first; True if signalled."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
        # that lands as the event fires, and the worker would outlive its service.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(tick):
                await self._event.wait()
        signalled = self._event.is_set()
        self._event.clear()
        return signalled


@dataclass(frozen=True)
class Chain:
    """A chain of events to continue when there is no envelope to reply to (a change
    made by a command or a timer): its correlation id and, where one is known, the
    event that caused this one (e.g. the episode's PatientEnrolled)."""

    correlation_id: UUID
    causation_id: UUID | None = None


def envelope_for(event: Event, site_id: str, *, cause: Envelope | None = None, chain: Chain | None = None) -> Envelope:
    """In reply to `cause` if given (its correlation, it as causation), else continuing
    `chain`, else the first event of a new chain."""
    if cause is not None:
        return caused_by(cause, event, site_id=site_id)
    if chain is not None:
        return new_envelope(
            event, site_id=site_id, correlation_id=chain.correlation_id, causation_id=chain.causation_id
        )
    return new_envelope(event, site_id=site_id)


class Outbox:
    def __init__(self, metadata: MetaData) -> None:
        self.table = Table(
            "outbox",
            metadata,
            Column("seq", Integer, primary_key=True, autoincrement=True),
            Column("event_id", String(36), nullable=False, unique=True),
            Column("subject", String(255), nullable=False),
            Column("payload", Text, nullable=False),
            Column("created_at", UtcDateTime, nullable=False),
            Column("sent_at", UtcDateTime, nullable=True, index=True),
            Column("attempts", Integer, nullable=False, default=0),
            Column("last_error", String(500), nullable=True),
            # W3C trace context of the span that staged the event (shared/tracing.py):
            # the relay publishes later, outside that span, and continues the trace from here.
            Column("trace_context", String(512), nullable=True),
        )
        self.commit_signal: CommitSignal | None = None
        self.express_lane: ExpressLane | None = None

    async def emit(
        self,
        session: AsyncSession,
        event: Event,
        site_id: str,
        *,
        cause: Envelope | None = None,
        chain: Chain | None = None,
    ) -> Envelope:
        """Stage one event of this service (see `envelope_for`); returns its envelope,
        whose ids a caller may keep (an episode's correlation id) or pass on."""
        envelope = envelope_for(event, site_id, cause=cause, chain=chain)
        await self.stage(session, envelope)
        return envelope

    async def emit_all(
        self, session: AsyncSession, events: Iterable[Event], site_id: str, *, cause: Envelope | None = None
    ) -> list[Envelope]:
        """`emit` for several events of one site at once: one multi-row INSERT."""
        envelopes = [envelope_for(event, site_id, cause=cause) for event in events]
        await self.stage(session, *envelopes)
        return envelopes

    async def stage(
        self, session: AsyncSession, *envelopes: Envelope, trace_contexts: Sequence[str | None] | None = None
    ) -> None:
        """Add events to the caller's transaction; they leave only if it commits.
        `trace_contexts`: one per envelope (`current_context()` of the request each came
        from) when one transaction stages the events of several requests (a group
        commit); by default the current one for all."""
        if not envelopes:
            return
        contexts = trace_contexts if trace_contexts is not None else [current_context()] * len(envelopes)
        staged = [
            Express(str(env.event_id), env.subject, env.model_dump_json(), context)
            for env, context in zip(envelopes, contexts, strict=True)
        ]
        now = clock.now()
        # Written as the transaction commits (nothing reads it back before): on PostgreSQL
        # in one statement with the transaction's audit rows.
        await insert_at_commit(
            session, self.table, [{**asdict(item), "created_at": now, "attempts": 0} for item in staged]
        )
        if self.express_lane is not None:
            self.express_lane.hold(session, staged, [_patient_of(env) for env in envelopes])
        self.signal(session)

    async def forward(self, session: AsyncSession, message_id: str, subject: str, envelope: Envelope) -> bool:
        """Stage another service's event, unchanged, under another subject (an outside
        system's feed), in the caller's transaction. `message_id` is its Nats-Msg-Id
        there (one per recipient: the same event may go to several); the envelope keeps
        its own event_id, by which the recipient de-duplicates. Staging the same
        `message_id` again does nothing (False): a redelivered event is forwarded once."""
        row = {
            "event_id": message_id,
            "subject": subject,
            "payload": envelope.model_dump_json(),
            "created_at": clock.now(),
            "attempts": 0,
            "trace_context": current_context(),
        }
        dialect = postgresql if dialect_name(session) == "postgresql" else sqlite
        statement = dialect.insert(self.table).values(**row).on_conflict_do_nothing(index_elements=["event_id"])
        if not rows_changed(await session.execute(statement)):
            return False
        self.signal(session)
        return True

    def signal(self, session: AsyncSession) -> None:
        if self.commit_signal is not None:
            self.commit_signal.mark(session)

    async def pending_count(self, session: AsyncSession) -> int:
        query = select(func.count()).select_from(self.table).where(self.table.c.sent_at.is_(None))
        return int((await session.execute(query)).scalar_one())

    async def oldest_pending_at(self, session: AsyncSession) -> datetime | None:
        query = select(func.min(self.table.c.created_at)).where(self.table.c.sent_at.is_(None))
        return (await session.execute(query)).scalar_one()


# Published before anything else pending (subject names: iop.<producer>.<name>.<site>).
SAFETY_EVENTS = ("check_in_submitted", "care_team_alerted")


def _patient_of(envelope: Envelope) -> str | None:
    patient = envelope.data.get("patient_id")
    return str(patient) if patient is not None else None


def _event_name(subject: str) -> str:
    return subject.split(".")[-2]


def is_safety_subject(subject: str) -> bool:
    """A safety event of a service's own stream (a copy in an outside system's feed is not)."""
    parts = subject.split(".")
    return len(parts) >= 4 and parts[1] != "feed" and parts[-2] in SAFETY_EVENTS


@dataclass(frozen=True)
class Express:
    """A staged safety event, as its outbox row holds it."""

    event_id: str
    subject: str
    payload: str
    trace_context: str | None


class ExpressLane:
    """Safety events leave the moment their transaction commits, without waiting for the
    relay's next read of the outbox (issue 10: under load that read queues behind every
    request for the database, and an urgent check-in waited 100+ ms there, twice on its
    way to the care team). Their rows stay the record: the relay still marks them sent,
    and publishes any the lane could not; a copy of one published both ways is dropped by
    JetStream's duplicate window (same Nats-Msg-Id).

    They overtake routine events of *other* patients only: a safety event whose patient
    has a routine event committed and not yet on the bus (a consent granted a moment
    before the check-in) is left to the relay, which publishes it after that one; so is
    each later safety event of that patient while the first still waits. An
    outside system's feed, read in stream order, so never sees a patient's check-in before
    the consent that lets it through. (Kept per process: replicas sharing a PostgreSQL
    outbox do not see each other's rows here.)"""

    _KEY = "iopnet.express"
    _ROUTINE = "iopnet.express.routine"
    REMEMBERED = 10_000  # ids published early and not yet seen by the relay

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._ready: collections.deque[Express] = collections.deque()
        self._event = asyncio.Event()
        self.published: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.in_flight: set[str] = set()
        # Events with a patient, committed and left to the relay (routine ones, and safety
        # ones that wait for those), not yet on the bus: event id -> patient, and by
        # patient; the safety events left to the relay, with those they wait for.
        self._for_relay: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._by_patient: dict[str, set[str]] = {}
        self.waiting: dict[str, set[str]] = {}
        sync_session = sessions.kw["sync_session_class"]
        event.listen(sync_session, "after_commit", self._after_commit)
        event.listen(sync_session, "after_soft_rollback", self._after_rollback)

    def hold(self, session: AsyncSession, staged: list[Express], patients: list[str | None]) -> None:
        for item, patient in zip(staged, patients, strict=True):
            if is_safety_subject(item.subject):
                session.info.setdefault(self._KEY, []).append((item, patient))
            elif patient is not None:
                session.info.setdefault(self._ROUTINE, []).append((item.event_id, patient))

    def _after_commit(self, session: Session) -> None:
        for event_id, patient in session.info.pop(self._ROUTINE, None) or []:
            self._for_relay[event_id] = patient
            self._by_patient.setdefault(patient, set()).add(event_id)
        while len(self._for_relay) > self.REMEMBERED:  # published by another replica, say
            self._on_the_bus(next(iter(self._for_relay)))
        held = session.info.pop(self._KEY, None)
        if not held:
            return
        ready = []
        for item, patient in held:
            earlier = self._by_patient.get(patient or "")
            if earlier:
                self.waiting[item.event_id] = set(earlier)  # the relay publishes it after them
                # and the patient's later safety events after it: were it not counted here,
                # the next check-in could leave by the lane while this one still waits.
                self._for_relay[item.event_id] = patient or ""
                earlier.add(item.event_id)
            else:
                ready.append(item)
        if ready:
            # In flight from now: the relay, woken by the same commit, leaves their rows.
            self.in_flight.update(item.event_id for item in ready)
            self._ready.extend(ready)
            self._event.set()

    def _after_rollback(self, session: Session, previous_transaction: object) -> None:
        # Any rollback, a savepoint's too: what was held goes by the relay instead (it
        # publishes only committed rows), never by the lane.
        session.info.pop(self._KEY, None)
        session.info.pop(self._ROUTINE, None)

    def relay_pending(self) -> frozenset[str]:
        """The events with a patient known to wait for the relay, as the relay starts a read."""
        return frozenset(self._for_relay)

    def in_patient_order(self, rows: list[Any], *, known_gone: frozenset[str] = frozenset()) -> list[Any]:
        """The relay's rows (safety first, then in commit order) as it may publish them now:
        a safety event left to it goes after the routine events of its patient that were
        committed before it, and waits for a later batch while any of them is not in this one.
        `known_gone`: routine events that were pending before the read and are not among
        the rows although the read took every pending row: on the bus already (another
        replica published them)."""
        for event_id in known_gone:
            self._on_the_bus(event_id)
        if not self.waiting:
            return rows
        ordered: list[Any] = []
        before: set[str] = set()  # published ahead of the row at hand, in this batch
        for row in sorted(rows, key=lambda r: (r.event_id in self.waiting or not is_safety_subject(r.subject), r.seq)):
            waits_for = self.waiting.get(row.event_id, ())
            if any(e in self._for_relay and e not in before for e in waits_for):
                continue  # its patient's earlier event is not in this batch: next time
            ordered.append(row)
            before.add(row.event_id)
        return ordered

    def on_the_bus(self, event_ids: Iterable[str]) -> None:
        """The relay's rows now on the bus."""
        for event_id in event_ids:
            self._on_the_bus(event_id)

    def _on_the_bus(self, event_id: str) -> None:
        self.waiting.pop(event_id, None)
        patient = self._for_relay.pop(event_id, None)
        if patient is not None:
            others = self._by_patient.get(patient, set())
            others.discard(event_id)
            if not others:
                self._by_patient.pop(patient, None)

    async def take(self) -> list[Express]:
        """The committed safety events not yet taken (in flight until `done`)."""
        await self._event.wait()
        self._event.clear()
        taken = list(self._ready)
        self._ready.clear()
        return taken

    def done(self, taken: list[Express], acked: int) -> None:
        """The first `acked` are on the bus; the rest are the relay's again."""
        for item in taken:
            self.in_flight.discard(item.event_id)
        for item in taken[:acked]:
            self.published[item.event_id] = None
        while len(self.published) > self.REMEMBERED:
            self.published.popitem(last=False)

    def status(self, event_id: str) -> str:
        """What the relay does with this event's row: mark it sent ("published", then
        forgotten here), leave it for its next pass ("in_flight"), or publish it ("pending")."""
        if self.published.pop(event_id, False) is None:
            return "published"
        return "in_flight" if event_id in self.in_flight else "pending"


class OutboxRelay:
    def __init__(
        self,
        outbox: Outbox,
        sessions: async_sessionmaker[AsyncSession],
        broker: Callable[[], NatsBroker | None],
        *,
        restricted_broker: Callable[[], NatsBroker | None] | None = None,
        batch_size: int = 256,
        retry_seconds: float = 2.0,
        publish_timeout: float = 5.0,
    ) -> None:
        self.outbox = outbox
        self.sessions = sessions
        self._broker = broker
        # Events on iop.restricted.> go to the NATS account that holds IOP_RESTRICTED.
        self._restricted_broker = restricted_broker or broker
        self.batch_size = batch_size
        self.retry_seconds = retry_seconds
        self.publish_timeout = publish_timeout
        self.published = 0
        self.express_published = 0  # safety events published by the express lane
        # Events this process put on the bus, by name (the subject's third token), for
        # /metrics: the lane's when JetStream acks them, the relay's own publishes; a row
        # the lane published is marked sent by the relay, not counted twice.
        self.published_by_event: collections.Counter[str] = collections.Counter()
        self._signal = CommitSignal(sessions, "outbox")
        outbox.commit_signal = self._signal
        self.express = ExpressLane(sessions)
        outbox.express_lane = self.express

    def wake(self) -> None:
        self._signal.set()

    def backoff(self, failures: int) -> float:
        """The pause after the `failures`-th failed pass in a row, before the next one even
        if commits wake the relay: while the bus cannot take events (a stream's leader being
        elected, say) every commit's wake-up would fail at once: 100 tries and log lines in
        2 s on one replica of the cluster test. Short at first, so a blip costs little."""
        return min(self.retry_seconds, 0.05 * 2 ** min(failures - 1, 16))

    async def run(self) -> None:
        express = asyncio.create_task(self._run_express(), name="outbox-express")
        failures = 0  # in a row
        try:
            while True:
                # Woken on commit; the timeout is only the retry tick after a failed publish.
                await self._signal.wait(self.retry_seconds)
                try:
                    while await self.relay_batch() == self.batch_size:
                        pass
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures += 1
                    if failures == 1:
                        log.warning("outbox relay paused", extra={"error": type(exc).__name__})
                    await asyncio.sleep(self.backoff(failures))
                else:
                    # A pass with no broker publishes nothing and fails nothing: not resumed yet.
                    if failures and self._broker() is not None:
                        log.warning("outbox relay resumed", extra={"count": failures})
                        failures = 0
        finally:
            express.cancel()
            await asyncio.gather(express, return_exceptions=True)

    async def _run_express(self) -> None:
        """Publish committed safety events at once (see ExpressLane); what fails here is
        left to the relay, which publishes every row not known to be on the bus."""
        while True:
            staged = await self.express.take()
            broker, restricted = self._broker(), self._restricted_broker()
            if broker is None or restricted is None:
                self.express.done(staged, 0)
                continue  # not connected yet: the relay has them
            acked = 0
            try:
                acked, _ = await self._publish(_Publisher(broker, restricted), staged)
            finally:
                self.express.done(staged, acked)
                self.express_published += acked
                self.published_by_event.update(_event_name(item.subject) for item in staged[:acked])
                self.wake()  # the relay marks their rows sent, or publishes what failed

    async def relay_batch(self) -> int:
        """Publish one batch of pending rows; returns how many were sent."""
        broker, restricted = self._broker(), self._restricted_broker()
        if broker is None or restricted is None:
            return 0
        publisher = _Publisher(broker, restricted)
        async with self.sessions() as session:
            known = self.express.relay_pending()  # before the read: see ExpressLane.in_patient_order
            if dialect_name(session) == "postgresql":
                async with session.begin():
                    # Replicas share the outbox: the rows stay locked (SKIP LOCKED for the
                    # others) while this relay publishes them. PostgreSQL has a pool, so
                    # the open transaction blocks nobody else.
                    rows = await self._pending(session, lock=True)
                    sent, error = await self._publish_pending(publisher, rows, known)
                    await self._record(session, rows, sent, error)
            else:
                # SQLite: one relay per file and one pooled connection. Publish with no
                # transaction open, so a broker outage (acks time out) never stalls the
                # service's requests behind the relay. Its two short turns finish work
                # (what is committed goes on the bus): they go before routine transactions
                # that start new work (shared/priority.py). Not on PostgreSQL, where the
                # relay's transaction lasts while it publishes: first in the pool's line
                # there, it kept connections from intake's check-ins (`iopnet bench
                # --postgres`: check-in HTTP p99 at 200/s 1.2-1.5 s, against 0.8-1.1 s).
                with finishing_work():
                    async with session.begin():
                        rows = await self._pending(session, lock=False)
                sent, error = await self._publish_pending(publisher, rows, known)
                with finishing_work():
                    async with session.begin():
                        await self._record(session, rows, sent, error)
        self.published += len(sent)
        if error is not None:
            raise _PublishFailed(f"{len(rows) - len(sent)} pending: {error}")
        return len(sent)

    async def _pending(self, session: AsyncSession, *, lock: bool) -> list[Any]:
        table = self.outbox.table
        # Safety events first, then the rest in commit order. A check-in may so reach
        # the bus before an earlier routine event of its stream, another patient's (one
        # behind its own patient's earlier event goes after it: ExpressLane.in_patient_order).
        # (A copy forwarded into an outside system's feed is not safety work: it waits its turn.)
        is_safety = or_(*(table.c.subject.like(f"%.{name}.%") for name in SAFETY_EVENTS))
        safety = case((and_(is_safety, ~table.c.subject.like(f"{ROOT}.feed.%")), 0), else_=1)
        query = (
            select(table.c.seq, table.c.event_id, table.c.subject, table.c.payload, table.c.trace_context)
            .where(table.c.sent_at.is_(None))
            .order_by(safety, table.c.seq)
            .limit(self.batch_size)
        )
        if lock:
            query = query.with_for_update(skip_locked=True)
        return list((await session.execute(query)).all())

    async def _record(self, session: AsyncSession, rows: list[Any], sent: list[int], error: str | None) -> None:
        table = self.outbox.table
        if sent:
            await session.execute(
                update(table)
                .where(table.c.seq.in_(in_list(sent)))
                .values(sent_at=clock.now(), attempts=table.c.attempts + 1)
            )
        if error is not None:
            failed = [r.seq for r in rows if r.seq not in set(sent)]
            await session.execute(
                update(table)
                .where(table.c.seq.in_(in_list(failed)))
                .values(attempts=table.c.attempts + 1, last_error=error[:500])
            )

    async def _publish_pending(
        self, publisher: "_Publisher", rows: list[Any], known: frozenset[str] = frozenset()
    ) -> tuple[list[int], str | None]:
        """The rows' seqs now on the bus: those the express lane published already, and
        the rest published here, in order (a patient's own events in commit order)."""
        status = {row.seq: self.express.status(row.event_id) for row in rows}
        early = [row.seq for row in rows if status[row.seq] == "published"]
        pending = [row for row in rows if status[row.seq] == "pending"]
        gone = known - {row.event_id for row in rows} if len(rows) < self.batch_size else frozenset()
        rest = self.express.in_patient_order(pending, known_gone=gone)
        count, error = await self._publish(publisher, rest) if rest else (0, None)
        self.express.on_the_bus(row.event_id for row in rest[:count])
        self.published_by_event.update(_event_name(row.subject) for row in rest[:count])
        if len(early) + len(rest) < len(rows) - sum(s == "in_flight" for s in status.values()):
            self.wake()  # a safety event held back for its patient's earlier one: next batch
        return early + [row.seq for row in rest[:count]], error

    async def _publish(self, publisher: "_Publisher", rows: list[Any]) -> tuple[int, str | None]:
        """On the service's broker connection, pipelined: every row is written in order,
        then every ack awaited (Nats-Msg-Id = event_id); rows are marked sent only once
        JetStream acknowledged them. FastStream's `publish` awaits each ack before the
        next write: under load each await costs a turn of a busy event loop, so a batch
        of 256 took over a second (issue 10's profile). Rows after a failure stay pending
        and are retried in order; JetStream de-duplicates any that were in fact stored.
        Returns how many, from the first, JetStream acknowledged."""
        futures = []
        try:
            # One deadline for the writes, not nats-py's `wait_stall` per message: with a
            # timeout, its semaphore wait runs as a task of its own, a turn of the event loop
            # per message even when nothing stalls (under load, 1-3 ms each: 200 safety
            # events took 300 ms to write on PostgreSQL).
            async with asyncio.timeout(self.publish_timeout):
                for row in rows:
                    # The trace goes on from the request (or handler) that staged the event.
                    with span_under(
                        stored_context(row.trace_context), f"{row.subject} publish", SpanKind.PRODUCER,
                        **{"messaging.system": "nats", "messaging.destination.name": row.subject},
                    ):  # fmt: skip
                        headers = headers_with_context({"Nats-Msg-Id": row.event_id})
                        futures.append(
                            await jetstream(publisher.broker(row.subject)).publish_async(
                                row.subject, row.payload.encode(), headers=headers
                            )
                        )
        except Exception as exc:
            error: str | None = f"{type(exc).__name__}: {exc}"
        else:
            error = None
        # All acks awaited at once: one at a time, each costs a turn of the event loop, and
        # under load a turn is long (200 check-ins' acks took 300 ms on PostgreSQL).
        done: set[asyncio.Future[Any]] = set()
        if futures:
            done, _ = await asyncio.wait(futures, timeout=self.publish_timeout)
        acked = 0
        for future in futures:
            if future not in done:
                error = error or f"TimeoutError: no ack within {self.publish_timeout} s"
                break
            failure = future.exception() if not future.cancelled() else asyncio.CancelledError()
            if failure is not None:
                error = error or f"{type(failure).__name__}: {failure}"
                break
            acked += 1
        for future in futures[acked:]:
            future.cancel()  # frees its slot in nats-py's pending-publish limit
        return acked, error


class _PublishFailed(Exception):
    pass


class _Publisher:
    def __init__(self, broker: NatsBroker, restricted: NatsBroker) -> None:
        self._broker, self._restricted = broker, restricted

    def broker(self, subject: str) -> NatsBroker:
        return self._restricted if subject.startswith(f"{ROOT}.{RESTRICTED}.") else self._broker
