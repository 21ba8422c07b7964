"""An operator gives an outside system access to one site with `iopnet integrations`, on a
running network (issue 11): the integration connects with the printed credentials, reads
that site's events and not the other's; revoking it closes its connection, with no
broker restart."""

import contextlib
import json
import re
import subprocess
import sys

import httpx
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from iopnet.natsd import url_with_user
from iopnet.network import LocalNetwork
from iopnet.testing import eventually
from shared.messaging.connection import connect_once
from tests.conftest import auth
from tests.e2e.test_ops import cli_env

SITES = ("site-a", "site-b")


def iopnet(network: LocalNetwork, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **cli_env(network),
        "IOPNET_INTAKE_PORT": str(network.settings.intake_port),
        "IOPNET_JWT_SECRET": network.settings.signing_secret,
    }
    return subprocess.run(
        [sys.executable, "-m", "iopnet.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


async def test_an_integration_added_from_the_cli_reads_its_site_until_revoked(network: LocalNetwork) -> None:
    assert network.nats is not None
    async with httpx.AsyncClient(base_url=network.url("intake"), timeout=10) as http:
        for site in SITES:
            body = {"site_id": site, "name": site, "timezone": "America/New_York"}
            assert (await http.post("/sites", json=body, headers=auth("network_admin"))).status_code == 201

    added = iopnet(network, "integrations", "add", "acme-ehr", "--site", "site-a", "--basis", "qsoa")
    assert added.returncode == 0, added.stderr
    password = re.search(r"NATS password: (\S+)", added.stdout)
    assert password is not None, added.stdout
    assert "durable acme-ehr-IOP_INTAKE-site-a on IOP_INTAKE, filter iop.intake.*.site-a" in added.stdout
    listed = iopnet(network, "integrations", "list", "--json")
    [record] = json.loads(listed.stdout)
    assert record["integration_id"] == "acme-ehr" and record["status"] == "active"

    url = url_with_user(network.nats.url, "integration-acme-ehr", password.group(1))
    nc = await connect_once(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        durable = "acme-ehr-IOP_INTAKE-site-a"
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            filter_subject="iop.intake.*.site-a",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
        )
        await js.add_consumer("IOP_INTAKE", config)
        pull = await js.pull_subscribe_bind(durable, stream="IOP_INTAKE")
        received: list[dict] = []

        async def registration_and_grant() -> bool:
            with contextlib.suppress(TimeoutError):  # nats-py's own, or asyncio's mid-fetch
                for message in await pull.fetch(10, timeout=0.5):
                    received.append(json.loads(message.data))
                    await message.ack()
            return {e["event_type"] for e in received} >= {"SiteRegistered", "IntegrationRegistered"}

        await eventually(registration_and_grant, what="site-a's events")
        assert {e["site_id"] for e in received} == {"site-a"}  # site-b's registration is not for it
        assert len({e["event_id"] for e in received}) == len(received)

        revoked = iopnet(network, "integrations", "revoke", "acme-ehr")
        assert revoked.returncode == 0, revoked.stderr

        async def closed() -> bool:
            return nc.is_closed

        await eventually(closed, timeout=10, what="the broker to close the revoked integration's connection")
    finally:
        await nc.close()
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        await connect_once(url, allow_reconnect=False)
