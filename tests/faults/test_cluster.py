"""Scaled out and under faults: a three-node NATS JetStream cluster (streams with three
replicas) and two replicas of each service on PostgreSQL, under a mixed load (patients
with contact details, enrollments, check-ins, one in four urgent), while one NATS node
(the leader of IOP_INTAKE) and then one replica of each service are killed with kill -9
and not brought back.

Then, with the figures printed (run with -s):
- every accepted write has its effects exactly once: its event on the bus once
  (PatientContactChanged, PatientEnrolled, CheckInSubmitted), each patient known to
  scheduling as enrolled with the same number of bookings as every other (no session
  twice), one welcome per patient at notifications, one care-team alert per urgent
  check-in;
- nothing lost on the way: every outbox row published, every event a durable consumes in
  its service's inbox;
- the outbox relays did not double-publish: no event_id twice on any stream, and each
  stream holds exactly its producers' outbox rows;
- the replicas shared the work: both replicas of each service applied events from the
  one durable they share (their /metrics, the killed one's read just before the kill),
  and both intake replicas accepted writes (which relay published what is printed).
"""

import asyncio
import json
import signal
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import nats.js.errors
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Table
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
from tests.conftest import auth, fresh_service_databases, network_settings
from tests.faults.test_crash_load import Stored, matches, notifications_at_rest, read_stream, rows, set_up_site

pytestmark = pytest.mark.postgres

SITES = ("cluster-east", "cluster-west")
# Three writes each, released in chunks (20, 50, the rest): a fault strikes in each of the first two.
PATIENTS = 100
CHUNKS = (20, 60)
WORKERS = 6
# A killed replica's unacknowledged messages come back to the other after this.
ACK_WAIT_SECONDS = 5
STORES = {"intake": intake_store, "scheduling": scheduling_store, "notifications": notifications_store}
# Each service's inbox records what its consumers applied; intake's feed lane keeps no
# inbox rows (its effects are keyed inserts): it is judged by its durable's state alone
# (everything delivered and acknowledged), as every durable also is.
INBOXES: dict[ServiceName, Table] = {name: STORES[name].inbox.table for name in SERVICES}


def keeps_inbox(durable: str) -> bool:
    return not durable.endswith("-feed")


# (service, stream, durable) -> the NATS user that reads it.
CONSUMED = {
    ("scheduling", "IOP_INTAKE", "scheduling-IOP_INTAKE"): "scheduling",
    ("intake", "IOP_SCHEDULING", "intake-IOP_SCHEDULING"): "intake",
    ("intake", "IOP_INTAKE", "intake-IOP_INTAKE-feed"): "intake",
    ("intake", "IOP_SCHEDULING", "intake-IOP_SCHEDULING-feed"): "intake",
    ("intake", "IOP_NOTIFICATIONS", "intake-IOP_NOTIFICATIONS-feed"): "intake",
    ("notifications", "IOP_INTAKE", "notifications-IOP_INTAKE"): "notifications",
    ("notifications", "IOP_INTAKE", "notifications-IOP_INTAKE-safety"): "notifications",
    ("notifications", "IOP_SCHEDULING", "notifications-IOP_SCHEDULING"): "notifications",
    ("notifications", "IOP_RESTRICTED", "notifications-IOP_RESTRICTED"): RESTRICTED_USERS["notifications"],
}
# The durables whose work both replicas must have shared (the busy ones).
SHARED: dict[ServiceName, str] = {
    "intake": "intake-IOP_INTAKE-feed",
    "scheduling": "scheduling-IOP_INTAKE",
    "notifications": "notifications-IOP_INTAKE",
}
# The replica of each service that is killed (the other runs on alone).
VICTIMS: dict[ServiceName, str] = {"intake": "intake-2", "scheduling": "scheduling", "notifications": "notifications-2"}
STREAMS_READ = {
    "IOP_INTAKE": "notifications",
    "IOP_SCHEDULING": "notifications",
    "IOP_NOTIFICATIONS": "notifications",  # its owner may read it back
    "IOP_RESTRICTED": RESTRICTED_USERS["notifications"],
}


@pytest.fixture
async def databases() -> AsyncIterator[dict[str, str]]:
    async with fresh_service_databases() as urls:
        yield urls


@pytest.fixture
def network(tmp_path: Path, databases: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalNetwork]:
    monkeypatch.setenv("IOPNET_ACK_WAIT_SECONDS", str(ACK_WAIT_SECONDS))
    monkeypatch.setenv("IOPNET_NOTIFY_ESCALATION_MINUTES", "600")
    settings = network_settings(
        tmp_path,
        log_level="WARNING",
        # Intake's feed lane follows a new consent-based integration in the replica that
        # registered it at once, in the other within this long.
        interest_refresh_seconds=1.0,
        **databases,
    )
    network = LocalNetwork(settings, log_dir=tmp_path, nats_nodes=3, replicas=2)
    try:
        network.start(timeout=120)
        yield network
    finally:
        network.stop()


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Patient:
    index: int
    site_id: str
    patient_id: str | None = None
    enrollment_id: str | None = None
    check_in_id: str | None = None
    urgent: bool = False


@dataclass
class Ledger:
    patients: list[Patient] = field(default_factory=list)
    writes: int = 0
    retries: int = 0
    served_by: Counter[str] = field(default_factory=Counter)  # instance -> accepted writes
    faults: list[str] = field(default_factory=list)
    marks: dict[int, asyncio.Event] = field(default_factory=dict)

    def wrote(self) -> None:
        self.writes += 1
        for count, reached in self.marks.items():
            if self.writes >= count:
                reached.set()

    async def reaching(self, count: int) -> None:
        """Returns as the `count`th write is accepted, not at a poll after it: a fault
        meant for the middle of the load lands there (polled, a fast network had
        finished the chunk before the kill; CI at 933437f: killed at write 240 of 240)."""
        if self.writes < count:
            await self.marks.setdefault(count, asyncio.Event()).wait()


class Balancer:
    """Round robin over the live replicas of a service, as a load balancer in front of
    them would: a request that gets no answer (its replica killed) goes to the next."""

    def __init__(self, network: LocalNetwork, http: httpx.AsyncClient, ledger: Ledger) -> None:
        self.network, self.http, self.ledger = network, http, ledger
        self.turn = 0

    def pick(self, service: ServiceName) -> str:
        live = [i for i in self.network.replicas(service) if self.network.processes[i].poll() is None]
        self.turn += 1
        return live[self.turn % len(live)]

    async def call(
        self, service: ServiceName, method: str, path: str, headers: dict[str, str], body: Any = None
    ) -> tuple[str, httpx.Response]:
        tries = 0

        async def once() -> tuple[str, httpx.Response] | None:
            nonlocal tries
            tries += 1
            instance = self.pick(service)
            try:
                response = await self.http.request(
                    method, f"{self.network.url(instance)}{path}", json=body, headers=headers
                )
            except httpx.TransportError:
                return None
            return None if response.status_code in (502, 503, 504) else (instance, response)

        answer = await eventually(once, timeout=60, interval=0.05, what=f"{method} {path} answered")
        assert answer is not None
        self.ledger.retries += tries - 1
        return answer

    def accepted(self, instance: str, response: httpx.Response, *expected: int) -> dict[str, Any]:
        assert response.status_code in expected, (instance, response.status_code, response.text)
        self.ledger.wrote()
        self.ledger.served_by[instance] += 1
        return dict(response.json())


async def drive(balancer: Balancer, program: dict[str, str], patient: Patient) -> None:
    desk = auth("front_desk", [patient.site_id])
    attempt = 0
    while patient.patient_id is None:
        # An unanswered create may have committed: a retry is a new person (by name), so
        # only an answered 201 counts, as in the crash test.
        body = {
            "site_id": patient.site_id,
            "given_name": f"Cluster{patient.index}",
            "family_name": f"Load{attempt}",
            "birth_date": str(date(1970, 1, 1) + timedelta(days=patient.index * 97 + attempt)),
            "email": f"patient-{patient.index}@example.org",
            "preferred_channel": "email",
            "language": "en",
        }
        attempt += 1
        instance, response = await balancer.call("intake", "POST", "/patients", desk, body)
        if response.status_code == 409:
            # The balancer re-sent this body after a replica died with it: the first try
            # was committed, and the duplicate check names it.
            instance, response = await balancer.call(
                "intake", "GET", f"/patients/{response.json()['error']['fields']['patient_id']}", desk
            )
            patient.patient_id = str(balancer.accepted(instance, response, 200)["patient_id"])
            continue
        patient.patient_id = str(balancer.accepted(instance, response, 201)["patient_id"])
    enrollment = {"program_id": program[patient.site_id], "level_of_care": "2.1", "cohort": "adult",
                  "start_date": str(date.today()), "referral_source": "self"}  # fmt: skip
    path = f"/patients/{patient.patient_id}/enrollments"
    instance, enrolled = await balancer.call("intake", "POST", path, desk, enrollment)
    if enrolled.status_code == 409:  # the first try was committed before its replica died
        instance, record = await balancer.call("intake", "GET", f"/patients/{patient.patient_id}", desk)
        [episode] = record.json()["enrollments"]
        patient.enrollment_id = str(episode["enrollment_id"])
        balancer.accepted(instance, record, 200)
    else:
        patient.enrollment_id = str(balancer.accepted(instance, enrolled, 201)["enrollment_id"])
    patient.urgent = patient.index % 4 == 1
    check_in = (
        {"mood": 2, "craving": 9, "used_since_last": True, "safety_concern": True}
        if patient.urgent
        else {"mood": 7, "craving": 1, "used_since_last": False, "safety_concern": False}
    )
    me = {**auth("patient", [], patient.patient_id), "Idempotency-Key": f"cluster-{patient.index}"}
    path = f"/patients/{patient.patient_id}/check-ins"
    instance, submitted = await balancer.call("intake", "POST", path, me, check_in)
    answer = balancer.accepted(instance, submitted, 201)
    patient.check_in_id = str(answer["check_in_id"])


# --- reading what happened --------------------------------------------------------------------


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@dataclass
class Work:
    """What one replica did, from its /metrics."""

    applied: dict[str, float]  # durable -> events applied
    published: float  # events its outbox relay published

    @classmethod
    async def scrape(cls, http: httpx.AsyncClient, url: str) -> "Work":
        values = metric_values((await http.get(f"{url}/metrics")).text)
        applied = {
            dict(labels)["consumer"]: value
            for (name, labels), value in values.items()
            if name == "iopnet_events_consumed_total" and dict(labels).get("outcome") == "applied"
        }
        published = sum(v for (name, _), v in values.items() if name == "iopnet_events_published_total")
        return cls(applied, published)


@dataclass
class Snapshot:
    streams: dict[str, list[Stored]]
    inboxes: dict[str, set[str]]
    outboxes: dict[str, list[dict[str, Any]]]
    filters: dict[tuple[str, str, str], list[str]]
    deliveries: dict[str, int]
    unfinished: dict[str, int]  # durable -> messages not yet delivered or not yet acknowledged
    feed: list[Stored]  # IOP_FEED: intake's forwards into the integrations' feeds


def live_url(network: LocalNetwork, user: str) -> str:
    """`user` on the nodes still running (the test's reads; the services list all three)."""
    assert network.nats_cluster is not None
    nodes = [n for n in network.nats_cluster.nodes if n.process is not None and n.process.poll() is None]
    return ",".join(n.user_url(user) for n in nodes)


async def snapshot(network: LocalNetwork, engines: dict[str, AsyncEngine]) -> Snapshot:
    streams = {name: await read_stream(live_url(network, user), name) for name, user in STREAMS_READ.items()}
    filters, deliveries, unfinished = {}, {}, {}
    for (service, stream, durable), user in CONSUMED.items():
        nc = await connect_once(live_url(network, user))
        try:
            info = await nc.jetstream().consumer_info(stream, durable)
        finally:
            await nc.close()
        config = info.config
        filters[(service, stream, durable)] = list(
            config.filter_subjects or ([config.filter_subject] if config.filter_subject else [])
        )
        deliveries[durable] = int(info.delivered.consumer_seq if info.delivered else 0)
        unfinished[durable] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    inboxes: dict[str, set[str]] = {
        name: {str(r["event_id"]) for r in await rows(engines[name], table)} for name, table in INBOXES.items()
    }
    outboxes: dict[str, list[dict[str, Any]]] = {n: await rows(engines[n], STORES[n].outbox.table) for n in SERVICES}
    feed = await read_stream(live_url(network, "intake"), "IOP_FEED")
    return Snapshot(streams, inboxes, outboxes, filters, deliveries, unfinished, feed)


def consumed(snap: Snapshot) -> dict[tuple[str, str, str], list[Stored]]:
    return {
        key: [s for s in snap.streams[key[1]] if any(matches(f, s.subject) for f in snap.filters[key])]
        for key in CONSUMED
    }


async def settled(network: LocalNetwork, engines: dict[str, AsyncEngine]) -> Snapshot | None:
    try:
        snap = await snapshot(network, engines)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
        return None  # a JetStream request that met an election: ask again
    if any(r["sent_at"] is None for outbox in snap.outboxes.values() for r in outbox):
        return None
    if any(snap.unfinished.values()):
        return None
    # Welcomes and alerts are dispatched by a poller, not by an event: all consumed is not all done.
    if not notifications_at_rest(await rows(engines["notifications"], notifications_store.notifications)):
        return None
    for (service, _, durable), events in consumed(snap).items():
        if keeps_inbox(durable) and any(e.event_id not in snap.inboxes[service] for e in events):
            return None
    # The streams are read before the outboxes, one message at a time (seconds here): a
    # welcome relayed in between is in its outbox, marked sent, and not in what was read.
    # Such a snapshot is not the network at rest; one that stays apart is judged below.
    if any(relay_gaps(snap).values()):
        return None
    return snap


MISSING_GAPS = {"outbox row not on a stream", "forward not in the feed"}  # the rest are extras


def relay_gaps(snap: Snapshot) -> dict[str, set[Any]]:
    """Where the outboxes and the streams disagree: each outbox row is once on the
    streams and nothing else is there. A forward into a feed keeps the event's own id: it
    is matched by (feed subject, event id)."""
    stored_ids = {s.event_id for events in snap.streams.values() for s in events}
    staged = [r for outbox in snap.outboxes.values() for r in outbox]
    to_feeds = [r for r in staged if r["subject"].startswith("iop.feed.")]
    rows_ids = {str(r["event_id"]) for r in staged if r not in to_feeds}
    forwards = {(r["subject"], json.loads(r["payload"])["event_id"]) for r in to_feeds}
    fed = {(s.subject, s.event_id) for s in snap.feed}
    return {
        "outbox row not on a stream": rows_ids - stored_ids,
        "stored event from no outbox row": stored_ids - rows_ids,
        "forward not in the feed": forwards - fed,
        "in the feed from no outbox row": fed - forwards,
    }


async def stream_leader(network: LocalNetwork, stream: str) -> str:
    nc = await connect_once(network.user_url("ops"))
    try:
        info = await nc.jetstream().stream_info(stream)
        assert info.config.num_replicas == 3, "IOPNET_STREAM_REPLICAS=3 on the cluster"
        assert info.cluster is not None and info.cluster.leader and len(info.cluster.replicas or []) == 2
        return str(info.cluster.leader)
    finally:
        await nc.close()


# --- the test ---------------------------------------------------------------------------------


async def feed_everything(http: httpx.AsyncClient, network: LocalNetwork) -> None:
    body = {"integration_id": "research-all", "sites": list(SITES), "basis": "consent", "purpose": "research"}
    added = await http.post(f"{network.url('intake')}/integrations", json=body, headers=auth("network_admin"))
    assert added.status_code == 201, added.text

    async def both_replicas_read() -> bool:
        for instance in network.replicas("intake"):
            metrics = (await http.get(f"{network.url(instance)}/metrics")).text
            if 'iopnet_consumer_dormant{consumer="intake-IOP_INTAKE-feed"} 0.0' not in metrics:
                return False
        return True

    await eventually(both_replicas_read, timeout=30, what="both intake replicas reading the feed lane")


async def test_cluster_and_replicas_lose_nothing_and_duplicate_nothing_under_kill_9(network: LocalNetwork) -> None:
    started = time.monotonic()
    ledger = Ledger()
    engines: dict[str, AsyncEngine] = {name: create_engine(network.settings.database_url(name)) for name in SERVICES}
    assert network.nats_cluster is not None
    work_at_kill: dict[str, Work] = {}
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            program: dict[str, str] = {}
            for site_id in SITES:
                # set_up_site keeps only the program: it writes through replica 1.
                holder: Any = type("L", (), {"sites": [], "programs": program})()
                await set_up_site(http, network, holder, site_id)
            # A consent-based integration of every site: intake's feed lane reads (and both
            # replicas share it) only when one exists.
            await feed_everything(http, network)
            balancer = Balancer(network, http, ledger)
            queue: asyncio.Queue[Patient] = asyncio.Queue()
            for index in range(PATIENTS):
                patient = Patient(index, SITES[index % len(SITES)])
                ledger.patients.append(patient)
                queue.put_nowait(patient)

            allowed = 0  # patients released so far: the load is paced by the faults
            released = asyncio.Condition()

            async def worker() -> None:
                while not queue.empty():
                    patient = queue.get_nowait()
                    async with released:
                        await released.wait_for(lambda index=patient.index: index < allowed)  # type: ignore[misc]
                    await drive(balancer, program, patient)

            async def release(count: int) -> None:
                nonlocal allowed
                async with released:
                    allowed += count
                    released.notify_all()

            first, second = CHUNKS
            workers = [asyncio.create_task(worker()) for _ in range(WORKERS)]
            try:
                # Into the first chunk: kill -9 the node that leads IOP_INTAKE.
                await release(first)
                await asyncio.wait_for(ledger.reaching(first), timeout=90)
                leader = await stream_leader(network, "IOP_INTAKE")
                node = next(i for i, n in enumerate(network.nats_cluster.nodes) if n.server_name == leader)
                ledger.faults.append(f"kill -9 NATS node {leader} (IOP_INTAKE's leader) at write {ledger.writes}")
                await asyncio.to_thread(network.stop_nats, True, node)
                # Into the second: kill -9 one replica of each service, its work read just before.
                # The victims' work is read first, with half the chunk released: three scrapes
                # under load took long enough for a fast network to finish a whole chunk (CI at
                # 933437f: killed at write 240 of 240). The kill comes a patient into the rest.
                half = second // 2
                await release(half)
                await asyncio.wait_for(ledger.reaching(3 * first + half // 2), timeout=90)
                scraped = await asyncio.gather(*(Work.scrape(http, network.url(v)) for v in VICTIMS.values()))
                work_at_kill.update(zip(VICTIMS.values(), scraped, strict=True))
                await release(second - half)
                await asyncio.wait_for(ledger.reaching(3 * (first + half) + 3), timeout=90)
                kills_at = ledger.writes
                for victim in VICTIMS.values():
                    network.processes[victim].send_signal(signal.SIGKILL)
                for victim in VICTIMS.values():
                    code = await asyncio.to_thread(network.signal_service, victim, signal.SIGKILL)
                    assert code == -signal.SIGKILL
                ledger.faults.append(f"kill -9 {', '.join(VICTIMS.values())} at write {kills_at}")
                await release(PATIENTS)
                await asyncio.wait_for(asyncio.gather(*workers), timeout=120)
            finally:
                for task in workers:
                    task.cancel()
            assert kills_at < 3 * (first + second), "the replicas were killed while writes were coming"
            loaded = time.monotonic() - started

            async def quiet() -> Snapshot | None:
                return await settled(network, engines)

            try:
                snap: Snapshot | None = await eventually(quiet, timeout=60, interval=0.5, what="the network to settle")
            except AssertionError:
                snap = None
            if snap is None:
                snap = await snapshot(network, engines)  # judged as it is: what is missing is lost
            survivors = {
                instance: await Work.scrape(http, network.url(instance))
                for instance in network.instances
                if network.processes[instance].poll() is None
            }
            figures = await verdict(http, network, ledger, snap, engines)
    finally:
        for engine in engines.values():
            await engine.dispose()

    work = {**work_at_kill, **survivors}
    figures["replicas"] = {
        instance: {
            "killed": instance in work_at_kill,
            "accepted_writes": ledger.served_by.get(instance, 0),
            "applied": {d: int(v) for d, v in sorted(w.applied.items()) if v},
            "published": int(w.published),
        }
        for instance, w in sorted(work.items())
    }
    figures["faults"] = ledger.faults
    figures["seconds"] = {"load_and_faults": round(loaded, 1), "total": round(time.monotonic() - started, 1)}
    print("\ncluster load:", json.dumps(figures, default=str, indent=1))

    assert figures["accepted_writes"] == PATIENTS * 3
    assert not figures["lost"], figures
    assert not figures["duplicates"], figures
    for service, durable in SHARED.items():
        for instance in network.replicas(service):
            assert work[instance].applied.get(durable, 0) > 0, (instance, durable, figures["replicas"])
    # Which relay publishes a row is a race (whichever reads it first locks it): a replica
    # may lose every one, so the split is printed, not asserted; that each relay skips the
    # rows another is publishing is test_outbox_replicas.py's.
    for instance in network.replicas("intake"):
        assert ledger.served_by[instance] > 0, figures["replicas"]


async def verdict(
    http: httpx.AsyncClient, network: LocalNetwork, ledger: Ledger, snap: Snapshot, engines: dict[str, AsyncEngine]
) -> dict[str, Any]:
    lost: Counter[str] = Counter()
    duplicates: Counter[str] = Counter()
    by_type: dict[str, list[Stored]] = defaultdict(list)
    for stored_events in snap.streams.values():
        for stored in stored_events:
            by_type[stored.event_type].append(stored)

    def once_on_bus(event_type: str, field_name: str, value: str | None) -> Stored | None:
        found = [s for s in by_type[event_type] if str(s.data.get(field_name)) == value]
        if not found:
            lost[f"{event_type} not on the bus"] += 1
        duplicates[f"{event_type} more than once"] += max(0, len(found) - 1)
        return found[0] if found else None

    # 1. Each accepted write is its event, once.
    check_ins: dict[str, Stored] = {}
    for p in ledger.patients:
        once_on_bus("PatientContactChanged", "patient_id", p.patient_id)
        once_on_bus("PatientEnrolled", "enrollment_id", p.enrollment_id)
        if found := once_on_bus("CheckInSubmitted", "check_in_id", p.check_in_id):
            check_ins[str(p.check_in_id)] = found

    # 2. The relays: each outbox row once on the streams, nothing else there.
    stored_ids = Counter(s.event_id for events in snap.streams.values() for s in events)
    duplicates["event_id twice on the streams"] += sum(c - 1 for c in stored_ids.values() if c > 1)
    fed = Counter((s.subject, s.event_id) for s in snap.feed)
    duplicates["forward twice in the feed"] += sum(c - 1 for c in fed.values() if c > 1)
    for gap, found in relay_gaps(snap).items():
        (lost if gap in MISSING_GAPS else duplicates)[gap] += len(found)
    lost["outbox row never marked sent"] += sum(r["sent_at"] is None for o in snap.outboxes.values() for r in o)

    # 3. The consumers: every consumed event in its service's inbox.
    redelivered: dict[str, int] = {}
    for (service, stream, durable), events in consumed(snap).items():
        redelivered[durable] = snap.deliveries[durable] - len(events)
        missing = sum(e.event_id not in snap.inboxes[service] for e in events) if keeps_inbox(durable) else 0
        if snap.unfinished[durable]:
            lost[f"{durable} left unacknowledged or undelivered"] += snap.unfinished[durable]
        if missing:
            lost[f"{service} never applied {stream} ({durable})"] += missing

    # 4. Effects, patient by patient: enrolled at scheduling with the same bookings as
    # every other patient (one program, one start), one welcome, one alert per urgent check-in.
    notifications = await rows(engines["notifications"], notifications_store.notifications)
    alerts = Counter(str(a["cause_event_id"]) for a in await rows(engines["notifications"], notifications_store.alerts))
    welcomes = Counter(
        str(r["patient_id"]) for r in notifications if r["template"] == "welcome" and r["recipient_kind"] == "patient"
    )
    booking_counts: Counter[int] = Counter()
    for p in ledger.patients:
        staff = auth("clinician", [p.site_id])
        scheduling = network.url(network.replicas("scheduling")[-1])
        answer = await http.get(f"{scheduling}/enrollments/{p.enrollment_id}", headers=staff)
        if answer.status_code != 200 or answer.json()["status"] != "active":
            lost["enrollment not active at scheduling"] += 1
        answer = await http.get(f"{scheduling}/patients/{p.patient_id}/bookings", headers=staff)
        assert answer.status_code == 200, (answer.status_code, answer.text)
        bookings = answer.json()
        sessions = Counter(str(b["session_id"]) for b in bookings)
        duplicates["booking twice for one session"] += sum(c - 1 for c in sessions.values() if c > 1)
        booking_counts[len(bookings)] += 1
        if welcomes[str(p.patient_id)] != 1:
            (lost if not welcomes[str(p.patient_id)] else duplicates)["welcome per patient"] += 1
        if p.urgent and p.check_in_id in check_ins:
            count = alerts[check_ins[p.check_in_id].event_id]
            if count != 1:
                (lost if not count else duplicates)["alert per urgent check-in"] += 1
    if len(booking_counts) != 1 or 0 in booking_counts:
        lost["patients with other bookings than the rest"] += sum(booking_counts.values()) - max(
            booking_counts.values()
        )
    return {
        "patients": len(ledger.patients),
        "urgent": sum(p.urgent for p in ledger.patients),
        "accepted_writes": ledger.writes,
        "request_retries": ledger.retries,
        "events": {name: len(events) for name, events in snap.streams.items()},
        "outbox_rows": {name: len(outbox) for name, outbox in snap.outboxes.items()},
        "bookings_per_patient": dict(booking_counts),
        "welcomes": sum(welcomes.values()),
        "alerts": sum(alerts.values()),
        "lost": +lost,
        "duplicates": +duplicates,
        "redelivered": redelivered,
    }
