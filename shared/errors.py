"""The error shape of DESIGN A6 and the handlers that produce it.

Two kinds of error become an answer here: the HTTP layer's own (`ApiError`: no token,
a role or site the caller may not use, bad input it checks itself) and a broken
business rule (`shared.domain_errors.DomainError`), whose kind picks the ApiError it
answers as — the one place a domain error becomes HTTP."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.domain_errors import DomainError, Kind


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or {}


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class AccessDenied(NotFound):
    """404 for a record the caller may not see, whose denial was audited in the
    transaction: `shared.db.transaction` commits (keeps the audit row) and re-raises."""

    keeps_audit = True


class Conflict(ApiError):
    status, code = 409, "conflict"


class Invalid(ApiError):
    status, code = 422, "invalid"


# What each kind of broken rule answers as (status and code come with the class).
DOMAIN_ANSWERS: dict[Kind, type[ApiError]] = {"conflict": Conflict, "invalid": Invalid, "not_found": NotFound}


def error_body(code: str, message: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "fields": fields or {}}}


INTERNAL_MESSAGE = "an unexpected error occurred; quote the request id when reporting it"


def internal_error_body(request_id: str) -> dict[str, Any]:
    """The 500 answer: the error shape plus the request id that the log line carries too.
    The message is fixed: an exception's own text may hold input (PHI)."""
    return {**error_body("internal", INTERNAL_MESSAGE), "request_id": request_id}


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid"])
    message: str
    fields: dict[str, str] = Field(default_factory=dict, description="offending field -> what is wrong with it")


class ErrorResponse(BaseModel):
    """Every 4xx answer (DESIGN A6)."""

    error: ErrorDetail


class InternalErrorResponse(ErrorResponse):
    """A 500: also names the request, as the X-Request-Id header and the log line do."""

    request_id: str


# Documented on every service route at once (shared.http includes routers with it), so
# the OpenAPI at /docs shows the error shape without each route repeating it.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, expired or invalid bearer token"},
    403: {"model": ErrorResponse, "description": "The caller's role may not do this"},
    404: {"model": ErrorResponse, "description": "Not found, or at a site the caller does not serve"},
    409: {"model": ErrorResponse, "description": "Conflict: a duplicate or an illegal status change"},
    413: {"model": ErrorResponse, "description": "Request body over the size limit"},
    422: {"model": ErrorResponse, "description": "Invalid input; `fields` names what is wrong"},
    500: {"model": InternalErrorResponse, "description": "Unexpected error; quote `request_id`"},
}


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(error_body(exc.code, exc.message, exc.fields), status_code=exc.status, headers=headers)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return await _api_error(request, DOMAIN_ANSWERS[exc.kind](exc.message, exc.fields))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Messages only, never the rejected input: it may be a name or a phone number.
    fields = {_field_path(tuple(err["loc"])): err["msg"] for err in exc.errors()}
    return JSONResponse(error_body("invalid", "the request is not valid", fields), status_code=422)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
    return JSONResponse(
        error_body(code.get(exc.status_code, "http_error"), str(exc.detail)),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


class BodyLimit:
    """Answers 413 before a handler sees a body over the limit (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        seen = 0
        answered = False

        async def limited_receive() -> Message:
            nonlocal seen, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Answer 413 now; the app then sees a disconnect and whatever it
                    # tries to send is dropped (FastAPI would otherwise answer 400).
                    answered = True
                    await self._too_large(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not answered:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except ClientDisconnect:
            if not answered:
                raise

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            error_body("too_large", f"request body exceeds {self.max_bytes} bytes"), status_code=413
        )
        await response(scope, receive, send)
