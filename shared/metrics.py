"""`GET /metrics` in Prometheus' text format (prometheus-client), one registry per app.

- HTTP: requests by method, route template (never the raw path: it holds ids) and status,
  with a latency histogram.
- Events: consumed per consumer and outcome (applied, duplicate, retried, dead-lettered)
  and published per event type, read from the counters the consumers and the relay keep.
- Backlog, read when scraped: outbox rows pending and the oldest one's age; each durable
  consumer's pending and redelivered counts as JetStream reports them.
- The process: objects built at start that the garbage collector's full collections skip
  (`iopnet_gc_frozen_objects`, `shared.runtime.keep_startup_heap_out_of_collections`).

Scrape-time reads are bounded (`SCRAPE_WAIT_SECONDS`): a busy database or an absent
broker leaves the last value and raises `iopnet_scrape_errors_total`, never a slow scrape.

`GET /metrics?name[]=iopnet_consumer_pending&name[]=...` answers only those series
(prometheus-client's own convention, as its `make_asgi_app` reads it) and reads at scrape
time only the backlog they need: a frequent scraper such as `iopnet bench` then costs the
service little (the whole text is some 800 series, written in Python at each scrape).
"""

import asyncio
import gc
import time
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from shared.runtime import ServiceRuntime

SCRAPE_WAIT_SECONDS = 0.5


class ServiceMetrics:
    def __init__(self, runtime: "ServiceRuntime") -> None:
        self.runtime = runtime
        self.registry = runtime.metrics_registry
        self.requests = Counter(
            "iopnet_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "iopnet_http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=self.registry
        )
        self.outbox_pending = Gauge("iopnet_outbox_pending", "Outbox rows not yet published", registry=self.registry)
        self.outbox_oldest_age = Gauge(
            "iopnet_outbox_oldest_pending_age_seconds",
            "Age of the oldest unpublished outbox row",
            registry=self.registry,
        )
        self.consumer_pending = Gauge(
            "iopnet_consumer_pending", "Messages not yet delivered to the durable", ["consumer"], registry=self.registry
        )
        self.consumer_ack_pending = Gauge(
            "iopnet_consumer_ack_pending", "Delivered, not yet acknowledged", ["consumer"], registry=self.registry
        )
        self.consumer_redelivered = Gauge(
            "iopnet_consumer_redelivered", "Messages JetStream has redelivered", ["consumer"], registry=self.registry
        )
        self.consumer_dormant = Gauge(
            "iopnet_consumer_dormant",
            "1 while a durable read only for outside systems has nobody asking (no durable, nothing read)",
            ["consumer"],
            registry=self.registry,
        )
        self.scrape_errors = Counter(
            "iopnet_scrape_errors", "Scrape-time reads that failed or timed out", ["source"], registry=self.registry
        )
        self.frozen_objects = Gauge(
            "iopnet_gc_frozen_objects",
            "Objects built at start that the garbage collector's full collections skip (iopnet serve)",
            registry=self.registry,
        )
        self.frozen_objects.set_function(gc.get_freeze_count)
        self.registry.register(_RuntimeCounters(runtime))

    async def refresh(self, names: Collection[str] = ()) -> None:
        """Read the backlog gauges now: all of them, or those among `names` (series names)."""
        reads = []
        if _wanted(names, "iopnet_outbox_"):
            reads.append(self._refresh_outbox())
        if _wanted(names, "iopnet_consumer_"):
            reads.extend(self._refresh_consumer(c) for c in self.runtime.consumers)
        await asyncio.gather(*reads)

    async def _refresh_outbox(self) -> None:
        runtime = self.runtime
        if runtime.engine is None:
            return
        try:
            async with asyncio.timeout(SCRAPE_WAIT_SECONDS), runtime.sessions() as session:
                pending = await runtime.outbox.pending_count(session)
                oldest = await runtime.outbox.oldest_pending_at(session)
        except Exception:
            self.scrape_errors.labels("outbox").inc()
            return
        self.outbox_pending.set(pending)
        self.outbox_oldest_age.set((datetime.now(UTC) - oldest).total_seconds() if oldest else 0)

    async def _refresh_consumer(self, consumer: Any) -> None:
        self.consumer_dormant.labels(consumer.durable).set(1 if consumer.dormant else 0)
        if consumer.dormant:  # no durable while nobody asks for its events: nothing pending
            for gauge in (self.consumer_pending, self.consumer_ack_pending, self.consumer_redelivered):
                gauge.labels(consumer.durable).set(0)
            return
        try:
            info = await consumer.js.consumer_info(
                consumer.subscription.stream, consumer.durable, timeout=SCRAPE_WAIT_SECONDS
            )
        except Exception:
            self.scrape_errors.labels(consumer.durable).inc()
            return
        self.consumer_pending.labels(consumer.durable).set(info.num_pending or 0)
        self.consumer_ack_pending.labels(consumer.durable).set(info.num_ack_pending or 0)
        self.consumer_redelivered.labels(consumer.durable).set(info.num_redelivered or 0)


def _wanted(names: Collection[str], prefix: str) -> bool:
    return not names or any(name.startswith(prefix) for name in names)


class _RuntimeCounters(Collector):
    """The counters the consumers and the relay keep in memory, read at scrape time."""

    def __init__(self, runtime: "ServiceRuntime") -> None:
        self.runtime = runtime

    def describe(self) -> Iterator[CounterMetricFamily]:
        # The names, so that a registry restricted to some series (`name[]`) finds this
        # collector: prometheus-client's way for a custom collector to name what it yields.
        yield from self._families()

    def collect(self) -> Iterator[CounterMetricFamily]:
        consumed, dead, published = self._families()
        for consumer in self.runtime.consumers:
            stats = consumer.stats
            for outcome, value in (
                ("applied", stats.applied),
                ("duplicate", stats.skipped_duplicates),
                ("retried", stats.retried),
                ("dead_lettered", stats.dead_lettered),
            ):
                consumed.add_metric([consumer.durable, outcome], value)
            dead.add_metric([consumer.durable], stats.dead_lettered)
        relay = getattr(self.runtime, "relay", None)
        for event, value in sorted((relay.published_by_event if relay else {}).items()):
            published.add_metric([event], value)
        yield consumed
        yield dead
        yield published

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        consumed = CounterMetricFamily(
            "iopnet_events_consumed", "Events taken by a consumer, by outcome", labels=["consumer", "outcome"]
        )
        dead = CounterMetricFamily("iopnet_dead_letters", "Messages dead-lettered", labels=["consumer"])
        published = CounterMetricFamily(
            "iopnet_events_published",
            "Events this process published from its outbox (relay and express lane), by type",
            labels=["event"],
        )
        return consumed, dead, published


class MetricsMiddleware:
    """Pure ASGI: counts and times every HTTP request by its route template."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            # The router put the matched route in the scope; unmatched paths share one label.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)


def install_metrics(app: FastAPI, runtime: "ServiceRuntime") -> ServiceMetrics:
    metrics = ServiceMetrics(runtime)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        names = request.query_params.getlist("name[]")
        await metrics.refresh(names)
        registry = metrics.registry.restricted_registry(names) if names else metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
