"""The console: a fourth deployable that owns no patient data (issue 13). It signs people
in (OpenID Connect, or the development sign-in under `iopnet run`), calls the three
services with their token, and listens to the bus for CareTeamAlerted to update the
clinicians' alert inbox live.

It has no database and publishes no event, so of DESIGN B1's shape it keeps what applies:
`domain.py` (pure rules and texts), `pages.py`, `clinic.py` and `admin.py` (HTTP in:
sign-in, alerts and the patient's page; the clinic's day and patients; a site's setup), `live.py` (events in),
`backend.py` (the services), `signin.py` (sessions) and this composition root."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.console import admin, clinic, pages, signin
from services.console.backend import Backend, BackendError
from services.console.domain import local_time
from services.console.live import AlertFeed
from shared.errors import ApiError
from shared.settings import Settings

log = logging.getLogger("iopnet.console")
HERE = Path(__file__).parent


class SecurityHeaders:
    """On every answer: a Content-Security-Policy that allows only the console's own
    scripts and styles (no inline code, no CDN), no framing, no referrer, nothing cached
    (pages carry patient data), no MIME sniffing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.policy = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                static = scope["path"].startswith("/static/")
                headers += [
                    (b"content-security-policy", self.policy.encode()),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"cache-control", b"public, max-age=3600" if static else b"no-store"),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Connected in the background: nats-py retries a first connect for ever, and the
        # screens must serve meanwhile (the inbox works by reload; /readyz says 503).
        connecting = asyncio.create_task(_connect(app.state.alerts), name="console-alert-feed")
        try:
            yield
        finally:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            await app.state.alerts.stop()
            await app.state.backend.close()

    app = FastAPI(title="iopnet console", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.templates = Jinja2Templates(directory=HERE / "templates")
    app.state.templates.env.filters["local"] = local_time
    app.state.backend = Backend(settings)
    app.state.alerts = AlertFeed(settings.effective_nats_url)
    app.state.oauth = signin.oauth_client(settings)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(pages.router)
    app.include_router(clinic.router)
    app.include_router(admin.router)
    _errors(app)
    app.add_middleware(
        SessionMiddleware,
        secret_key=signin.session_secret(settings),
        session_cookie=signin.SESSION_COOKIE,
        max_age=signin.SESSION_MAX_AGE_SECONDS,
        same_site="lax",
        https_only=signin.secure_cookies(settings),
    )
    app.add_middleware(SecurityHeaders)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": "console"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = {"nats": app.state.alerts.connected}
        ready = all(checks.values())
        return JSONResponse({"service": "console", "ready": ready, "checks": checks}, status_code=200 if ready else 503)

    return app


async def _connect(alerts: AlertFeed) -> None:
    try:
        await alerts.start()
    except Exception as exc:
        log.warning("alert feed not connected", extra={"error": type(exc).__name__})


def _errors(app: FastAPI) -> None:
    @app.exception_handler(pages.SignInRequired)
    async def to_signin(request: Request, exc: pages.SignInRequired) -> Response:
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": "/signin"})
        return RedirectResponse("/signin", status_code=303)

    @app.exception_handler(BackendError)
    async def backend_error(request: Request, exc: BackendError) -> HTMLResponse:
        if exc.status == 401:
            request.session.clear()
        answer = pages.render(request, "error.html", None, message=exc.message)
        answer.status_code = exc.status if exc.status in (403, 404, 409, 422) else 502
        return answer

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> HTMLResponse:
        answer = pages.render(request, "error.html", None, message=str(exc))
        answer.status_code = exc.status
        return answer
