"""OpenTelemetry traces: off unless configured, one trace from a request to its last effect.

HTTP server spans are FastAPI's own (its built-in telemetry, `telemetry=TELEMETRY` in
shared/http.py: request spans only, no OTel logs, which would carry exception messages).
Their `url.query` is redacted to its keys by `RedactQuery`, since a query may hold a
searched name; every provider this module installs has it, and a test's must too.

Configured by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, or `OTEL_TRACES_EXPORTER=otlp`, makes each service
export its spans over OTLP/HTTP (`OTEL_SERVICE_NAME` defaults to `iopnet-<service>`). Unset,
the API's no-op tracer costs next to nothing and nothing is stored.

How a trace crosses the outbox and the bus: the W3C trace context (`traceparent`) of the
span that staged an event is kept in its outbox row, because the relay publishes it later,
outside the request; the relay publishes it in a PRODUCER span under that context and puts
the producer span's context in the message headers; a consumer opens its CONSUMER span
under the headers' context, so what its handler stages (a CareTeamAlerted) joins the same
trace. Span attributes are ids and names only (event type, subject, route), never PHI.
"""

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.trace import Span, SpanKind

tracer = trace.get_tracer("iopnet")


def tracing_requested() -> bool:
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "otlp"
    )


def configure_tracing(service: str) -> bool:
    """Export this process's spans over OTLP when the environment asks for it. A provider
    already installed (by a test, or by an operator's own bootstrap) is left as it is."""
    if not tracing_requested() or _has_provider():
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or f"iopnet-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    install(provider)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


# FastAPI(telemetry=...): HTTP spans only. Its OTel logs record exception messages and its
# metrics duplicate /metrics; its operation spans add little to a trace across services.
TELEMETRY: dict[str, Any] = {"logs": False, "metrics": False, "operation_spans": False}


class RedactQuery(SpanProcessor):
    """Keeps a span's `url.query` keys and drops the values (`name=…&birth_date=…`): a
    search by name must not reach a trace backend. Runs at span start, before any
    exporter sees the span."""

    def on_start(self, span: SdkSpan, parent_context: otel_context.Context | None = None) -> None:
        query = (span.attributes or {}).get("url.query")
        if isinstance(query, str) and query:
            keys = [part.split("=", 1)[0] for part in query.split("&")]
            span.set_attribute("url.query", "&".join(f"{key}=REDACTED" for key in keys))

    def on_end(self, span: ReadableSpan) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def install(provider: TracerProvider) -> TracerProvider:
    """What every provider serving iopnet needs before its exporters (a test's too)."""
    provider.add_span_processor(RedactQuery())
    return provider


def _has_provider() -> bool:
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def current_context() -> str | None:
    """The active span's context as stored in an outbox row (JSON of the W3C headers), or
    None when nothing is being traced."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return json.dumps(carrier, sort_keys=True) if carrier else None


def stored_context(stored: str | None) -> dict[str, str]:
    if not stored:
        return {}
    try:
        carrier = json.loads(stored)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in carrier.items()} if isinstance(carrier, dict) else {}


@contextmanager
def span_under(carrier: Mapping[str, str] | None, name: str, kind: SpanKind, **attributes: Any) -> Iterator[Span]:
    """A span whose parent is the context in `carrier` (message headers, an outbox row)."""
    parent = propagate.extract(dict(carrier or {}))
    with tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes) as span:
        yield span


def headers_with_context(headers: dict[str, str]) -> dict[str, str]:
    """`headers` plus the active span's context, for a message about to be published."""
    propagate.inject(headers)
    return headers
