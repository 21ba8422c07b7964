"""Structured JSON logs. Callers pass ids only (event_id, patient_id, site_id), never
names, contact details or free text; `extra` keys outside SAFE_FIELDS are dropped so a
slip cannot leak PHI into a log aggregator."""

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key in SAFE_FIELDS:
                entry[key] = value if value is None or isinstance(value, int | float | bool) else str(value)
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
