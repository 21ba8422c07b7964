"""integrations: outside systems that read the events of their sites, with their basis

Revision ID: f1a0c0ffee03
Revises: e7a0c0ffee02
Create Date: 2026-11-27 18:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f1a0c0ffee03"
down_revision: str | None = "e7a0c0ffee02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "integrations",
        sa.Column("integration_id", sa.String(length=40), nullable=False),
        sa.Column("sites", sa.Text(), nullable=False),
        sa.Column("basis", sa.String(length=10), nullable=False),
        sa.Column("purpose", sa.String(length=40), nullable=True),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("password_hash", sa.String(length=80), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("integration_id"),
    )


def downgrade() -> None:
    op.drop_table("integrations")
