"""Kill and restart the broker around intake's writes: the outbox loses nothing and
JetStream's de-duplication keeps each event once."""

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select, update

from iopnet.testing import eventually
from services.intake import store
from services.intake.app import create_app
from tests.conftest import auth, make_settings, running, stream_count

ADMIN = auth("network_admin")


def site(site_id: str) -> dict[str, str]:
    return {"site_id": site_id, "name": site_id.title(), "timezone": "America/Chicago"}


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, intake_database_url=database_url))


async def outbox_rows(app) -> list[dict]:
    async with app.state.runtime.sessions() as session:
        return [dict(r) for r in (await session.execute(select(store.outbox.table))).mappings()]


async def all_sent(app) -> bool:
    found = await outbox_rows(app)
    return bool(found) and all(r["sent_at"] is not None for r in found)


async def test_writes_while_broker_is_down_are_published_when_it_returns(app, nats_server) -> None:
    async with running(app) as client:
        assert (await client.post("/sites", json=site("before-outage"), headers=ADMIN)).status_code == 201
        await eventually(lambda: all_sent(app), what="first event sent")

        nats_server.stop(kill=True)
        response = await client.post("/sites", json=site("during-outage"), headers=ADMIN)
        assert response.status_code == 201  # the write does not depend on the broker

        async def attempted_and_pending() -> bool:
            rows = {r["subject"]: r for r in await outbox_rows(app)}
            row = rows["iop.intake.site_registered.during-outage"]
            return row["sent_at"] is None and row["attempts"] >= 1 and row["last_error"] is not None

        await eventually(attempted_and_pending, timeout=20, what="failed publish left pending")
        assert (await client.get("/readyz")).status_code == 503

        nats_server.start()
        await eventually(lambda: all_sent(app), timeout=20, what="pending event sent after restart")
        assert await stream_count(nats_server.url, "IOP_INTAKE") == 2  # each event once, none lost


async def test_republish_after_a_crash_between_publish_and_mark_is_deduplicated(app, nats_server) -> None:
    async with running(app) as client:
        await client.post("/sites", json=site("toledo-west"), headers=ADMIN)
        await eventually(lambda: all_sent(app), what="event sent")
        # As if the relay died after JetStream's ack but before marking the row sent.
        async with app.state.runtime.sessions() as session, session.begin():
            await session.execute(update(store.outbox.table).values(sent_at=None))
        app.state.runtime.relay.wake()
        await eventually(lambda: all_sent(app), what="row re-sent")
        [row] = await outbox_rows(app)
        assert row["attempts"] == 2
    assert await stream_count(nats_server.url, "IOP_INTAKE") == 1


async def test_service_starts_before_the_broker(nats_server, database_url: str, tmp_path: Path) -> None:
    nats_server.stop(kill=True)
    app = create_app(make_settings(nats_server.url, tmp_path, intake_database_url=database_url))
    async with running(app) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.post("/sites", json=site("early-bird"), headers=ADMIN)).status_code == 201
        nats_server.start()

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(ready, timeout=20, what="ready once NATS is up")
        await eventually(lambda: all_sent(app), timeout=20, what="event sent")
    assert await stream_count(nats_server.url, "IOP_INTAKE") == 1


async def test_requests_do_not_wait_on_the_relay_while_the_broker_is_down(app, nats_server) -> None:
    """The relay publishes outside any transaction on SQLite (one connection per file):
    with the broker gone and acks timing out, reads and writes still answer promptly.
    Each request gets a deadline shorter than the relay's 5 s publish timeout: held
    behind a relay transaction, it would miss it."""
    async with running(app) as client:
        assert (await client.post("/sites", json=site("steady-state"), headers=ADMIN)).status_code == 201
        await eventually(lambda: all_sent(app), what="first event sent")
        nats_server.stop(kill=True)
        for index in range(5):
            async with asyncio.timeout(3):
                assert (await client.post("/sites", json=site(f"outage-{index}"), headers=ADMIN)).status_code == 201
                listed = await client.get("/sites", headers=ADMIN)
            assert len(listed.json()) == index + 2
        pending = [r for r in await outbox_rows(app) if r["sent_at"] is None]
        assert len(pending) == 5
