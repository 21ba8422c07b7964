"""Test support shipped with the package: real servers, a bus recorder, deadline waits.

Waiting here is always on a condition with a deadline: the bus recorder is woken by
each message; `eventually` re-checks a condition (a database row, an HTTP answer)
until it holds or the deadline passes, and then fails loudly.
"""

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg

from shared.messaging.connection import connect_once

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Await `probe()` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


async def cancelled(task: "asyncio.Task[Any]", *, timeout: float = 10.0) -> None:
    """Cancel `task` and wait until it has wound down (its transaction rolled back, its
    connection returned), so what the test tears down next is no longer in use; fail
    if it ignores the cancellation."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        raise AssertionError(f"{task.get_name()} still running {timeout}s after it was cancelled")


@dataclass
class BusMessage:
    subject: str
    data: bytes
    headers: dict[str, str]
    received_at: float

    def envelope(self) -> dict[str, Any]:
        return json.loads(self.data)


@dataclass
class BusRecorder:
    """A plain nats-py subscriber that records every message on `subjects` (on a network
    with NATS users, `OBSERVED_SUBJECTS`: what its `ops` user may read)."""

    url: str
    subjects: tuple[str, ...] = ("iop.>",)
    messages: list[BusMessage] = field(default_factory=list)
    _nc: Client | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self) -> "BusRecorder":
        self._nc = await connect_once(self.url)
        for subject in self.subjects:
            await self._nc.subscribe(subject, cb=self._on_message)
        await self._nc.flush()
        return self

    async def _on_message(self, msg: Msg) -> None:
        self.messages.append(BusMessage(msg.subject, msg.data, dict(msg.headers or {}), time.monotonic()))
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[BusMessage], bool], *, count: int = 1, timeout: float = 10.0
    ) -> list[BusMessage]:
        async def enough() -> list[BusMessage]:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.matching(predicate)) >= count)
            return self.matching(predicate)

        try:
            async with asyncio.timeout(timeout):
                return await enough()
        except TimeoutError:
            seen = [m.subject for m in self.messages]
            raise AssertionError(f"bus: wanted {count} matching message(s) in {timeout}s; saw {seen}") from None

    async def wait_for_event(self, event_type: str, *, count: int = 1, timeout: float = 10.0) -> list[BusMessage]:
        return await self.wait_for(lambda m: _event_type(m) == event_type, count=count, timeout=timeout)

    def matching(self, predicate: Callable[[BusMessage], bool]) -> list[BusMessage]:
        return [m for m in self.messages if predicate(m)]

    def events(self, event_type: str) -> list[BusMessage]:
        return self.matching(lambda m: _event_type(m) == event_type)

    async def stop(self) -> None:
        if self._nc is not None:
            await self._nc.drain()


def _event_type(message: BusMessage) -> str | None:
    try:
        return message.envelope().get("event_type")
    except (ValueError, AttributeError):
        return None


class LineReader:
    """Reads a child process's output on a thread, so a test can wait for a line."""

    def __init__(self, stream: Any) -> None:
        import queue
        import threading

        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            self._queue.put(raw.decode(errors="replace"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        import queue

        deadline = time.monotonic() + timeout
        while True:
            if any(text in line for line in self.lines):
                return "".join(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{text!r} not printed in {timeout}s:\n{''.join(self.lines)}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"output ended before {text!r}:\n{''.join(self.lines)}")
            self.lines.append(line)

    def text(self) -> str:
        self._thread.join(timeout=10)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)
