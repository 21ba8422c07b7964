"""The crash guard: a mixed load through the three service processes while each of them
and nats-server is killed (kill -9) and stopped (SIGTERM) mid-load and restarted.

The load: two sites (each with a program and an on-call roster), patients created with
an email address and a consent, enrolled; every other one discharged right after the
enrollment, the others check in, one in three urgently (a care-team alert by email).
Notifications runs with live channels against a real SMTP server in the test process.

Then every effect is checked, all at once, with the figures printed (run with -s):
- lost 0: every write the HTTP API accepted is an event on its stream, and every event
  a service consumes is in that service's inbox; each patient's enrollment is known to
  scheduling and notifications, each active patient got one welcome, each urgent
  check-in one alert mailed to the on-call clinician;
- duplicates 0: no event_id twice in a stream, no notification delivered twice at the
  channel (counted per notification id in the Message-ID), one alert per check-in;
- discharged-but-active 0: scheduling's `GET /enrollments/{id}` says discharged and no
  booking is left; notifications holds the episode ended, nothing pending for it, and no
  welcome or reminder planned after the discharge was applied;
- applied out of order 0: each durable applied its stream's events in stream order
  (the inbox times against the stream sequences) — the cause of the last point.
The figures also give the redeliveries (per durable) and the slowest /readyz answer.

Every wait is a condition with a deadline; the load is paced by the fault schedule (a
chunk of patients per fault), not by the clock.
"""

import asyncio
import itertools
import json
import re
import signal
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats.js.errors
import pytest
from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncEngine

from iopnet.natsd import RESTRICTED_USERS
from iopnet.network import LocalNetwork
from iopnet.testing import eventually
from services.intake import store as intake_store
from services.notifications import store as notifications_store
from services.scheduling import store as scheduling_store
from shared.db import create_engine
from shared.messaging.connection import connect_once
from shared.settings import SERVICES, ServiceName
from tests.conftest import SmtpSink, auth, fresh_service_databases, network_settings

SITES = ("crash-north", "crash-south")
PATIENTS = 64
# A short lease, kept alive by the consumer's in_progress() heartbeats: a crashed
# consumer's messages come back within seconds (shared/messaging/consumer.py).
ACK_WAIT_SECONDS = 10
# A claimed send is retried after 3 x this + 5 s: short enough that a send cut off by a
# stop and resent would show up as a duplicate within the test.
SEND_TIMEOUT_SECONDS = 2
NOTIFICATION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(?=@iopnet\.invalid>)")
# The streams each service consumes, and the NATS user it reads them as.
# (service, stream, durable) -> the NATS user that reads it. notifications reads
# IOP_INTAKE in two lanes: the routine one and the safety lane (check-ins).
CONSUMED = {
    ("scheduling", "IOP_INTAKE", "scheduling-IOP_INTAKE"): "scheduling",
    ("intake", "IOP_SCHEDULING", "intake-IOP_SCHEDULING"): "intake",
    ("notifications", "IOP_INTAKE", "notifications-IOP_INTAKE"): "notifications",
    ("notifications", "IOP_INTAKE", "notifications-IOP_INTAKE-safety"): "notifications",
    ("notifications", "IOP_SCHEDULING", "notifications-IOP_SCHEDULING"): "notifications",
    ("notifications", "IOP_RESTRICTED", "notifications-IOP_RESTRICTED"): RESTRICTED_USERS["notifications"],
}
STORES = {"intake": intake_store, "scheduling": scheduling_store, "notifications": notifications_store}
FAULTS: tuple[tuple[str, str], ...] = (
    ("scheduling", "term"),
    ("notifications", "kill"),
    ("intake", "kill"),
    ("nats", "term"),
    ("scheduling", "kill"),
    ("notifications", "term"),
    ("intake", "term"),
    ("nats", "kill"),
)


@pytest.fixture(autouse=True)
def live_notifications(monkeypatch: pytest.MonkeyPatch, smtp_sink: SmtpSink) -> None:
    """The service processes inherit the environment: live email to the test's SMTP
    server, no quiet or business hours, no escalation within the test."""
    env = {
        "IOPNET_NOTIFY_LIVE_CHANNELS": "true",
        "IOPNET_SMTP_HOST": "127.0.0.1",
        "IOPNET_SMTP_PORT": str(smtp_sink.port),
        "IOPNET_SMTP_FROM": "iopnet <no-reply@iopnet.test>",
        "IOPNET_NOTIFY_QUIET_START": "00:00",
        "IOPNET_NOTIFY_QUIET_END": "00:00",
        "IOPNET_NOTIFY_BUSINESS_START": "00:00",
        "IOPNET_NOTIFY_BUSINESS_END": "00:00",
        "IOPNET_NOTIFY_BUSINESS_DAYS": "[1,2,3,4,5,6,7]",
        "IOPNET_NOTIFY_ESCALATION_MINUTES": "600",
        "IOPNET_NOTIFY_RETRY_BASE_SECONDS": "0.2",
        "IOPNET_NOTIFY_SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT_SECONDS),
        "IOPNET_NOTIFY_ALLOW_INSECURE_TARGETS": "false",
        "IOPNET_ACK_WAIT_SECONDS": str(ACK_WAIT_SECONDS),
        "IOPNET_LOG_LEVEL": "WARNING",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def service_databases(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, str]]:
    """The three services' database URLs as settings: their SQLite files in the data dir,
    or three fresh databases on the test PostgreSQL."""
    if request.param == "sqlite":
        yield {}
        return
    async with fresh_service_databases() as urls:
        yield urls


@pytest.fixture
def network(tmp_path: Path, service_databases: dict[str, str]) -> Iterator[LocalNetwork]:
    settings = network_settings(tmp_path, log_level="WARNING", **service_databases)
    network = LocalNetwork(settings, log_dir=tmp_path)
    try:
        network.start()
        yield network
    finally:
        network.stop()


def recovery_log(network: LocalNetwork) -> list[str]:
    """What the consumers logged while gathering back unacknowledged messages after a fault:
    beside a rare event applied out of stream order (twice in CI, 11 s late both times), it
    says whether a recovery gave up waiting (`Consumer._gather`)."""
    assert network.log_dir is not None
    found: list[str] = []
    for log in sorted(network.log_dir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "unacknowledged messages" in line:
                try:
                    r = json.loads(line)
                    found.append(f"{r['ts'][11:23]} {r['consumer']}: {r['msg']} ({r['count']})")
                except (ValueError, KeyError):
                    found.append(f"{log.stem}: {line.strip()[:300]}")
    return sorted(found)


# --- the load -------------------------------------------------------------------------------


@dataclass
class Patient:
    index: int
    site_id: str
    email: str
    patient_id: str | None = None
    consent_id: str | None = None
    enrollment_id: str | None = None
    discharged: bool = False
    check_in_id: str | None = None
    urgent: bool = False


@dataclass
class Ledger:
    """What the HTTP APIs accepted (2xx), and so what must have its effects."""

    sites: list[str] = field(default_factory=list)
    programs: dict[str, str] = field(default_factory=dict)
    patients: list[Patient] = field(default_factory=list)
    writes: int = 0
    retries: int = 0
    faults: list[tuple[str, str, float]] = field(default_factory=list)  # (target, how, when)


def letters(number: int) -> str:
    out = ""
    number += 26
    while number:
        number, digit = divmod(number, 26)
        out = "abcdefghijklmnopqrstuvwxyz"[digit] + out
    return out


class Load:
    def __init__(self, http: httpx.AsyncClient, network: LocalNetwork, ledger: Ledger) -> None:
        self.http = http
        self.network = network
        self.ledger = ledger
        self.allowed = 0  # patients the fault schedule has released so far
        self.released = asyncio.Condition()
        self.progress = asyncio.Condition()

    async def call(self, method: str, url: str, headers: dict[str, str], body: Any = None) -> httpx.Response:
        """One request, repeated while the service is down or restarting (no answer, or
        a 502-504); any other answer is final."""
        tries = 0

        async def once() -> httpx.Response | None:
            nonlocal tries
            tries += 1
            try:
                response = await self.http.request(method, url, json=body, headers=headers)
            except httpx.TransportError:
                return None
            return None if response.status_code in (502, 503, 504) else response

        response = await eventually(once, timeout=90, interval=0.1, what=f"{method} {url} answered")
        assert response is not None
        self.ledger.retries += tries - 1
        return response

    async def accepted(self, response: httpx.Response, *expected: int) -> dict[str, Any]:
        assert response.status_code in expected, (response.status_code, response.text)
        self.ledger.writes += 1
        async with self.progress:
            self.progress.notify_all()
        return dict(response.json())

    async def patient(self, patient: Patient) -> None:
        intake = self.network.url("intake")
        desk = auth("front_desk", [patient.site_id])
        attempt = 0
        while patient.patient_id is None:
            # A kill -9 during the request leaves its outcome unknown: the retry is a new
            # name (so it is not held as a possible duplicate); only an answered 201 counts.
            body = {
                "site_id": patient.site_id,
                "given_name": f"Crash{letters(patient.index)}",
                "family_name": f"Load{letters(attempt)}",
                "birth_date": str(date(1970, 1, 1) + timedelta(days=patient.index * 97 + attempt)),
                "email": patient.email,
                "preferred_channel": "email",
                "language": "en",
            }
            attempt += 1
            try:
                response = await self.http.post(f"{intake}/patients", json=body, headers=desk)
            except httpx.TransportError:
                self.ledger.retries += 1
                await self.call("GET", f"{intake}/healthz", {})  # wait for intake to answer again
                continue
            if response.status_code in (502, 503, 504):
                continue
            patient.patient_id = str((await self.accepted(response, 201))["patient_id"])
        me = auth("patient", [], patient.patient_id)
        consent = {
            "recipient": "org:iopnet-notifications",
            "purpose": "appointment_reminders",
            "information": "Appointment times",
            "expires_on": str(date.today() + timedelta(days=90)),
            "signed_at": datetime.now(UTC).isoformat(),
        }
        granted = await self.call("POST", f"{intake}/patients/{patient.patient_id}/consents", me, consent)
        patient.consent_id = str((await self.accepted(granted, 201))["consent_id"])
        enrollment = {"program_id": self.ledger.programs[patient.site_id], "level_of_care": "2.1",
                      "cohort": "adult", "start_date": str(date.today()), "referral_source": "self"}  # fmt: skip
        enrolled = await self.call("POST", f"{intake}/patients/{patient.patient_id}/enrollments", desk, enrollment)
        if enrolled.status_code == 409:  # the first try was committed before a kill -9
            record = await self.call("GET", f"{intake}/patients/{patient.patient_id}", desk)
            [episode] = record.json()["enrollments"]
            patient.enrollment_id = str(episode["enrollment_id"])
            await self.accepted(record, 200)
        else:
            patient.enrollment_id = str((await self.accepted(enrolled, 201))["enrollment_id"])
        if patient.index % 2 == 0:
            discharge = {"reason": "completed", "discharged_on": str(date.today())}
            url = f"{intake}/enrollments/{patient.enrollment_id}/discharge"
            ended = await self.call("POST", url, auth("clinician", [patient.site_id]), discharge)
            if ended.status_code == 409:  # committed before a kill -9: it says so now
                check = await self.call("GET", f"{intake}/enrollments/{patient.enrollment_id}", desk)
                assert check.json()["status"] == "discharged", check.text
            await self.accepted(ended, 200, 409)
            patient.discharged = True
            return
        patient.urgent = patient.index % 6 == 1
        check_in = (
            {"mood": 2, "craving": 9, "used_since_last": True, "safety_concern": True}
            if patient.urgent
            else {"mood": 7, "craving": 1, "used_since_last": False, "safety_concern": False}
        )
        headers = {**me, "Idempotency-Key": f"crash-load-{patient.index}"}  # a retry is the same check-in
        submitted = await self.call("POST", f"{intake}/patients/{patient.patient_id}/check-ins", headers, check_in)
        answer = await self.accepted(submitted, 201)
        patient.check_in_id = str(answer["check_in_id"])
        assert (answer["risk"] == "urgent") == patient.urgent, answer

    async def worker(self, queue: asyncio.Queue[Patient]) -> None:
        while True:
            patient = await queue.get()
            async with self.released:
                await self.released.wait_for(self._allows(patient.index))
            try:
                await self.patient(patient)
            finally:
                queue.task_done()

    def _allows(self, index: int) -> Callable[[], bool]:
        return lambda: index < self.allowed

    async def release(self, count: int) -> None:
        async with self.released:
            self.allowed += count
            self.released.notify_all()

    async def writes_reach(self, count: int) -> None:
        async with self.progress:
            await asyncio.wait_for(self.progress.wait_for(lambda: self.ledger.writes >= count), timeout=90)


async def set_up_sites(http: httpx.AsyncClient, network: LocalNetwork, ledger: Ledger) -> None:
    for site_id in SITES:
        await set_up_site(http, network, ledger, site_id)


async def set_up_site(http: httpx.AsyncClient, network: LocalNetwork, ledger: Ledger, site_id: str) -> None:
    """The site at intake, its on-call roster at notifications, a program at scheduling
    that intake has heard of."""
    admin = auth("network_admin")
    site = {"site_id": site_id, "name": site_id.replace("-", " ").title(), "timezone": "America/New_York"}
    assert (await http.post(f"{network.url('intake')}/sites", json=site, headers=admin)).status_code == 201
    ledger.sites.append(site_id)
    roster = {"members": [{"name": "On Call", "role": "clinician", "channel": "email",
                           "address": f"oncall-{site_id}@clinic.test"}]}  # fmt: skip

    async def roster_set() -> bool:
        url = f"{network.url('notifications')}/sites/{site_id}/care-team"
        return (await http.put(url, json=roster, headers=admin)).status_code == 200

    await eventually(roster_set, timeout=30, what="notifications to learn the site")
    weekday = (date.today() + timedelta(days=2)).isoweekday()
    block = {"weekday": weekday, "start": "09:00", "minutes": 60, "kind": "group_therapy",
             "title": "Morning group", "capacity": 40}  # fmt: skip
    program = {"site_id": site_id, "name": "Adult IOP", "track": "morning", "cohort": "adult", "blocks": [block]}

    async def published() -> str | None:
        response = await http.post(
            f"{network.url('scheduling')}/programs", json=program, headers=auth("site_admin", [site_id])
        )
        return str(response.json()["program_id"]) if response.status_code == 201 else None

    program_id = await eventually(published, timeout=30, what="scheduling to learn the site")
    assert program_id is not None
    ledger.programs[site_id] = program_id

    async def known() -> bool:
        response = await http.get(f"{network.url('intake')}/programs", headers=auth("front_desk", [site_id]))
        return response.status_code == 200 and program_id in response.text

    await eventually(known, timeout=30, what="intake to learn the program")


# --- faults ----------------------------------------------------------------------------------


async def inflict(network: LocalNetwork, target: str, how: str, ledger: Ledger) -> None:
    """kill -9 or SIGTERM one process, then start it again (same ports, same data)."""
    ledger.faults.append((target, how, time.monotonic()))
    if target == "nats":
        await asyncio.to_thread(network.stop_nats, how == "kill")
        await asyncio.to_thread(network.start_nats)
        await asyncio.to_thread(network.wait_ready, 60)
        return
    name: ServiceName = target  # type: ignore[assignment]
    sig = signal.SIGKILL if how == "kill" else signal.SIGTERM
    # A graceful stop must end within the time LocalNetwork.stop gives it.
    code = await asyncio.to_thread(network.signal_service, name, sig, 20)
    assert code == -sig or (how == "term" and code == 0), (target, how, code)
    await asyncio.to_thread(network.restart_service, name)


@dataclass
class ReadyProbe:
    """Asks every service's /readyz over and over during the load: how long it takes to
    answer (any status) while the service works through its backlog."""

    network: LocalNetwork
    slowest: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SERVICES, 0.0))
    answered: int = 0

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=15) as http:
            while True:
                for name in SERVICES:
                    started = time.monotonic()
                    try:
                        await http.get(f"{self.network.url(name)}/readyz")
                    except httpx.TransportError:
                        continue  # down or restarting: nothing to time
                    self.answered += 1
                    self.slowest[name] = max(self.slowest[name], time.monotonic() - started)
                # A paced probe, not a synchronisation: it only measures.
                await asyncio.sleep(0.2)


# --- reading what happened -------------------------------------------------------------------


@dataclass
class Stored:
    seq: int
    subject: str
    envelope: dict[str, Any]

    @property
    def event_id(self) -> str:
        return str(self.envelope["event_id"])

    @property
    def event_type(self) -> str:
        return str(self.envelope["event_type"])

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.envelope["data"])


def user_url(network: LocalNetwork, user: str) -> str:
    assert network.nats is not None
    return network.nats.user_url(user)


async def read_stream(url: str, stream: str) -> list[Stored]:
    nc = await connect_once(url)
    try:
        js = nc.jetstream()
        state = (await js.stream_info(stream)).state
        stored = []
        for seq in range(state.first_seq, state.last_seq + 1):
            try:
                message = await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            stored.append(Stored(seq, message.subject or "", json.loads(message.data or b"{}")))
        return stored
    finally:
        await nc.close()


async def consumer_facts(url: str, stream: str, durable: str) -> tuple[list[str], int]:
    """The durable's filter subjects (what it consumes) and how many deliveries it has
    made in all, redeliveries included (kept in the consumer's state across restarts)."""
    nc = await connect_once(url)
    try:
        info = await nc.jetstream().consumer_info(stream, durable)
        config = info.config
        subjects = list(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))
        return subjects, int(info.delivered.consumer_seq if info.delivered else 0)
    finally:
        await nc.close()


async def stream_messages(url: str, stream: str) -> int:
    nc = await connect_once(url)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


def matches(pattern: str, subject: str) -> bool:
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(tokens) == len(wanted)


async def rows(engine: AsyncEngine, table: Table) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        return [dict(r) for r in (await connection.execute(select(table))).mappings()]


@dataclass
class Snapshot:
    streams: dict[str, list[Stored]]
    inboxes: dict[str, dict[str, dict[str, Any]]]  # service -> event_id -> inbox row
    outboxes: dict[str, list[dict[str, Any]]]
    filters: dict[tuple[str, str, str], list[str]]
    deliveries: dict[str, int]
    notifications: list[dict[str, Any]]
    notification_enrollments: dict[str, dict[str, Any]]
    alerts: list[dict[str, Any]]
    notifications_stream: int
    dead_letters: int


async def snapshot(network: LocalNetwork, engines: dict[str, AsyncEngine]) -> Snapshot:
    streams = {
        "IOP_INTAKE": await read_stream(user_url(network, "notifications"), "IOP_INTAKE"),
        "IOP_SCHEDULING": await read_stream(user_url(network, "notifications"), "IOP_SCHEDULING"),
        "IOP_RESTRICTED": await read_stream(user_url(network, RESTRICTED_USERS["notifications"]), "IOP_RESTRICTED"),
    }
    filters, deliveries = {}, {}
    for (service, stream, durable), user in CONSUMED.items():
        facts = await consumer_facts(user_url(network, user), stream, durable)
        filters[(service, stream, durable)], deliveries[durable] = facts
    inboxes: dict[str, dict[str, dict[str, Any]]] = {
        name: {r["event_id"]: r for r in await rows(engines[name], STORES[name].inbox.table)} for name in SERVICES
    }
    outboxes: dict[str, list[dict[str, Any]]] = {
        name: await rows(engines[name], STORES[name].outbox.table) for name in SERVICES
    }
    engine = engines["notifications"]
    return Snapshot(
        streams=streams,
        inboxes=inboxes,
        outboxes=outboxes,
        filters=filters,
        deliveries=deliveries,
        notifications=await rows(engine, notifications_store.notifications),
        notification_enrollments={r["enrollment_id"]: r for r in await rows(engine, notifications_store.enrollments)},
        alerts=await rows(engine, notifications_store.alerts),
        notifications_stream=await stream_messages(network.nats_url, "IOP_NOTIFICATIONS"),
        dead_letters=await stream_messages(network.nats_url, "IOP_DLQ"),
    )


def consumed(snap: Snapshot) -> dict[tuple[str, str, str], list[Stored]]:
    """Per (service, stream, durable): the stored events that durable consumes."""
    return {
        key: [s for s in snap.streams[key[1]] if any(matches(f, s.subject) for f in snap.filters[key])]
        for key in CONSUMED
    }


def notifications_at_rest(notifications: list[dict[str, Any]]) -> bool:
    """No message being sent or due: the dispatcher, which polls, has nothing to stage."""
    now = datetime.now(UTC)
    return not any(
        row["status"] == "sending" or (row["status"] == "pending" and row["due_at"] <= now) for row in notifications
    )


async def settled(network: LocalNetwork, engines: dict[str, AsyncEngine]) -> Snapshot | None:
    """Nothing left to do: every outbox row published, every consumed event in its
    consumer's inbox, no message due or being sent."""
    snap = await snapshot(network, engines)
    if any(r["sent_at"] is None for outbox in snap.outboxes.values() for r in outbox):
        return None
    for (service, _, _), events in consumed(snap).items():
        if any(e.event_id not in snap.inboxes[service] for e in events):
            return None
    if not notifications_at_rest(snap.notifications):
        return None
    # The outbox is read before IOP_NOTIFICATIONS is counted: a row staged and relayed in
    # between makes the two differ, which is the network still at work, not at rest (one
    # that stays apart is judged by the verdict).
    if snap.notifications_stream != len(snap.outboxes["notifications"]):
        return None
    return snap


# --- the verdict -----------------------------------------------------------------------------


async def verdict(
    http: httpx.AsyncClient, network: LocalNetwork, ledger: Ledger, snap: Snapshot, sink: SmtpSink
) -> dict[str, Any]:
    lost: Counter[str] = Counter()
    duplicates: Counter[str] = Counter()
    discharged_active: Counter[str] = Counter()
    by_type: dict[str, list[Stored]] = defaultdict(list)
    for stored_events in snap.streams.values():
        for stored in stored_events:
            by_type[stored.event_type].append(stored)

    def on_bus(event_type: str, field_name: str, value: str | None) -> Stored | None:
        found = [s for s in by_type[event_type] if str(s.data.get(field_name)) == value]
        if not found:
            lost[f"{event_type} not on the bus"] += 1
            return None
        return found[0]

    # 1. Accepted writes -> events on the bus.
    for site_id in ledger.sites:
        if not [s for s in by_type["SiteRegistered"] if s.envelope["site_id"] == site_id]:
            lost["SiteRegistered not on the bus"] += 1
    discharges: dict[str, Stored] = {}
    check_ins: dict[str, Stored] = {}
    for p in ledger.patients:
        on_bus("PatientContactChanged", "patient_id", p.patient_id)
        on_bus("ConsentGranted", "consent_id", p.consent_id)
        on_bus("PatientEnrolled", "enrollment_id", p.enrollment_id)
        if p.discharged and (found := on_bus("PatientDischarged", "enrollment_id", p.enrollment_id)):
            discharges[str(p.enrollment_id)] = found
        if p.check_in_id and (found := on_bus("CheckInSubmitted", "check_in_id", p.check_in_id)):
            check_ins[p.check_in_id] = found

    # 2. Events -> every consumer's inbox, in stream order.
    out_of_order: dict[str, int] = {}
    late_examples: list[str] = []
    redelivered: dict[str, int] = {}
    for (service, stream, durable), events in consumed(snap).items():
        redelivered[durable] = snap.deliveries[durable] - len(events)
        inbox = snap.inboxes[service]
        missing = [e for e in events if e.event_id not in inbox]
        if missing:
            lost[f"{service} never applied {stream}"] += len(missing)
        applied = sorted((inbox[e.event_id]["received_at"], e.seq, e.event_type) for e in events if e.event_id in inbox)
        late, highest = 0, (0, "", datetime.min.replace(tzinfo=UTC))
        for at, seq, event_type in applied:
            if seq < highest[0]:
                late += 1
                if len(late_examples) < 5:
                    late_examples.append(
                        f"{durable}: {event_type} #{seq} applied {(at - highest[2]).total_seconds():.1f}s"
                        f" after {highest[1]} #{highest[0]}, at {at:%H:%M:%S.%f}"
                    )
            else:
                highest = (seq, event_type, at)
        out_of_order[durable] = late

    # 3. Each event once on its stream; each outbox row once on IOP_NOTIFICATIONS.
    for name, stored_events in snap.streams.items():
        twice = sum(count - 1 for count in Counter(s.event_id for s in stored_events).values() if count > 1)
        if twice:
            duplicates[f"event twice on {name}"] += twice
    extra = snap.notifications_stream - len(snap.outboxes["notifications"])
    if extra:
        (duplicates if extra > 0 else lost)["IOP_NOTIFICATIONS vs its outbox"] += abs(extra)
    sent_events = Counter(
        json.loads(r["payload"])["data"]["notification_id"]
        for r in snap.outboxes["notifications"]
        if json.loads(r["payload"])["event_type"] == "NotificationSent"
    )
    duplicates["NotificationSent twice for one notification"] += sum(c - 1 for c in sent_events.values() if c > 1)
    booked = Counter(s.data["booking_id"] for s in by_type["PatientBooked"])
    duplicates["PatientBooked twice for one booking"] += sum(c - 1 for c in booked.values() if c > 1)

    # 4. At the channel: each notification delivered once. After a kill -9 between a send
    # and its record the dispatcher sends again (at least once: nothing can know whether
    # the first went out); that copy carries the same Message-ID, for the mail system to
    # drop, and is counted apart. Any other second copy is a duplicate.
    kills = [when for target, how, when in ledger.faults if target == "notifications" and how == "kill"]
    deliveries: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for mail in sink.mails:
        # The notification id: in X-Iopnet-Delivery, and inside the Message-ID.
        match = NOTIFICATION_ID.search(str(mail["headers"].get("Message-ID", "")))
        notification_id = mail["headers"].get("X-Iopnet-Delivery") or (match.group(0) if match else "unidentified")
        deliveries[str(notification_id)].append(mail)
    mailed = Counter({notification_id: len(copies) for notification_id, copies in deliveries.items()})
    resent_after_kill = 0
    for copies in deliveries.values():
        copies.sort(key=lambda m: m["received_at"])
        for earlier, later in itertools.pairwise(copies):
            same_id = earlier["headers"].get("Message-ID") == later["headers"].get("Message-ID")
            if same_id and any(earlier["received_at"] < k < later["received_at"] for k in kills):
                resent_after_kill += 1
            else:
                duplicates["mail delivered twice"] += 1
    rows_by_patient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in snap.notifications:
        rows_by_patient[str(row["patient_id"])].append(row)

    # 5. Lifecycle effects, patient by patient.
    for p in ledger.patients:
        staff = auth("clinician", [p.site_id])
        answer = await http.get(f"{network.url('scheduling')}/enrollments/{p.enrollment_id}", headers=staff)
        episode = snap.notification_enrollments.get(str(p.enrollment_id))
        if answer.status_code != 200:
            lost["enrollment unknown to scheduling"] += 1
        if episode is None:
            lost["enrollment unknown to notifications"] += 1
        bookings = await http.get(f"{network.url('scheduling')}/patients/{p.patient_id}/bookings", headers=staff)
        open_bookings = bookings.json() if bookings.status_code == 200 else []
        messages = [r for r in rows_by_patient[str(p.patient_id)] if r["recipient_kind"] == "patient"]
        welcomes = [r for r in messages if r["template"] == "welcome" and mailed[r["notification_id"]]]
        if not p.discharged:
            if answer.status_code == 200 and answer.json()["status"] != "active":
                lost["active patient not active at scheduling"] += 1
            if not open_bookings:
                lost["active patient without bookings"] += 1
            if episode is not None and episode["status"] != "active":
                lost["active patient not active at notifications"] += 1
            if len(welcomes) != 1:
                (lost if not welcomes else duplicates)["welcome mails per active patient"] += abs(len(welcomes) - 1)
            continue
        if answer.status_code == 200 and answer.json()["status"] != "discharged":
            discharged_active["scheduling says active"] += 1
        if open_bookings:
            discharged_active["scheduling holds bookings"] += 1
        if episode is not None and episode["status"] == "active":
            discharged_active["notifications says active"] += 1
        discharge = discharges.get(str(p.enrollment_id))
        discharge_applied = snap.inboxes["notifications"].get(discharge.event_id) if discharge else None
        for row in messages:
            if row["template"] != "welcome" and not row["template"].startswith("reminder"):
                continue
            if row["status"] in ("pending", "held", "sending"):
                discharged_active["message still planned"] += 1
            elif (
                row["status"] == "sent"
                and discharge_applied is not None
                and row["created_at"] > discharge_applied["received_at"]
            ):
                discharged_active["message planned after the discharge, and sent"] += 1

    # 6. Urgent check-ins: one alert each, mailed to the site's on-call clinician.
    alerts_by_cause = Counter(str(a["cause_event_id"]) for a in snap.alerts)
    for p in ledger.patients:
        if not p.urgent or p.check_in_id not in check_ins:
            continue
        cause = check_ins[p.check_in_id].event_id
        if alerts_by_cause[cause] == 0:
            lost["urgent check-in without an alert"] += 1
            continue
        duplicates["alerts per urgent check-in"] += alerts_by_cause[cause] - 1
        [alert] = [a for a in snap.alerts if str(a["cause_event_id"]) == cause]
        to_on_call = [
            r for r in snap.notifications if r["alert_id"] == alert["alert_id"] and mailed[r["notification_id"]]
        ]
        if not to_on_call:
            lost["alert not mailed to the on-call clinician"] += 1

    return {
        "patients": len(ledger.patients),
        "discharged": sum(p.discharged for p in ledger.patients),
        "urgent": sum(p.urgent for p in ledger.patients),
        "accepted_writes": ledger.writes,
        "request_retries": ledger.retries,
        "events": {name: len(stored_events) for name, stored_events in snap.streams.items()}
        | {"IOP_NOTIFICATIONS": snap.notifications_stream},
        "mails": len(sink.mails),
        "mails_resent_after_kill_same_message_id": resent_after_kill,
        "dead_letters": snap.dead_letters,
        "lost": +lost,
        "duplicates": +duplicates,
        "discharged_active": +discharged_active,
        "applied_out_of_order": {k: v for k, v in out_of_order.items() if v},
        "out_of_order_examples": late_examples,
        "redelivered": redelivered,
    }


async def test_crash_load_loses_nothing_duplicates_nothing_and_keeps_discharges(
    network: LocalNetwork, smtp_sink: SmtpSink
) -> None:
    started = time.monotonic()
    ledger = Ledger()
    engines: dict[str, AsyncEngine] = {name: create_engine(network.settings.database_url(name)) for name in SERVICES}
    probe = ReadyProbe(network)
    probe_task = asyncio.create_task(probe.run())
    workers: list[asyncio.Task[None]] = []
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            await set_up_sites(http, network, ledger)
            load = Load(http, network, ledger)
            queue: asyncio.Queue[Patient] = asyncio.Queue()
            for index in range(PATIENTS):
                patient = Patient(index, SITES[index % len(SITES)], f"patient-{index}@example.org")
                ledger.patients.append(patient)
                queue.put_nowait(patient)
            workers = [asyncio.create_task(load.worker(queue)) for _ in range(4)]

            # Each fault strikes while its chunk of patients is being written: the events
            # of one patient straddle the kill, as they do in production.
            chunk = PATIENTS // (len(FAULTS) + 1)
            await load.release(chunk)
            for target, how in FAULTS:
                base = ledger.writes
                await load.release(chunk)
                await load.writes_reach(base + 6)
                await inflict(network, target, how, ledger)
            await load.release(PATIENTS)
            await asyncio.wait_for(queue.join(), timeout=90)
            loaded = time.monotonic() - started

            async def quiet() -> Snapshot | None:
                return await settled(network, engines)

            try:
                snap = await eventually(quiet, timeout=45, interval=0.5, what="the network to settle")
            except AssertionError:
                snap = None
            if snap is None:
                snap = await snapshot(network, engines)  # judged as it is: what is missing counts as lost
            figures = await verdict(http, network, ledger, snap, smtp_sink)
    finally:
        for task in (probe_task, *workers):
            task.cancel()
        for engine in engines.values():
            await engine.dispose()
    figures["readyz_slowest_seconds"] = {k: round(v, 3) for k, v in probe.slowest.items()}
    figures["seconds"] = {"load_and_faults": round(loaded, 1), "total": round(time.monotonic() - started, 1)}
    figures["consumer_recoveries"] = recovery_log(network)
    print("\ncrash load:", json.dumps(figures, default=str))
    assert figures["accepted_writes"] >= PATIENTS * 4
    assert not figures["lost"], figures
    assert not figures["duplicates"], figures
    assert not figures["discharged_active"], figures
    assert not figures["applied_out_of_order"], figures
    assert max(probe.slowest.values()) < 1.0, figures
