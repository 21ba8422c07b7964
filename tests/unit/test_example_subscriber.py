"""examples/subscriber.py's loop, with a stand-in for the pull subscription: a fetch that
times out either way nats-py can say it (its own TimeoutError, or a plain asyncio one
when the deadline runs out between its two pull requests) is an empty second, not a
crash; the event after it is stored and acknowledged. (The whole example runs against a
real network in tests/e2e/test_integrator.py.)"""

import asyncio
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import nats.errors

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "subscriber.py"


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_subscriber", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Event:
    subject = "iop.intake.patient_enrolled.site-a"

    def __init__(self) -> None:
        self.data = json.dumps({"event_id": "e-1", "event_type": "PatientEnrolled", "site_id": "site-a",
                                "occurred_at": "2026-11-29T09:00:00+00:00"}).encode()  # fmt: skip
        self.acked = False

    async def ack(self) -> None:
        self.acked = True


class Subscription:
    """Answers each fetch with the next of `answers`: an exception to raise, or messages."""

    def __init__(self, answers: list[Any], stop: asyncio.Event) -> None:
        self.answers, self.stop = answers, stop

    async def fetch(self, batch: int, timeout: float) -> list[Event]:
        answer = self.answers.pop(0)
        if not self.answers:
            self.stop.set()
        if isinstance(answer, BaseException):
            raise answer
        return answer


async def test_a_fetch_that_times_out_either_way_is_an_empty_second(tmp_path: Path) -> None:
    module = example()
    db = module.open_store(str(tmp_path / "store.sqlite3"))
    stop, event = asyncio.Event(), Event()
    answers = [nats.errors.TimeoutError(), TimeoutError(), [event]]
    await module.consume(Subscription(answers, stop), db, stop)
    assert event.acked
    assert db.execute("SELECT event_id, event_type FROM events").fetchall() == [("e-1", "PatientEnrolled")]
