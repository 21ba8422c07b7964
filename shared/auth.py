"""JWT auth and site scoping (DESIGN A3).

401: no or bad token. 403: the role may not do this. 404: the record is at a site
the caller may not see (answering 403 there would confirm it exists).
"""

import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Annotated, Literal
from uuid import UUID

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import clock
from shared.errors import Forbidden, NotFound, Unauthorized

Role = Literal["network_admin", "site_admin", "clinician", "front_desk", "patient", "integration"]
ROLES: tuple[Role, ...] = (
    "network_admin", "site_admin", "clinician", "front_desk", "patient", "integration",
)  # fmt: skip
ALGORITHM = "HS256"
# Defaults of Settings.jwt_issuer / jwt_audience / jwt_max_ttl_seconds; the services pass
# their settings, these serve callers without settings (tests, tools).
ISSUER = "iopnet"
AUDIENCE = "iopnet"
MAX_TTL_SECONDS = 12 * 3600
# The audit row's actor column is String(200): a longer sub would fail every audited
# request on PostgreSQL, so it is refused as a bad token instead.
MAX_SUB_LENGTH = 200


class Principal(BaseModel):
    # Frozen: a verified token's caller is shared by that token's requests (decode_token).
    model_config = ConfigDict(frozen=True)

    sub: str = Field(min_length=1, max_length=MAX_SUB_LENGTH)
    role: Role
    sites: list[str] = Field(default_factory=list)
    patient_id: UUID | None = None

    def sees_site(self, site_id: str) -> bool:
        return self.role == "network_admin" or site_id in self.sites

    def visible_sites(self, candidates: Iterable[str] | None = None) -> list[str] | None:
        """None means every site (network admin)."""
        if self.role == "network_admin":
            return None if candidates is None else list(candidates)
        pool = self.sites if candidates is None else candidates
        return [s for s in pool if s in self.sites]


def mint_token(
    secret: str,
    *,
    sub: str,
    role: Role,
    sites: list[str] | None = None,
    patient_id: UUID | str | None = None,
    ttl_seconds: int = 8 * 3600,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
) -> str:
    if role == "patient" and patient_id is None:
        raise ValueError("a patient token needs a patient_id")
    now = clock.now()
    claims: dict[str, object] = {
        "sub": sub,
        "role": role,
        "sites": sites or [],
        "iss": issuer,
        "aud": audience,
        "iat": now,
        "exp": now + timedelta(seconds=ttl_seconds),
    }
    if patient_id is not None:
        claims["patient_id"] = str(patient_id)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def decode_token(
    secret: str,
    token: str,
    *,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    max_ttl_seconds: int = MAX_TTL_SECONDS,
) -> Principal:
    """The caller of a valid token: signed with `secret`, from `issuer` for `audience`,
    unexpired, and minted for at most `max_ttl_seconds` (a leaked token of years'
    lifetime is refused even though the signature holds).

    A token verified once is not verified again while it lasts (issue 10: every request
    of a client carries the same token, and its check was 9% of a check-in's CPU at
    intake: 76 us here, 130 us under load). Only what passed is kept, under everything
    it was checked against (the secret too), so a token is never accepted by a check it
    did not pass; its expiry is still checked on every request, against PyJWT's clock."""
    principal, expires_at = _verified(secret, token, issuer, audience, max_ttl_seconds)
    if expires_at <= time.time():
        raise Unauthorized("missing or invalid bearer token")
    return principal


# A client's token per entry, a few hundred bytes each. An invalid token raises, and
# functools.lru_cache keeps no exceptions: a stream of bad tokens cannot push good ones out
# by being remembered, nor be accepted.
@functools.lru_cache(maxsize=4096)
def _verified(secret: str, token: str, issuer: str, audience: str, max_ttl_seconds: int) -> tuple[Principal, int]:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=issuer,
            audience=audience,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
        # PyJWT has checked both are integers (or numbers it could read as such).
        lifetime = int(claims["exp"]) - int(claims["iat"])
        if lifetime > max_ttl_seconds:
            raise Unauthorized("token lifetime exceeds the allowed maximum")
        principal = Principal.model_validate(claims)
    except (jwt.PyJWTError, ValidationError) as exc:
        raise Unauthorized("missing or invalid bearer token") from exc
    if principal.role == "patient" and principal.patient_id is None:
        raise Unauthorized("a patient token must carry patient_id")
    return principal, int(claims["exp"])


_bearer = HTTPBearer(auto_error=False)


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing or invalid bearer token")
    settings = request.app.state.settings
    provider = getattr(request.app.state, "oidc", None)
    if provider is not None and provider.issued(credentials.credentials):
        principal: Principal = await provider.principal(credentials.credentials)
        return principal
    return decode_token(
        settings.signing_secret,
        credentials.credentials,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        max_ttl_seconds=settings.jwt_max_ttl_seconds,
    )


def require_roles(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    """Dependency: the caller, if authenticated and of one of `roles` (else 401/403)."""

    async def dependency(
        principal: Annotated[Principal, Depends(current_principal)],
    ) -> Principal:
        if principal.role not in roles:
            raise Forbidden(f"role {principal.role} may not do this")
        return principal

    return dependency


def ensure_site(principal: Principal, site_id: str, what: str = "resource") -> None:
    """404 for a site the caller does not serve: no existence leak."""
    if not principal.sees_site(site_id):
        raise NotFound(f"{what} not found")


# --- the role aliases every service's routes use (DESIGN A3) -----------------------------
# One set, so a role means the same in every service: a route names who may call it.

NetworkAdmin = Annotated[Principal, Depends(require_roles("network_admin"))]
Admin = Annotated[Principal, Depends(require_roles("network_admin", "site_admin"))]
Clinical = Annotated[Principal, Depends(require_roles("network_admin", "site_admin", "clinician"))]
Staff = Annotated[Principal, Depends(require_roles("network_admin", "site_admin", "clinician", "front_desk"))]
StaffOrPatient = Annotated[
    Principal, Depends(require_roles("network_admin", "site_admin", "clinician", "front_desk", "patient"))
]
StaffOrSystem = Annotated[
    Principal, Depends(require_roles("network_admin", "site_admin", "clinician", "front_desk", "integration"))
]
# Systems that receive webhooks, and the admins who register them for their site.
Integrator = Annotated[Principal, Depends(require_roles("network_admin", "site_admin", "integration"))]
