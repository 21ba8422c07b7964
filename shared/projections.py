"""Projections more than one service keeps of another's events.

Sites: intake owns them; scheduling and notifications keep name and timezone from
SiteRegistered (session times, quiet hours and hours-weeks are all in site time).
"""

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import UtcDateTime, insert_row, kept_for_this_transaction, select_by, update_by


class SiteDirectory:
    def __init__(self, metadata: MetaData) -> None:
        self.table = Table(
            "sites",
            metadata,
            Column("site_id", String(40), primary_key=True),
            Column("name", String(200), nullable=False),
            Column("timezone", String(64), nullable=False),
            Column("updated_at", UtcDateTime, nullable=False),
        )

    async def upsert(self, session: AsyncSession, site_id: str, name: str, timezone: str) -> None:
        """Apply SiteRegistered: registration and every later change of name or timezone."""
        self._read(session).pop(site_id, None)
        values = {"name": name, "timezone": timezone, "updated_at": datetime.now(UTC)}
        if await update_by(session, self.table, {"site_id": site_id}, **values) == 0:
            await insert_row(session, self.table, site_id=site_id, **values)

    async def get(self, session: AsyncSession, site_id: str) -> dict[str, Any] | None:
        """The site, read once per transaction: every event of a consumer's batch asks for
        its site, and a batch holds many events of few sites (`upsert` forgets it)."""
        known = self._read(session)
        if site_id not in known:
            row = (await session.execute(select_by(self.table, "site_id"), {"site_id": site_id})).mappings().first()
            known[site_id] = dict(row) if row else None
        found = known[site_id]
        return dict(found) if found is not None else None

    async def read_ahead(self, session: AsyncSession, site_ids: Iterable[str]) -> None:
        """Several sites in one statement, kept as `get` keeps one (a consumer's batch of
        events at several sites)."""
        known = self._read(session)
        missing = sorted({site_id for site_id in site_ids if site_id not in known})
        if len(missing) < 2:
            return  # one site's own read costs the same
        found = {row["site_id"]: row for row in await self.list(session, missing)}
        for site_id in missing:
            known[site_id] = found.get(site_id)

    def _read(self, session: AsyncSession) -> dict[str, dict[str, Any] | None]:
        return kept_for_this_transaction(session, f"iopnet.{self.table.name}", dict[str, dict[str, Any] | None])

    async def list(self, session: AsyncSession, only: list[str] | None) -> list[dict[str, Any]]:
        query = select(self.table).order_by(self.table.c.site_id)
        if only is not None:
            query = query.where(self.table.c.site_id.in_(only))
        return [dict(r) for r in (await session.execute(query)).mappings()]
