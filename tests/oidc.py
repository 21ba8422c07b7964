"""A real OpenID Connect provider for the tests (oidc-provider-mock, on loopback), and a
sign-in through it the way a browser does: the authorization request with PKCE, the
provider's sign-in form posted, the code from the redirect exchanged for tokens."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import oidc_provider_mock
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client

CLIENT_ID = "iopnet-console"
# The tests never follow the redirect: the code is read from its Location header.
REDIRECT_URI = "http://127.0.0.1:9/auth/callback"


@contextmanager
def oidc_provider() -> Iterator[str]:
    """The provider's issuer URL (its discovery document and JWKS under it)."""
    with oidc_provider_mock.run_server_in_thread() as server:
        yield f"http://localhost:{server.server_port}"


def add_user(issuer: str, sub: str, **claims: Any) -> None:
    """The claims the provider puts in this user's tokens."""
    answer = httpx.put(f"{issuer}/users/{quote(sub, safe='')}", json=claims)
    assert answer.status_code == 204, answer.text


async def sign_in(issuer: str, sub: str, client_id: str = CLIENT_ID) -> dict[str, Any]:
    """Authorization Code with PKCE (S256) for `sub`; returns the token response
    (access_token, id_token, ...)."""
    async with httpx.AsyncClient() as http:
        metadata = (await http.get(f"{issuer}/.well-known/openid-configuration")).json()
    verifier = generate_token(48)
    async with AsyncOAuth2Client(
        client_id, client_secret="test-secret", scope="openid profile", redirect_uri=REDIRECT_URI,
        code_challenge_method="S256",
    ) as client:  # fmt: skip
        url, state = client.create_authorization_url(metadata["authorization_endpoint"], code_verifier=verifier)
        async with httpx.AsyncClient() as browser:
            form = await browser.get(url)
            assert form.status_code == 200, form.text
            answer = await browser.post(url, data={"sub": sub})
        assert answer.status_code == 302, answer.text
        query = parse_qs(urlsplit(answer.headers["location"]).query)
        assert query["state"] == [state]
        token: dict[str, Any] = await client.fetch_token(
            metadata["token_endpoint"], code=query["code"][0], code_verifier=verifier
        )
        return token
