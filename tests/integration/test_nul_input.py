"""A NUL character anywhere in a scheduling or notifications request body answers 422
with the DESIGN A6 error object and changes nothing (shared.api.Input, the base of every
service's request bodies) — against a real nats-server and a real database, SQLite and
PostgreSQL. PostgreSQL text cannot hold U+0000: before the services shared intake's
base model, such a body reached the insert and answered 500 there.

Each refused body is also sent without the NUL, and must succeed: the refusal is the
NUL's, not some other fault of the body."""

from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import MetaData, func, select

from services.notifications import store as notifications_store
from services.notifications.app import create_app as notifications_app
from services.scheduling import store as scheduling_store
from services.scheduling.app import create_app as scheduling_app
from tests.conftest import auth, make_settings, running
from tests.integration.test_notifications_delivery import register_integration, register_site
from tests.integration.test_scheduling_input import SITE, with_site

ADMIN = auth("site_admin", [SITE])
INTEGRATION = auth("integration", [SITE])
BLOCK = {"weekday": 1, "start": "18:00", "minutes": 60, "kind": "group_therapy", "title": "Group", "topics": ["Coping"]}
PROGRAM = {"site_id": SITE, "name": "Evening IOP", "cohort": "adult", "blocks": [BLOCK]}
MEMBER = {"name": "Dr. First", "role": "clinician", "channel": "email", "address": "oncall@clinic.test"}
SUBSCRIPTION = {"site_id": SITE, "url": "https://hooks.example.org/iop", "events": ["SessionScheduled"],
                "secret": "whsec-" + "s" * 24}  # fmt: skip


async def row_counts(app: FastAPI, metadata: MetaData) -> dict[str, int]:
    async with app.state.runtime.sessions() as session:
        return {
            table.name: int((await session.execute(select(func.count()).select_from(table))).scalar_one())
            for table in metadata.sorted_tables
        }


def assert_nul_refused(response: httpx.Response, field: str) -> None:
    assert response.status_code == 422, response.text
    assert response.json() == {
        "error": {
            "code": "invalid",
            "message": "the request is not valid",
            "fields": {field: "Value error, may not contain the NUL character"},
        }
    }


async def test_a_nul_in_a_scheduling_body_is_422_and_changes_nothing(
    nats_server, database_url: str, tmp_path: Path
) -> None:
    app = scheduling_app(make_settings(nats_server.url, tmp_path, scheduling_database_url=database_url))
    cases: list[tuple[dict[str, Any], str]] = [
        ({**PROGRAM, "name": "Evening\x00IOP"}, "name"),
        ({**PROGRAM, "blocks": [{**BLOCK, "title": "Gr\x00up"}]}, "blocks.0.title"),
        # A string inside a list is checked too (the template is kept, and published).
        ({**PROGRAM, "blocks": [{**BLOCK, "topics": ["Coping", "\x00"]}]}, "blocks.0.topics"),
    ]
    async with running(app) as client:
        await with_site(app, nats_server.url)
        before = await row_counts(app, scheduling_store.metadata)
        for body, field in cases:
            assert_nul_refused(await client.post("/programs", json=body, headers=ADMIN), field)
        assert await row_counts(app, scheduling_store.metadata) == before
        published = await client.post("/programs", json=PROGRAM, headers=ADMIN)
        assert published.status_code == 201, published.text


async def test_a_nul_in_a_notifications_body_is_422_and_changes_nothing(
    nats_server, database_url: str, tmp_path: Path
) -> None:
    app = notifications_app(make_settings(nats_server.url, tmp_path, notifications_database_url=database_url))
    care_team = f"/sites/{SITE}/care-team"
    async with running(app) as client:
        await register_integration(app, nats_server.url, [SITE])
        await register_site(app, nats_server.url)
        before = await row_counts(app, notifications_store.metadata)
        refused = await client.put(care_team, json={"members": [{**MEMBER, "name": "Dr.\x00First"}]}, headers=ADMIN)
        assert_nul_refused(refused, "members.0.name")
        secret = SUBSCRIPTION["secret"] + "\x00"
        refused = await client.post("/subscriptions", json={**SUBSCRIPTION, "secret": secret}, headers=INTEGRATION)
        assert_nul_refused(refused, "secret")
        assert await row_counts(app, notifications_store.metadata) == before
        kept = await client.put(care_team, json={"members": [MEMBER]}, headers=ADMIN)
        assert kept.status_code == 200, kept.text
        subscribed = await client.post("/subscriptions", json=SUBSCRIPTION, headers=INTEGRATION)
        assert subscribed.status_code == 201, subscribed.text
