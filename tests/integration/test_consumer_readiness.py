"""/readyz and the consumers: 503 until every consumer is bound, and an answer within a
second even while the service's database connection is busy with a backlog.

Against a real nats-server and database, with scheduling (one consumer, of IOP_INTAKE)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import pytest
from fastapi import FastAPI
from nats.js.api import AckPolicy, ConsumerConfig
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from iopnet.testing import eventually
from services.scheduling.app import create_app
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import SiteRegistered
from tests.conftest import make_settings, publish, running


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path) -> FastAPI:
    return create_app(make_settings(nats_server.url, tmp_path, scheduling_database_url=database_url))


def site_registered() -> Envelope:
    return new_envelope(SiteRegistered(name="Dayton North", timezone="America/New_York"), site_id="dayton-north")


async def test_readyz_is_503_until_every_consumer_is_bound(app: FastAPI, nats_server) -> None:
    await publish(nats_server.url, site_registered())  # IOP_INTAKE exists
    # Something else holds the durable's name (a push consumer): scheduling's consumer
    # cannot bind and keeps re-trying; the service must not call itself ready.
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        squatter = ConsumerConfig(
            durable_name="scheduling-IOP_INTAKE", deliver_subject="elsewhere", ack_policy=AckPolicy.EXPLICIT
        )
        await js.add_consumer("IOP_INTAKE", squatter)
        async with running(app) as client:

            async def connected_but_unbound() -> httpx.Response | None:
                answer = await client.get("/readyz")
                checks = answer.json()["checks"]
                return answer if checks["database"] and checks["nats"] and not checks["consumers"] else None

            answer = await eventually(connected_but_unbound, what="database and NATS up, the consumer not bound")
            assert answer is not None and answer.status_code == 503

            await js.delete_consumer("IOP_INTAKE", "scheduling-IOP_INTAKE")

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready, what="ready once the consumer is bound")
            assert app.state.runtime.consumers[0].bound.is_set()
    finally:
        await nc.close()


async def test_a_consumer_waiting_for_its_producer_stream_does_not_hold_readiness(app: FastAPI) -> None:
    """IOP_INTAKE does not exist (intake never ran): nothing to consume yet, and the
    durable will start from the stream's first message. Scheduling is ready."""
    async with running(app) as client:

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(ready, what="ready without the producer's stream")
        [consumer] = app.state.runtime.consumers
        assert consumer.awaiting_stream and not consumer.bound.is_set()


@contextlib.asynccontextmanager
async def every_pooled_connection_busy(app: FastAPI) -> AsyncIterator[list[AsyncConnection]]:
    """Check out connections until the pool has none left (one on SQLite, pool plus
    overflow on PostgreSQL), each in an open transaction, as a backlog's work would."""
    engine = app.state.runtime.engine
    held: list[AsyncConnection] = []
    try:
        while True:
            try:
                async with asyncio.timeout(0.5):
                    connection = await engine.connect()
            except TimeoutError:
                break  # the pool is exhausted: the next checkout would wait
            held.append(connection)
            await connection.begin()
            await connection.execute(text("SELECT 1"))
        yield held
    finally:
        for connection in held:
            await connection.rollback()
            await connection.close()


async def test_readyz_answers_within_a_second_while_the_service_connection_is_busy(app: FastAPI, nats_server) -> None:
    await publish(nats_server.url, site_registered())
    async with running(app) as client:

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(ready, what="scheduling ready")
        async with every_pooled_connection_busy(app) as held:
            assert held
            async with asyncio.timeout(1.0):
                answer = await client.get("/readyz")
            assert answer.status_code == 200, answer.text
            assert answer.json()["checks"]["database"] is True
