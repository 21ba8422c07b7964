"""Safety work first, inside one service process.

SQLite has one writer at a time. A transaction of the safety lane (an urgent check-in)
would otherwise wait behind every routine transaction queued for the database (a wave
of bookings, reminders, relay batches). While a safety transaction waits or runs, the
routine consumers and the outbox relay start no new transaction; the one in progress
finishes, then the safety lane has the database. Routine work resumes when no safety
work is left. On PostgreSQL the gate costs nothing and changes little."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PriorityGate:
    def __init__(self) -> None:
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

    async def routine(self) -> None:
        """Returns at once unless safety work is waiting or running."""
        await self._clear.wait()
