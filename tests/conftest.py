"""Fixtures: a real nats-server per test (free port, temp dir, killable), real SQLite and
PostgreSQL databases, services running in-process over real HTTP transports."""

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import httpx
import nats
import nats.js.errors
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url

from iopnet.natsd import NatsServer, free_port
from iopnet.testing import BusRecorder
from shared.auth import Role, mint_token
from shared.contracts import Envelope
from shared.messaging.streams import STREAMS, ensure_streams
from shared.settings import Settings

TEST_SECRET = "test-signing-secret-" + "x" * 32


class ExternalNats:
    """IOPNET_TEST_NATS_URL: an existing server; it cannot be killed by the tests."""

    def __init__(self, url: str) -> None:
        self.url = url

    def stop(self, kill: bool = False) -> None:
        pytest.skip("this test kills the broker; it needs its own nats-server")

    def start(self) -> "ExternalNats":
        return self


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer | ExternalNats]:
    external = os.environ.get("IOPNET_TEST_NATS_URL")
    if external:
        yield ExternalNats(external)
        return
    server = NatsServer(tmp_path / "nats", port=free_port()).start()
    try:
        yield server
    finally:
        server.stop(kill=True)


def _postgres_admin_url() -> str | None:
    given = os.environ.get("IOPNET_TEST_POSTGRES_URL")
    if given:
        return given
    if shutil.which("docker") and os.path.exists("/var/run/docker.sock"):
        return _testcontainers_postgres()
    return None


_container_url: str | None = None


def _testcontainers_postgres() -> str | None:
    global _container_url
    if _container_url is None:
        try:
            from testcontainers.postgres import PostgresContainer

            container = PostgresContainer("postgres:16-alpine", driver="asyncpg")
            container.start()
            _container_url = container.get_connection_url()
        except Exception:
            return None
    return _container_url


def _plain_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    admin = _postgres_admin_url()
    if admin is None:
        pytest.skip("PostgreSQL case skipped: set IOPNET_TEST_POSTGRES_URL or run Docker for testcontainers")
    name = f"iopnet_test_{uuid4().hex[:12]}"
    connection = await asyncpg.connect(_plain_dsn(admin))
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    try:
        yield (
            make_url(admin).set(drivername="postgresql+asyncpg", database=name).render_as_string(hide_password=False)
        )
    finally:
        connection = await asyncpg.connect(_plain_dsn(admin))
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """One fresh database per test, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'service.db'}"
        return
    async with fresh_postgres_database() as url:
        yield url


def make_settings(nats_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "data_dir": tmp_path / "data",
        "jwt_secret": TEST_SECRET,
        "nak_delay_seconds": 0.05,
        "ack_wait_seconds": 5.0,
        "max_deliver": 3,
        "outbox_retry_seconds": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


def token(role: Role, sites: list[str] | None = None, patient_id: str | None = None, sub: str = "tester") -> str:
    return mint_token(TEST_SECRET, sub=sub, role=role, sites=sites, patient_id=patient_id)


def auth(role: Role, sites: list[str] | None = None, patient_id: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, sites, patient_id)}"}


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan (database, NATS, relay, consumers) and talk HTTP to it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            yield client


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[BusRecorder]:
    recorder = await BusRecorder(nats_server.url).start()
    try:
        yield recorder
    finally:
        await recorder.stop()


async def publish(nats_url: str, *envelopes: Envelope, msg_id_prefix: str = "") -> None:
    """Publish envelopes as their producer would (declaring its streams first).

    `msg_id_prefix` changes the Nats-Msg-Id: the same event re-published past the
    duplicate window, which only the consumer's inbox can catch.
    """
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        producers = {e.producer for e in envelopes}
        specs = [s for s in STREAMS.values() if s.owner in producers or s.name == "IOP_RESTRICTED"]
        await ensure_streams(js, specs, 120)
        for envelope in envelopes:
            await js.publish(
                envelope.subject, envelope.to_bytes(), headers={"Nats-Msg-Id": msg_id_prefix + str(envelope.event_id)}
            )
    finally:
        await nc.close()


async def publish_raw(nats_url: str, subject: str, payload: bytes) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, [STREAMS["IOP_INTAKE"], STREAMS["IOP_SCHEDULING"], STREAMS["IOP_RESTRICTED"]], 120)
        await js.publish(subject, payload)
    finally:
        await nc.close()


async def dead_letters(nats_url: str) -> list[tuple[str, dict[str, str], bytes]]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info("IOP_DLQ")
        except nats.js.errors.NotFoundError:
            return []
        letters = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg("IOP_DLQ", seq)
            letters.append((msg.subject, dict(msg.headers or {}), msg.data or b""))
        return letters
    finally:
        await nc.close()


async def stream_count(nats_url: str, stream: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


def program_published(
    site_id: str, program_id: str = "adult-iop-am", cohort: str = "adult", name: str = "Adult IOP"
) -> Envelope:
    """ProgramPublished as scheduling publishes it: what intake may enroll patients in."""
    from shared.contracts import new_envelope
    from shared.contracts.events import ProgramPublished, TemplateBlock

    block = TemplateBlock(weekday=1, start="09:00", minutes=180, kind="group_therapy", title="Group", capacity=12)
    event = ProgramPublished(
        program_id=program_id, name=name, level_of_care="2.1", cohort=cohort, weekly_hours_target=9.0, template=[block]
    )
    return new_envelope(event, site_id=site_id)
