"""Scheduling service: composition of settings, database, broker, relay, background
loops (session horizon, treatment-hours review) and routes."""

from fastapi import FastAPI

from services.scheduling import api, store, usecases
from services.scheduling.handlers import SUBSCRIPTIONS
from shared.http import create_service_app
from shared.runtime import ServiceRuntime, periodic
from shared.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    runtime = ServiceRuntime(
        "scheduling",
        settings or Settings(),
        outbox=store.outbox,
        inbox=store.inbox,
        migrations_dir=store.MIGRATIONS,
        subscriptions=SUBSCRIPTIONS,
        jobs=[
            periodic(lambda s: s.horizon_interval_seconds, usecases.extend_horizons, "session-horizon"),
            periodic(lambda s: s.hours_review_interval_seconds, usecases.review_hours, "hours-review"),
        ],
    )
    return create_service_app(runtime, [api.router], "Programs, sessions, bookings, attendance and treatment hours.")
