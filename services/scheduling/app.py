"""Scheduling service: composition of settings, database, broker, relay, background
loops (session horizon, treatment-hours review) and routes."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from services.scheduling import api, store, usecases
from services.scheduling.handlers import SUBSCRIPTIONS
from shared.http import create_service_app
from shared.runtime import ServiceRuntime
from shared.settings import Settings

log = logging.getLogger("iopnet.scheduling")


def every(
    interval: Callable[[Settings], float], work: Callable[[AsyncSession, datetime], Awaitable[object]], name: str
) -> Callable[[ServiceRuntime], Awaitable[None]]:
    """A background loop: run `work` in its own transaction now and then every interval."""

    async def loop(runtime: ServiceRuntime) -> None:
        while True:
            try:
                async with runtime.sessions() as session, session.begin():
                    await work(session, datetime.now(UTC))
            except Exception as exc:  # a failed round is retried next round, never fatal
                log.warning("background round failed", extra={"reason": name, "error": type(exc).__name__})
            await asyncio.sleep(interval(runtime.settings))

    loop.__name__ = name
    return loop


def create_app(settings: Settings | None = None) -> FastAPI:
    runtime = ServiceRuntime(
        "scheduling",
        settings or Settings(),
        outbox=store.outbox,
        inbox=store.inbox,
        migrations_dir=store.MIGRATIONS,
        subscriptions=SUBSCRIPTIONS,
        jobs=[
            every(lambda s: s.horizon_interval_seconds, usecases.extend_horizons, "session-horizon"),
            every(lambda s: s.hours_review_interval_seconds, usecases.review_hours, "hours-review"),
        ],
    )
    return create_service_app(runtime, [api.router], "Programs, sessions, bookings, attendance and treatment hours.")
