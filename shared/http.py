"""The HTTP shell every service shares: lifespan, errors, body limit, request ids and
the access log, security headers, health, AsyncAPI, offline docs."""

import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast
from uuid import uuid4

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.db import is_sqlite, transaction
from shared.errors import ERROR_RESPONSES, BodyLimit, install_error_handlers, internal_error_body
from shared.files import secure_data_dir, secure_file
from shared.group_commit import GroupCommit
from shared.logging import log_context
from shared.messaging.asyncapi import asyncapi_document
from shared.metrics import install_metrics
from shared.oidc import oidc_verifier
from shared.runtime import ServiceRuntime
from shared.tracing import TELEMETRY, configure_tracing

log = logging.getLogger("iopnet.http")

T = TypeVar("T")
Work = Callable[[AsyncSession], Awaitable[T]]

# Swagger UI and ReDoc files, served from the fastapi-offline package (no CDN): /docs
# works on a clinic network without internet access, and loads no third-party script.
DOCS_ASSETS = "/docs-assets"
REQUEST_ID_HEADER = "X-Request-Id"
# A caller's own request id is kept (it ties their logs to ours) if it is plainly an id:
# a bounded token of safe characters, so it cannot forge log lines or carry text.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def create_service_app(runtime: ServiceRuntime, routers: list[APIRouter], description: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        _secure_files(runtime)
        configure_tracing(runtime.name)
        # Read now so a short secret stops the service at start, not at the first request.
        assert runtime.settings.signing_secret
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPIOffline(
        title=f"iopnet {runtime.name}",
        description=description,
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
        telemetry=TELEMETRY,
    )
    app.state.runtime = runtime
    app.state.settings = runtime.settings
    app.state.writes = RoutineWrites(runtime)
    app.state.oidc = oidc_verifier(runtime.settings)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=runtime.settings.max_body_bytes)
    install_metrics(app, runtime)
    # Added last, so outermost: it sees every answer, a 413 or a 500 included.
    app.add_middleware(RequestContext, cacheable_prefix=DOCS_ASSETS + "/")

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": runtime.name}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        # 503 until every check holds, consumers bound included (ServiceRuntime.readiness
        # says what counts as bound); answered within a second even under a backlog.
        checks = await runtime.readiness()
        ready = all(checks.values())
        return JSONResponse(
            {"service": runtime.name, "ready": ready, "checks": checks}, status_code=200 if ready else 503
        )

    document = asyncapi_document(runtime)  # generated once, from the brokers' declarations

    @app.get("/asyncapi", tags=["ops"])
    async def asyncapi() -> dict[str, Any]:
        return document

    for router in routers:
        # The error answers are documented once here for every API route (a route's own
        # `responses` entry for a status still wins).
        app.include_router(router, responses=ERROR_RESPONSES)
    return app


def _secure_files(runtime: ServiceRuntime) -> None:
    """Private umask, and group/other access taken off the data dir and the service's
    SQLite files (which may live elsewhere when the URL says so)."""
    secure_data_dir(runtime.settings.data_dir)
    url = runtime.settings.database_url(runtime.name)
    database = make_url(url).database if is_sqlite(url) else None
    if database and database != ":memory:":
        for suffix in ("", "-wal", "-shm", "-journal"):
            secure_file(Path(database + suffix))


class RequestContext:
    """Pure ASGI middleware (BaseHTTPMiddleware would re-wrap exceptions and cost a task
    per request). For every HTTP request: a request id (the caller's if sane, else new)
    in `request.state.request_id` and the X-Request-Id header; security headers; an
    answer in the error shape for any unexpected exception; one access-log line with
    method, path (never the query: it may hold a searched name), status and the id."""

    def __init__(self, app: ASGIApp, cacheable_prefix: str | None = None) -> None:
        self.app = app
        self.cacheable_prefix = cacheable_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _incoming_request_id(scope) or uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path: str = scope.get("path", "")
        # Answers carry patient data: no browser or proxy may keep a copy. Only the
        # static docs assets (no data) may be cached.
        no_store = not (self.cacheable_prefix and path.startswith(self.cacheable_prefix))
        status: int | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                headers["X-Content-Type-Options"] = "nosniff"
                if no_store:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        try:
            with log_context(request_id=request_id):
                await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            log.error(
                "unhandled error",
                extra={
                    "method": scope.get("method"),
                    "path": path,
                    # 500 unless an answer had already started (then it keeps its status).
                    "status": status or 500,
                    "request_id": request_id,
                    "error": type(exc).__name__,
                },
                exc_info=exc,
            )
            if status is not None:
                # Part of the answer is out: nothing coherent can follow. Re-raised so
                # the server drops the connection instead of leaving a truncated body.
                raise
            response = JSONResponse(internal_error_body(request_id), status_code=500)
            await response(scope, receive, send_with_headers)
        finally:
            log.info(
                "request",
                extra={
                    "method": scope.get("method"),
                    "path": path,
                    # None: the client went away before any answer was started.
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                    "request_id": request_id,
                },
            )


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _SANE_REQUEST_ID.fullmatch(candidate) else None
    return None


async def db_session(request: Request) -> AsyncIterator[AsyncSession]:
    runtime = request.app.state.runtime
    await runtime.gate.routine()  # a safety request in flight goes first (shared/priority.py)
    async with runtime.sessions() as session:
        yield session


async def safety_session(request: Request) -> AsyncIterator[AsyncSession]:
    """For the routes that carry safety information (a check-in): routine requests and
    background work of the service start no new transaction meanwhile (shared/priority.py)."""
    runtime = request.app.state.runtime
    async with runtime.gate.urgent(), runtime.sessions() as session:
        yield session


async def interest_refresher(request: Request) -> Callable[[], Awaitable[None]]:
    """For the routes that change who outside asks for what (integrations, webhook
    subscriptions): called after their commit, the consumers read for them follow."""
    return cast("Callable[[], Awaitable[None]]", request.app.state.runtime.refresh_interests)


class RoutineWrites:
    """The write transactions of routine requests (a patient registered, an enrollment).

    On SQLite a service has one connection, and a request's transaction held it for
    several times its statements' own time: between statements the event loop serves the
    other requests. Under the enrollment wave of `make bench` intake's connection was
    held 85-90% of the time, and enrollments went no faster with more clients. Here the
    requests that arrive together share one transaction, each answered once it has
    committed (GroupCommit); a refusal runs again alone, so its audit row is kept and the
    others are not held back. On PostgreSQL each request keeps a transaction of its own:
    intake runs in replicas there, and a group would hold every request's row locks until
    the whole group commits, so one lock waited on would stall them all (measured and
    left for a run with replicas: docs/performance.md)."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        url = runtime.settings.database_url(runtime.name)
        self.group: GroupCommit[Work[Any], Any] | None = GroupCommit(self._sessions, _do) if is_sqlite(url) else None

    async def run(self, work: Work[T]) -> T:
        """`work` in a transaction, committed before this returns; its error raised."""
        if self.group is not None:
            return cast("T", await self.group.record(work))
        async with self._sessions() as session, transaction(session):
            return await work(session)

    @asynccontextmanager
    async def _sessions(self) -> AsyncIterator[AsyncSession]:
        await self.runtime.gate.routine()  # a safety request in flight goes first (shared/priority.py)
        async with self.runtime.sessions() as session:
            yield session


async def _do(session: AsyncSession, work: Work[T]) -> T:
    return await work(session)


async def routine_writes(request: Request) -> RoutineWrites:
    # async: FastAPI runs a plain `def` dependency in a worker thread (a hop per request)
    return cast(RoutineWrites, request.app.state.writes)


Db = Annotated[AsyncSession, Depends(db_session)]
Writes = Annotated[RoutineWrites, Depends(routine_writes)]
SafetyDb = Annotated[AsyncSession, Depends(safety_session)]
RefreshInterests = Annotated[Callable[[], Awaitable[None]], Depends(interest_refresher)]
