"""Integrations as records at intake (issue 11): network admins add one for some sites on
a basis, rotate its broker password, revoke it; the password is answered once and kept
only as a bcrypt hash, which the broker gets from /integrations/broker-users. On SQLite
and PostgreSQL, against a real nats-server."""

from pathlib import Path

import bcrypt
import pytest

from services.intake.app import create_app
from tests.conftest import auth, make_settings, running

ADMIN = auth("network_admin")
SITES = [
    {"site_id": "columbus-east", "name": "Columbus East", "timezone": "America/New_York"},
    {"site_id": "dayton-north", "name": "Dayton North", "timezone": "America/New_York"},
]


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, intake_database_url=database_url))


def checks(password: str, password_hash: str) -> bool:
    return bcrypt.checkpw(password.encode(), password_hash.encode())


async def test_an_integration_is_added_rotated_and_revoked_by_a_network_admin(app) -> None:
    async with running(app) as client:
        for site in SITES:
            assert (await client.post("/sites", json=site, headers=ADMIN)).status_code == 201
        body = {"integration_id": "acme-ehr", "sites": ["columbus-east"], "basis": "qsoa"}
        added = await client.post("/integrations", json=body, headers=ADMIN)
        assert added.status_code == 201, added.text
        created = added.json()
        assert created["nats_user"] == "integration-acme-ehr"
        assert created["inbox_prefix"] == "_INBOX.integration-acme-ehr"
        assert {c["filter_subject"] for c in created["consumers"]} == {
            "iop.intake.*.columbus-east",
            "iop.scheduling.*.columbus-east",
            "iop.notifications.*.columbus-east",
        }
        [user] = (await client.get("/integrations/broker-users", headers=ADMIN)).json()
        assert user["integration_id"] == "acme-ehr" and checks(created["password"], user["password_hash"])
        listed = (await client.get("/integrations", headers=ADMIN)).json()
        assert [i["integration_id"] for i in listed] == ["acme-ehr"]
        assert "password" not in listed[0] and "password_hash" not in listed[0]

        again = await client.post("/integrations", json=body, headers=ADMIN)
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"

        rotated = (await client.post("/integrations/acme-ehr/rotate", headers=ADMIN)).json()
        [user] = (await client.get("/integrations/broker-users", headers=ADMIN)).json()
        assert checks(rotated["password"], user["password_hash"])
        assert not checks(created["password"], user["password_hash"])

        revoked = await client.post("/integrations/acme-ehr/revoke", headers=ADMIN)
        assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
        assert (await client.get("/integrations/broker-users", headers=ADMIN)).json() == []
        assert (await client.post("/integrations/acme-ehr/rotate", headers=ADMIN)).status_code == 409
        assert (await client.post("/integrations/nobody/revoke", headers=ADMIN)).status_code == 404

        # Each grant and its end are in the audit trail of the sites it covers, and only there.
        audit = (await client.get("/audit", headers=auth("site_admin", ["columbus-east"]))).json()
        actions = [row["action"] for row in audit if row["action"].startswith("integration.")]
        assert actions.count("integration.add") == 1 and "integration.revoke" in actions
        other = (await client.get("/audit", headers=auth("site_admin", ["dayton-north"]))).json()
        assert not [row for row in other if row["action"].startswith("integration.")]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"integration_id": "x", "sites": ["columbus-east"], "basis": "qsoa"}, "integration_id"),
        ({"integration_id": "acme", "sites": [], "basis": "qsoa"}, "sites"),
        ({"integration_id": "acme", "sites": ["columbus-east"], "basis": "friends"}, "basis"),
        ({"integration_id": "acme", "sites": ["nowhere"], "basis": "qsoa"}, "sites"),
        ({"integration_id": "acme", "sites": ["columbus-east"], "basis": "consent"}, "purpose"),
        ({"integration_id": "acme", "sites": ["columbus-east"], "basis": "qsoa", "purpose": "research"}, "purpose"),
    ],
)
async def test_a_bad_integration_is_refused_and_nothing_is_added(app, body: dict, field: str) -> None:
    async with running(app) as client:
        await client.post("/sites", json=SITES[0], headers=ADMIN)
        answer = await client.post("/integrations", json=body, headers=ADMIN)
        assert answer.status_code == 422, answer.text
        assert any(field in key for key in answer.json()["error"]["fields"]), answer.json()
        assert (await client.get("/integrations", headers=ADMIN)).json() == []


async def test_only_a_network_admin_manages_integrations(app) -> None:
    async with running(app) as client:
        await client.post("/sites", json=SITES[0], headers=ADMIN)
        body = {"integration_id": "acme-ehr", "sites": ["columbus-east"], "basis": "qsoa"}
        for role in ("site_admin", "clinician", "integration"):
            headers = auth(role, ["columbus-east"])
            assert (await client.post("/integrations", json=body, headers=headers)).status_code == 403
            assert (await client.get("/integrations/broker-users", headers=headers)).status_code == 403
        assert (await client.get("/integrations")).status_code == 401
