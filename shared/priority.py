"""Safety work first, inside one service process.

SQLite has one writer at a time. A transaction of the safety lane (an urgent check-in)
would otherwise wait behind every routine transaction queued for the database (a wave
of bookings, reminders, relay batches). While a safety transaction waits or runs, the
routine consumers, the routine HTTP requests and the dispatcher's claims start no new
transaction (for a bounded time), and a routine consumer's batch in progress commits what
it has applied at its next event and lets the rest wait (`pressing`); then the safety
work has the database. The outbox relay is not held: it carries the safety events out,
and publishes them before other pending rows. On PostgreSQL the gate changes little."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PriorityGate:
    def __init__(self, max_wait_seconds: float = 0.25) -> None:
        # Routine work waits at most this long: under a sustained flood of safety work
        # it still moves (the dispatcher's claims include the care team's urgent messages).
        self.max_wait_seconds = max_wait_seconds
        self._urgent = 0
        self._clear = asyncio.Event()
        self._clear.set()

    @asynccontextmanager
    async def urgent(self) -> AsyncIterator[None]:
        self._urgent += 1
        self._clear.clear()
        try:
            yield
        finally:
            self._urgent -= 1
            if self._urgent == 0:
                self._clear.set()

    @property
    def pressing(self) -> bool:
        """Safety work is waiting or running: routine work should yield at its next step."""
        return not self._clear.is_set()

    async def routine(self) -> None:
        """Returns at once unless safety work is waiting or running; then when it is
        done, or after `max_wait_seconds` at most."""
        if self._clear.is_set():
            return
        try:
            async with asyncio.timeout(self.max_wait_seconds):
                await self._clear.wait()
        except TimeoutError:
            pass
