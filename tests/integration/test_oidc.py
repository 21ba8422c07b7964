"""The services accept the identity provider's tokens (issue 13): a real OpenID Connect
provider on loopback, a sign-in through it with PKCE, and intake verifying what the
console would send: RS256 from the provider's JWKS, issuer and audience checked, the
provider's claims mapped to iopnet's role and sites. The shared-secret tokens keep
working beside them."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from services.intake.app import create_app
from shared.auth import mint_token
from shared.oidc import LEEWAY_SECONDS, OidcVerifier
from tests.conftest import auth, make_settings, running
from tests.oidc import add_user, oidc_provider, sign_in

SITE, OTHER = "columbus-east", "dayton-north"


@pytest.fixture
def issuer() -> Iterator[str]:
    with oidc_provider() as url:
        add_user(url, "ana.admin", iopnet_role="network_admin", iopnet_sites=[])
        add_user(url, "dee.desk", iopnet_role="front_desk", iopnet_sites=[SITE])
        add_user(url, "nobody", email="nobody@example.org")  # signs in, but has no iopnet role
        yield url


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path, issuer: str):
    return create_app(make_settings(nats_server.url, tmp_path, intake_database_url=database_url, oidc_issuer=issuer))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_provider_token_is_verified_and_mapped_to_iopnet_roles_and_sites(app, issuer: str) -> None:
    admin = (await sign_in(issuer, "ana.admin"))["id_token"]
    desk = (await sign_in(issuer, "dee.desk"))["id_token"]
    async with running(app) as client:
        for site_id in (SITE, OTHER):
            site = {"site_id": site_id, "name": site_id.title(), "timezone": "America/New_York"}
            answer = await client.post("/sites", json=site, headers=bearer(admin))
            assert answer.status_code == 201, answer.text
        person = {"site_id": OTHER, "given_name": "Marisol", "family_name": "Quintero", "birth_date": "1988-03-04"}
        created = await client.post("/patients", json=person, headers=auth("front_desk", [OTHER]))
        assert created.status_code == 201, created.text  # the shared-secret tokens still work
        elsewhere = created.json()["patient_id"]

        # The desk's token carries its sites: it sees its own, not the other site's patient.
        assert (await client.post("/sites", json={**site, "site_id": "x"}, headers=bearer(desk))).status_code == 403
        mine = {**person, "site_id": SITE, "given_name": "Lucía"}
        assert (await client.post("/patients", json=mine, headers=bearer(desk))).status_code == 201
        assert (await client.get(f"/patients/{elsewhere}", headers=bearer(desk))).status_code == 404
        audit = await client.get("/audit", params={"patient_id": elsewhere}, headers=auth("network_admin"))
        assert "dee.desk" in {row["actor"] for row in audit.json()}  # the provider's sub is the actor


async def test_tokens_the_services_refuse(app, issuer: str, tmp_path: Path) -> None:
    desk = (await sign_in(issuer, "dee.desk"))["id_token"]
    other_client = (await sign_in(issuer, "dee.desk", client_id="some-other-app"))["id_token"]
    nobody = (await sign_in(issuer, "nobody"))["id_token"]
    head, body, signature = desk.split(".")
    tampered = f"{head}.{body}.{signature[:-4]}{'AAAA' if not signature.endswith('AAAA') else 'BBBB'}"
    claims = jwt.decode(desk, options={"verify_signature": False})
    # The provider's issuer on a token signed with the shared secret (HS256): refused,
    # or anyone holding that secret could pose as the provider.
    settings = app.state.settings
    forged = mint_token(
        settings.signing_secret, sub="dee.desk", role="network_admin", issuer=issuer, audience=claims["aud"]
    )
    async with running(app) as client:
        assert (await client.get("/programs", headers=bearer(desk))).status_code == 200
        for token in (tampered, other_client, nobody, forged):
            answer = await client.get("/programs", headers=bearer(token))
            assert answer.status_code == 401, answer.text
            assert answer.json()["error"]["code"] == "unauthorized"


async def test_a_provider_token_is_verified_once_while_it_lasts(
    app, issuer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    desk = (await sign_in(issuer, "dee.desk"))["id_token"]
    verified: list[str] = []
    real = OidcVerifier._verified

    def spy(self: OidcVerifier, token: str, keys: list[jwt.PyJWK]) -> dict[str, Any]:
        verified.append(token)
        return real(self, token, keys)

    monkeypatch.setattr(OidcVerifier, "_verified", spy)
    async with running(app) as client:
        answers = [(await client.get("/programs", headers=bearer(desk))).status_code for _ in range(3)]
        assert answers == [200, 200, 200]
        assert verified == [desk]  # the key lookup and RSA check once, not per request
        # Once the token has expired, it is not vouched for any more: it is verified again
        # (and refused then, by PyJWT's own clock, once the provider's expiry has passed).
        expires_at = jwt.decode(desk, options={"verify_signature": False})["exp"]
        monkeypatch.setattr("shared.oidc.time.time", lambda: expires_at + LEEWAY_SECONDS)
        await client.get("/programs", headers=bearer(desk))
    assert verified == [desk, desk]
