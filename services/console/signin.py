"""Signing in and staying signed in.

- OpenID Connect, Authorization Code with PKCE (S256), through authlib's Starlette
  client: it keeps state, nonce and the code verifier in the session and verifies the
  ID token (the provider's JWKS, issuer, audience, nonce). The console then calls the
  services with that ID token: they verify it again themselves (shared/oidc.py).
- The development sign-in (`IOPNET_CONSOLE_DEV_SIGNIN`, on under `iopnet run` only):
  a demo user gets a shared-secret token. Marked as such on every page.
- The session is a signed cookie (HttpOnly, SameSite=Lax, Secure outside localhost)
  that holds the token and who it names, never patient data. It ends after
  IOPNET_CONSOLE_IDLE_MINUTES without a request, or when the token expires.
- Every form carries the session's CSRF token, checked on every POST.
"""

import hashlib
import hmac
import secrets
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from fastapi import Request

from services.console.domain import Person, idle_expired, token_expired
from shared.auth import Role, mint_token
from shared.errors import Forbidden
from shared.settings import Settings

# authlib warns on import that its httpx integration moves to a package "httpx2"; its
# Starlette client imports that integration. Nothing for us to do, and the warning would
# greet every `make run` on the terminal. (authlib.deprecate turns its own warnings on
# when imported, so the filter goes in after it.)
with warnings.catch_warnings():
    import authlib.deprecate  # type: ignore[import-untyped]  # noqa: F401  (its import sets its filter)

    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    from authlib.integrations.starlette_client import OAuth  # type: ignore[import-untyped]  # no stubs shipped

SESSION_COOKIE = "iopnet_console"
# The cookie's own limit; idle and token expiry end a session sooner.
SESSION_MAX_AGE_SECONDS = 12 * 3600
DEMO_STAFF: list[tuple[str, Role, list[str]]] = [
    ("demo-network-admin", "network_admin", []),
    ("demo-site-admin", "site_admin", ["columbus-east"]),
    ("demo-clinician", "clinician", ["columbus-east"]),
    ("demo-front-desk", "front_desk", ["columbus-east"]),
    ("demo-clinician-denver", "clinician", ["denver-central"]),
]


def session_secret(settings: Settings) -> str:
    if settings.console_session_secret:
        return settings.console_session_secret
    # One secret to manage under `make run`: a key derived from the JWT secret, for this use only.
    return hmac.new(settings.signing_secret.encode(), b"iopnet-console-session", hashlib.sha256).hexdigest()


def public_url(settings: Settings) -> str:
    return (settings.console_public_url or f"http://{settings.http_host}:{settings.console_port}").rstrip("/")


def secure_cookies(settings: Settings) -> bool:
    """Secure cookies everywhere but a plain-http localhost (make run, the tests)."""
    url = public_url(settings)
    return not (url.startswith("http://127.0.0.1") or url.startswith("http://localhost"))


def oauth_client(settings: Settings) -> OAuth | None:
    if not settings.oidc_issuer:
        return None
    oauth = OAuth()
    oauth.register(
        "provider",
        client_id=settings.oidc_client_id,
        client_secret=settings.oidc_client_secret,
        server_metadata_url=settings.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration",
        client_kwargs={
            "scope": "openid profile",
            "code_challenge_method": "S256",
            # Without a secret the console is a public client: PKCE alone binds the code to it.
            "token_endpoint_auth_method": "client_secret_post" if settings.oidc_client_secret else "none",
        },
    )
    return oauth


def person_from_provider(token: dict[str, Any], settings: Settings) -> Person:
    """The provider's answer, verified by authlib: its claims as iopnet's caller."""
    claims = token.get("userinfo") or jwt.decode(token["id_token"], options={"verify_signature": False})
    sites = claims.get(settings.oidc_sites_claim) or []
    return Person(
        sub=str(claims["sub"]),
        role=str(claims.get(settings.oidc_role_claim) or ""),
        sites=tuple(sites.split() if isinstance(sites, str) else sites),
        patient_id=claims.get(settings.oidc_patient_claim),
        token=token["id_token"],
        expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC),
        via="oidc",
    )


def development_person(settings: Settings, sub: str, patient_id: str | None = None) -> Person:
    if not settings.console_dev_signin:
        raise Forbidden("the development sign-in is off")
    if patient_id:
        role: Role = "patient"
        sites: list[str] = []
    else:
        match = [(r, s) for name, r, s in DEMO_STAFF if name == sub]
        if not match:
            raise Forbidden("no such demo user")
        role, sites = match[0]
    ttl = min(settings.jwt_ttl_seconds, settings.console_idle_minutes * 60 * 8)
    token = mint_token(
        settings.signing_secret, sub=sub, role=role, sites=sites, patient_id=patient_id, ttl_seconds=ttl,
        issuer=settings.jwt_issuer, audience=settings.jwt_audience,
    )  # fmt: skip
    return Person(sub, role, tuple(sites), patient_id, token, datetime.now(UTC) + timedelta(seconds=ttl), "development")


def remember(request: Request, person: Person) -> None:
    request.session.clear()  # a new session on every sign-in (no fixation)
    request.session.update(
        sub=person.sub, role=person.role, sites=list(person.sites), patient_id=person.patient_id,
        token=person.token, expires_at=person.expires_at.isoformat(), via=person.via,
        csrf=secrets.token_urlsafe(32), last_seen=datetime.now(UTC).isoformat(),
    )  # fmt: skip


def signed_in(request: Request, idle: timedelta) -> Person | None:
    """The session's person, if it is still good; an idle or expired session is ended."""
    data = request.session
    if "token" not in data:
        return None
    now = datetime.now(UTC)
    person = Person(
        sub=data["sub"], role=data["role"], sites=tuple(data["sites"]), patient_id=data["patient_id"],
        token=data["token"], expires_at=datetime.fromisoformat(data["expires_at"]), via=data["via"],
    )  # fmt: skip
    if idle_expired(datetime.fromisoformat(data["last_seen"]), now, idle) or token_expired(person, now):
        data.clear()
        data["ended"] = "idle"
        return None
    data["last_seen"] = now.isoformat()
    return person


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


def check_csrf(request: Request, submitted: str | None) -> None:
    expected = request.session.get("csrf")
    if not expected or not submitted or not hmac.compare_digest(str(expected), submitted):
        raise Forbidden("the form has expired; reload the page and try again")
