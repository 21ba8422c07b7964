"""The HTTP shell of shared/http.py (issue 8, parts 5 and 6): any unexpected error answers
500 in the error shape with a request id, every request is in the access log, security
headers on every answer, error responses documented on every route, /docs offline, and
a service refuses to start with a short signing secret."""

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from services.intake import store as intake_store
from shared.errors import INTERNAL_MESSAGE, NotFound
from shared.http import DOCS_ASSETS, create_service_app
from shared.logging import JsonFormatter
from shared.runtime import ServiceRuntime
from shared.settings import Settings, WeakSecretError

SECRET = "unit-test-secret-" + "s" * 32
MAX_BYTES = 256
PHI = "jane.doe@example.org"
ERROR_STATUSES = ("401", "403", "404", "409", "413", "422")


class Body(BaseModel):
    age: int


def _router() -> APIRouter:
    router = APIRouter()

    @router.get("/boom")
    async def boom() -> None:
        # An unexpected error whose text holds input: it must reach neither the answer nor the log.
        raise RuntimeError(f"could not store {PHI}")

    @router.get("/boom-key")
    async def boom_key() -> None:
        raise KeyError(PHI)

    @router.get("/ok")
    async def ok() -> dict[str, str]:
        return {"patient": "p-1"}

    @router.get("/logs")
    async def logs() -> dict[str, str]:
        logging.getLogger("iopnet.handler").info("handled")
        return {}

    @router.get("/missing")
    async def missing() -> None:
        raise NotFound("patient not found")

    @router.post("/body")
    async def body(payload: Body) -> dict[str, int]:
        return {"age": payload.age}

    @router.get("/half")
    async def half() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first part"
            raise RuntimeError("broke mid-answer")

        return StreamingResponse(chunks())

    return router


def _app(tmp_path: Path) -> FastAPI:
    # The lifespan is not run (ASGITransport does not): no database or broker is needed,
    # so a stand-in with what create_service_app reads at build time is enough.
    settings = Settings(jwt_secret=SECRET, data_dir=tmp_path / "data", max_body_bytes=MAX_BYTES)
    return create_service_app(_runtime(settings), [_router()], "test service")


def _runtime(settings: Settings) -> ServiceRuntime:
    """Composed, not started: no database or broker is reached."""
    return ServiceRuntime(
        "intake",
        settings,
        outbox=intake_store.outbox,
        inbox=intake_store.inbox,
        migrations_dir=intake_store.MIGRATIONS,
        subscriptions=[],
    )


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_app(tmp_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        yield http


class HttpLog:
    """The iopnet.http records of the test's call phase (caplog's list is renewed per phase)."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    @property
    def records(self) -> list[logging.LogRecord]:
        return [r for r in self.caplog.records if r.name == "iopnet.http"]

    @property
    def access(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == "request"]

    @property
    def errors(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno >= logging.ERROR]


@pytest.fixture
def http_log(caplog: pytest.LogCaptureFixture) -> Iterator[HttpLog]:
    with caplog.at_level(logging.INFO, logger="iopnet.http"):
        yield HttpLog(caplog)


# --- the catch-all ---------------------------------------------------------------------


async def test_a_requests_own_log_lines_carry_its_request_id(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="iopnet.handler"):
        response = await client.get("/logs")
    [record] = [r for r in caplog.records if r.name == "iopnet.handler"]
    assert json.loads(JsonFormatter().format(record))["request_id"] == response.headers["X-Request-Id"]


@pytest.mark.parametrize("path", ["/boom", "/boom-key"])
async def test_unexpected_error_answers_500_in_the_error_shape(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    request_id = response.headers["x-request-id"]
    assert response.json() == {
        "error": {"code": "internal", "message": INTERNAL_MESSAGE, "fields": {}},
        "request_id": request_id,
    }
    assert PHI not in response.text


async def test_500_is_logged_with_method_path_status_and_id_without_phi(
    client: httpx.AsyncClient, http_log: HttpLog
) -> None:
    response = await client.get("/boom", params={"name": "Jane Doe"})
    request_id = response.headers["x-request-id"]
    (error,) = http_log.errors
    assert (error.method, error.path, error.status, error.request_id) == ("GET", "/boom", 500, request_id)
    assert error.error == "RuntimeError"
    (access,) = http_log.access
    assert (access.method, access.path, access.status, access.request_id) == ("GET", "/boom", 500, request_id)
    rendered = "\n".join(JsonFormatter().format(r) for r in http_log.records)
    assert PHI not in rendered
    assert "Jane" not in rendered  # the query string is never logged
    assert json.loads(JsonFormatter().format(error))["exc_where"].startswith("test_http_shell.py:")


async def test_error_after_the_answer_started_is_not_masked(client: httpx.AsyncClient, http_log: HttpLog) -> None:
    # Headers and part of the body are out: a second answer cannot follow, so the
    # error reaches the server (which drops the connection) and is logged once.
    with pytest.raises(RuntimeError, match="mid-answer"):
        await client.get("/half")
    (access,) = http_log.access
    assert access.status == 200
    assert [r.error for r in http_log.errors] == ["RuntimeError"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("GET", "/ok", {}, 200),
        ("GET", "/missing", {}, 404),
        ("GET", "/nowhere", {}, 404),
        ("POST", "/body", {"json": {"age": "x"}}, 422),
        ("POST", "/body", {"content": b"x" * (MAX_BYTES + 1)}, 413),
        ("GET", "/boom", {}, 500),
        ("GET", "/docs", {}, 200),
    ],
)
async def test_every_request_is_in_the_access_log_with_its_id(
    client: httpx.AsyncClient,
    http_log: HttpLog,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
) -> None:
    response = await client.request(method, path, **kwargs)
    assert response.status_code == status
    (access,) = http_log.access
    assert (access.method, access.path, access.status) == (method, path, status)
    assert access.request_id == response.headers["x-request-id"]
    assert isinstance(access.duration_ms, float)


async def test_request_ids_are_new_for_each_request(client: httpx.AsyncClient) -> None:
    ids = {(await client.get("/ok")).headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


async def test_a_sane_incoming_request_id_is_kept(client: httpx.AsyncClient, http_log: HttpLog) -> None:
    response = await client.get("/boom", headers={"X-Request-Id": "lb-7f3a.2026:01"})
    assert response.headers["x-request-id"] == "lb-7f3a.2026:01"
    assert response.json()["request_id"] == "lb-7f3a.2026:01"
    assert {r.request_id for r in http_log.records} == {"lb-7f3a.2026:01"}


@pytest.mark.parametrize("given", ["", "a b", "<script>", '"quoted"', "x" * 129, "-leading-dash", "name=Jane"])
async def test_an_odd_incoming_request_id_is_replaced(client: httpx.AsyncClient, given: str) -> None:
    response = await client.get("/ok", headers={"X-Request-Id": given})
    assert response.headers["x-request-id"] != given
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


# --- headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", "/ok", {}),
        ("GET", "/missing", {}),
        ("GET", "/nowhere", {}),
        ("POST", "/body", {"json": {}}),
        ("POST", "/body", {"content": b"x" * (MAX_BYTES + 1)}),
        ("GET", "/boom", {}),
        ("GET", "/openapi.json", {}),
        ("GET", "/docs", {}),
        ("GET", "/healthz", {}),
    ],
)
async def test_answers_are_not_stored_nor_sniffed(
    client: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    response = await client.request(method, path, **kwargs)
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_docs_assets_may_be_cached_but_not_sniffed(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{DOCS_ASSETS}/swagger-ui.css")
    assert response.status_code == 200
    assert "no-store" not in response.headers.get("cache-control", "")
    assert response.headers["x-content-type-options"] == "nosniff"


# --- OpenAPI and /docs of the real services ---------------------------------------------


def _service_app(name: str, tmp_path: Path) -> FastAPI:
    module = __import__(f"services.{name}.app", fromlist=["create_app"])
    app: FastAPI = module.create_app(
        Settings(jwt_secret=SECRET, data_dir=tmp_path / "data", nats_url="nats://127.0.0.1:1")
    )
    return app


@pytest.mark.parametrize("name", ["intake", "scheduling", "notifications"])
def test_every_api_route_documents_its_error_answers(name: str, tmp_path: Path) -> None:
    schema = _service_app(name, tmp_path).openapi()
    operations = [
        (path, method, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if "ops" not in operation.get("tags", [])
    ]
    assert len(operations) >= 5, "the service's routes are in its OpenAPI"
    for path, method, operation in operations:
        for status in ERROR_STATUSES:
            content = operation["responses"].get(status, {}).get("content", {})
            ref = content.get("application/json", {}).get("schema", {}).get("$ref")
            assert ref == "#/components/schemas/ErrorResponse", (method, path, status)
        internal = operation["responses"]["500"]["content"]["application/json"]["schema"]["$ref"]
        assert internal == "#/components/schemas/InternalErrorResponse", (method, path)
    error = schema["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) >= {"code", "message"}
    assert set(error["properties"]) == {"code", "message", "fields"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_load_nothing_from_another_host(page: str, tmp_path: Path) -> None:
    transport = httpx.ASGITransport(app=_service_app("intake", tmp_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        html = (await http.get(page)).text
        assert not re.search(r"https?://|//[a-z]", html), "an absolute URL: the page would need the internet"
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert any(a.endswith(".js") for a in assets)
        if page == "/docs":
            assert any(a.endswith(".css") for a in assets)
        for asset in assets:
            assert not urlsplit(asset).netloc
            response = await http.get(asset)
            assert response.status_code == 200, asset
            assert len(response.content) > 1000, asset
        spec = re.search(r"""(?:url: |spec-url=)['"]([^'"]+)['"]""", html)
        assert spec is not None
        assert (await http.get(spec.group(1))).status_code == 200


# --- the signing secret at start ---------------------------------------------------------


async def test_a_service_refuses_to_start_with_a_short_secret_file(tmp_path: Path) -> None:
    from services.intake.app import create_app

    data = tmp_path / "data"
    data.mkdir()
    (data / "jwt.secret").write_text("short-secret\n")
    app = create_app(Settings(data_dir=data, nats_url="nats://127.0.0.1:1"))
    with pytest.raises(WeakSecretError, match="at least 32"):
        async with app.router.lifespan_context(app):
            pytest.fail("the service started")
    assert not (data / "intake.db").exists(), "refused before touching the database"


def test_a_short_environment_secret_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOPNET_JWT_SECRET", "tiny-secret-31-bytes-long-xxxxx")
    with pytest.raises(ValueError, match="at least 32") as caught:
        Settings()
    assert "tiny-secret" not in str(caught.value)


def test_a_secret_of_32_bytes_is_accepted() -> None:
    assert Settings(jwt_secret="k" * 32).signing_secret == "k" * 32


def test_an_empty_environment_secret_means_the_generated_one(tmp_path: Path) -> None:
    settings = Settings(jwt_secret="", data_dir=tmp_path / "data")
    secret = settings.signing_secret
    assert len(secret.encode()) >= 32
    assert (tmp_path / "data" / "jwt.secret").stat().st_mode & 0o777 == 0o600
    assert Settings(data_dir=tmp_path / "data").signing_secret == secret, "one secret for the local network"


def test_a_token_lifetime_over_the_maximum_cannot_be_configured() -> None:
    with pytest.raises(ValueError, match="jwt_max_ttl_seconds"):
        Settings(jwt_secret=SECRET, jwt_ttl_seconds=13 * 3600, jwt_max_ttl_seconds=12 * 3600)


# --- the services apply the configured issuer, audience and maximum lifetime ---------------


async def test_routes_check_the_configured_issuer_audience_and_lifetime(tmp_path: Path) -> None:
    from fastapi import Depends

    from shared.auth import Principal, mint_token, require_roles

    settings = Settings(
        jwt_secret=SECRET,
        data_dir=tmp_path / "data",
        jwt_issuer="clinic-idp",
        jwt_audience="iop-api",
        jwt_ttl_seconds=600,
        jwt_max_ttl_seconds=3600,
    )
    router = APIRouter()

    @router.get("/me")
    async def me(principal: Principal = Depends(require_roles("clinician"))) -> dict[str, str]:
        return {"sub": principal.sub}

    runtime = _runtime(settings)
    app = create_service_app(runtime, [router], "test service")

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    good = mint_token(SECRET, sub="c1", role="clinician", ttl_seconds=600, issuer="clinic-idp", audience="iop-api")
    wrong_issuer = mint_token(SECRET, sub="c1", role="clinician", ttl_seconds=600, audience="iop-api")
    wrong_audience = mint_token(SECRET, sub="c1", role="clinician", ttl_seconds=600, issuer="clinic-idp")
    too_long = mint_token(SECRET, sub="c1", role="clinician", ttl_seconds=7200, issuer="clinic-idp", audience="iop-api")
    long_sub = mint_token(SECRET, sub="s" * 60_000, role="clinician", issuer="clinic-idp", audience="iop-api")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.get("/me", headers=bearer(good))).json() == {"sub": "c1"}
        for token in (wrong_issuer, wrong_audience, too_long, long_sub):
            response = await http.get("/me", headers=bearer(token))
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
