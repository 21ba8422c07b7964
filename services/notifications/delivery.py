"""The dispatcher: sends due messages and records each attempt.

Handlers and use cases only decide *that* a message is due (a row, in the event's
transaction); the dispatcher, woken on commit (and by a tick for messages due later),
decides at send time whether it may go out now (usecases.prepare: expiry, consent,
quiet and business hours), sends it outside any transaction and then records the
attempt together with NotificationSent, or a retry with exponential backoff and
jitter, or after the last attempt NotificationFailed. A crash between send and record
resends once, when its send lease runs out: at-least-once to the channel, never a lost
message. A claimed message is `sending` until the lease ends, so dispatchers of replicas
sharing a PostgreSQL database (SKIP LOCKED) never send the same message at once.
"""

import asyncio
import logging
import random
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.notifications import domain, store, usecases
from services.notifications.channels import ChannelAdapter, DeliveryError, OutboundMessage, build_channels
from shared.contracts.events import NotificationFailed, NotificationSent
from shared.messaging.outbox import CommitSignal
from shared.runtime import ServiceRuntime
from shared.settings import Settings

log = logging.getLogger("iopnet.notifications.delivery")
BATCH = 50
CONCURRENCY = 8


class Dispatcher:
    def __init__(self, settings: Settings, policy: usecases.Policy) -> None:
        self.settings = settings
        self.policy = policy
        self.channels: dict[str, ChannelAdapter] = build_channels(settings)
        self.signal: CommitSignal | None = None
        self.sent = 0
        self.failed = 0
        self._random = random.Random()

    def wake_after_commit(self, session: AsyncSession) -> None:
        if self.signal is not None:
            self.signal.mark(session)

    async def run(self, runtime: ServiceRuntime) -> None:
        self.signal = CommitSignal(runtime.sessions, "deliveries")
        tick = self.settings.notify_dispatch_tick_seconds
        wait = 0.0
        while True:
            # Woken on commit, or when the next message falls due (a reminder, a retry),
            # or by the tick at the latest.
            await self.signal.wait(tick=wait)
            try:
                await self.dispatch_due(runtime.sessions)
                async with runtime.sessions() as session:
                    upcoming = await store.next_due_at(session)
            except Exception as exc:  # a failed round is retried next tick, never fatal
                log.warning("dispatch round failed", extra={"error": type(exc).__name__})
                upcoming = None
            wait = tick
            if upcoming is not None:
                wait = min(tick, max(0.01, (upcoming - store.now()).total_seconds()))

    async def dispatch_due(self, sessions: async_sessionmaker[AsyncSession]) -> int:
        """Send everything due now, in batches; returns how many messages were handled."""
        handled = 0
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(row: dict[str, Any]) -> None:
            async with limit:
                await self.deliver(sessions, row)

        while True:
            async with sessions() as session:
                due = await store.due_notifications(session, store.now(), BATCH)
            if not due:
                return handled
            for outcome in await asyncio.gather(*(one(row) for row in due), return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.warning("delivery failed to record", extra={"error": type(outcome).__name__})
            handled += len(due)
            if len(due) < BATCH:
                return handled

    async def deliver(self, sessions: async_sessionmaker[AsyncSession], row: dict[str, Any]) -> None:
        now = store.now()
        try:
            async with sessions() as session, session.begin():
                lease = now + timedelta(seconds=3 * self.settings.notify_send_timeout_seconds + 5)
                current = await store.claim_notification(session, row["notification_id"], now, lease)
                if current is None:
                    return  # cancelled, held, rescheduled or taken since it was picked up
                decision = await usecases.prepare(session, self.policy, current, now)
                if isinstance(decision, usecases.Settle):
                    await self._settle(session, current, decision)
                    return
            message = compose(current, decision)
        except Exception as exc:  # counted as an attempt: a broken row backs off, never spins
            await self._failed(sessions, row, row["channel"], row["attempts"] + 1, type(exc).__name__, True)
            return
        attempts = current["attempts"] + 1
        adapter = self.channels.get(decision.channel) or self.channels["console"]
        try:
            provider_id = await adapter.send(message)
        except DeliveryError as exc:
            await self._failed(sessions, current, decision.channel, attempts, exc.reason, exc.retryable)
            return
        except Exception as exc:  # a bug in an adapter must not kill the dispatcher
            await self._failed(sessions, current, decision.channel, attempts, type(exc).__name__, True)
            return
        async with sessions() as session, session.begin():
            await store.mark_notification(
                session, current["notification_id"],
                status="sent", status_reason=None, attempts=attempts, provider_id=provider_id,
                sent_at=store.now(), channel=decision.channel, last_error=None,
            )  # fmt: skip
            await store.record_attempt(
                session, notification_id=current["notification_id"], attempt=attempts,
                channel=decision.channel, outcome="sent", provider_id=provider_id,
            )  # fmt: skip
            envelope = usecases.outcome_envelope(NotificationSent, current, decision.channel, attempts)
            await usecases.emit(session, envelope, fan_out=current["recipient_kind"] != "integration")
            self.wake_after_commit(session)
        self.sent += 1

    async def _settle(self, session: AsyncSession, row: dict[str, Any], decision: usecases.Settle) -> None:
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

    async def _failed(
        self,
        sessions: async_sessionmaker[AsyncSession],
        row: dict[str, Any],
        channel: str,
        attempts: int,
        error: str,
        retryable: bool,
    ) -> None:
        final = attempts >= self.policy.max_attempts or not retryable
        async with sessions() as session, session.begin():
            values: dict[str, Any] = {"attempts": attempts, "last_error": error, "channel": channel}
            if final:
                values.update(status="failed", status_reason="gave_up" if retryable else "refused")
            else:
                values.update(status="pending", due_at=self.retry_at(store.now(), attempts))
            await store.mark_notification(session, row["notification_id"], **values)
            await store.record_attempt(
                session, notification_id=row["notification_id"], attempt=attempts, channel=channel,
                outcome="failed" if final else "retry", error=error,
            )  # fmt: skip
            if final:
                envelope = usecases.outcome_envelope(NotificationFailed, row, channel, attempts, reason=error)
                await usecases.emit(session, envelope, fan_out=row["recipient_kind"] != "integration")
                self.failed += 1
            self.wake_after_commit(session)
        log.warning(
            "notification attempt failed",
            extra={
                "notification_id": row["notification_id"],
                "channel": channel,
                "attempts": attempts,
                "error": error,
                "status": "failed" if final else "retry",
            },
        )

    def retry_at(self, now: datetime, attempts: int) -> datetime:
        delay = domain.backoff_seconds(
            attempts, self.policy.retry_base_seconds, self.policy.retry_max_seconds, self._random.random()
        )
        return now + timedelta(seconds=delay)


def compose(row: dict[str, Any], ready: usecases.Ready) -> OutboundMessage:
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
