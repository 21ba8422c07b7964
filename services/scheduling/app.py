"""Scheduling service: composition of settings, database, broker, relay and routes."""

from fastapi import FastAPI

from services.scheduling import api, store
from services.scheduling.handlers import SUBSCRIPTIONS
from shared.http import create_service_app
from shared.runtime import ServiceRuntime
from shared.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    runtime = ServiceRuntime(
        "scheduling",
        settings or Settings(),
        outbox=store.outbox,
        inbox=store.inbox,
        migrations_dir=store.MIGRATIONS,
        subscriptions=SUBSCRIPTIONS,
    )
    return create_service_app(runtime, [api.router], "Programs, sessions, bookings, attendance and treatment hours.")
