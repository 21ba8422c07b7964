"""Structured JSON logs. Callers pass ids only (event_id, patient_id, site_id), never
names, contact details or free text; `extra` keys outside SAFE_FIELDS are dropped so a
slip cannot leak PHI into a log aggregator."""

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

SAFE_FIELDS = frozenset(
    {
        "service", "event_id", "event_type", "subject", "site_id", "patient_id", "enrollment_id",
        "consumer", "stream", "deliveries", "reason", "count", "attempts", "method", "path",
        "status", "duration_ms", "url", "channel", "template", "notification_id", "error",
        "correlation_id", "pid", "alert_id", "session_id", "booking_id", "check_in_id",
        "request_id", "file",
    }
)  # fmt: skip
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))
# What the current request or event is: every log line written while handling it carries
# these ids (request_id in HTTP; correlation_id and event_id in a consumer), so one
# check-in can be followed from the request through every service that reacts to it.
_CONTEXT: ContextVar[dict[str, str]] = ContextVar("iopnet_log_context", default={})  # noqa: B039 - never mutated


_base_factory = logging.getLogRecordFactory()


def _record_with_context(*args: object, **kwargs: object) -> logging.LogRecord:
    # Stamped when the line is logged, in the caller's context: a handler that formats
    # later, elsewhere (a queue, pytest's capture), still sees the right ids.
    record = _base_factory(*args, **kwargs)
    record.iopnet_context = _CONTEXT.get()
    return record


logging.setLogRecordFactory(_record_with_context)


@contextmanager
def log_context(**ids: object) -> Iterator[None]:
    """Within the block (and the tasks it starts), log lines carry `ids` unless a line
    names its own value. Ids only: the keys must be in SAFE_FIELDS."""
    unsafe = set(ids) - SAFE_FIELDS
    if unsafe:
        raise ValueError(f"not loggable: {sorted(unsafe)}")
    token = _CONTEXT.set({**_CONTEXT.get(), **{k: str(v) for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key in SAFE_FIELDS:
                entry[key] = value if value is None or isinstance(value, int | float | bool) else str(value)
        for key, value in getattr(record, "iopnet_context", {}).items():
            entry.setdefault(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            # Where it happened, never what it said: the message and the locals may hold
            # input (a name, a phone number); file, line and function cannot.
            entry["exc_where"] = _where(record.exc_info[2])
        return json.dumps(entry)


def _where(tb: TracebackType | None, frames: int = 8) -> str:
    """The innermost `frames` frames as `file:line in function`, innermost first."""
    summary = traceback.extract_tb(tb)[-frames:]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(summary))


def configure_logging(level: str = "INFO", service: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).disabled = True
    if service:
        handler.addFilter(_ServiceTag(service))


class _ServiceTag(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "service"):
            record.service = self.service
        return True
