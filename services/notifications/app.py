"""Notifications service: composition of settings, database, broker, relay, dispatcher and routes."""

from fastapi import FastAPI

from services.notifications import api, store
from services.notifications.delivery import dispatcher
from services.notifications.handlers import SUBSCRIPTIONS
from shared.http import create_service_app
from shared.runtime import ServiceRuntime
from shared.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    runtime = ServiceRuntime(
        "notifications",
        settings or Settings(),
        outbox=store.outbox,
        inbox=store.inbox,
        migrations_dir=store.MIGRATIONS,
        subscriptions=SUBSCRIPTIONS,
        jobs=[dispatcher.run],
    )
    return create_service_app(runtime, [api.router], "Messages to patients, care teams and other systems.")
