"""integrations (intake's, as its events tell) and subscriptions.integration_id

Revision ID: c4d0c0ffee05
Revises: b3c9d2e4f601
Create Date: 2026-11-27 19:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c4d0c0ffee05"
down_revision: str | None = "b3c9d2e4f601"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "integrations",
        sa.Column("integration_id", sa.String(length=40), nullable=False),
        sa.Column("sites", sa.Text(), nullable=False),
        sa.Column("basis", sa.String(length=10), nullable=False),
        sa.Column("purpose", sa.String(length=40), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("integration_id"),
    )
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("integration_id", sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f("ix_subscriptions_integration_id"), ["integration_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_subscriptions_integration_id"))
        batch_op.drop_column("integration_id")
    op.drop_table("integrations")
