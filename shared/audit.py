"""Audit rows: every read or change of a patient record (DESIGN B5).

Each service keeps its own audit table (it owns its database); the shape and the one
way to write a row are shared: a service's store binds an `AuditTrail` to its table.
"""

from uuid import UUID

from sqlalchemy import Column, Integer, MetaData, String, Table
from sqlalchemy.ext.asyncio import AsyncSession

from shared import clock
from shared.auth import Principal
from shared.db import UtcDateTime, insert_at_commit


def audit_table(metadata: MetaData) -> Table:
    return Table(
        "audit_log",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("at", UtcDateTime, nullable=False, index=True),
        Column("actor", String(200), nullable=False),
        Column("role", String(40), nullable=False),
        Column("site_id", String(40), nullable=False, index=True),
        Column("action", String(80), nullable=False),
        Column("patient_id", String(36), nullable=True, index=True),
    )


class AuditTrail:
    """Writes audit rows to one service's audit table, each in the caller's transaction
    (it commits with the change, or with the refusal it records). Nothing reads a row back
    in the transaction that writes it, so they are written as it commits
    (`shared.db.insert_at_commit`)."""

    def __init__(self, table: Table) -> None:
        self.table = table

    async def __call__(
        self,
        session: AsyncSession,
        principal: Principal,
        action: str,
        site_id: str,
        patient_id: UUID | str | None,
    ) -> None:
        await insert_at_commit(session, self.table, [self.row(principal, action, site_id, patient_id)])

    async def many(self, session: AsyncSession, rows: list[dict[str, object]]) -> None:
        """Several rows (built with `row`) in one multi-row INSERT."""
        await insert_at_commit(session, self.table, rows)

    @staticmethod
    def row(principal: Principal, action: str, site_id: str, patient_id: UUID | str | None) -> dict[str, object]:
        return {
            "at": clock.now(),
            "actor": principal.sub,
            "role": principal.role,
            "site_id": site_id,
            "action": action,
            "patient_id": str(patient_id) if patient_id is not None else None,
        }
