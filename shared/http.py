"""The HTTP shell every service shares: lifespan, errors, body limit, health, AsyncAPI."""

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts.asyncapi import asyncapi_document
from shared.errors import BodyLimit, install_error_handlers
from shared.runtime import ServiceRuntime

log = logging.getLogger("iopnet.http")


def create_service_app(runtime: ServiceRuntime, routers: list[APIRouter], description: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title=f"iopnet {runtime.name}", description=description, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.settings = runtime.settings
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=runtime.settings.max_body_bytes)
    app.middleware("http")(_access_log)

    subscribed = sorted({t for s in runtime.subscriptions for t in s.handlers})

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": runtime.name}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        checks = await runtime.readiness()
        # A consumer still waiting for another service's stream is reported, not gating:
        # its durable consumer will start from the stream's first message once bound.
        ready = all(ok for name, ok in checks.items() if name != "consumers")
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/asyncapi", tags=["ops"])
    async def asyncapi() -> dict[str, Any]:
        return asyncapi_document(runtime.name, subscribed)

    for router in routers:
        app.include_router(router)
    return app


async def _access_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    # Path only: a query string may carry a name being searched for.
    started = time.perf_counter()
    response = await call_next(request)
    log.info(
        "request",
        extra={
            "method": request.method,
            "path": request.url.path,
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        },
    )
    return response


async def db_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.runtime.sessions() as session:
        yield session


Db = Annotated[AsyncSession, Depends(db_session)]
