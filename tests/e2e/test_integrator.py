"""Issue 11, "Done means": an integrator follows docs/events.md against a real network (a
nats-server and the three services as processes) with the code in examples/, run as
subprocesses as an integrator would run them.

- basis qsoa: an integration for site-a added with the CLI; examples/subscriber.py gets
  every event of site-a once, across a kill -9 and restart of the subscriber (events
  published while it was down included), and none of site-b;
- webhooks: examples/webhook_receiver.py accepts a delivery from notifications and refuses
  a tampered, stale or unsigned request with 401;
- basis consent: the subscriber on the integration's feed gets nothing about a patient
  until the patient's ConsentGranted (which it gets, then the patient's next check-in),
  and those are the entries of the patient's accounting of disclosures."""

import hashlib
import hmac
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from iopnet.network import LocalNetwork
from iopnet.testing import BusRecorder, eventually
from shared.messaging.connection import connect_once
from tests.conftest import auth, token
from tests.e2e.test_integrations import iopnet

REPO = Path(__file__).resolve().parents[2]
SITES = ("site-a", "site-b")
SECRET = "whsec-" + "k" * 26


@pytest.fixture(autouse=True)
def live_webhooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The services inherit this: webhooks really sent, to a receiver on loopback over
    http (development only); patients here have no contact channel, so nothing else goes out."""
    monkeypatch.setenv("IOPNET_NOTIFY_LIVE_CHANNELS", "true")
    monkeypatch.setenv("IOPNET_NOTIFY_ALLOW_INSECURE_TARGETS", "true")


class Example:
    """One of examples/*.py as a subprocess, its output in a file."""

    def __init__(self, script: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "examples" / script), *args],
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    async def printed(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        async def found() -> re.Match[str] | None:
            assert self.process.poll() is None, f"exited {self.process.returncode}:\n{self.log.read_text()}"
            return next((m for line in self.lines() if (m := re.search(pattern, line))), None)

        return await eventually(found, timeout=timeout, what=f"{pattern!r} in {self.log.name}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=30)


@pytest.fixture
def examples() -> Iterator[list[Example]]:
    started: list[Example] = []
    yield started
    for example in started:
        example.stop(signal.SIGKILL)


def subscriber(
    examples: list[Example], network: LocalNetwork, tmp_path: Path, password: str, *args: str, run: int
) -> Example:
    assert network.nats is not None
    example = Example(
        "subscriber.py",
        ["--url", network.nats.url, "--store", str(tmp_path / "store.sqlite3"), "--ack-wait", "2", *args],
        {"NATS_PASSWORD": password},
        tmp_path / f"subscriber-{run}.log",
    )
    examples.append(example)
    return example


async def feed_lane_done(network: LocalNetwork) -> bool:
    """Intake's feed lane on IOP_INTAKE has nothing left to read or to acknowledge."""
    nc = await connect_once(network.nats_url)  # as `ops`, replies on its own inbox prefix
    try:
        info = await nc.jetstream().consumer_info("IOP_INTAKE", "intake-IOP_INTAKE-feed")
    finally:
        await nc.close()
    return not info.num_pending and not info.num_ack_pending


def stored(tmp_path: Path) -> list[dict[str, Any]]:
    """What the subscriber has processed: its SQLite store, as an integrator would query it."""
    with sqlite3.connect(tmp_path / "store.sqlite3", timeout=10) as db:
        rows = db.execute("SELECT subject, body FROM events").fetchall()
    return [json.loads(body) | {"_subject": subject} for subject, body in rows]


def added(network: LocalNetwork, *args: str) -> str:
    """`iopnet integrations add ...`; returns the NATS password it printed once."""
    result = iopnet(network, "integrations", "add", *args)
    assert result.returncode == 0, result.stderr
    password = re.search(r"NATS password: (\S+)", result.stdout)
    assert password is not None, result.stdout
    return password.group(1)


async def register_sites(http: httpx.AsyncClient, network: LocalNetwork) -> None:
    for site in SITES:
        body = {"site_id": site, "name": site, "timezone": "America/New_York"}
        response = await http.post(f"{network.url('intake')}/sites", json=body, headers=auth("network_admin"))
        assert response.status_code == 201, response.text


async def publish_program(http: httpx.AsyncClient, network: LocalNetwork, site: str) -> str:
    block = {"weekday": 3, "start": "09:00", "minutes": 60, "kind": "group_therapy", "title": "Group"}
    body = {"site_id": site, "name": "Adult IOP", "track": "morning", "cohort": "adult", "blocks": [block]}

    async def published() -> httpx.Response | None:
        response = await http.post(
            f"{network.url('scheduling')}/programs", json=body, headers=auth("site_admin", [site])
        )
        return response if response.status_code == 201 else None

    return str((await eventually(published, timeout=30, what=f"scheduling to know {site}")).json()["program_id"])


async def enrolled(http: httpx.AsyncClient, network: LocalNetwork, site: str, program_id: str, n: int) -> str:
    intake, desk = network.url("intake"), auth("front_desk", [site])
    patient = {"site_id": site, "given_name": "Test", "family_name": f"Person-{site}-{n}", "birth_date": "1980-01-01"}
    created = await http.post(f"{intake}/patients", json=patient, headers=desk)
    assert created.status_code == 201, created.text
    patient_id = str(created.json()["patient_id"])
    body = {"program_id": program_id, "level_of_care": "2.1", "cohort": "adult",
            "start_date": str(date.today()), "referral_source": "self"}  # fmt: skip

    async def enrollment() -> httpx.Response | None:
        response = await http.post(f"{intake}/patients/{patient_id}/enrollments", json=body, headers=desk)
        return response if response.status_code == 201 else None

    await eventually(enrollment, timeout=30, what="intake to know the program")
    return patient_id


async def check_in(
    http: httpx.AsyncClient, network: LocalNetwork, site: str, patient_id: str, concern: bool = False
) -> str:
    """A check-in; with a safety concern, notifications raises a CareTeamAlerted."""
    body = {"mood": 6, "craving": 2, "used_since_last": False, "safety_concern": concern, "sleep_hours": 7}
    response = await http.post(
        f"{network.url('intake')}/patients/{patient_id}/check-ins", json=body, headers=auth("front_desk", [site])
    )
    assert response.status_code == 201, response.text
    return str(response.json()["check_in_id"])


async def placed(bus: BusRecorder, patient_id: str) -> None:
    """Scheduling has applied the patient's enrollment: its bookings (or waitlist places)
    are on the bus. An event about the patient that occurs after their consent is the
    consent's to feed, so what is to come before a consent must have happened first; on a
    slow machine scheduling (routine work) may apply an enrollment seconds later."""
    placement = re.compile(r"^iop\.scheduling\.(patient_booked|patient_waitlisted)\.")

    async def seen() -> bool:
        return any(
            placement.match(m.subject) and json.loads(m.data)["data"].get("patient_id") == patient_id
            for m in bus.messages
        )

    await eventually(seen, timeout=60, what="scheduling to place the enrollment")


def site_a_events(bus: BusRecorder) -> set[str]:
    """Ground truth: the event ids of site-a on the public streams, as published."""
    public = re.compile(r"^iop\.(intake|scheduling|notifications)\.[a-z_]+\.site-a$")
    return {json.loads(m.data)["event_id"] for m in bus.messages if public.match(m.subject)}


async def test_a_qsoa_integration_gets_its_sites_events_once_across_a_restart_and_webhooks_are_signed(
    network: LocalNetwork, tmp_path: Path, examples: list[Example]
) -> None:
    bus = await BusRecorder(network.nats_url, network.observed_subjects).start()
    async with httpx.AsyncClient(timeout=30) as http:
        await register_sites(http, network)
        password = added(network, "acme-ehr", "--site", "site-a", "--basis", "qsoa")
        first = subscriber(examples, network, tmp_path, password, "--integration", "acme-ehr", "--site", "site-a",
                           "--basis", "qsoa", run=1)  # fmt: skip
        await first.printed(r"^ready: acme-ehr-IOP_INTAKE-site-a, acme-ehr-IOP_SCHEDULING-site-a")
        programs = {site: await publish_program(http, network, site) for site in SITES}
        patients = {site: await enrolled(http, network, site, programs[site], 1) for site in SITES}
        for site in SITES:
            await check_in(http, network, site, patients[site], concern=True)

        # Killed mid-way (kill -9: nothing flushed, what was not acked comes again).
        await first.printed(r"^processed \S+ PatientEnrolled$")
        first.stop(signal.SIGKILL)
        # Published while the subscriber is down: it must get these when it is back.
        late = {site: await enrolled(http, network, site, programs[site], 2) for site in SITES}
        late_check_in = await check_in(http, network, "site-a", late["site-a"])
        await check_in(http, network, "site-b", late["site-b"])

        second = subscriber(examples, network, tmp_path, password, "--integration", "acme-ehr", "--site", "site-a",
                            "--basis", "qsoa", run=2)  # fmt: skip
        await second.printed(r"^ready: ")

        async def all_of_site_a() -> bool:
            assert second.process.poll() is None, f"the subscriber exited:\n{second.log.read_text()}"
            have = {e["event_id"] for e in stored(tmp_path)}
            expected = site_a_events(bus)
            return have == expected and any(e["data"].get("check_in_id") == late_check_in for e in stored(tmp_path))

        await eventually(all_of_site_a, timeout=60, what="every event of site-a in the subscriber's store")
        events = stored(tmp_path)
        assert {e["site_id"] for e in events} == {"site-a"}  # never site-b's
        site_b = [m for m in bus.messages if m.subject.endswith(".site-b") and not m.subject.startswith("iop.dlq.")]
        assert {json.loads(m.data)["event_type"] for m in site_b} >= {"PatientEnrolled", "CheckInSubmitted"}
        assert {e["event_type"] for e in events} >= {
            "ProgramPublished", "SessionScheduled", "PatientEnrolled", "CheckInSubmitted", "CareTeamAlerted",
        }  # fmt: skip
        # Processed once each, across both runs: a redelivered event is a "duplicate". The
        # kill -9 may land between the subscriber's commit and its "processed" line: that one
        # event is stored without the line, and the second run reports it as a duplicate.
        processed = [line.split()[1] for run in (first, second) for line in run.lines() if line.startswith("processed")]
        redelivered = {line.split()[1] for line in second.lines() if line.startswith("duplicate")}
        assert len(processed) == len(set(processed))  # never processed twice
        stored_ids = {e["event_id"] for e in events}
        assert len(stored_ids) == len(events) and set(processed) <= stored_ids
        unprinted = stored_ids - set(processed)
        assert len(unprinted) <= 1 and unprinted <= redelivered, (unprinted, redelivered)
        assert all(e["_subject"] == f"iop.{e['producer']}.{_snake(e['event_type'])}.site-a" for e in events)

        await webhooks_are_verified(http, network, examples, tmp_path, patients["site-a"], bus)
        second.stop()
    await bus.stop()


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


async def webhooks_are_verified(
    http: httpx.AsyncClient,
    network: LocalNetwork,
    examples: list[Example],
    tmp_path: Path,
    patient_id: str,
    bus: BusRecorder,
) -> None:
    receiver = Example("webhook_receiver.py", ["--port", "0"], {"WEBHOOK_SECRET": SECRET}, tmp_path / "receiver.log")
    examples.append(receiver)
    url = (await receiver.printed(r"^listening on (http://127\.0\.0\.1:\d+)$")).group(1)

    integration = {"Authorization": f"Bearer {token('integration', ['site-a'], sub='acme-ehr')}"}
    hook = {"site_id": "site-a", "url": f"{url}/iopnet", "events": ["CheckInSubmitted"], "secret": SECRET}

    async def subscribed() -> httpx.Response | None:
        response = await http.post(f"{network.url('notifications')}/subscriptions", json=hook, headers=integration)
        assert response.status_code in (201, 403), response.text  # 403 until notifications knows acme-ehr
        return response if response.status_code == 201 else None

    subscription = (await eventually(subscribed, timeout=30, what="the webhook subscribed")).json()
    check_in_id = await check_in(http, network, "site-a", patient_id)
    [published] = await bus.wait_for(lambda m: json.loads(m.data)["data"].get("check_in_id") == check_in_id)
    event_id = json.loads(published.data)["event_id"]
    await receiver.printed(rf"^accepted {event_id} CheckInSubmitted site-a$")

    async def logged() -> dict[str, Any] | None:
        page = await http.get(
            f"{network.url('notifications')}/subscriptions/{subscription['subscription_id']}/deliveries",
            headers=integration,
        )
        assert page.status_code == 200, page.text
        return next((d for d in page.json()["items"] if d["event_id"] == event_id and d["status"] == "sent"), None)

    delivery = await eventually(logged, timeout=30, what="the delivery in the log")
    assert delivery["last_status_code"] == 204

    # The receiver refuses what iopnet did not sign, now.
    body = published.data
    now = str(int(time.time()))

    def signed(timestamp: str, content: bytes, secret: str = SECRET) -> dict[str, str]:
        signature = hmac.new(secret.encode(), timestamp.encode() + b"." + content, hashlib.sha256).hexdigest()
        return {"X-Iopnet-Timestamp": timestamp, "X-Iopnet-Signature": signature, "Content-Type": "application/json"}

    tampered = body.replace(b'"mood":6', b'"mood":1') if b'"mood":6' in body else body + b" "
    refused = {
        "tampered body": (tampered, signed(now, body)),
        "stale timestamp": (body, signed(str(int(time.time()) - 3600), body)),
        "another secret": (body, signed(now, body, "whsec-" + "x" * 26)),
        "unsigned": (body, {"Content-Type": "application/json"}),
    }
    for what, (content, headers) in refused.items():
        answer = await http.post(f"{url}/iopnet", content=content, headers=headers)
        assert answer.status_code == 401, what
    assert sum(line.startswith("rejected") for line in receiver.lines()) == len(refused)
    genuine = await http.post(f"{url}/iopnet", content=body, headers=signed(now, body))
    assert genuine.status_code == 204  # the same scheme as notifications' signer
    receiver.stop()


async def test_a_consent_integration_gets_a_patients_events_only_from_their_consent_and_they_are_accounted(
    network: LocalNetwork, tmp_path: Path, examples: list[Example]
) -> None:
    bus = await BusRecorder(network.nats_url, network.observed_subjects).start()
    async with httpx.AsyncClient(timeout=30) as http:
        await register_sites(http, network)
        password = added(network, "research-x", "--site", "site-a", "--basis", "consent", "--purpose", "research")
        feed = subscriber(examples, network, tmp_path, password, "--integration", "research-x", "--basis", "consent",
                          run=1)  # fmt: skip
        await feed.printed(r"^ready: research-x-IOP_FEED$")
        program = await publish_program(http, network, "site-a")
        patient = await enrolled(http, network, "site-a", program, 1)
        never = await enrolled(http, network, "site-a", program, 2)
        before = await check_in(http, network, "site-a", patient)
        await check_in(http, network, "site-a", never)
        await feed.printed(r"^processed \S+ ProgramPublished$")  # context comes through
        for someone in (patient, never):
            await placed(bus, someone)  # their bookings occurred before the consent

        grant = {"recipient": "org:research-x", "purpose": "research", "information": "Check-ins",
                 "expires_on": "2099-01-01", "signed_at": datetime.now(UTC).isoformat()}  # fmt: skip
        granted = await http.post(
            f"{network.url('intake')}/patients/{patient}/consents", json=grant, headers=auth("front_desk", ["site-a"])
        )
        assert granted.status_code == 201, granted.text
        after = await check_in(http, network, "site-a", patient)

        async def fed_and_decided() -> bool:
            # Both of the patient's events in the feed, and intake's feed lane done with every
            # IOP_INTAKE event (so the check-in before the consent was decided too). Not by
            # their order: intake's relay publishes check-ins first (safety), so the later
            # check-in may be on the bus, and in the feed, before the ConsentGranted.
            events = stored(tmp_path)
            fed = any(e["data"].get("check_in_id") == after for e in events) and any(
                e["event_type"] == "ConsentGranted" and e["data"].get("patient_id") == patient for e in events
            )
            return fed and await feed_lane_done(network)

        await eventually(fed_and_decided, timeout=60, what="the patient's events in the feed, every event decided")
        events = stored(tmp_path)
        about = [e for e in events if e["data"].get("patient_id") == patient]
        assert sorted(e["event_type"] for e in about) == ["CheckInSubmitted", "ConsentGranted"]
        assert not [e for e in events if e["data"].get("patient_id") == never]
        assert not [e for e in events if e["data"].get("check_in_id") == before]
        assert {e["site_id"] for e in events} == {"site-a"}
        assert all(e["_subject"].startswith("iop.feed.research-x.") for e in events)
        # The envelope is the one published: same event_id, same body.
        originals = {json.loads(m.data)["event_id"]: json.loads(m.data) for m in bus.messages}
        for event in about:
            assert {k: v for k, v in event.items() if k != "_subject"} == originals[event["event_id"]]

        ledger = await http.get(
            f"{network.url('intake')}/patients/{patient}/disclosures", headers=auth("patient", [], patient)
        )
        assert ledger.status_code == 200, ledger.text
        entries = ledger.json()["disclosures"]
        assert {e["event_id"] for e in entries} == {e["event_id"] for e in about}
        assert {(e["recipient"], e["purpose"], e["channel"]) for e in entries} == {
            ("org:research-x", "research", "feed")
        }
        nothing = await http.get(
            f"{network.url('intake')}/patients/{never}/disclosures", headers=auth("site_admin", ["site-a"])
        )
        assert nothing.json() == {"disclosures": [], "next_offset": None}
        feed.stop()
    await bus.stop()
