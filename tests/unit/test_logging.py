"""Structured logs (shared/logging.py): JSON, safe fields only, no exception text."""

import json
import logging
import sys
from uuid import uuid4

import pytest

from shared.logging import SAFE_FIELDS, JsonFormatter

PHI = {
    "email": "jane.doe@example.org",
    "given_name": "Jane",
    "family_name": "Doe",
    "phone": "+16145550100",
    "birth_date": "1985-02-03",
    "notes": "told me about her drinking",
}


def _record(msg="processed", args=(), exc_info=None, **extra):
    record = logging.getLogRecordFactory()("iopnet.test", logging.INFO, __file__, 10, msg, args, exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def _format(record: logging.LogRecord) -> dict:
    return json.loads(JsonFormatter().format(record))


def test_output_is_one_json_object():
    line = JsonFormatter().format(_record("hello %s", ("world",)))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "hello world"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "iopnet.test"
    assert entry["ts"].endswith("+00:00")


def test_safe_extra_fields_are_kept():
    entry = _format(_record(event_id="e-1", site_id="columbus-east", deliveries=3, duration_ms=1.5, service="intake"))
    assert entry["event_id"] == "e-1"
    assert entry["site_id"] == "columbus-east"
    assert entry["deliveries"] == 3
    assert entry["duration_ms"] == 1.5
    assert entry["service"] == "intake"


def test_non_primitive_safe_values_are_stringified():
    patient_id = uuid4()
    assert _format(_record(patient_id=patient_id))["patient_id"] == str(patient_id)


@pytest.mark.parametrize("key", sorted(PHI))
def test_unsafe_extra_keys_are_dropped(key):
    assert key not in SAFE_FIELDS
    line = JsonFormatter().format(_record(**{key: PHI[key]}))
    assert key not in json.loads(line)
    assert PHI[key] not in line


def test_via_a_real_logger_extra_is_filtered():
    logger = logging.getLogger("iopnet.test.filter")
    captured: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(self.format(record))

    handler = Capture()
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("patient updated", extra={"patient_id": "p-9", "email": PHI["email"]})
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    entry = json.loads(captured[0])
    assert entry["patient_id"] == "p-9"
    assert entry["level"] == "WARNING"
    assert "email" not in entry
    assert PHI["email"] not in captured[0]


def test_exception_renders_type_only():
    try:
        raise ValueError(f"bad phone {PHI['phone']} for {PHI['email']}")
    except ValueError:
        record = _record("failed", exc_info=sys.exc_info())
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["exc_type"] == "ValueError"
    assert PHI["phone"] not in line
    assert PHI["email"] not in line
    assert "Traceback" not in line


def test_no_exception_no_exc_type():
    entry = _format(_record())
    assert "exc_type" not in entry
    assert "exc_where" not in entry


def _fail_with_phi() -> None:
    raise ValueError(f"bad phone {PHI['phone']}")


def test_exception_says_where_it_happened_not_what_it_said() -> None:
    try:
        _fail_with_phi()
    except ValueError:
        record = _record("failed", exc_info=sys.exc_info())
    line = JsonFormatter().format(record)
    where = json.loads(line)["exc_where"]
    # Innermost frame first: the function that raised, then its caller.
    assert where.startswith("test_logging.py:")
    assert "in _fail_with_phi <- test_logging.py:" in where
    assert "in test_exception_says_where_it_happened_not_what_it_said" in where
    assert PHI["phone"] not in line
    assert "raise ValueError" not in line  # no source text either


def test_request_fields_are_kept_and_none_is_null() -> None:
    entry = _format(_record(request_id="4f2a", status=None, file="intake.db"))
    assert entry["request_id"] == "4f2a"
    assert entry["status"] is None
    assert entry["file"] == "intake.db"


def test_lines_inside_a_context_carry_its_ids():
    from shared.logging import log_context

    request_id, correlation_id = uuid4().hex, str(uuid4())
    with log_context(request_id=request_id):
        assert _format(_record())["request_id"] == request_id
        with log_context(correlation_id=correlation_id):
            inner = _format(_record())
        # A line's own value wins over the context's.
        assert _format(_record(request_id="explicit"))["request_id"] == "explicit"
    assert (inner["request_id"], inner["correlation_id"]) == (request_id, correlation_id)
    assert "request_id" not in _format(_record())


def test_a_context_takes_ids_only():
    from shared.logging import log_context

    with pytest.raises(ValueError, match="given_name"), log_context(given_name="Jane"):
        pass


async def test_a_request_context_reaches_the_tasks_it_starts():
    import asyncio

    from shared.logging import log_context

    with log_context(request_id="r-1"):
        entry = await asyncio.create_task(asyncio.to_thread(lambda: _format(_record())))
    assert entry["request_id"] == "r-1"
