"""Inbox: which events a service has already applied (DESIGN B3).

The event_id is recorded in the same transaction as the handler's effects, so an event
redelivered after a crash, a lost ack or a re-publish past the duplicate window is
applied exactly once.
"""

import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, MetaData, Select, String, Table, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts import Envelope
from shared.db import UtcDateTime, in_list, insert_rows


class Inbox:
    def __init__(self, metadata: MetaData) -> None:
        self.table = Table(
            "inbox",
            metadata,
            Column("event_id", String(36), primary_key=True),
            Column("event_type", String(80), nullable=False),
            Column("consumer", String(120), nullable=False),
            Column("received_at", UtcDateTime, nullable=False),
        )

    async def claim(self, session: AsyncSession, envelope: Envelope, consumer: str) -> bool:
        """True if this event is new (and is now recorded); False if already applied.

        Two replicas racing on one event both see "new"; the primary key makes the
        second commit fail, so that delivery is retried and then skipped.
        """
        if await self.seen(session, [envelope]):
            return False
        await self.record(session, [self.row(envelope, consumer)])
        return True

    async def seen(self, session: AsyncSession, envelopes: Sequence[Envelope]) -> set[str]:
        """The ids among these events that were applied before: a batch asks once, not
        once per event (each statement is a round trip to the database's thread)."""
        ids = {str(envelope.event_id) for envelope in envelopes}
        result = await session.execute(_seen(self.table), {"ids": in_list(ids)})
        return set(result.scalars())

    def row(self, envelope: Envelope, consumer: str) -> dict[str, object]:
        """The inbox row of an event applied now (its time is taken now, not at commit)."""
        return {
            "event_id": str(envelope.event_id),
            "event_type": envelope.event_type,
            "consumer": consumer,
            "received_at": datetime.now(UTC),
        }

    async def record(self, session: AsyncSession, rows: Sequence[dict[str, object]]) -> None:
        """The rows of the events applied in this transaction, in one statement. The
        primary key still refuses an event another replica applied meanwhile: the
        transaction fails and the batch goes one by one, where it is skipped."""
        if rows:
            await insert_rows(session, self.table, rows)


class IdempotentEffects(Inbox):
    """For a consumer whose every effect is a keyed insert that does nothing the second
    time (intake's feed lane: a forward keyed by recipient and event, a ledger entry
    likewise): no inbox row per event, which would double the work of a lane that reads
    every event of the network and acts on few. It must not share events' ids with the
    main inbox either: the main consumers apply the same events."""

    def __init__(self) -> None:  # no table
        pass

    async def seen(self, session: AsyncSession, envelopes: Sequence[Envelope]) -> set[str]:
        return set()

    async def record(self, session: AsyncSession, rows: Sequence[dict[str, object]]) -> None:
        pass


# Built once per table (see shared/db.py, select_by): a batch runs each once.
@functools.cache
def _seen(table: Table) -> Select[Any]:
    return select(table.c.event_id).where(table.c.event_id.in_(bindparam("ids", expanding=True)))
