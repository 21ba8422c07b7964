"""What every service process runs besides its routes: database, migrations, NATS,
owned streams, the outbox relay and the consumers. app.py composes one of these."""

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from faststream.nats import NatsBroker
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from shared.db import create_engine, is_sqlite, migrate, session_factory
from shared.messaging import (
    STREAMS,
    Consumer,
    Inbox,
    Outbox,
    OutboxRelay,
    Subscription,
    ensure_streams,
    owned_streams,
)
from shared.messaging import broker as brokers
from shared.messaging.control import ControlPlane
from shared.messaging.publishers import declare_publishers
from shared.messaging.streams import StreamLimits
from shared.priority import PriorityGate
from shared.settings import ServiceName, Settings

log = logging.getLogger("iopnet.runtime")

# How long a stop lets each consumer finish the message or batch in hand before it is
# cancelled (its transaction then rolls back, and what it held is NAKed all the same).
CONSUMER_STOP_GRACE_SECONDS = 5.0
# Then every other background task: cancelled, and given this long to wind down (a job
# may catch the cancellation to finish work in flight, e.g. record a send).
TASK_STOP_GRACE_SECONDS = 10.0
# /readyz answers within a second: the database probe gets this long, then counts as down.
READINESS_DATABASE_TIMEOUT_SECONDS = 0.8

BackgroundJob = Callable[["ServiceRuntime"], Awaitable[None]]


def periodic(
    interval: Callable[[Settings], float],
    work: Callable[[AsyncSession, datetime], Awaitable[object]],
    name: str,
) -> BackgroundJob:
    """A background loop: run `work(session, now)` in its own transaction at start and
    then every interval. A failed round is logged and retried next round."""

    async def loop(runtime: "ServiceRuntime") -> None:
        while True:
            try:
                async with runtime.sessions() as session, session.begin():
                    await work(session, datetime.now(UTC))
            except Exception as exc:
                log.warning("background round failed", extra={"reason": name, "error": type(exc).__name__})
            await asyncio.sleep(interval(runtime.settings))

    loop.__name__ = name
    return loop


def lanes_of_this_process(
    name: ServiceName, subscriptions: list[Subscription], lanes: str, database_url: str
) -> list[Subscription]:
    """The subscriptions this process consumes (`Settings.lanes`). A part of them only on
    PostgreSQL: the rest is another process's, on the same database, and SQLite takes one."""
    if lanes == "all":
        return subscriptions
    if database_url.startswith("sqlite"):
        raise ValueError(f"IOPNET_LANES={lanes} needs PostgreSQL: on SQLite one process reads every lane")
    if not any(s.lane == "safety" for s in subscriptions):
        raise ValueError(f"IOPNET_LANES={lanes}: {name} has no safety lane (only notifications has one)")
    return [s for s in subscriptions if (s.lane == "safety") == (lanes == "safety")]


# A routine batch's transaction, by database. SQLite has one writer: a check-in or the
# dispatcher's claim of a welcome waits for the batch's commit, so it stays short. On
# PostgreSQL nothing waits for it (each transaction has a connection of its own, and the
# safety lane locks no patient row), and the rows a batch reads once (a site's rules, a
# patient's contact and enrollments, the webhook subscriptions) serve more events in a
# longer one: `iopnet bench --postgres` ran 18% fewer statements in notifications and
# used 16% less of its CPU at 0.5 s than at 0.1 s (docs/performance.md).
ROUTINE_TRANSACTION_SECONDS = {"sqlite": 0.1, "postgresql": 0.5}


def application_name(name: ServiceName, lanes: str) -> str:
    """How a process's PostgreSQL connections are named: the service, and its lanes when
    it reads only some (notifications' safety process: iopnet-notifications-safety)."""
    return f"iopnet-{name}" if lanes == "all" else f"iopnet-{name}-{lanes}"


def routine_transaction_seconds(settings: Settings, database_url: str) -> float:
    """How long a routine consumer's batch runs in one transaction (Settings, or the
    database's default)."""
    if settings.routine_transaction_seconds is not None:
        return settings.routine_transaction_seconds
    return ROUTINE_TRANSACTION_SECONDS["sqlite" if is_sqlite(database_url) else "postgresql"]


def session_niceness(pid: int | str = "self", proc: Path = Path("/proc")) -> int | None:
    """The niceness of the autogroup of `pid`'s session, or None where it has none: a
    kernel without autogroups, or a session in the root group (init's, and that of any
    process started from it without `setsid`), whose file reads empty."""
    try:
        fields = (proc / str(pid) / "autogroup").read_text().split()  # "/autogroup-85 nice 0"
    except OSError:
        return None
    return int(fields[-1]) if fields else None


def run_at_niceness(niceness: int) -> None:
    """Raise this process's Unix niceness to at least `niceness` (settings.cpu_nice).
    Raising it needs no privilege; one already higher (set by whoever started the
    process) is kept, since lowering it would. On Linux niceness belongs to each thread
    and a new thread takes its creator's: this runs before the process starts any.

    A process that leads its own session (`iopnet run` starts each so) also gives its
    session's autogroup that niceness: with autogroups the kernel shares the cores between
    sessions first, so a thread's niceness alone ranks it only within its session. Never
    in a session it shares (a terminal's): that would slow everything started there."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if niceness > current:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    if os.getsid(0) == os.getpid():
        session = session_niceness()
        if session is not None and niceness > session:
            with contextlib.suppress(OSError):  # a /proc mounted read-only (some containers)
                Path("/proc/self/autogroup").write_text(str(niceness))


def keep_startup_heap_out_of_collections() -> None:
    """Move what the process built to start (modules, models, routes, compiled schemas)
    out of the cyclic garbage collector's reach, once it is built: it lives as long as the
    process. Otherwise every full collection walks all of it, and under
    `iopnet bench --postgres` those took up to 240 ms in intake and 460 ms in
    notifications: a pause of the whole event loop, an urgent check-in's included
    (docs/performance.md). Only for a process that runs one service to its end: a test
    process that builds many apps would keep each one's garbage for good."""
    gc.collect()
    gc.freeze()


class ServiceRuntime:
    def __init__(
        self,
        name: ServiceName,
        settings: Settings,
        *,
        outbox: Outbox,
        inbox: Inbox,
        migrations_dir: Path,
        subscriptions: list[Subscription],
        jobs: list[BackgroundJob] | None = None,
        lane_inboxes: Mapping[str, Inbox] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.outbox = outbox
        self.inbox = inbox
        # A lane whose events the main consumers apply too keeps an inbox of its own.
        self.lane_inboxes = dict(lane_inboxes or {})
        self.migrations_dir = migrations_dir
        url = settings.database_url(name)
        self.subscriptions = lanes_of_this_process(name, subscriptions, settings.lanes, url)
        # Read by another process of the service (its lanes split): the control plane
        # leaves requests for them to that one.
        self.elsewhere = [s for s in subscriptions if s not in self.subscriptions]
        self.jobs = jobs or []
        self.engine: AsyncEngine = create_engine(url, settings.db_pool_size, application_name(name, settings.lanes))
        # SQLite's pool holds one connection, which a backlog keeps busy for seconds: the
        # probe never queues behind the service's own work. No pool: each probe opens and
        # closes its connection (cheap on SQLite, one short session on PostgreSQL).
        self.probe_engine: AsyncEngine = create_async_engine(
            url, poolclass=NullPool, connect_args={"timeout": READINESS_DATABASE_TIMEOUT_SECONDS}
        )
        self.sessions: async_sessionmaker[AsyncSession] = session_factory(self.engine)
        # Safety work first (shared/priority.py): the safety lane's consumer and the
        # check-in requests hold routine transactions back while they wait or run.
        self.gate = PriorityGate()
        # One registry per service: FastStream's Prometheus middleware and ServiceMetrics.
        self.metrics_registry = CollectorRegistry()
        # One FastStream broker per NATS account: the main one, and (intake, notifications)
        # the account that holds IOP_RESTRICTED, or the main one when no separate URL is
        # configured (a server without accounts).
        self.broker = brokers.new_broker(settings.effective_nats_url, f"iopnet-{name}", registry=self.metrics_registry)
        self.restricted_broker = self.broker
        if settings.nats_restricted_url and self._needs_restricted():
            self.restricted_broker = brokers.new_broker(
                settings.nats_restricted_url, f"iopnet-{name}-restricted", registry=self.metrics_registry
            )
        declare_publishers(name, self.broker, self.restricted_broker)
        self.consumers = [self._consumer(subscription) for subscription in self.subscriptions]
        self.relay: OutboxRelay
        self.streams_ready = asyncio.Event()
        self.connected = False
        # Set when the service starts to stop: a job may watch it to take no new work.
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._consumer_tasks: list[asyncio.Task[None]] = []

    def _consumer(self, subscription: Subscription) -> Consumer:
        restricted = STREAMS[subscription.stream].restricted
        return Consumer(
            self.name,
            subscription,
            self.sessions,
            self.lane_inboxes.get(subscription.lane or "", self.inbox),
            self.restricted_broker if restricted else self.broker,
            dlq_broker=self.broker,
            max_deliver=self.settings.max_deliver,
            ack_wait_seconds=self.settings.ack_wait_seconds,
            nak_delay_seconds=self.settings.nak_delay_seconds,
            batch=self.settings.fetch_batch,
            duplicate_window_seconds=self.settings.duplicate_window_seconds,
            gate=self.gate,
            transaction_budget_seconds=routine_transaction_seconds(
                self.settings, self.settings.database_url(self.name)
            ),
        )

    async def start(self) -> None:
        await migrate(self.engine, self.migrations_dir)
        self.relay = OutboxRelay(
            self.outbox,
            self.sessions,
            lambda: self.broker if self.streams_ready.is_set() else None,
            restricted_broker=lambda: self.restricted_broker if self.streams_ready.is_set() else None,
            batch_size=self.settings.outbox_batch,
            retry_seconds=self.settings.outbox_retry_seconds,
        )
        self._spawn(self._messaging(), "messaging")
        self._spawn(self.relay.run(), "outbox-relay")
        for job in self.jobs:
            self._spawn(job(self), getattr(job, "__name__", "job"))
        log.info("service started", extra={"service": self.name})

    def _needs_restricted(self) -> bool:
        return any(s.restricted for s in owned_streams(self.name)) or any(
            STREAMS[s.stream].restricted for s in self.subscriptions
        )

    def _brokers(self) -> list[NatsBroker]:
        return list({id(b): b for b in (self.broker, self.restricted_broker)}.values())

    async def _messaging(self) -> None:
        for broker in self._brokers():
            await brokers.connect(broker)
        self.connected = True
        main, restricted = brokers.jetstream(self.broker), brokers.jetstream(self.restricted_broker)
        await self._declare_streams(main, restricted)
        self.streams_ready.set()
        self.relay.wake()
        for consumer in self.consumers:
            self._consumer_tasks.append(self._spawn(consumer.run(), consumer.durable))
        if any(c.subscription.interest is not None for c in self.consumers):
            self._spawn(self._follow_interests(), "interest-refresh")
        control = ControlPlane(self.name, main, self.consumers, lanes=self.settings.lanes, elsewhere=self.elsewhere)
        await control.start(brokers.client(self.broker))

    async def refresh_interests(self) -> None:
        """After a change to who outside asks for what (an integration, a webhook
        subscription), committed: the consumers read only for them re-bind now."""
        scoped = [c for c in self.consumers if c.subscription.interest is not None]
        outcomes = await asyncio.gather(*(c.refresh_interest() for c in scoped), return_exceptions=True)
        for consumer, outcome in zip(scoped, outcomes, strict=True):
            if isinstance(outcome, Exception):  # the periodic round tries again
                failure = {"consumer": consumer.durable, "error": type(outcome).__name__}
                log.warning("interest refresh failed", extra=failure)

    async def _follow_interests(self) -> None:
        """What another replica was asked reaches this one's consumers within a round."""
        while True:
            await asyncio.sleep(self.settings.interest_refresh_seconds)
            await self.refresh_interests()

    async def _declare_streams(self, main: JetStreamContext, restricted: JetStreamContext) -> None:
        """The streams this service owns, with the replicas and retention of its settings.
        Retried until it succeeds (a cluster still placing streams, a broker restarting):
        meanwhile the service is not ready, and says why."""
        window, limits = self.settings.duplicate_window_seconds, StreamLimits.from_settings(self.settings)
        owned = owned_streams(self.name)
        delay = 1.0
        while True:
            try:
                await ensure_streams(
                    main, [s for s in owned if not s.restricted], window, service=self.name, limits=limits
                )
                await ensure_streams(
                    restricted, [s for s in owned if s.restricted], window, service=self.name, limits=limits
                )
                return
            except Exception as exc:
                log.warning("streams not declared; retrying", extra={"service": self.name, "error": type(exc).__name__})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._on_task_done)
        self._tasks.append(task)
        return task

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            # A background loop must not die quietly: readyz turns false and we say so.
            log.error(
                "background task died",
                extra={"reason": task.get_name(), "error": type(task.exception()).__name__},
            )

    async def stop(self) -> None:
        """Consumers first: each takes no new message, finishes the one or the batch in
        hand (bounded) and NAKs what it still holds, so those come back at once and in
        order (not after ack_wait, behind later ones). Meanwhile the other tasks are
        cancelled. NATS and the database close only after all of them have ended."""
        self.stopping.set()
        for consumer in self.consumers:
            consumer.request_stop()
        consumer_tasks = set(self._consumer_tasks)
        for task in self._tasks:
            if task not in consumer_tasks:
                task.cancel()
        if consumer_tasks:
            _, slow = await asyncio.wait(consumer_tasks, timeout=CONSUMER_STOP_GRACE_SECONDS)
            for task in slow:
                log.warning("consumer did not finish its batch in time; cancelled", extra={"reason": task.get_name()})
                task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=TASK_STOP_GRACE_SECONDS)
            for task in stuck:
                log.error("background task ignored cancellation", extra={"reason": task.get_name()})
        self.connected = False
        try:
            for broker in self._brokers():
                await brokers.close(broker)
        except Exception as exc:  # the broker may already be gone; the database still closes
            log.warning("nats close failed", extra={"error": type(exc).__name__})
        finally:
            for engine in (self.probe_engine, self.engine):
                if engine is not None:
                    await engine.dispose()
        log.info("service stopped", extra={"service": self.name})

    async def readiness(self) -> dict[str, bool]:
        """Every check must hold for /readyz to answer 200. It answers within a second
        even while the service works through a backlog: nothing here waits for the
        service's pooled connection (see `_database_reachable`)."""
        checks = {"database": await self._database_reachable()}
        checks["nats"] = (
            self.connected
            and all(brokers.client(b).is_connected for b in self._brokers())
            and self.streams_ready.is_set()
        )
        # Every consumer bound to its durable. One whose stream its producer has not
        # declared yet counts as bound: there is nothing to consume, its durable will
        # start from the stream's first message, and a service must not be unready
        # because another one has never run. Starting, re-binding after a failure, a
        # broker that does not answer, or stopping: not ready.
        checks["consumers"] = len(self.consumers) == len(self.subscriptions) and all(
            c.bound.is_set() or (c.awaiting_stream and not c.stopping) for c in self.consumers
        )
        checks["background"] = all(not t.done() for t in self._tasks if t.get_name() != "messaging")
        return checks

    async def _database_reachable(self) -> bool:
        """A query on a connection of the probe's own, with a deadline. On SQLite it reads
        the schema (a `SELECT 1` never touches the file); on PostgreSQL `SELECT 1`."""
        url = self.settings.database_url(self.name)
        query = "SELECT count(*) FROM sqlite_master" if is_sqlite(url) else "SELECT 1"
        try:
            async with asyncio.timeout(READINESS_DATABASE_TIMEOUT_SECONDS):
                async with self.probe_engine.connect() as connection:
                    await connection.execute(text(query))
        except Exception as exc:
            log.warning("database not ready", extra={"error": type(exc).__name__})
            return False
        return True
