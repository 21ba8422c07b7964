"""The dispatcher: sends due messages and records each attempt.

Handlers and use cases only decide *that* a message is due (a row, in the event's
transaction); the dispatcher, woken on commit (and by a tick for messages due later),
decides at send time whether it may go out now (usecases.prepare: expiry, consent,
quiet and business hours), sends it outside any transaction and then records the
attempt together with NotificationSent, or a retry with exponential backoff and
jitter, or after the last attempt NotificationFailed. A claimed message is `sending`
until its lease ends, so dispatchers of replicas sharing a PostgreSQL database (SKIP
LOCKED) never send the same message at once.

Urgent messages (a care team told of an urgent check-in, an escalation) go in a lane of
their own: woken by the commit that planned them, with their own claims, records and
send slots, first in line for the database (shared/priority.py) and not held back by
the safety gate. They never wait for a round of routine messages (under a wave of
welcomes, a round of 50 took a second or more on SQLite while the consumers drained).

The window between a send and its record is what can send a message twice, so it is
kept short and closed on shutdown:
- Records are written together (group commit: whoever gets the database writes every
  outcome that is waiting), and a new claim waits while outcomes wait, so a record never
  queues behind this dispatcher's own claims. (On SQLite it can still wait for a
  consumer's transaction to finish: one writer at a time.)
- `stop()` (and a cancellation, which does the same) stops taking messages, hands back
  the claimed ones not sent yet, and lets the sends under way finish and be recorded,
  for at most `stop_grace_seconds`.
- Only a kill between a send and its record leaves a message `sending`: it goes out
  again when its lease ends. Every outbound message carries its notification id as an
  idempotency key (email Message-ID, `Idempotency-Key` and `X-Iopnet-Delivery-Id` on
  SMS and webhooks, channels.py) so the receiver can drop that copy.
"""

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeAlias

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.notifications import domain, store, usecases
from services.notifications.channels import (
    ChannelAdapter,
    DeliveryError,
    OutboundMessage,
    WebhookChannel,
    build_channels,
)
from shared import clock
from shared.contracts.events import NotificationFailed, NotificationSent
from shared.group_commit import GroupCommit
from shared.messaging.outbox import CommitSignal
from shared.priority import PriorityGate, finishing_work, first_in_line
from shared.runtime import ServiceRuntime
from shared.settings import Settings

log = logging.getLogger("iopnet.notifications.delivery")
BATCH = 50
# Sends under way at once (each an SMTP session, an SMS or webhook request). Only the
# sends are bounded: a batch's claims and records are each written together, so that a
# batch costs a few turns of the database, not two per message (on SQLite the one
# connection is shared with the consumers; a turn there is the costly part).
CONCURRENCY = 8
# uvicorn's graceful shutdown (iopnet serve) and ServiceRuntime.stop() each allow 10 s;
# the sends under way get half of that to finish and be recorded.
STOP_GRACE_SECONDS = 5.0

sessionmaker = async_sessionmaker[AsyncSession]


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to, to be recorded: sent (provider_id) or failed (error)."""

    row: store.NotificationRow
    channel: str
    attempts: int
    provider_id: str | None = None
    error: str | None = None
    retryable: bool = True  # failed: False for a refusal no later attempt can fix
    final: bool = False  # failed: no further attempt (the last one, or a refusal)
    retry_at: datetime | None = None
    # The delivery log's detail (webhooks): the receiver's HTTP status, and the send's time.
    status_code: int | None = None
    duration_ms: int | None = None

    @property
    def sent(self) -> bool:
        return self.error is None


class Claim(NamedTuple):
    row: store.NotificationRow
    now: datetime


# A claimed message: the row as it was, where it goes, and the message itself.
Claimed: TypeAlias = tuple[store.NotificationRow, usecases.Ready, OutboundMessage]


class Dispatcher:
    def __init__(
        self, settings: Settings, policy: usecases.Policy, *, stop_grace_seconds: float = STOP_GRACE_SECONDS
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.stop_grace_seconds = stop_grace_seconds
        self.channels: dict[str, ChannelAdapter] = build_channels(settings)
        self.signal: CommitSignal | None = None
        self.urgent_signal: CommitSignal | None = None
        self.sent = 0
        self.failed = 0
        self._random = random.Random()
        self._stopping = False
        self._deliveries: set[asyncio.Task[None]] = set()
        # The runtime's: a claim yields to the safety lane (shared/priority.py).
        self.gate: PriorityGate | None = None
        # By lane (urgent or not): each lane's claims and records are grouped apart.
        self._records: dict[bool, GroupCommit[Outcome, None]] = {}
        self._claims: dict[bool, GroupCommit[Claim, Claimed | None]] = {}
        self._finished: asyncio.Future[None] | None = None
        self._loops: asyncio.Future[list[None]] | None = None

    @property
    def lanes(self) -> tuple[str, ...]:
        """The lanes this process sends. The safety lane's own process (IOPNET_LANES=safety)
        sends only urgent messages: routine rounds there take turns of the event loop its
        alerts wait for (`iopnet bench --postgres`: urgent check-in -> CareTeamAlerted p99
        312-540 ms with both lanes there, 182-188 ms with urgent only). The routine
        process sends both: its urgent lane also covers the other's, on its tick."""
        return ("urgent",) if self.settings.lanes == "safety" else ("urgent", "routine")

    @property
    def stopping(self) -> bool:
        return self._stopping

    def wake_after_commit(self, session: AsyncSession) -> None:
        if self.signal is not None:
            self.signal.mark(session)
        if self.urgent_signal is not None and usecases.urgent_planned(session):
            self.urgent_signal.mark(session)

    async def run(self, runtime: ServiceRuntime) -> None:
        self.signal = CommitSignal(runtime.sessions, "deliveries")
        self.urgent_signal = CommitSignal(runtime.sessions, "urgent deliveries")
        self.gate = runtime.gate
        self._loops = asyncio.gather(*(self._loop(runtime.sessions, urgent=lane == "urgent") for lane in self.lanes))
        try:
            await asyncio.shield(self._loops)
        except asyncio.CancelledError:
            # Cancelled without stop() first (ServiceRuntime.stop cancels its tasks):
            # finish the same way before going.
            await self._wind_down()
            raise
        await self._finish()

    async def stop(self) -> None:
        """Stop taking messages; let the sends under way finish and be recorded (at most
        stop_grace_seconds). For the service's shutdown, before its tasks are cancelled."""
        await self._wind_down()

    async def _wind_down(self) -> None:
        """Take no new message, let the sends under way finish and be recorded, and let
        the loops end at their next step rather than cancel them mid-statement: with two
        loops cut mid-query at shutdown, a test's event loop hung at close in 3 runs of 12
        on the task SQLAlchemy starts to close a connection cut mid-statement (aiosqlite's
        `_terminate_graceful_close`), after the engine was disposed."""
        self._stopping = True
        for signal in (self.signal, self.urgent_signal):
            if signal is not None:
                signal.set()
        await self._finish()
        if self._loops is not None and not self._loops.done():
            await asyncio.wait({self._loops}, timeout=self.stop_grace_seconds)
            if not self._loops.done():
                self._loops.cancel()
                await asyncio.wait({self._loops}, timeout=1.0)

    async def _loop(self, sessions: sessionmaker, *, urgent: bool) -> None:
        tick = self.settings.notify_dispatch_tick_seconds
        wait = 0.0
        signal = self.urgent_signal if urgent else self.signal
        assert signal is not None
        while not self._stopping:
            # Woken on commit, or when the next message falls due (a reminder, a retry),
            # or by the tick at the latest.
            signalled = await signal.wait(tick=wait)
            if self._stopping:
                return
            # A bare tick (nothing committed, nothing known to fall due) looks in finishing
            # work's place: the urgent lane's look every tick went first in line for the
            # connection, beside the safety consumers, mostly to find nothing.
            polled = urgent and not signalled and wait >= tick
            try:
                handled = await self.dispatch_due(sessions, urgent=urgent, polled=polled)
                with finishing_work() if polled and not handled else _lane(urgent):
                    async with sessions() as session:
                        upcoming = await store.next_due_at(session, urgent=urgent)
            except Exception as exc:  # a failed round is retried next tick, never fatal
                log.warning("dispatch round failed", extra={"error": type(exc).__name__, "urgent": urgent})
                upcoming = None
            wait = tick
            if upcoming is not None:
                wait = min(tick, max(0.01, (upcoming - clock.now()).total_seconds()))

    async def _finish(self) -> None:
        """Once, however it is reached (stop(), then the cancellation that follows)."""
        self._stopping = True
        if self._finished is None:
            self._finished = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._finished)

    async def _drain(self) -> None:
        pending = set(self._deliveries)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=self.stop_grace_seconds)
        for task in late:  # a send past the grace stays `sending`: it goes out after its lease
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=1.0)
            log.warning("sends cut short by shutdown", extra={"count": len(late)})

    async def dispatch_due(self, sessions: sessionmaker, *, urgent: bool = False, polled: bool = False) -> int:
        """Send everything due now in the lane (urgent messages, or the others), in
        batches; returns how many messages were handled. `polled`: only the tick woke
        the lane, so its first look waits in finishing work's place; what it finds is
        sent in the lane's."""
        handled = 0
        sends = asyncio.Semaphore(CONCURRENCY)

        async def one(row: store.NotificationRow) -> None:
            if not self._stopping:
                await self.deliver(sessions, row, sends, urgent=urgent)

        while not self._stopping:
            with finishing_work() if polled else _lane(urgent):
                async with sessions() as session:
                    now = clock.now()
                    due = await store.due_notifications(session, now, BATCH, urgent=urgent)
                    if not urgent:
                        # Webhooks: the head of each subscription's queue, one at a time (in order).
                        due += [head for head in await store.webhook_heads(session) if head["due_at"] <= now]
            polled = False
            if not due:
                return handled
            # Tasks of their own, awaited with wait() rather than gather(): cancelling this
            # round (shutdown) must not cancel a send under way or its record. They take
            # the lane's place in the line with them (a task copies its context).
            with _lane(urgent):
                tasks = {asyncio.ensure_future(one(row)) for row in due}
            self._deliveries |= tasks
            try:
                await asyncio.wait(tasks)
            finally:
                self._deliveries -= {t for t in tasks if t.done()}
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    log.warning("delivery failed to record", extra={"error": type(task.exception()).__name__})
            handled += len(due)
            if len(due) < BATCH:
                return handled
        return handled

    async def deliver(
        self,
        sessions: sessionmaker,
        row: store.NotificationRow,
        sends: asyncio.Semaphore | None = None,
        *,
        urgent: bool = False,
    ) -> None:
        """Claim, send and record one message. `sends` bounds the sends under way; the
        claims and records of messages delivered together (in one lane) share transactions."""
        records = self._recorder(sessions, urgent)
        await records.idle()  # outcomes waiting to be recorded go first
        now = clock.now()
        try:
            claimed = await self._claim(sessions, row, now, urgent)
        except Exception as exc:  # counted as an attempt: a broken row backs off, never spins
            await self._record(records, self._failure(row, row["channel"], row["attempts"] + 1, type(exc).__name__))
            return
        if claimed is None:
            return
        # Only the send itself holds a slot: the outcome is recorded after letting go of
        # it, so the next sends go on while this one's record waits for its group.
        async with sends or contextlib.nullcontext():
            if self._stopping:
                outcome: Outcome | None = None
            elif self._lease_outlasts_a_send(claimed_at=now):
                outcome = await self._send(claimed)
            else:
                # Its lease ran out while it waited for a slot (slow sends ahead of it): it
                # is due again as it stands, and another dispatcher may have claimed it since.
                return
        if outcome is None:
            await self._release(sessions, claimed[0])  # claimed, not sent: back to pending at once
            return
        await self._record(records, outcome)

    async def _send(self, claimed: Claimed) -> Outcome:
        current, decision, message = claimed
        attempts = current["attempts"] + 1
        adapter = self.channels.get(decision.channel) or self.channels["console"]
        started = time.monotonic()
        status_code: int | None = None
        try:
            if isinstance(adapter, WebhookChannel):
                delivered = await adapter.post(message)
                provider_id, status_code = delivered.provider_id, delivered.status_code
            else:
                provider_id = await adapter.send(message)
        except DeliveryError as exc:
            outcome = self._failure(current, decision.channel, attempts, exc.reason, retryable=exc.retryable)
            status_code = exc.status_code
        except Exception as exc:  # a bug in an adapter must not kill the dispatcher
            outcome = self._failure(current, decision.channel, attempts, type(exc).__name__)
        else:
            outcome = Outcome(current, decision.channel, attempts, provider_id=provider_id)
        elapsed = int((time.monotonic() - started) * 1000)
        return replace(outcome, status_code=status_code, duration_ms=elapsed)

    def _lease_until(self, claimed_at: datetime) -> datetime:
        return claimed_at + timedelta(seconds=3 * self.settings.notify_send_timeout_seconds + 5)

    def _lease_outlasts_a_send(self, claimed_at: datetime) -> bool:
        """A send started now ends (or times out) before the claim's lease does, so no
        other dispatcher can take the message while it is going out."""
        timeout = timedelta(seconds=self.settings.notify_send_timeout_seconds)
        return clock.now() + timeout < self._lease_until(claimed_at)

    def _recorder(self, sessions: sessionmaker, urgent: bool = False) -> GroupCommit[Outcome, None]:
        group = self._records.get(urgent)
        if group is None or group.sessions is not sessions:
            group = self._records[urgent] = GroupCommit.set_based(sessions, self._write_all)
        return group

    def _claimer(self, sessions: sessionmaker, urgent: bool = False) -> GroupCommit[Claim, Claimed | None]:
        group = self._claims.get(urgent)
        if group is None or group.sessions is not sessions:
            group = self._claims[urgent] = GroupCommit.set_based(sessions, self._take_all)
        return group

    async def _claim(
        self, sessions: sessionmaker, row: store.NotificationRow, now: datetime, urgent: bool = False
    ) -> Claimed | None:
        """Take the message for sending, or settle it if it may not go out now (together
        with the other deliveries of its lane claiming meanwhile, in one transaction)."""
        if self.gate is not None and not urgent:
            await self.gate.routine()
        return await self._claimer(sessions, urgent).record(Claim(row, now))

    async def _take_all(self, session: AsyncSession, claims: list[Claim]) -> list[Claimed | Exception | None]:
        """A group's claims: the messages taken in two statements for all of them (each
        with the lease of its own claim), and what preparing them reads (the patients'
        contacts, consents and enrollments) read for all of them at once. A message not
        taken was cancelled, held, rescheduled or taken by another dispatcher since it was
        picked up. Due as of the latest claim: each of them was made before this. A
        message claimed twice in one group goes to the first claim only."""
        leases = {claim.row["notification_id"]: self._lease_until(claim.now) for claim in claims}
        taken = await store.claim_notifications(session, leases, max(claim.now for claim in claims))
        await usecases.read_ahead(session, list(taken.values()))
        return [await self._take(session, taken.pop(claim.row["notification_id"], None), claim.now) for claim in claims]

    async def _take(
        self, session: AsyncSession, current: store.NotificationRow | None, now: datetime
    ) -> Claimed | None:
        if current is None:
            return None
        decision = await usecases.prepare(session, self.policy, current, now)
        if isinstance(decision, usecases.Settle):
            await self._settle(session, current, decision)
            return None
        return current, decision, compose(current, decision)

    async def _release(self, sessions: sessionmaker, row: store.NotificationRow) -> None:
        # `row` is as it was before the claim: it is due again at its own time.
        with contextlib.suppress(Exception):  # else its lease runs out: sent later, once
            async with sessions() as session, session.begin():
                await store.mark_notification(session, row["notification_id"], status="pending", due_at=row["due_at"])

    async def _record(self, records: GroupCommit[Outcome, None], outcome: Outcome) -> None:
        await records.record(outcome)
        if outcome.sent:
            self.sent += 1
            return
        if outcome.final:
            self.failed += 1
        log.warning(
            "notification attempt failed",
            extra={
                "notification_id": outcome.row["notification_id"],
                "channel": outcome.channel,
                "attempts": outcome.attempts,
                "error": outcome.error,
                "status": "failed" if outcome.final else "retry",
            },
        )

    def _failure(
        self, row: store.NotificationRow, channel: str, attempts: int, error: str, *, retryable: bool = True
    ) -> Outcome:
        # A webhook delivery is retried until it goes through or its subscription is paused
        # (nothing behind it is sent meanwhile, so giving up would lose it); a refusal
        # (a 4xx, the target policy) is final at once, as for every message.
        webhook = row["template"] == "webhook"
        final = not retryable or (not webhook and attempts >= self.policy.max_attempts)
        retry_at = None if final else self.retry_at(clock.now(), attempts)
        return Outcome(row, channel, attempts, error=error, retryable=retryable, final=final, retry_at=retry_at)

    async def _write_all(self, session: AsyncSession, outcomes: list[Outcome]) -> list[Exception | None]:
        """A group's outcomes: the messages sent in a few multi-row statements (a batch of
        welcomes is a batch of sends), the failures one by one (their decisions differ)."""
        await self._write_sent(session, [outcome for outcome in outcomes if outcome.sent])
        for outcome in outcomes:
            if not outcome.sent:
                await self._write_failed(session, outcome)
        self.wake_after_commit(session)
        return [None] * len(outcomes)

    async def _write_sent(self, session: AsyncSession, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        await store.mark_sent(
            session,
            [{"notification_id": outcome.row["notification_id"], "attempts": outcome.attempts,
              "provider_id": outcome.provider_id, "channel": outcome.channel} for outcome in outcomes],
        )  # fmt: skip
        await store.record_attempts(
            session,
            [{"notification_id": outcome.row["notification_id"], "attempt": outcome.attempts,
              "channel": outcome.channel, "outcome": "sent", "provider_id": outcome.provider_id,
              "status_code": outcome.status_code, "duration_ms": outcome.duration_ms} for outcome in outcomes],
        )  # fmt: skip
        ended = [usecases.Ended(outcome.row, outcome.channel, outcome.attempts) for outcome in outcomes]
        await usecases.announce_outcomes(session, NotificationSent, ended)
        for outcome in outcomes:
            if outcome.row["template"] == "webhook":
                await usecases.webhook_attempted(session, self.policy, outcome.row, ok=True)

    async def _write_failed(self, session: AsyncSession, outcome: Outcome) -> None:
        row, channel, attempts, error = outcome.row, outcome.channel, outcome.attempts, outcome.error
        values: dict[str, Any] = {"attempts": attempts, "last_error": error, "channel": channel}
        if outcome.final:
            values.update(status="failed", status_reason="gave_up" if outcome.retryable else "refused")
        else:
            values.update(status="pending", due_at=outcome.retry_at)
        await store.mark_notification(session, row["notification_id"], **values)
        await store.record_attempt(
            session, notification_id=row["notification_id"], attempt=attempts, channel=channel,
            outcome="failed" if outcome.final else "retry", error=error, status_code=outcome.status_code,
            duration_ms=outcome.duration_ms,
        )  # fmt: skip
        if outcome.final:
            await usecases.announce_outcome(session, NotificationFailed, row, channel, attempts, reason=error)
        if row["template"] == "webhook":
            await usecases.webhook_attempted(session, self.policy, row, ok=False, error=error)

    async def _settle(self, session: AsyncSession, row: store.NotificationRow, decision: usecases.Settle) -> None:
        # `row` is as it was before the claim: a message not sent now keeps its due time
        # (or takes the later one given), not the claim's lease.
        values: dict[str, Any] = {
            "status": decision.status,
            "status_reason": decision.reason,
            "due_at": decision.due_at or row["due_at"],
        }
        await store.mark_notification(session, row["notification_id"], **values)
        log.info(
            "notification not sent now",
            extra={"notification_id": row["notification_id"], "status": decision.status, "reason": decision.reason},
        )

    def retry_at(self, now: datetime, attempts: int) -> datetime:
        delay = domain.backoff_seconds(
            attempts, self.policy.retry_base_seconds, self.policy.retry_max_seconds, self._random.random()
        )
        return now + timedelta(seconds=delay)


@contextlib.contextmanager
def _lane(urgent: bool) -> Iterator[None]:
    """The urgent lane's waits for a database connection go before all others; the
    routine lane's before the consumers' (it finishes work they planned: a welcome waited
    behind each consumer's batch at every turn of its round, shared/priority.py)."""
    with first_in_line() if urgent else finishing_work():
        yield


def compose(row: store.NotificationRow, ready: usecases.Ready) -> OutboundMessage:
    """The message itself: rendered in the recipient's language (webhooks: the event)."""
    webhook = row["template"] == "webhook"
    return OutboundMessage(
        notification_id=row["notification_id"],
        patient_id=row["patient_id"],
        channel=ready.channel,
        template=row["template"],
        address=ready.address,
        subject="" if webhook else domain.subject_line(row["template"], ready.language),
        text="" if webhook else domain.render(row["template"], ready.language, **ready.values),
        payload=ready.payload,
        secret=ready.secret,
    )
