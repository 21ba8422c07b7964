"""check-ins by episode and time: an episode's last check-ins read from the index

Revision ID: f3a0c0ffee05
Revises: f2a0c0ffee04
Create Date: 2026-11-30 02:05:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "f3a0c0ffee05"
down_revision: str | None = "f2a0c0ffee04"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Its leading column serves every look-up the old index served.
    with op.batch_alter_table("check_ins", schema=None) as batch_op:
        batch_op.create_index("ix_check_ins_episode_recent", ["enrollment_id", "submitted_at"], unique=False)
        batch_op.drop_index(batch_op.f("ix_check_ins_enrollment_id"))


def downgrade() -> None:
    with op.batch_alter_table("check_ins", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_check_ins_enrollment_id"), ["enrollment_id"], unique=False)
        batch_op.drop_index("ix_check_ins_episode_recent")
