"""Tokens from an OpenID Connect provider (issue 13): the people in the clinics sign in
to the console through the network's identity provider, and the console calls the
services with the provider's token. The services verify it themselves: RS256 (or
another asymmetric algorithm the provider publishes), the key from the provider's JWKS
(found through its discovery document), issuer and audience checked, a lifetime no
longer than iopnet allows. The provider's claims map to iopnet's role, sites and
patient id through three claim names (settings `oidc_*_claim`).

A token names its issuer: one from the provider goes here, any other to the shared-secret
check (`iopnet token`, `make run`, the tests). Never HS256 here: a provider's token
signed with a shared key would let anyone holding the client secret mint staff tokens.
"""

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from pydantic import ValidationError

from shared.auth import Principal
from shared.errors import Unauthorized
from shared.settings import Settings

# What a provider may sign with; symmetric algorithms are refused (see the module docstring).
ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]
DISCOVERY_PATH = "/.well-known/openid-configuration"
# Seconds of clock difference between the provider and a service that are forgiven.
LEEWAY_SECONDS = 30
# Signed-in people whose tokens are kept verified, per service process (a few hundred bytes each).
KEPT_TOKENS = 4096


@dataclass(frozen=True)
class ClaimNames:
    role: str = "iopnet_role"
    sites: str = "iopnet_sites"
    patient_id: str = "iopnet_patient_id"


class OidcVerifier:
    """Verifies tokens of one provider for one audience. Keys are fetched once and again
    only for a key id it has not seen (the provider rotated its keys)."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        claims: ClaimNames | None = None,
        max_ttl_seconds: int = 12 * 3600,
        jwks_url: str | None = None,
        timeout_seconds: float = 5.0,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.claims = claims or ClaimNames()
        self.max_ttl_seconds = max_ttl_seconds
        self.timeout_seconds = timeout_seconds
        self._jwks_url = jwks_url
        self._keys: jwt.PyJWKClient | None = None
        self._lock = asyncio.Lock()
        # Tokens verified already, with their callers and expiry: every request of the
        # console carries the same token, and its check costs a key lookup in a worker
        # thread and an RSA verification (the shared-secret tokens are kept likewise,
        # shared.auth.decode_token). Only tokens that passed are kept.
        self._kept: collections.OrderedDict[str, tuple[Principal, int]] = collections.OrderedDict()

    def issued(self, token: str) -> bool:
        """Whether the token says it comes from this provider (not yet verified)."""
        if token in self._kept:
            return True
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return False
        return isinstance(claims.get("iss"), str) and claims["iss"].rstrip("/") == self.issuer

    async def principal(self, token: str) -> Principal:
        if (kept := self._still_valid(token)) is not None:
            return kept
        try:
            claims = self._verified(token, await self._candidate_keys(token))
        except (jwt.PyJWTError, httpx.HTTPError, KeyError, ValueError) as exc:
            raise Unauthorized("missing or invalid bearer token") from exc
        if int(claims["exp"]) - int(claims["iat"]) > self.max_ttl_seconds:
            raise Unauthorized("token lifetime exceeds the allowed maximum")
        principal = self._map(claims)
        self._kept[token] = (principal, int(claims["exp"]))
        while len(self._kept) > KEPT_TOKENS:
            self._kept.popitem(last=False)
        return principal

    def _still_valid(self, token: str) -> Principal | None:
        """The caller of a token verified before, unless it has expired since (with the
        leeway PyJWT allowed it, against the clock PyJWT reads)."""
        kept = self._kept.get(token)
        if kept is None:
            return None
        principal, expires_at = kept
        if expires_at <= time.time() - LEEWAY_SECONDS:
            del self._kept[token]
            return None
        self._kept.move_to_end(token)
        return principal

    def _map(self, claims: dict[str, Any]) -> Principal:
        """The provider's claims as iopnet's caller; a token without a known role is refused."""
        sites = claims.get(self.claims.sites) or []
        if isinstance(sites, str):  # a provider that sends a space-separated list
            sites = sites.split()
        try:
            principal = Principal(
                sub=str(claims["sub"]),
                role=claims.get(self.claims.role),  # type: ignore[arg-type]
                sites=sites,
                patient_id=claims.get(self.claims.patient_id),
            )
        except ValidationError as exc:
            raise Unauthorized("the token's claims name no iopnet role, sites or patient") from exc
        if principal.role == "patient" and principal.patient_id is None:
            raise Unauthorized("a patient token must carry patient_id")
        if principal.role == "integration":
            raise Unauthorized("integrations do not sign in through the identity provider")
        return principal

    def _verified(self, token: str, keys: list[jwt.PyJWK]) -> dict[str, Any]:
        """The claims, from the first key whose signature holds (one, when the token names it)."""
        failure: jwt.PyJWTError = jwt.InvalidSignatureError("no signing key")
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.key,
                    algorithms=ALGORITHMS,
                    issuer=self.issuer,
                    audience=self.audience,
                    leeway=LEEWAY_SECONDS,
                    options={"require": ["exp", "iat", "iss", "aud", "sub"]},
                )
                return claims
            except jwt.InvalidSignatureError as exc:
                failure = exc
        raise failure

    async def _candidate_keys(self, token: str) -> list[jwt.PyJWK]:
        """The key the token names (`kid`), or, for a provider that names none, each of its
        signing keys. PyJWKClient fetches with urllib (blocking): a thread keeps the event
        loop free."""
        keys = await self._key_client()
        if jwt.get_unverified_header(token).get("kid"):
            return [await asyncio.to_thread(keys.get_signing_key_from_jwt, token)]
        return await asyncio.to_thread(keys.get_signing_keys)

    async def _key_client(self) -> jwt.PyJWKClient:
        async with self._lock:
            if self._keys is None:
                url = self._jwks_url or await self._discover_jwks_url()
                self._keys = jwt.PyJWKClient(url, cache_keys=True, timeout=self.timeout_seconds)
            return self._keys

    async def _discover_jwks_url(self) -> str:
        async with httpx.AsyncClient(timeout=self.timeout_seconds) as client:
            answer = await client.get(self.issuer + DISCOVERY_PATH)
            answer.raise_for_status()
            return str(answer.json()["jwks_uri"])


def oidc_verifier(settings: Settings) -> OidcVerifier | None:
    """The services' verifier of the provider's tokens, if a provider is configured."""
    if not settings.oidc_issuer:
        return None
    return OidcVerifier(
        settings.oidc_issuer,
        settings.oidc_audience,
        claims=ClaimNames(settings.oidc_role_claim, settings.oidc_sites_claim, settings.oidc_patient_claim),
        max_ttl_seconds=settings.jwt_max_ttl_seconds,
    )
