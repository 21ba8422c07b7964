"""Credentials for outside systems (issue 11), enforced by a real nats-server.

An integration for site A reads A's public events through durables named and filtered
for it, and nothing else: not B's events, not another filter, no publish on any `iop.`
subject, no stream or message API, no core subscription. An integration with basis
`consent` reads only its own feed. Adding, rotating and revoking one is a config reload of
the running server (no restart): a rotated password stops working, and a revoked
integration's open connection is closed. Denials are observed as in
test_nats_permissions.py: the server's `permissions violation` report, with a deadline.
"""

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import bcrypt
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from iopnet.natsd import (
    IntegrationUser,
    NatsServer,
    free_port,
    load_or_create_credentials,
    url_with_user,
    write_integrations,
)
from iopnet.testing import eventually
from shared.contracts import new_envelope
from shared.contracts.events import PatientEnrolled
from shared.messaging.connection import connect_once
from shared.messaging.integrations import IntegrationConsumer, integration_consumers, integration_user
from shared.messaging.streams import ensure_streams, owned_streams

SITE_A, SITE_B = "site-a", "site-b"
DENIED_TIMEOUT = 1.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    nats_dir = tmp_path / "nats"
    server = NatsServer(nats_dir, port=free_port(), users=load_or_create_credentials(nats_dir)).start()
    try:
        yield server
    finally:
        server.stop(kill=True)


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


class Integration:
    """One outside system's connection, with what the server reported about it."""

    def __init__(self, nc: Client, violations: list[str]) -> None:
        self.nc, self.violations = nc, violations

    async def reported(self, action: str, subject: str) -> None:
        expected = f'permissions violation for {action} to "{subject}"'.lower()

        async def seen() -> bool:
            return any(expected in v for v in self.violations)

        await eventually(seen, timeout=5, what=expected)

    async def denied_request(self, subject: str, body: dict[str, Any]) -> None:
        with pytest.raises(nats.errors.TimeoutError):
            await self.nc.request(subject, json.dumps(body).encode(), timeout=DENIED_TIMEOUT)
        await self.reported("publish", subject)


@asynccontextmanager
async def connected(server: NatsServer, integration_id: str, password: str) -> AsyncIterator[Integration]:
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc).lower())

    user = integration_user(integration_id)
    nc = await connect_once(url_with_user(server.url, user, password), error_cb=on_error, allow_reconnect=False)
    try:
        yield Integration(nc, violations)
    finally:
        await nc.close()


async def admitted(server: NatsServer, integration_id: str, password: str) -> bool:
    """Whether the server (after a reload, which it does in the background) takes these credentials."""
    try:
        async with connected(server, integration_id, password):
            return True
    except (nats.errors.Error, OSError):  # refused: an authorization error, or the socket closed on it
        return False


async def publish_enrollments(server: NatsServer) -> None:
    nc = await connect_once(server.user_url("intake"), allow_reconnect=False)
    try:
        js = nc.jetstream()
        await ensure_streams(js, [s for s in owned_streams("intake") if not s.restricted], 120, service="intake")
        for site in (SITE_A, SITE_B):
            event = PatientEnrolled(
                patient_id=uuid4(),
                enrollment_id=uuid4(),
                program_id="adult",
                level_of_care="2.1",
                cohort="adult",
                start_date=datetime.now(UTC).date(),
                referral_source="self",
            )
            envelope = new_envelope(event, site_id=site)
            await js.publish(envelope.subject, envelope.to_bytes(), headers={"Nats-Msg-Id": str(envelope.event_id)})
    finally:
        await nc.close()


def durable_config(durable: str, filter_subject: str | None = None, **more: Any) -> ConsumerConfig:
    return ConsumerConfig(
        name=durable,
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=filter_subject,
        **more,
    )


async def add_integrations(server: NatsServer, *integrations: IntegrationUser) -> None:
    write_integrations(server.data_dir, integrations)
    server.reload()


async def test_an_integration_reads_its_sites_events_and_nothing_else(server: NatsServer) -> None:
    await publish_enrollments(server)
    await add_integrations(server, IntegrationUser("ehr-a", (SITE_A,), "qsoa", hashed("pw-a")))
    await eventually(lambda: admitted(server, "ehr-a", "pw-a"), what="the reloaded server to admit ehr-a")

    consumers = integration_consumers("ehr-a", (SITE_A,), "qsoa")
    assert len(consumers) == 3  # one per public stream, for its one site
    [intake] = [c for c in consumers if c.stream == "IOP_INTAKE"]
    assert intake == IntegrationConsumer("IOP_INTAKE", "ehr-a-IOP_INTAKE-site-a", "iop.intake.*.site-a")
    stream, durable, subject = intake.stream, intake.durable, intake.filter_subject
    async with connected(server, "ehr-a", "pw-a") as ehr:
        js = ehr.nc.jetstream()
        await js.add_consumer(stream, durable_config(durable, subject))
        pull = await js.pull_subscribe_bind(durable, stream=stream)
        [message] = await pull.fetch(1, timeout=5)
        assert json.loads(message.data)["site_id"] == SITE_A
        await message.ack()
        with pytest.raises(TimeoutError):  # nats-py's own, or asyncio's when time ran out mid-fetch
            await pull.fetch(1, timeout=0.5)  # site B's enrollment is not in its filter
        assert not ehr.violations

        # Side doors, each refused by the server.
        prefix = f"$JS.API.CONSUMER.CREATE.{stream}"
        other_site = f"ehr-a-IOP_INTAKE-{SITE_B}"
        await ehr.denied_request(
            f"{prefix}.{other_site}.iop.intake.*.{SITE_B}",
            {"stream_name": stream, "config": {"name": other_site, "filter_subject": f"iop.intake.*.{SITE_B}"}},
        )
        await ehr.denied_request(  # its own durable, widened to every site
            f"{prefix}.{durable}.iop.intake.>",
            {"stream_name": stream, "config": {"name": durable, "filter_subject": "iop.intake.>"}},
        )
        await ehr.denied_request(  # the forms whose filter the subject does not show
            f"{prefix}.{durable}", {"stream_name": stream, "config": {"name": durable, "filter_subjects": ["iop.>"]}}
        )
        await ehr.denied_request(f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}", {"stream_name": stream})
        await ehr.denied_request(f"$JS.API.STREAM.MSG.GET.{stream}", {"seq": 2})
        await ehr.denied_request(f"$JS.API.STREAM.INFO.{stream}", {})
        await ehr.denied_request(f"$JS.API.STREAM.PURGE.{stream}", {})
        await ehr.denied_request(f"$JS.API.CONSUMER.INFO.{stream}.scheduling-{stream}", {})
        forged = f"iop.intake.patient_enrolled.{SITE_A}"
        await ehr.nc.publish(forged, b"{}")
        await ehr.reported("publish", forged)
        await ehr.nc.subscribe("iop.>")
        await ehr.reported("subscription", "iop.>")
        await ehr.nc.subscribe("_INBOX.intake.>")
        await ehr.reported("subscription", "_INBOX.intake.>")


async def test_a_consent_based_integration_reads_only_its_own_feed(server: NatsServer) -> None:
    await publish_enrollments(server)
    await add_integrations(server, IntegrationUser("research-b", (SITE_B,), "consent", hashed("pw-b")))
    await eventually(lambda: admitted(server, "research-b", "pw-b"), what="the reloaded server to admit research-b")
    [feed] = integration_consumers("research-b", (SITE_B,), "consent")
    assert (feed.stream, feed.filter_subject) == ("IOP_FEED", "iop.feed.research-b.>")
    stream, durable, subject = feed.stream, feed.durable, feed.filter_subject
    async with connected(server, "research-b", "pw-b") as research:
        public = "research-b-IOP_INTAKE-site-b"
        await research.denied_request(
            f"$JS.API.CONSUMER.CREATE.IOP_INTAKE.{public}.iop.intake.*.{SITE_B}",
            {"stream_name": "IOP_INTAKE", "config": {"name": public, "filter_subject": f"iop.intake.*.{SITE_B}"}},
        )
        other_feed = "iop.feed.ehr-a.>"
        await research.denied_request(
            f"$JS.API.CONSUMER.CREATE.IOP_FEED.{durable}.{other_feed}",
            {"stream_name": "IOP_FEED", "config": {"name": durable, "filter_subject": other_feed}},
        )
        # Its own feed's durable (IOP_FEED, which intake declares): allowed.
        js = research.nc.jetstream()
        before = len(research.violations)
        created = await js.add_consumer(stream, durable_config(durable, subject))
        assert created.config.filter_subject == "iop.feed.research-b.>"
        assert len(research.violations) == before


async def test_rotation_and_revocation_take_effect_on_a_reload_without_a_restart(server: NatsServer) -> None:
    process = server.process
    await add_integrations(server, IntegrationUser("ehr-a", (SITE_A,), "qsoa", hashed("first")))
    await eventually(lambda: admitted(server, "ehr-a", "first"), what="ehr-a admitted")

    await add_integrations(server, IntegrationUser("ehr-a", (SITE_A,), "qsoa", hashed("second")))
    await eventually(lambda: admitted(server, "ehr-a", "second"), what="the rotated password admitted")
    assert not await admitted(server, "ehr-a", "first")

    async with connected(server, "ehr-a", "second") as ehr:
        await add_integrations(server)  # revoked: no integration left

        async def closed() -> bool:
            return ehr.nc.is_closed

        await eventually(closed, timeout=10, what="the revoked integration's connection to be closed")
    assert not await admitted(server, "ehr-a", "second")
    assert server.process is process and process is not None and process.poll() is None  # never restarted
