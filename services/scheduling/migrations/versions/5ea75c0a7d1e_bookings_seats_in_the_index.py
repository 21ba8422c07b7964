"""bookings: one index for a session's seats and waitlist (session, status, position)

Revision ID: 5ea75c0a7d1e
Revises: e7a0c0ffee03
Create Date: 2026-11-29 21:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "5ea75c0a7d1e"
down_revision: str | None = "e7a0c0ffee03"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("bookings", schema=None) as batch_op:
        batch_op.create_index("ix_bookings_session_status_position", ["session_id", "status", "position"], unique=False)
        # Its first column serves every lookup by session the old index served.
        batch_op.drop_index(batch_op.f("ix_bookings_session_id"))


def downgrade() -> None:
    with op.batch_alter_table("bookings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bookings_session_id"), ["session_id"], unique=False)
        batch_op.drop_index("ix_bookings_session_status_position")
