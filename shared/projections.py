"""Projections more than one service keeps of another's events.

Sites: intake owns them; scheduling and notifications keep name and timezone from
SiteRegistered (session times, quiet hours and hours-weeks are all in site time).
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import UtcDateTime, insert_row, select_by, update_by


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
        values = {"name": name, "timezone": timezone, "updated_at": datetime.now(UTC)}
        if await update_by(session, self.table, {"site_id": site_id}, **values) == 0:
            await insert_row(session, self.table, site_id=site_id, **values)

    async def get(self, session: AsyncSession, site_id: str) -> dict[str, Any] | None:
        row = (await session.execute(select_by(self.table, "site_id"), {"site_id": site_id})).mappings().first()
        return dict(row) if row else None

    async def list(self, session: AsyncSession, only: list[str] | None) -> list[dict[str, Any]]:
        query = select(self.table).order_by(self.table.c.site_id)
        if only is not None:
            query = query.where(self.table.c.site_id.in_(only))
        return [dict(r) for r in (await session.execute(query)).mappings()]
