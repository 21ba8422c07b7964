"""Group commit: callers that want to write at the same time share one transaction.

Whoever gets the turn writes every item queued meanwhile in one transaction; each caller
is answered only once the transaction holding its item has committed (or learns why it
was not). The group grows with the load by itself: while one transaction runs, the next
callers queue, and the next turn takes them all.

Two ways to write a group:
- `GroupCommit(sessions, write)`: `write(session, item)` per item, in the shared
  transaction (it saves the transactions: on SQLite a turn on the one connection and an
  fsync each);
- `GroupCommit.set_based(sessions, write_all)`: `write_all(session, items)` for the whole
  group, which can read and write in multi-row statements (it saves the statements too).
  It answers one outcome per item, in order: a result, or an `Exception` *instance* for a
  refusal that must not cost the others theirs (its audit row commits with the group).

If the group's transaction fails, every item is tried again in a transaction of its own,
so one bad item never fails the others. Alone, an item's refusal marked `keeps_audit`
commits its audit row as it would outside a group (`shared.db.transaction`); in a group
it cannot (the others' writes would commit with it and then be written again alone).
"""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import transaction

Item = TypeVar("Item")
Result = TypeVar("Result")

Sessions = Callable[[], contextlib.AbstractAsyncContextManager[AsyncSession]]
WriteAll = Callable[[AsyncSession, list[Item]], Awaitable[list[Result | Exception]]]


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        sessions: Sessions,
        write: Callable[[AsyncSession, Item], Awaitable[Result]] | None = None,
        *,
        write_all: WriteAll[Item, Result] | None = None,
        max_group: int = 256,
    ) -> None:
        if (write is None) == (write_all is None):
            raise ValueError("give one of write and write_all")
        self.sessions = sessions
        self.write_all: WriteAll[Item, Result] = write_all or _one_by_one(write)  # type: ignore[arg-type]
        self.max_group = max_group
        self.queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self.turn = asyncio.Lock()
        self.drained = asyncio.Event()
        self.drained.set()
        self.transactions = 0  # committed
        self.largest_group = 0

    @classmethod
    def set_based(
        cls, sessions: Sessions, write_all: WriteAll[Item, Result], *, max_group: int = 256
    ) -> "GroupCommit[Item, Result]":
        return cls(sessions, write_all=write_all, max_group=max_group)

    async def record(self, item: Item) -> Result:
        """Return what the writer answered for `item` once it is committed; raise the
        refusal it answered, or the error that kept it from being committed."""
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.queue.append((item, done))
        self.drained.clear()
        while not done.done():
            async with self.turn:
                try:
                    if not done.done():
                        group, self.queue = self.queue[: self.max_group], self.queue[self.max_group :]
                        await self._commit(group)
                finally:
                    if not self.queue:
                        self.drained.set()
        return await done

    async def idle(self) -> None:
        await self.drained.wait()

    async def _commit(self, group: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            async with self.sessions() as session, transaction(session) if len(group) == 1 else session.begin():
                outcomes = await self.write_all(session, [item for item, _ in group])
            self.transactions += 1
            self.largest_group = max(self.largest_group, len(group))
        except Exception as exc:
            if len(group) > 1:  # one bad item must not cost the others theirs
                for one in group:
                    await self._commit([one])
                return
            _settle(group, exc)
            return
        except BaseException:  # cancelled mid-write: the waiters learn it, never hang
            for _, done in group:
                done.cancel()
            raise
        for (_, done), outcome in zip(group, outcomes, strict=True):
            if done.done():
                continue
            if isinstance(outcome, Exception):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)


def _one_by_one(write: Callable[[AsyncSession, Any], Awaitable[Any]]) -> WriteAll[Any, Any]:
    async def write_all(session: AsyncSession, items: list[Any]) -> list[Any]:
        return [await write(session, item) for item in items]

    return write_all


def _settle(group: list[tuple[Any, asyncio.Future[Any]]], error: BaseException) -> None:
    for _, done in group:
        if not done.done():
            done.set_exception(error)
