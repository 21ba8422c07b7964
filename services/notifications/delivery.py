"""The dispatcher: sends pending messages and records each attempt.

Handlers only decide *that* a message is due (a row, in the event's transaction); the
dispatcher, woken on commit, sends it outside any transaction and then records the
result and NotificationSent together. A crash between send and record resends once:
at-least-once to the channel, never a lost message.
"""

import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from services.notifications import domain, store
from services.notifications.channels import ChannelAdapter, ConsoleChannel, DeliveryError, OutboundMessage
from shared.contracts import new_envelope
from shared.contracts.events import NotificationFailed, NotificationSent
from shared.messaging.outbox import CommitSignal
from shared.runtime import ServiceRuntime

log = logging.getLogger("iopnet.notifications.delivery")
MAX_ATTEMPTS = 5
BATCH = 50


class Dispatcher:
    def __init__(self) -> None:
        self.signal: CommitSignal | None = None
        self.channels: dict[str, ChannelAdapter] = {"console": ConsoleChannel()}

    def wake_after_commit(self, session: AsyncSession) -> None:
        if self.signal is not None:
            self.signal.mark(session)

    async def run(self, runtime: ServiceRuntime) -> None:
        self.signal = CommitSignal(runtime.sessions, "deliveries")
        while True:
            # Woken on commit; the tick serves retries whose backoff has elapsed.
            await self.signal.wait(tick=1.0)
            async with runtime.sessions() as session:
                due = await store.due_notifications(session, BATCH)
            for notification in due:
                await self.deliver(runtime, notification)

    async def deliver(self, runtime: ServiceRuntime, notification: dict[str, Any]) -> None:
        attempts = notification["attempts"] + 1
        try:
            message = await self._compose(runtime, notification)
            provider_id = await self.channels[notification["channel"]].send(message)
        except (DeliveryError, KeyError) as exc:
            await self._failed(runtime, notification, attempts, type(exc).__name__)
            return
        async with runtime.sessions() as session, session.begin():
            await store.mark_notification(
                session, notification["notification_id"],
                status="sent", attempts=attempts, provider_id=provider_id, sent_at=store.now(),
            )  # fmt: skip
            await store.outbox.stage(session, _outcome(NotificationSent, notification, attempts))

    async def _compose(self, runtime: ServiceRuntime, notification: dict[str, Any]) -> OutboundMessage:
        async with runtime.sessions() as session:
            contact = await store.get_contact(session, notification["patient_id"])
            episodes = await store.patient_enrollments(session, notification["patient_id"])
        cause = next(e for e in episodes if e["enrolled_event_id"] == notification["cause_event_id"])
        text = domain.render(notification["template"], notification["language"], start_date=str(cause["start_date"]))
        address = None
        if contact is not None:
            address = contact["phone"] if notification["channel"] == "sms" else contact["email"]
        return OutboundMessage(
            notification_id=notification["notification_id"],
            patient_id=notification["patient_id"],
            channel=notification["channel"],
            template=notification["template"],
            address=address,
            text=text,
        )

    async def _failed(self, runtime: ServiceRuntime, notification: dict[str, Any], attempts: int, error: str) -> None:
        async with runtime.sessions() as session, session.begin():
            if attempts >= MAX_ATTEMPTS:
                await store.mark_notification(
                    session,
                    notification["notification_id"],
                    status="failed",
                    attempts=attempts,
                    last_error=error,
                )
                await store.outbox.stage(session, _outcome(NotificationFailed, notification, attempts))
            else:
                retry_at = store.now() + timedelta(seconds=2**attempts)
                await store.mark_notification(
                    session,
                    notification["notification_id"],
                    attempts=attempts,
                    last_error=error,
                    due_at=retry_at,
                )
        log.warning(
            "notification attempt failed",
            extra={"notification_id": notification["notification_id"], "attempts": attempts, "error": error},
        )


def _outcome(kind: type[NotificationSent] | type[NotificationFailed], notification: dict[str, Any], attempts: int):
    event = kind(
        notification_id=UUID(notification["notification_id"]),
        recipient_kind=notification["recipient_kind"],
        channel=notification["channel"],
        template=notification["template"],
        cause_event_id=UUID(notification["cause_event_id"]),
        attempts=attempts,
    )
    return new_envelope(
        event,
        site_id=notification["site_id"],
        correlation_id=UUID(notification["correlation_id"]),
        causation_id=UUID(notification["cause_event_id"]),
    )


dispatcher = Dispatcher()
