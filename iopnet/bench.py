"""`iopnet bench` / `make bench`: Monday 9:00 at network scale, against the raw bus.

Starts its own network (embedded nats-server, the three services as processes, SQLite in
a temp dir; PostgreSQL when `--postgres` gives a server), then drives, as clinics would:
- setup: S sites, each with a care-team roster and a program of three weekly groups;
- an enrollment wave: N patients over the S sites from C concurrent clients, each
  enrollment fanning out as in real use (bookings, waitlist, reminders, welcome);
- a check-in wave while the enrollments still drain: one check-in per patient, 5%
  urgent; the first half offered at a fixed rate (default 200/s), the rest as fast as
  intake answers;
- on PostgreSQL, notifications' safety lane runs in a process of its own
  (`--no-safety-process`: in the one process, as on SQLite), and `--replicas` runs
  services in several processes (intake's requests go round its processes);
- the raw baseline on the same nats-server: nats-py async publish of as many messages of
  the same size, then a durable pull consumer with explicit acks.
It reports intake's HTTP throughput and latency, check-in -> CheckInSubmitted, urgent
check-in -> CareTeamAlerted (during the drain and after) and -> the on-call's message
sent (during the drain), enrollment -> welcome sent,
each service's consumer rate (and its ratio to the raw consumer), outbox lag, and each
process's peak RSS and CPU time, the load generator's included. It writes
bench/results/<timestamp>.json and .png and prints a table. Nothing here asserts a
timing: the smoke test in `make test` checks that a tiny run completes and reports.
"""

import asyncio
import contextlib
import itertools
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import psutil
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.engine import make_url

from iopnet.bench_http import Answer, LoadClient
from iopnet.bench_load import BusLog, Sampler, local_postgres_server, raw_baseline
from iopnet.bench_report import latency_summary, plot, print_table, write_results
from iopnet.natsd import free_port, url_with_user
from iopnet.network import LocalNetwork
from iopnet.testing import eventually
from shared.auth import mint_token
from shared.settings import SERVICES, ServiceName, Settings

RESULTS_DIR = Path("bench/results")
WEEKDAYS = (1, 3, 5)  # Monday, Wednesday, Friday groups


@dataclass
class BenchConfig:
    patients: int = 300
    sites: int = 3
    concurrency: int = 16
    check_in_rate: float = 200.0
    urgent_share: float = 0.05
    postgres: str | None = None  # an admin URL: three databases are created and dropped
    # Notifications' safety lane in a process of its own (PostgreSQL only); None: on
    # PostgreSQL, off on SQLite.
    safety_process: bool | None = None
    # Processes per service (PostgreSQL only), e.g. {"intake": 2}; a service not named runs one.
    replicas: dict[ServiceName, int] = field(default_factory=dict)
    results_dir: Path = RESULTS_DIR
    drain_timeout: float = 240.0


@dataclass
class Timings:
    """Monotonic times in this process, by id, and HTTP latencies in ms."""

    enroll_http_ms: list[float] = field(default_factory=list)
    enroll_accepted: dict[str, float] = field(default_factory=dict)  # enrollment_id -> t
    check_in_http_ms: dict[str, list[float]] = field(default_factory=lambda: {"offered": [], "flat_out": []})
    check_in_accepted: dict[str, float] = field(default_factory=dict)  # check_in_id -> t
    urgent: set[str] = field(default_factory=set)
    during_drain: set[str] = field(default_factory=set)  # check-ins accepted while enrollments drained
    waves: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


class Clinics:
    """The clinics' side: HTTP calls a front desk, an admin and patients make."""

    def __init__(self, network: LocalNetwork, http: LoadClient, config: BenchConfig) -> None:
        self.network, self.http, self.config = network, http, config
        self.secret = network.settings.signing_secret
        self.sites = [f"bench-{i:02d}" for i in range(config.sites)]
        self.admin = self._bearer(mint_token(self.secret, sub="bench-admin", role="network_admin"))
        self.desk = self._bearer(mint_token(self.secret, sub="bench-desk", role="front_desk", sites=self.sites))
        self.programs: dict[str, str] = {}
        self.timings = Timings()
        # Intake in several processes: requests go round them, as a load balancer sends them.
        self._intakes = itertools.cycle(network.replicas("intake"))

    @staticmethod
    def _bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def url(self, service: str, path: str) -> str:
        instance = next(self._intakes) if service == "intake" else service
        return f"{self.network.url(instance)}{path}"

    async def set_up(self) -> None:
        await asyncio.gather(*(self._site(site) for site in self.sites))

    async def _site(self, site: str) -> None:
        body = {"site_id": site, "name": f"Bench {site}", "timezone": "America/New_York"}
        (await self.http.post(self.url("intake", "/sites"), json=body, headers=self.admin)).raise_for_status()
        roster = {"members": [
            {"name": "On call", "role": "clinician", "channel": "email", "address": f"oncall@{site}.example.org"},
            {"name": "Backup", "role": "clinician", "channel": "email", "address": f"backup@{site}.example.org"},
        ]}  # fmt: skip
        blocks = [
            {"weekday": day, "start": "09:00", "minutes": 180, "kind": "group_therapy", "title": "Group"}
            for day in WEEKDAYS
        ]
        program = {"site_id": site, "name": "Adult IOP", "cohort": "adult", "blocks": blocks}

        async def roster_set() -> bool:
            put = await self.http.put(self.url("notifications", f"/sites/{site}/care-team"), json=roster,
                                      headers=self.admin)  # fmt: skip
            return put.status_code == 200

        async def published() -> Answer | None:
            response = await self.http.post(self.url("scheduling", "/programs"), json=program, headers=self.admin)
            return response if response.status_code == 201 else None

        await eventually(roster_set, timeout=60, what=f"notifications to know {site}")
        response = await eventually(published, timeout=60, what=f"scheduling to know {site}")
        assert response is not None  # eventually returns only a truthy value
        self.programs[site] = str(response.json()["program_id"])

        async def known() -> bool:
            listed = await self.http.get(self.url("intake", "/programs"), headers=self.admin)
            return any(p["program_id"] == self.programs[site] for p in listed.json())

        await eventually(known, timeout=60, what="intake to know the program")

    async def enroll(self, index: int, *, timed: bool = True) -> str | None:
        """A new patient and their enrollment; the patient id, or None if refused.
        `timed`: its latency and welcome count in the wave's figures."""
        site = self.sites[index % len(self.sites)]
        patient = {
            "site_id": site, "given_name": "Bench", "family_name": f"Patient{index}", "birth_date": "1990-01-01",
            "email": f"bench{index}@example.org", "preferred_channel": "email",
        }  # fmt: skip
        created = await self.http.post(self.url("intake", "/patients"), json=patient, headers=self.desk)
        if created.status_code != 201:
            self._error(f"patient {created.status_code}")
            return None
        patient_id = str(created.json()["patient_id"])
        body = {
            "program_id": self.programs[site], "level_of_care": "2.1", "cohort": "adult",
            "start_date": (date.today() + timedelta(days=1)).isoformat(), "referral_source": "self",
        }  # fmt: skip
        started = time.monotonic()
        response = await self.http.post(self.url("intake", f"/patients/{patient_id}/enrollments"), json=body,
                                        headers=self.desk)  # fmt: skip
        done = time.monotonic()
        if response.status_code != 201:
            self._error(f"enrollment {response.status_code}")
            return None
        if timed:
            self.timings.enroll_http_ms.append((done - started) * 1000)
            self.timings.enroll_accepted[str(response.json()["enrollment_id"])] = done
        return patient_id

    async def post_check_in(self, patient_id: str, urgent: bool) -> Answer:
        token = mint_token(self.secret, sub=f"patient-{patient_id}", role="patient", patient_id=patient_id)
        headers = {**self._bearer(token), "Idempotency-Key": str(uuid4())}
        body = {"mood": 2 if urgent else 6, "craving": 3, "used_since_last": False, "safety_concern": urgent,
                "sleep_hours": 7}  # fmt: skip
        return await self.http.post(self.url("intake", f"/patients/{patient_id}/check-ins"), json=body,
                                    headers=headers)  # fmt: skip

    async def check_in(self, patient_id: str, urgent: bool, lane: str, draining: bool) -> None:
        started = time.monotonic()
        response = await self.post_check_in(patient_id, urgent)
        done = time.monotonic()
        if response.status_code != 201:
            self._error(f"check-in {response.status_code}")
            return
        check_in_id = str(response.json()["check_in_id"])
        self.timings.check_in_http_ms[lane].append((done - started) * 1000)
        self.timings.check_in_accepted[check_in_id] = done
        if urgent:
            self.timings.urgent.add(check_in_id)
        if draining:
            self.timings.during_drain.add(check_in_id)

    def _error(self, kind: str) -> None:
        self.timings.errors[kind] = self.timings.errors.get(kind, 0) + 1


async def _enrollment_wave(clinics: Clinics, config: BenchConfig) -> list[str]:
    limiter = asyncio.Semaphore(config.concurrency)

    async def one(index: int) -> str | None:
        async with limiter:
            return await clinics.enroll(index)

    started = time.monotonic()
    patients = [p for p in await asyncio.gather(*(one(i) for i in range(config.patients))) if p]
    elapsed = time.monotonic() - started
    clinics.timings.waves["enrollment"] = {"requests": len(patients), "seconds": round(elapsed, 2),
                                           "per_s": round(len(patients) / elapsed, 1)}  # fmt: skip
    return patients


async def _check_in_wave(clinics: Clinics, config: BenchConfig, patients: list[str], drained: asyncio.Event) -> None:
    """The first half at the offered rate (open loop: each request leaves on schedule,
    whether or not the earlier ones were answered), the rest flat out."""
    every = max(1, round(1 / config.urgent_share))
    urgent = {i for i in range(len(patients)) if i % every == every // 2}
    half = len(patients) // 2
    started = time.monotonic()
    tasks = []
    for i in range(half):
        delay = started + i / config.check_in_rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # the offered rate's schedule, not a wait on a result
        tasks.append(asyncio.create_task(clinics.check_in(patients[i], i in urgent, "offered", not drained.is_set())))
    await asyncio.gather(*tasks)
    offered = time.monotonic() - started
    limiter = asyncio.Semaphore(config.concurrency)

    async def flat_out(i: int) -> None:
        async with limiter:
            await clinics.check_in(patients[i], i in urgent, "flat_out", not drained.is_set())

    started = time.monotonic()
    await asyncio.gather(*(flat_out(i) for i in range(half, len(patients))))
    fast = time.monotonic() - started
    timings = clinics.timings
    timings.waves["check_in_offered"] = {"offered_per_s": config.check_in_rate, "requests": half,
                                         "seconds": round(offered, 2), "per_s": round(half / offered, 1)}  # fmt: skip
    rest = len(patients) - half
    timings.waves["check_in_flat_out"] = {"requests": rest, "seconds": round(fast, 2),
                                          "per_s": round(rest / fast, 1) if fast else 0.0}  # fmt: skip


def _cpu_seconds(pids: dict[str, int], sampler: Sampler) -> dict[str, float]:
    seconds = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            seconds[name] = times.user + times.system
    database = sampler.database_cpu_seconds()
    if database is not None:
        seconds["postgresql"] = database
    return seconds


async def _request_cost(
    clinics: Clinics, patients: list[str], pids: dict[str, int], sampler: Sampler, bus: BusLog
) -> dict[str, dict[str, Any]]:
    """On the quiet network, after the waves: CPU milliseconds each process spends per
    request, for as many check-ins flat out as there are patients and, as the floor of the
    HTTP stack and of the load generator's client, as many GET /healthz. Then as many new
    enrollments, each counted until its fan-out has settled (its welcome sent): the CPU an
    enrollment costs the whole network, scheduling's and notifications' share included. It
    tells whether a rate is reachable on this machine's cores at all (docs/performance.md)."""
    config, requests = clinics.config, len(patients)
    limiter = asyncio.Semaphore(config.concurrency)

    async def healthz(_: int) -> None:
        async with limiter:
            (await clinics.http.get(clinics.url("intake", "/healthz"))).raise_for_status()

    async def check_in(i: int) -> None:
        async with limiter:
            (await clinics.post_check_in(patients[i % len(patients)], urgent=False)).raise_for_status()

    async def enrollment(i: int) -> None:
        async with limiter:
            if await clinics.enroll(config.patients + i, timed=False) is None:
                raise RuntimeError("an enrollment of the cost phase was refused")

    async def settled(kind: str, welcomes: int) -> bool:
        if kind == "enrollment" and not await bus.wait("NotificationSent", welcomes, config.drain_timeout, _welcome):
            return False
        return await _at_rest(sampler, config.drain_timeout)

    cost: dict[str, dict[str, Any]] = {}
    for kind, one in (("healthz", healthz), ("check_in", check_in), ("enrollment", enrollment)):
        # From rest to rest: the waves' fan-out is not counted here, this one's all is.
        quiet = await _at_rest(sampler, config.drain_timeout)
        welcomes = bus.count("NotificationSent", _welcome) + requests
        before, started = _cpu_seconds(pids, sampler), time.monotonic()
        await asyncio.gather(*(one(i) for i in range(requests)))
        seconds = time.monotonic() - started  # the rate intake answered at
        done = quiet and await settled(kind, welcomes)
        after = _cpu_seconds(pids, sampler)
        cost[kind] = {
            "requests": requests,
            "settled": done,  # False: the network was not at rest within the drain timeout, before or after
            "per_s": round(requests / seconds, 1),
            "cpu_ms_per_request": {
                name: round((after[name] - before[name]) / requests * 1000, 2) for name in after if name in before
            },
        }
    return cost


async def _at_rest(sampler: Sampler, timeout: float) -> bool:
    """Wait until no service has work left, seen twice in a row (an event between one
    service's outbox and the next one's consumer is in neither count for a moment)."""
    deadline, seen = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        seen = seen + 1 if await sampler.at_rest() else 0
        if seen == 2:
            return True
        await asyncio.sleep(0.2)  # the bench's own poll, as BusLog.wait
    return False


def _monotonic(iso: str) -> float:
    """A wall-clock time from an envelope, on this process's monotonic clock (all on one machine)."""
    return time.monotonic() - (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()


def _welcome(data: dict[str, Any]) -> bool:
    return data.get("template") == "welcome"


def _urgent_message(data: dict[str, Any]) -> bool:
    return data.get("template") == "care_urgent_check_in"


def _latencies(bus: BusLog, timings: Timings) -> dict[str, Any]:
    submitted = {s.data.get("check_in_id"): s for s in bus.by_type["CheckInSubmitted"]}
    by_event_id = {s.envelope["event_id"]: s.data.get("check_in_id") for s in submitted.values()}
    to_bus = [(submitted[c].at - t) * 1000 for c, t in timings.check_in_accepted.items() if c in submitted]
    alerted: dict[str, list[float]] = {"during_drain": [], "after_drain": []}
    # Where an urgent check-in's time goes in notifications: on the bus -> alert committed
    # (consume and apply) -> alert on the bus (notifications' outbox relay).
    applied, relayed = [], []
    for seen in bus.by_type["CareTeamAlerted"]:
        check_in = by_event_id.get(seen.data.get("cause_event_id"))
        if check_in in timings.urgent and check_in in timings.check_in_accepted:
            lane = "during_drain" if check_in in timings.during_drain else "after_drain"
            alerted[lane].append((seen.at - timings.check_in_accepted[check_in]) * 1000)
            committed = _monotonic(seen.envelope["occurred_at"])
            applied.append((committed - submitted[check_in].at) * 1000)
            relayed.append((seen.at - committed) * 1000)
    enrollments = {s.envelope["event_id"]: s for s in bus.by_type["PatientEnrolled"]}
    welcome, messaged = [], []
    # Where a welcome's time goes: accepted -> PatientEnrolled on the bus (intake's outbox),
    # -> the welcome sent and recorded (notifications: consume, plan, dispatch), -> its
    # NotificationSent on the bus (notifications' outbox).
    welcome_stages: dict[str, list[float]] = {"enrolled_to_bus": [], "on_bus_to_sent": [], "sent_to_bus": []}
    watched = timings.during_drain & timings.urgent & timings.check_in_accepted.keys()
    for seen in bus.by_type["NotificationSent"]:
        cause = enrollments.get(seen.data.get("cause_event_id"))
        enrollment = cause.data.get("enrollment_id") if cause else None
        if cause and _welcome(seen.data) and enrollment in timings.enroll_accepted:
            accepted, recorded = timings.enroll_accepted[enrollment], _monotonic(seen.envelope["occurred_at"])
            welcome.append((seen.at - accepted) * 1000)
            welcome_stages["enrolled_to_bus"].append((cause.at - accepted) * 1000)
            welcome_stages["on_bus_to_sent"].append((recorded - cause.at) * 1000)
            welcome_stages["sent_to_bus"].append((seen.at - recorded) * 1000)
        # The last stage of an urgent check-in: the on-call's message has gone out.
        check_in = by_event_id.get(seen.data.get("cause_event_id"))
        if _urgent_message(seen.data) and check_in in watched:
            messaged.append((seen.at - timings.check_in_accepted[check_in]) * 1000)
    lag = [
        max(0.0, (seen.at - _monotonic(seen.envelope["occurred_at"])) * 1000)
        for seen_list in bus.by_type.values()
        for seen in seen_list
    ]
    return {
        "enroll_http_ms": timings.enroll_http_ms,
        "check_in_http_offered_ms": timings.check_in_http_ms["offered"],
        "check_in_http_flat_out_ms": timings.check_in_http_ms["flat_out"],
        "check_in_to_bus_ms": to_bus,
        "urgent_to_care_team_alerted_during_drain_ms": alerted["during_drain"],
        "urgent_to_care_team_alerted_after_drain_ms": alerted["after_drain"],
        "urgent_on_bus_to_alert_committed_ms": applied,
        "urgent_alert_committed_to_bus_ms": relayed,
        "urgent_to_care_team_messaged_during_drain_ms": messaged,
        "enrollment_to_welcome_sent_ms": welcome,
        "welcome_enrollment_to_bus_ms": welcome_stages["enrolled_to_bus"],
        "welcome_on_bus_to_sent_ms": welcome_stages["on_bus_to_sent"],
        "welcome_sent_to_bus_ms": welcome_stages["sent_to_bus"],
        "outbox_lag_ms": lag,
    }


@asynccontextmanager
async def _live_progress(
    clinics: Clinics, bus: BusLog, config: BenchConfig
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """A live display (rich) of what has been accepted and what has reached the bus;
    yields the call that ends it."""
    columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns)
    total = config.patients
    urgent = max(1, round(total * config.urgent_share))
    rows = {
        "enrollments accepted": (total, lambda: len(clinics.timings.enroll_accepted)),
        "welcomes sent (the wave drained)": (total, lambda: bus.count("NotificationSent", _welcome)),
        "check-ins accepted": (total, lambda: len(clinics.timings.check_in_accepted)),
        "CheckInSubmitted on the bus": (total, lambda: bus.count("CheckInSubmitted")),
        "CareTeamAlerted on the bus": (urgent, lambda: bus.count("CareTeamAlerted")),
        "on-call messaged (urgent)": (urgent, lambda: bus.count("NotificationSent", _urgent_message)),
    }
    tasks = {name: progress.add_task(name, total=limit) for name, (limit, _) in rows.items()}

    async def refresh() -> None:
        while True:
            for name, (limit, count) in rows.items():
                progress.update(tasks[name], completed=min(count(), limit))
            await asyncio.sleep(0.2)  # the display's refresh tick

    progress.start()
    refresher = asyncio.create_task(refresh())

    async def finish() -> None:
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)
        for name, (limit, count) in rows.items():
            progress.update(tasks[name], completed=min(count(), limit))
        progress.stop()

    try:
        yield finish
    finally:
        if not refresher.done():
            await finish()


async def _drive(
    network: LocalNetwork, config: BenchConfig, pids: dict[str, int], database_server: int | None = None
) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(LoadClient(connections=config.concurrency * 4))
        clinics = Clinics(network, http, config)
        await clinics.set_up()
        bus = await BusLog(network.nats_url, network.observed_subjects).start()
        stack.push_async_callback(bus.stop)
        # Every service process (notifications-safety too, when the safety lane has its own).
        services = {i: network.url(i) for i, (name, _) in network.instances.items() if name in SERVICES}
        sampler = Sampler(http, services, pids, database_server).start()
        stack.push_async_callback(sampler.stop)
        started = time.monotonic()
        display = await stack.enter_async_context(_live_progress(clinics, bus, config))
        print(f"enrollment wave: {config.patients} patients over {config.sites} sites ...", flush=True)
        patients = await _enrollment_wave(clinics, config)
        drained = asyncio.Event()

        async def drain() -> None:
            await bus.wait("NotificationSent", len(patients), config.drain_timeout, _welcome)
            drained.set()

        watcher = asyncio.create_task(drain())
        print(f"check-in wave: {len(patients)} check-ins, enrollments still draining ...", flush=True)
        await _check_in_wave(clinics, config, patients, drained)
        urgent = len(clinics.timings.urgent)
        await bus.wait("CheckInSubmitted", len(clinics.timings.check_in_accepted), config.drain_timeout)
        await bus.wait("CareTeamAlerted", urgent, config.drain_timeout)
        await bus.wait("NotificationSent", urgent, config.drain_timeout, _urgent_message)
        await watcher
        wall = time.monotonic() - started
        await display()
        await sampler.stop()
        print("cost per request on the quiet network ...", flush=True)
        cost = await _request_cost(clinics, patients, pids, sampler, bus)
        accepted = len(clinics.timings.check_in_accepted) + cost["check_in"]["requests"]
        await bus.wait("CheckInSubmitted", accepted, config.drain_timeout)
        print("raw baseline on the same nats-server ...", flush=True)
        sizes = [len(str(s.envelope)) for s in bus.by_type["CheckInSubmitted"][:100]] or [600]
        events = sum(len(v) for v in bus.by_type.values())
        assert network.bench_password is not None
        bench_url = url_with_user(network.nats.url if network.nats else "", "bench", network.bench_password)
        raw = await raw_baseline(bench_url, max(events, 1000), int(sum(sizes) / len(sizes)))
        consumers = sampler.consumer_rates()
        for rates in consumers.values():
            rates["ratio_mean_to_raw_consume"] = round(rates["mean_per_s_while_backlogged"] / raw["consume_per_s"], 3)
            rates["ratio_peak_to_raw_consume"] = round(rates["peak_per_s"] / raw["consume_per_s"], 3)
        samples = _latencies(bus, clinics.timings)
        return {
            "config": _config(config),
            "wall_seconds": round(wall, 1),
            "waves": clinics.timings.waves,
            "counts": {
                "enrollments_accepted": len(clinics.timings.enroll_accepted),
                "check_ins_accepted": len(clinics.timings.check_in_accepted),
                "urgent_check_ins": urgent,
                "events_on_bus": events,
                "welcomes_sent": len(samples["enrollment_to_welcome_sent_ms"]),
                "care_team_alerted": sum(1 for _ in bus.by_type["CareTeamAlerted"]),
                "on_call_messaged": bus.count("NotificationSent", _urgent_message),
                "refused": clinics.timings.errors,
            },
            "latency_ms": {name: latency_summary(values) for name, values in samples.items()},
            "consumers": consumers,
            "raw_baseline": raw,
            "request_cost": cost,
            "processes": {name: stats.__dict__ for name, stats in sampler.processes.items()},
            "samples_ms": samples,
        }


def _config(config: BenchConfig) -> dict[str, Any]:
    shown = {k: str(v) if isinstance(v, Path) else v for k, v in config.__dict__.items() if k != "postgres"}
    database = "postgresql" if config.postgres else "sqlite"
    return shown | {"database": database, "safety_process": _safety_process(config)}


def _safety_process(config: BenchConfig) -> bool:
    return config.postgres is not None if config.safety_process is None else config.safety_process


async def _postgres_databases(admin_url: str) -> tuple[dict[str, str], list[str]]:
    plain = admin_url.replace("postgresql+asyncpg://", "postgresql://")
    suffix = secrets.token_hex(4)
    names = {service: f"iopnet_bench_{service}_{suffix}" for service in SERVICES}
    connection = await asyncpg.connect(plain)
    try:
        for name in names.values():
            await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    base = admin_url.rsplit("/", 1)[0]
    return {service: f"{base}/{name}" for service, name in names.items()}, list(names.values())


async def _drop_databases(admin_url: str, names: list[str]) -> None:
    connection = await asyncpg.connect(admin_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        for name in names:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def run_bench(config: BenchConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="iopnet-bench-") as scratch:
        databases: dict[str, str] = {}
        created: list[str] = []
        if config.postgres:
            databases, created = asyncio.run(_postgres_databases(config.postgres))
        settings = Settings(
            data_dir=Path(scratch) / "data",
            nats_url=None,
            jwt_secret=None,
            embedded_nats_port=free_port(),
            intake_port=free_port(),
            scheduling_port=free_port(),
            notifications_port=free_port(),
            log_level="WARNING",
            intake_database_url=databases.get("intake"),
            scheduling_database_url=databases.get("scheduling"),
            notifications_database_url=databases.get("notifications"),
        )
        network = LocalNetwork(
            settings,
            log_dir=Path(scratch),
            bench_password=secrets.token_urlsafe(24),
            safety_lane_process=_safety_process(config),
            replicas=config.replicas,
        )
        try:
            network.start()
            pids = {name: process.pid for name, process in network.processes.items()}
            if network.nats is not None and network.nats.process is not None:
                pids["nats-server"] = network.nats.process.pid
            pids["load-generator"] = os.getpid()
            return asyncio.run(_drive(network, config, pids, _database_server(config)))
        finally:
            network.stop()
            if created:
                asyncio.run(_drop_databases(config.postgres or "", created))


def _database_server(config: BenchConfig) -> int | None:
    """The PostgreSQL server's postmaster when it runs on this machine: its CPU counts too."""
    if not config.postgres:
        return None
    url = make_url(config.postgres)
    return local_postgres_server(url.host, url.port or 5432)


def main(config: BenchConfig) -> Path:
    results = run_bench(config)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = write_results(results, config.results_dir, stamp)
    plot(results, path.with_suffix(".png"))
    print_table(results)
    print(f"results: {path} and {path.with_suffix('.png')}")
    return path
