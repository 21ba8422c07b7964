"""potential duplicates: network-wide matches queued for network admins

Revision ID: 6f0fbada3764
Revises: 481d82170145
Create Date: 2026-11-27 12:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6f0fbada3764"
down_revision: str | None = "481d82170145"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "potential_duplicates",
        sa.Column("duplicate_id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=36), nullable=False),
        sa.Column("match_patient_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("resolution", sa.String(length=10), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(["match_patient_id"], ["patients.patient_id"]),
        sa.ForeignKeyConstraint(["patient_id"], ["patients.patient_id"]),
        sa.PrimaryKeyConstraint("duplicate_id"),
        sa.UniqueConstraint("patient_id", "match_patient_id", name="uq_potential_duplicates_pair"),
    )
    with op.batch_alter_table("potential_duplicates", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_potential_duplicates_match_patient_id"), ["match_patient_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_potential_duplicates_patient_id"), ["patient_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_potential_duplicates_status"), ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("potential_duplicates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_potential_duplicates_status"))
        batch_op.drop_index(batch_op.f("ix_potential_duplicates_patient_id"))
        batch_op.drop_index(batch_op.f("ix_potential_duplicates_match_patient_id"))

    op.drop_table("potential_duplicates")
