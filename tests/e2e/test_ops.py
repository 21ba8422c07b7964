"""The operator's commands against a running network whose broker has its real accounts
and allow-lists: `events tail` sees public events and is refused the contact details;
`dlq retry` has notifications re-read a restricted original from its own account;
`events replay --consumer` has a service re-drive its durable, and its inbox skips what it has."""

import asyncio
import json
import os
import subprocess
import sys
from uuid import uuid4

import httpx
import nats.js.errors

from iopnet.natsd import PERMISSIONS, RESTRICTED_USERS
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
    assert tail.wait(timeout=10) == 0, output.text()
    # --count 1: exactly one line, though several sites were registered meanwhile.
    [line] = output.text().splitlines()
    assert json.loads(line)["envelope"]["event_type"] == "SiteRegistered"

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


async def test_replay_re_drives_a_durable_and_a_dry_run_changes_nothing(network: LocalNetwork) -> None:
    """`events replay --consumer`: as `ops`, which asks scheduling; scheduling resets its
    own durable (with the permission iopnet/natsd.py gives it) and its inbox skips what
    it has. The stream keeps its count."""
    site = {"site_id": SITE, "name": "Columbus East", "timezone": "America/New_York"}
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.post(f"{network.url('intake')}/sites", json=site, headers=auth("network_admin"))).is_success

    async def applied() -> bool:
        state = await consumer_info(network, "IOP_INTAKE", "scheduling-IOP_INTAKE")
        return state is not None and state[1] >= 1

    await eventually(applied, timeout=30, what="scheduling to apply SiteRegistered")
    before = await consumer_info(network, "IOP_INTAKE", "scheduling-IOP_INTAKE")

    dry = await asyncio.to_thread(
        iopnet, network, "events", "replay", "--consumer", "scheduling-IOP_INTAKE", "--since", "1h", "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert "dry run: would reset scheduling-IOP_INTAKE on IOP_INTAKE" in dry.stdout
    assert "to sequence 1, re-driving 1 of the messages" in dry.stdout and "Nothing was changed." in dry.stdout
    assert await consumer_info(network, "IOP_INTAKE", "scheduling-IOP_INTAKE") == before

    replayed = await asyncio.to_thread(
        iopnet, network, "events", "replay", "--consumer", "scheduling-IOP_INTAKE", "--from-seq", "1"
    )
    if "$JS.API.CONSUMER.RESET.IOP_INTAKE.scheduling-IOP_INTAKE" in PERMISSIONS["scheduling"].publish:
        assert replayed.returncode == 0, replayed.stderr
        summary = json.loads(replayed.stdout.splitlines()[-1])
        assert (summary["redriven"], summary["applied"], summary["duplicates"]) == (1, 0, 1)
        assert "re-driving scheduling-IOP_INTAKE" in replayed.stderr  # the progress bar
    else:
        # Until natsd.py lets scheduling reset its durable: a clear refusal, nothing changed.
        assert replayed.returncode == 1
        assert "needs permission to publish it" in replayed.stderr and "Traceback" not in replayed.stderr
        assert await consumer_info(network, "IOP_INTAKE", "scheduling-IOP_INTAKE") == before
    assert (await stream_state(network, "IOP_INTAKE")).messages == 1

    integration = await asyncio.to_thread(
        iopnet, network, "events", "replay", "--consumer", "ehr-IOP_INTAKE-columbus-east", "--from-seq", "1"
    )
    assert integration.returncode == 2
    assert "$JS.API.CONSUMER.RESET.IOP_INTAKE.ehr-IOP_INTAKE-columbus-east" in integration.stderr
    both = await asyncio.to_thread(iopnet, network, "events", "replay", "--consumer", "scheduling-IOP_INTAKE")
    assert both.returncode == 2 and "exactly one of --since and --from-seq" in both.stderr


async def consumer_info(network: LocalNetwork, stream: str, durable: str) -> tuple[int, int, int, int] | None:
    """(delivered, ack floor, pending, unacked) as `ops` reads them."""
    nc = await connect_once(network.nats_url)
    try:
        info = await nc.jetstream().consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        return None
    finally:
        await nc.close()
    return (info.delivered.stream_seq, info.ack_floor.stream_seq, info.num_pending, info.num_ack_pending)


async def stream_state(network: LocalNetwork, stream: str):
    nc = await connect_once(network.nats_url)
    try:
        return (await nc.jetstream().stream_info(stream)).state
    finally:
        await nc.close()
