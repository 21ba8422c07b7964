"""Error shape of DESIGN A6 and the 413 body limit (shared/errors.py), and the one place
a broken rule (shared.domain_errors.DomainError) becomes that answer."""

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from shared.domain_errors import DomainError
from shared.errors import (
    ERROR_RESPONSES,
    INTERNAL_MESSAGE,
    ApiError,
    BodyLimit,
    Conflict,
    ErrorResponse,
    Forbidden,
    InternalErrorResponse,
    Invalid,
    NotFound,
    Unauthorized,
    install_error_handlers,
    internal_error_body,
)

MAX_BYTES = 256
SECRET_EMAIL = "jane.doe.secret@example.org"
ERRORS: dict[str, type[ApiError]] = {
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "conflict": Conflict,
    "invalid": Invalid,
}

# Each kind of broken rule, and the answer it must get: (status, code, message, fields).
RULES: dict[str, tuple[DomainError, tuple[int, str, str, dict[str, str]]]] = {
    "conflict": (
        DomainError("conflict", "the alert is already acknowledged"),
        (409, "conflict", "the alert is already acknowledged", {}),
    ),
    "not_found": (
        DomainError("not_found", "potential duplicate not found"),
        (404, "not_found", "potential duplicate not found", {}),
    ),
    "invalid_field": (
        DomainError("invalid", "birth date is in the future", "birth_date"),
        (422, "invalid", "birth date is in the future", {"birth_date": "birth date is in the future"}),
    ),
    "invalid_unnamed": (
        DomainError("invalid", "a name must hold at least one letter"),
        (422, "invalid", "a name must hold at least one letter", {}),
    ),
    "invalid_fields": (
        DomainError("invalid", "unknown destination", fields={"to_site_id": "not a site you serve"}),
        (422, "invalid", "unknown destination", {"to_site_id": "not a site you serve"}),
    ),
}


class Patient(BaseModel):
    given_name: str = Field(min_length=1)
    age: int
    preferred_channel: str = Field(pattern=r"^(sms|email|none)$")


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=MAX_BYTES)

    @app.get("/raise/{name}")
    async def raise_error(name: str) -> None:
        raise ERRORS[name]("it went wrong", fields={"site_id": "unknown site"} if name == "invalid" else None)

    @app.get("/rule/{name}")
    async def break_rule(name: str) -> None:
        raise RULES[name][0]

    @app.post("/patients", status_code=201)
    async def create(patient: Patient) -> dict[str, int]:
        return {"age": patient.age}

    @app.post("/raw")
    async def raw(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    return app


@pytest.fixture
async def client():
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        yield http


@pytest.mark.parametrize(
    ("name", "status"),
    [("unauthorized", 401), ("forbidden", 403), ("not_found", 404), ("conflict", 409), ("invalid", 422)],
)
async def test_api_errors_map_to_status_and_shape(client, name, status):
    response = await client.get(f"/raise/{name}")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    fields = {"site_id": "unknown site"} if name == "invalid" else {}
    assert response.json() == {"error": {"code": name, "message": "it went wrong", "fields": fields}}


@pytest.mark.parametrize("name", sorted(RULES))
async def test_each_kind_of_broken_rule_maps_to_its_status_code_and_fields(client, name):
    status, code, message, fields = RULES[name][1]
    response = await client.get(f"/rule/{name}")
    assert response.status_code == status
    assert response.json() == {"error": {"code": code, "message": message, "fields": fields}}


def test_a_broken_rule_knows_no_http():
    error = DomainError("invalid", "start date is more than a year away", "start_date")
    assert not hasattr(error, "status")
    assert isinstance(error, ValueError)  # so a rule checked in a pydantic validator is a 422 too
    assert (error.kind, error.fields) == ("invalid", {"start_date": "start date is more than a year away"})


async def test_unauthorized_asks_for_a_bearer_token(client):
    response = await client.get("/raise/unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert "www-authenticate" not in (await client.get("/raise/forbidden")).headers


async def test_unknown_route_uses_the_error_shape(client):
    response = await client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert set(response.json()["error"]) == {"code", "message", "fields"}


async def test_wrong_method_uses_the_error_shape(client):
    response = await client.delete("/patients")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_valid_body_passes(client):
    body = {"given_name": "Jane", "age": 40, "preferred_channel": "sms"}
    response = await client.post("/patients", json=body)
    assert response.status_code == 201
    assert response.json() == {"age": 40}


async def test_validation_error_names_fields_without_echoing_input(client):
    body = {"given_name": "Jane", "age": SECRET_EMAIL, "preferred_channel": SECRET_EMAIL}
    response = await client.post("/patients", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert error["message"]
    assert set(error["fields"]) == {"age", "preferred_channel"}
    assert all(isinstance(msg, str) and msg for msg in error["fields"].values())
    assert SECRET_EMAIL not in response.text
    assert "jane.doe" not in response.text
    assert "Jane" not in response.text


async def test_missing_field_is_named(client):
    response = await client.post("/patients", json={"age": 3, "preferred_channel": "none"})
    assert response.status_code == 422
    assert set(response.json()["error"]["fields"]) == {"given_name"}


async def test_malformed_json_answers_422_without_echo(client):
    raw = b'{"given_name": "' + SECRET_EMAIL.encode() + b'", '
    response = await client.post("/patients", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid"
    assert SECRET_EMAIL not in response.text


def _over_limit_patient() -> bytes:
    return b'{"given_name": "' + b"a" * (MAX_BYTES * 2) + b'", "age": 1, "preferred_channel": "sms"}'


def _assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert set(response.json()["error"]) == {"code", "message", "fields"}


async def _chunks(body: bytes, size: int = 64):
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("path", ["/patients", "/raw"])
async def test_declared_oversized_body_answers_413(client, path):
    response = await client.post(path, content=_over_limit_patient())
    assert response.request.headers["content-length"] == str(len(_over_limit_patient()))
    _assert_too_large(response)


async def test_body_at_the_limit_passes(client):
    response = await client.post("/raw", content=b"x" * MAX_BYTES)
    assert response.status_code == 200
    assert response.json() == {"size": MAX_BYTES}


async def test_streamed_oversized_body_answers_413_on_a_raw_route(client):
    response = await client.post("/raw", content=_chunks(b"x" * (MAX_BYTES * 3)))
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    _assert_too_large(response)


async def test_small_streamed_body_passes(client):
    response = await client.post("/raw", content=_chunks(b"x" * (MAX_BYTES - 1), size=16))
    assert response.status_code == 200
    assert response.json() == {"size": MAX_BYTES - 1}


async def test_streamed_oversized_body_answers_413_on_a_model_route(client):
    response = await client.post(
        "/patients", content=_chunks(_over_limit_patient()), headers={"content-type": "application/json"}
    )
    _assert_too_large(response)


# --- the documented error schema (OpenAPI) is the one the handlers answer with ----------


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        *[("GET", f"/raise/{name}", {}) for name in ERRORS],
        *[("GET", f"/rule/{name}", {}) for name in RULES],
        ("GET", "/nowhere", {}),
        ("POST", "/patients", {"json": {"age": "x"}}),
        ("POST", "/raw", {"content": b"x" * (MAX_BYTES + 1)}),
    ],
)
async def test_error_answers_match_the_documented_schema(
    client: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, object]
) -> None:
    response = await client.request(method, path, **kwargs)
    assert response.status_code >= 400
    assert ErrorResponse.model_validate(response.json()).model_dump() == response.json()


def test_every_error_status_is_documented_with_the_error_schema() -> None:
    assert {401, 403, 404, 409, 413, 422} <= set(ERROR_RESPONSES)
    for status, entry in ERROR_RESPONSES.items():
        assert issubclass(entry["model"], ErrorResponse), status
        assert entry["description"], status
    assert ERROR_RESPONSES[500]["model"] is InternalErrorResponse


def test_internal_error_body_is_fixed_text_and_names_the_request() -> None:
    body = internal_error_body("req-1")
    assert body == {"error": {"code": "internal", "message": INTERNAL_MESSAGE, "fields": {}}, "request_id": "req-1"}
    assert InternalErrorResponse.model_validate(body).model_dump() == body
