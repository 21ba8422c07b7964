"""Fixtures: a real nats-server per test (free port, temp dir, killable), real SQLite and
PostgreSQL databases, services running in-process over real HTTP transports."""

import asyncio
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
from faststream.nats import NatsBroker
from sqlalchemy import MetaData, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.pool import Pool

from iopnet.natsd import NatsServer, free_port
from iopnet.testing import BusRecorder
from shared.auth import Role, mint_token
from shared.contracts import Envelope
from shared.db import create_engine, session_factory
from shared.messaging import Inbox, Outbox
from shared.messaging.broker import new_broker
from shared.messaging.connection import connect_once
from shared.messaging.streams import STREAMS, ensure_streams
from shared.settings import Settings

TEST_SECRET = "test-signing-secret-" + "x" * 32


class ExternalNats:
    """IOPNET_TEST_NATS_URL: an existing server, which the tests must not kill."""

    def __init__(self, url: str) -> None:
        self.url = url

    def stop(self, kill: bool = False) -> None:
        raise RuntimeError("an external broker cannot be stopped; use the own_nats_server fixture")

    def start(self) -> "ExternalNats":
        return self


def _local_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", port=free_port()).start()
    try:
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer | ExternalNats]:
    external = os.environ.get("IOPNET_TEST_NATS_URL")
    if external:
        yield ExternalNats(external)
        return
    yield from _local_nats(tmp_path)


@pytest.fixture
def own_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of the test's own, always: fault tests kill and restart it."""
    yield from _local_nats(tmp_path)


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


@asynccontextmanager
async def fresh_service_databases() -> AsyncIterator[dict[str, str]]:
    """Three fresh databases on the test PostgreSQL, one per service, as
    `<service>_database_url` settings; dropped afterwards."""
    from iopnet.bench import _drop_databases, _postgres_databases

    admin = _postgres_admin_url()
    if admin is None:
        pytest.skip("PostgreSQL case skipped: set IOPNET_TEST_POSTGRES_URL or run Docker for testcontainers")
    urls, names = await _postgres_databases(admin)
    try:
        yield {f"{service}_database_url": url for service, url in urls.items()}
    finally:
        await _drop_databases(admin, names)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """One fresh database per test, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'service.db'}"
        return
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture
async def inbox_db(database_url: str):
    """An inbox table alone, on each backend: for tests of the shared consumer."""
    metadata = MetaData()
    inbox = Inbox(metadata)
    engine = create_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield inbox, session_factory(engine)
    await engine.dispose()


async def outbox_alone(database_url: str) -> tuple[Outbox, AsyncEngine, async_sessionmaker[AsyncSession]]:
    """An outbox table alone on a new engine (dispose it): for tests of the relay."""
    metadata = MetaData()
    outbox = Outbox(metadata)
    engine = create_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    return outbox, engine, session_factory(engine)


async def applied_in_order(sessions: async_sessionmaker[AsyncSession], inbox: Inbox) -> list[str]:
    """The event ids the inbox holds, in the order they were applied."""
    async with sessions() as session:
        query = select(inbox.table.c.event_id).order_by(inbox.table.c.received_at)
        return [str(r) for r in (await session.execute(query)).scalars()]


async def routine_transaction(sessions: async_sessionmaker[AsyncSession]) -> None:
    """A transaction of routine work: on SQLite it waits for the one connection in the
    pool's line (shared/priority.py) behind safety and finishing work."""
    async with sessions() as session, session.begin():
        await session.execute(select(1))


class Statements:
    """The statements a session sends, by table read."""

    def __init__(self, session: AsyncSession) -> None:
        self.sent: list[str] = []
        self.session = session

    async def __aenter__(self) -> "Statements":
        self.connection = (await self.session.connection()).sync_connection
        event.listen(self.connection, "before_cursor_execute", self._sent)
        return self

    async def __aexit__(self, *_: object) -> None:
        event.remove(self.connection, "before_cursor_execute", self._sent)

    def _sent(self, _connection: object, _cursor: object, statement: str, *_: object) -> None:
        self.sent.append(" ".join(statement.split()))

    def reads(self, table: str) -> int:
        return sum(s.startswith("SELECT") and f"FROM {table} " in f"{s} " for s in self.sent)


class Checkouts:
    """The names of the tasks that take a connection from `pool`, in order, once started."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.names: list[str] = []
        self._listening = False

    def start(self) -> None:
        event.listen(self.pool, "checkout", self._checked_out)
        self._listening = True

    def stop(self) -> None:
        if self._listening:
            event.remove(self.pool, "checkout", self._checked_out)
            self._listening = False

    def _checked_out(self, *_: object) -> None:
        task = asyncio.current_task()
        self.names.append(task.get_name() if task else "?")


def make_settings(nats_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "data_dir": tmp_path / "data",
        "jwt_secret": TEST_SECRET,
        "nak_delay_seconds": 0.05,
        "ack_wait_seconds": 5.0,
        "max_deliver": 3,
        "outbox_retry_seconds": 0.2,
        # Local receivers (http on 127.0.0.1); tests of the strict policy set it False.
        "notify_allow_insecure_targets": True,
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


async def connected_broker(nats_url: str) -> NatsBroker:
    """A FastStream broker for a test's consumer, connected (close it with
    shared.messaging.broker.close)."""
    broker = new_broker(nats_url, "iopnet-test")
    await broker.connect()
    return broker


async def publish(nats_url: str, *envelopes: Envelope, msg_id_prefix: str = "") -> None:
    """Publish envelopes as their producer would (declaring its streams first).

    `msg_id_prefix` changes the Nats-Msg-Id: the same event re-published past the
    duplicate window, which only the consumer's inbox can catch.
    """
    nc = await connect_once(nats_url)
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
    nc = await connect_once(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, [STREAMS["IOP_INTAKE"], STREAMS["IOP_SCHEDULING"], STREAMS["IOP_RESTRICTED"]], 120)
        await js.publish(subject, payload)
    finally:
        await nc.close()


async def dead_letters(nats_url: str) -> list[tuple[str, dict[str, str], bytes]]:
    nc = await connect_once(nats_url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info("IOP_DLQ")
        except nats.js.errors.NotFoundError:
            return []
        if not info.state.messages:
            return []  # an empty stream's first_seq is 0, which get_msg refuses
        letters = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg("IOP_DLQ", seq)
            letters.append((msg.subject, dict(msg.headers or {}), msg.data or b""))
        return letters
    finally:
        await nc.close()


async def stream_count(nats_url: str, stream: str) -> int:
    nc = await connect_once(nats_url)
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


# --- notifications: real peers (an SMTP server, an HTTP server) in the test process ---------------


class SmtpSink:
    """A real SMTP server (aiosmtpd's Controller, its own thread and loop) on a free
    loopback port. Every mail it accepts is parsed and kept; `refuse` answers the next
    N transactions with a 451 (try again later)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.mails: list[Any] = []
        self.refuse = 0
        self._controller: Any = None

    def start(self) -> "SmtpSink":
        from aiosmtpd.controller import Controller

        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import email
        import email.policy
        import time

        if self.refuse > 0:
            self.refuse -= 1
            return "451 Requested action aborted: try again later"
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.mails.append(
            {
                "from": envelope.mail_from,
                "to": list(envelope.rcpt_tos),
                "subject": str(message["Subject"]),
                "text": message.get_content() if not message.is_multipart() else "",
                "headers": dict(message.items()),
                "received_at": time.monotonic(),
                "received_wall": time.time(),
            }
        )
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[dict[str, Any]]:
        return [m for m in self.mails if address in m["to"]]


class HttpPeer:
    """A real HTTP server (http.server in a thread) on a free loopback port, standing in
    for an SMS provider and webhook receivers. It records every POST; on a path given
    a secret it verifies X-Iopnet-Signature (hex HMAC-SHA256 over f"{timestamp}.{body}")
    and refuses a bad one with 401; `fail[path] = n` answers the next n POSTs with 500."""

    def __init__(self) -> None:
        import threading

        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self.fail: dict[str, int] = {}
        self.secrets: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> "HttpPeer":
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                import json

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = peer._answer(self.path, dict(self.headers.items()), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        import hashlib
        import hmac
        import time

        with self._lock:
            signature_ok = None
            if path in self.secrets:
                timestamp = headers.get("X-Iopnet-Timestamp", "")
                expected = hmac.new(
                    self.secrets[path].encode(), timestamp.encode() + b"." + body, hashlib.sha256
                ).hexdigest()
                fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 300
                signature_ok = fresh and hmac.compare_digest(expected, headers.get("X-Iopnet-Signature", ""))
            if signature_ok is False:
                status = 401
            elif self.fail.get(path, 0) > 0:
                self.fail[path] -= 1
                status = 500
            else:
                status = 200
            number = len(self.requests) + 1
            self.requests.append(
                {"path": path, "headers": headers, "body": body, "status": status, "signature_ok": signature_ok,
                 "received_at": time.monotonic()}
            )  # fmt: skip
        if status != 200:
            return status, {"error": "unavailable" if status == 500 else "bad signature"}
        return status, {"id": f"peer-{number}", "status": "queued"}

    def posts(self, path: str, status: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["path"] == path and (status is None or r["status"] == status)]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture
def http_peer() -> Iterator[HttpPeer]:
    peer = HttpPeer().start()
    try:
        yield peer
    finally:
        peer.stop()


def network_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """A whole network's settings (tests/e2e, tests/faults): embedded NATS and the three
    services on free ports, data under the test's tmp dir."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "nats_url": None,
        "jwt_secret": TEST_SECRET,
        "embedded_nats_port": free_port(),
        "intake_port": free_port(),
        "scheduling_port": free_port(),
        "notifications_port": free_port(),
    }
    return Settings(**(values | overrides))
