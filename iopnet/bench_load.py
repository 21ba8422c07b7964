"""What `iopnet bench` measures with: the bus as seen from outside (one record per event,
parsed once), the services' /metrics and their processes sampled while the load runs,
and the raw bus baseline on the same nats-server."""

import asyncio
import contextlib
import itertools
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import nats
import psutil
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from prometheus_client.parser import text_string_to_metric_families

from iopnet.bench_http import LoadClient
from shared.messaging.connection import connect_once


@dataclass
class Seen:
    """An event as the bench saw it on the bus (monotonic clock of this process)."""

    at: float
    envelope: dict[str, Any]

    @property
    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = self.envelope.get("data", {})
        return data


@dataclass
class BusLog:
    """Every public event, by type; `at` is when it reached this process."""

    url: str
    subjects: tuple[str, ...]
    by_type: dict[str, list[Seen]] = field(default_factory=lambda: defaultdict(list))
    _nc: Client | None = None

    async def start(self) -> "BusLog":
        # A generous pending limit: the bench reads every event of the run.
        self._nc = await connect_once(self.url, pending_size=1024 * 1024 * 1024)
        for subject in self.subjects:
            await self._nc.subscribe(subject, cb=self._on_message, pending_msgs_limit=10_000_000)
        await self._nc.flush()
        return self

    async def _on_message(self, msg: Msg) -> None:
        now = time.monotonic()
        try:
            envelope = json.loads(msg.data)
        except ValueError:
            return
        self.by_type[str(envelope.get("event_type"))].append(Seen(now, envelope))

    def count(self, event_type: str, where: Callable[[dict[str, Any]], bool] | None = None) -> int:
        """How many events of the type have been seen (those whose data `where` accepts)."""
        seen = self.by_type.get(event_type, ())
        return len(seen) if where is None else sum(1 for s in seen if where(s.data))

    async def wait(
        self, event_type: str, count: int, timeout: float, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> bool:
        deadline = time.monotonic() + timeout
        while self.count(event_type, where) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)  # the bench's own progress poll
        return True

    async def stop(self) -> None:
        if self._nc is not None:
            await self._nc.drain()


@dataclass
class ProcessStats:
    peak_rss_mb: float | None = 0.0  # None: not measured (a server's processes share memory)
    cpu_seconds: float = 0.0
    niceness: int = 0  # the CPU priority it ran at (routine-only processes yield: IOPNET_CPU_NICE)


def local_postgres_server(host: str | None, port: int) -> int | None:
    """The pid of the PostgreSQL server listening on this loopback port (its postmaster),
    or None: not on this machine, or not visible to this user."""
    if host not in (None, "", "localhost", "127.0.0.1", "::1"):
        return None
    for process in psutil.process_iter(["name"]):
        if process.info["name"] not in ("postgres", "postmaster"):
            continue
        try:
            listening = [c for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
        if any(c.laddr.port == port for c in listening):
            return process.pid
    return None


def server_cpu_seconds(postmaster: psutil.Process) -> float:
    """CPU time of a PostgreSQL server so far: the postmaster, its live backends and
    workers, and the children it has reaped (a backend whose connection closed)."""
    own = postmaster.cpu_times()
    total = own.user + own.system + own.children_user + own.children_system
    for child in postmaster.children():
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


# The sampler scrapes every half second: only the series it reads, so the services spend
# on its scrapes a fraction of what the whole text costs them (shared/metrics.py).
SCRAPED = "/metrics?" + urlencode(
    [("name[]", n) for n in ("iopnet_events_consumed_total", "iopnet_consumer_pending", "iopnet_consumer_ack_pending")]
)


# What `Sampler.at_rest` reads: the work each service has left (events to publish, to consume).
LEFT_TO_DO = ("iopnet_consumer_pending", "iopnet_consumer_ack_pending", "iopnet_outbox_pending")
AT_REST = "/metrics?" + urlencode([("name[]", n) for n in LEFT_TO_DO])


@dataclass
class Sampler:
    """Every `interval`: each service's consumer counters (from /metrics) and each
    process's RSS and CPU time (psutil), the load generator's own included."""

    http: LoadClient
    services: dict[str, str]  # name -> base url
    pids: dict[str, int]  # process name -> pid
    # The database server on this machine (PostgreSQL's postmaster), if any: it shares the
    # cores with the services, so its CPU during the run is reported beside theirs.
    database_server: int | None = None
    interval: float = 0.5
    applied: dict[str, list[tuple[float, float, float]]] = field(default_factory=lambda: defaultdict(list))
    processes: dict[str, ProcessStats] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def start(self) -> "Sampler":
        self._handles = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        self._server: tuple[psutil.Process, float] | None = None
        if self.database_server is not None:
            with contextlib.suppress(psutil.Error):
                server = psutil.Process(self.database_server)
                self._server = (server, server_cpu_seconds(server))  # what it used before the run
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self._scrape(name, url) for name, url in self.services.items()))
            self._sample_processes()
            await asyncio.sleep(self.interval)

    async def _scrape(self, service: str, url: str) -> None:
        try:
            text = (await self.http.get(f"{url}{SCRAPED}", timeout=2)).text
        except (aiohttp.ClientError, TimeoutError):
            return
        applied = pending = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "iopnet_events_consumed_total" and sample.labels.get("outcome") == "applied":
                    applied += sample.value
                elif sample.name in ("iopnet_consumer_pending", "iopnet_consumer_ack_pending"):
                    pending += sample.value
        self.applied[service].append((time.monotonic(), applied, pending))

    def _sample_processes(self) -> None:
        for name, handle in self._handles.items():
            try:
                memory = handle.memory_info().rss / 1e6
                times = handle.cpu_times()
                niceness = handle.nice()
            except psutil.Error:
                continue
            stats = self.processes.setdefault(name, ProcessStats())
            stats.peak_rss_mb = max(stats.peak_rss_mb or 0.0, memory)
            stats.cpu_seconds = times.user + times.system
            stats.niceness = niceness
        if self._server is not None:
            server, before = self._server
            with contextlib.suppress(psutil.Error):
                # Peak RSS is not summed over its processes: they share its buffers.
                stats = self.processes.setdefault("postgresql", ProcessStats(peak_rss_mb=None))
                stats.cpu_seconds = server_cpu_seconds(server) - before
                stats.niceness = server.nice()

    async def at_rest(self) -> bool:
        """Whether no service has an event left to publish or to consume (an answer it
        cannot give counts as work left)."""

        async def left(url: str) -> float:
            try:
                text = (await self.http.get(f"{url}{AT_REST}", timeout=2)).text
            except (aiohttp.ClientError, TimeoutError):
                return 1.0
            families = text_string_to_metric_families(text)
            return sum(sample.value for family in families for sample in family.samples if sample.name in LEFT_TO_DO)

        return not any(await asyncio.gather(*(left(url) for url in self.services.values())))

    def database_cpu_seconds(self) -> float | None:
        """The CPU seconds the database server on this machine has used since the start
        (PostgreSQL), or None when there is none to watch."""
        if self._server is None:
            return None
        server, before = self._server
        with contextlib.suppress(psutil.Error):
            return server_cpu_seconds(server) - before
        return None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            # The last word: every count at the end of the run.
            await asyncio.gather(*(self._scrape(name, url) for name, url in self.services.items()))
            self._sample_processes()

    def consumer_rates(self) -> dict[str, dict[str, float]]:
        """Events applied per second while the service had a backlog: the best window
        and the mean over all windows with one."""
        rates: dict[str, dict[str, float]] = {}
        for service, samples in self.applied.items():
            busy = [
                (b_applied - a_applied) / (b_at - a_at)
                for (a_at, a_applied, a_pending), (b_at, b_applied, _) in itertools.pairwise(samples)
                if a_pending > 0 and b_at > a_at
            ]
            total = samples[-1][1] if samples else 0.0
            rates[service] = {
                "applied": total,
                "peak_per_s": round(max(busy, default=0.0), 1),
                "mean_per_s_while_backlogged": round(sum(busy) / len(busy), 1) if busy else 0.0,
            }
        return rates


async def raw_baseline(url: str, count: int, size: int) -> dict[str, float]:
    """nats-py alone on the same nats-server: JetStream async publish of `count` messages
    of `size` bytes, then a durable pull consumer (batches of 64, explicit acks)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    stream = "BENCH_RAW"
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=["bench.raw.>"], storage=StorageType.FILE))
        payload = b"x" * size
        started = time.perf_counter()
        acks = [await js.publish_async(f"bench.raw.{i % 50}", payload) for i in range(count)]
        await asyncio.gather(*acks)
        published = time.perf_counter() - started
        config = ConsumerConfig(
            durable_name="raw", ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, max_ack_pending=-1
        )
        await js.add_consumer(stream, config)
        subscription = await js.pull_subscribe_bind("raw", stream)
        started = time.perf_counter()
        done = 0
        while done < count:
            messages = await subscription.fetch(64, timeout=5)
            for message in messages:
                await message.ack()
            done += len(messages)
        consumed = time.perf_counter() - started
        return {
            "messages": count,
            "message_bytes": size,
            "publish_per_s": round(count / published, 1),
            "consume_per_s": round(count / consumed, 1),
        }
    finally:
        try:
            await js.delete_stream(stream)
        finally:
            await nc.close()
