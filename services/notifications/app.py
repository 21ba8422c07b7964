"""Notifications service: composition of settings, database, broker, relay, the
dispatcher, the escalation loop and routes."""

import asyncio
import logging
from dataclasses import dataclass

from fastapi import FastAPI

from services.notifications import api, store, usecases
from services.notifications.backfill import Backfiller
from services.notifications.delivery import Dispatcher
from services.notifications.handlers import Handlers
from shared import clock
from shared.http import create_service_app
from shared.runtime import ServiceRuntime
from shared.settings import Settings

log = logging.getLogger("iopnet.notifications")


@dataclass
class Notifier:
    """What this service's handlers, routes and loops share: the rules from settings and
    the dispatcher they wake after a commit that queued messages."""

    policy: usecases.Policy
    dispatcher: Dispatcher
    handlers: Handlers
    backfiller: Backfiller

    @classmethod
    def from_settings(cls, settings: Settings, webhooks: usecases.WebhookSettings | None = None) -> "Notifier":
        policy = usecases.Policy.from_settings(settings, webhooks)
        dispatcher = Dispatcher(settings, policy)
        return cls(policy, dispatcher, Handlers(policy, dispatcher), Backfiller(policy, dispatcher.wake_after_commit))

    async def escalation_loop(self, runtime: ServiceRuntime) -> None:
        """Escalate unacknowledged urgent alerts (usecases.escalate_alerts) every
        IOPNET_NOTIFY_ESCALATION_CHECK_SECONDS."""
        while True:
            try:
                async with runtime.sessions() as session, session.begin():
                    await usecases.escalate_alerts(session, self.policy, clock.now())
                    self.dispatcher.wake_after_commit(session)
            except Exception as exc:  # a failed round is retried next round, never fatal
                log.warning("escalation round failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(runtime.settings.notify_escalation_check_seconds)


def create_app(settings: Settings | None = None, webhooks: usecases.WebhookSettings | None = None) -> FastAPI:
    """`webhooks`: the webhook rules (default: from the environment, IOPNET_NOTIFY_WEBHOOK_*)."""
    settings = settings or Settings()
    notifier = Notifier.from_settings(settings, webhooks)

    async def dispatcher(runtime: ServiceRuntime) -> None:
        await notifier.dispatcher.run(runtime)

    # On shutdown the dispatcher stops taking messages and lets the sends under way
    # finish and be recorded. It does so when its task is cancelled; a runtime that calls
    # a job's `stop()` before cancelling its tasks gets the same, a little earlier.
    dispatcher.stop = notifier.dispatcher.stop  # type: ignore[attr-defined]

    async def escalations(runtime: ServiceRuntime) -> None:
        await notifier.escalation_loop(runtime)

    async def backfills(runtime: ServiceRuntime) -> None:
        await notifier.backfiller.run(runtime)

    runtime = ServiceRuntime(
        "notifications",
        settings,
        outbox=store.outbox,
        inbox=store.inbox,
        migrations_dir=store.MIGRATIONS,
        subscriptions=notifier.handlers.subscriptions(),
        jobs=[dispatcher, escalations, backfills],
    )
    app = create_service_app(
        runtime, [api.router], "Messages to patients, care teams and other systems: reminders, follow-ups, alerts."
    )
    app.state.notifier = notifier
    return app
