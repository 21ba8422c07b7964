"""Intake service: composition of settings, database, broker, relay and routes."""

from fastapi import FastAPI

from services.intake import api, store
from services.intake.handlers import SUBSCRIPTIONS
from shared.http import create_service_app
from shared.runtime import ServiceRuntime
from shared.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    runtime = ServiceRuntime(
        "intake",
        settings or Settings(),
        outbox=store.outbox,
        inbox=store.inbox,
        migrations_dir=store.MIGRATIONS,
        subscriptions=SUBSCRIPTIONS,
    )
    return create_service_app(runtime, [api.router], "Sites, patients, enrollments: the front door of every site.")
