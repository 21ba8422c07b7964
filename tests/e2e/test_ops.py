"""The operator's commands against a running network whose broker has its real accounts
and allow-lists: `events tail` sees public events and is refused the contact details;
`dlq retry` has notifications re-read a restricted original from its own account;
`events replay` has each consumer re-apply a stream, and its inbox skips what it has."""

import asyncio
import json
import os
import subprocess
import sys
from uuid import uuid4

import httpx

from iopnet.natsd import RESTRICTED_USERS
from iopnet.network import LocalNetwork
from iopnet.testing import LineReader, eventually
from shared.contracts import new_envelope
from shared.contracts.events import PatientContactChanged
from shared.messaging.connection import connect_once
from tests.conftest import auth, dead_letters

SITE = "columbus-east"
PHONE = "+13805550142"


def cli_env(network: LocalNetwork) -> dict[str, str]:
    """A shell in the repo while `iopnet run` runs: no IOPNET_NATS_URL, the ops password
    is read from the data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOPNET_")}
    env["IOPNET_DATA_DIR"] = str(network.settings.data_dir)
    env["IOPNET_EMBEDDED_NATS_PORT"] = str(network.settings.embedded_nats_port)
    return env


def iopnet(network: LocalNetwork, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iopnet.cli", *args], env=cli_env(network), capture_output=True, text=True, timeout=120
    )


async def publish_contact_change(network: LocalNetwork, data: dict[str, object]) -> None:
    """As intake's relay does, on intake's restricted user."""
    assert network.nats is not None
    envelope = new_envelope(
        PatientContactChanged(
            patient_id=uuid4(), phone=PHONE, email="p@example.org", preferred_channel="sms", language="en"
        ),
        site_id=SITE,
    )
    body = envelope.model_dump(mode="json") | {"data": data} if data else envelope.model_dump(mode="json")
    nc = await connect_once(network.nats.user_url(RESTRICTED_USERS["intake"]))
    try:
        await nc.jetstream().publish(envelope.subject, json.dumps(body).encode())
    finally:
        await nc.close()


def start_tail(network: LocalNetwork) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "iopnet.cli", "events", "tail", "--count", "1"],
        env=cli_env(network),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def test_tail_sees_public_events_and_is_refused_the_contact_details(network: LocalNetwork) -> None:
    tail = start_tail(network)
    output = LineReader(tail.stdout)
    try:
        sites = iter(range(1000))

        async def registered() -> bool:
            # A new site each round, until the tail (started in parallel) has subscribed,
            # printed one and stopped.
            site = {"site_id": f"site-{next(sites)}", "name": "Columbus East", "timezone": "America/New_York"}
            async with httpx.AsyncClient(timeout=5) as http:
                await http.post(f"{network.url('intake')}/sites", json=site, headers=auth("network_admin"))
            return tail.poll() is not None

        await eventually(registered, timeout=30, what="the tail to print an event and stop")
    finally:
        if tail.poll() is None:
            tail.kill()
    assert tail.wait(timeout=10) == 0
    assert '"event_type": "SiteRegistered"' in output.text()

    refused = iopnet(network, "events", "tail", "--subject", "iop.restricted.>", "--count", "1")
    assert refused.returncode == 1
    assert "may not read" in refused.stderr


async def test_a_restricted_dead_letter_is_retried_by_notifications_from_its_own_account(
    network: LocalNetwork,
) -> None:
    # A contact change notifications cannot parse: dead-lettered at once, payload withheld.
    await publish_contact_change(network, {"patient_id": "not-a-uuid", "phone": PHONE})

    async def dead_lettered() -> list[object]:
        return await dead_letters(network.nats_url)

    [(subject, headers, payload)] = await eventually(dead_lettered, timeout=30, what="the dead letter")
    assert subject.startswith("iop.dlq.notifications.patient_contact_changed.")
    assert payload == b"" and headers["Iop-Payload-Withheld"] == "restricted"

    listed = iopnet(network, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    [letter] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (letter["consumer"], letter["original_stream"]) == ("notifications-IOP_RESTRICTED", "IOP_RESTRICTED")
    assert PHONE not in listed.stdout

    # ops publishes nothing: notifications re-reads the original from IOP_RESTRICTED, and
    # it is still invalid, which the retry says in fixed words.
    retried = iopnet(network, "dlq", "retry", str(letter["sequence"]))
    assert retried.returncode == 1
    assert "notifications: invalid event: " in retried.stderr
    assert PHONE not in retried.stderr + retried.stdout


async def test_replay_has_each_consumer_skip_what_it_already_applied(network: LocalNetwork) -> None:
    site = {"site_id": SITE, "name": "Columbus East", "timezone": "America/New_York"}
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.post(f"{network.url('intake')}/sites", json=site, headers=auth("network_admin"))).is_success

    async def both_applied() -> bool:
        replayed = iopnet(network, "events", "replay", "IOP_INTAKE")
        summaries = [json.loads(line) for line in replayed.stdout.splitlines()]
        return replayed.returncode == 0 and all(s["duplicates"] == 1 for s in summaries) and len(summaries) == 2

    # Until both consumers applied SiteRegistered live, a replay applies it itself; after
    # that every replay finds it applied.
    await eventually(both_applied, timeout=30, what="a replay that finds everything applied")
    replayed = await asyncio.to_thread(iopnet, network, "events", "replay", "IOP_INTAKE", "--service", "scheduling")
    [summary] = [json.loads(line) for line in replayed.stdout.splitlines()]
    assert summary == {"service": "scheduling", "applied": 0, "duplicates": 1, "not_handled": 0, "failed": []}
    assert "scheduling: IOP_INTAKE up to 1 of 1" in replayed.stderr
