"""Intake service: composition of settings, database, broker, relay, the activation
loop (pending episodes become active on their start date) and routes."""

from datetime import timedelta

from fastapi import FastAPI

from services.intake import api, integrations_api, store, usecases
from services.intake.handlers import SUBSCRIPTIONS
from shared.http import create_service_app
from shared.messaging.inbox import IdempotentEffects
from shared.runtime import ServiceRuntime, periodic
from shared.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = ServiceRuntime(
        "intake",
        settings,
        outbox=store.outbox,
        inbox=store.inbox,
        migrations_dir=store.MIGRATIONS,
        subscriptions=SUBSCRIPTIONS,
        # The feed lane reads every public event; its effects are keyed inserts (no inbox rows).
        lane_inboxes={"feed": IdempotentEffects()},
        jobs=[
            periodic(lambda s: s.horizon_interval_seconds, usecases.activate_due_enrollments, "enrollment-activation"),
            periodic(
                lambda s: s.disclosure_purge_interval_seconds,
                usecases.disclosure_purge(timedelta(days=settings.disclosure_retention_days)),
                "disclosure-purge",
            ),
        ],
    )
    app = create_service_app(
        runtime,
        [api.router, integrations_api.router],
        "The front door of every site: patients, episodes, consents, check-ins, plans.",
    )
    app.state.check_ins = api.check_in_group(runtime)
    return app
