"""webhooks: ordered queue per subscription, pause after consecutive failures, backfill,
and the delivery log's status codes and timings

Revision ID: b3c9d2e4f601
Revises: e7a0c0ffee04
Create Date: 2026-11-27 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b3c9d2e4f601"
down_revision: str | None = "e7a0c0ffee04"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status", sa.String(length=10), server_default="active", nullable=False))
        batch_op.add_column(sa.Column("paused_reason", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("next_seq", sa.BigInteger(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("backfill_from", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("backfill_status", sa.String(length=10), server_default="none", nullable=False))
        batch_op.add_column(sa.Column("backfill_events", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("backfill_error", sa.String(length=200), nullable=True))
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.add_column(sa.Column("event_type", sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column("queue_phase", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("queue_seq", sa.BigInteger(), nullable=True))
        batch_op.create_index("ix_notifications_webhook_queue", ["recipient", "queue_phase", "queue_seq"], unique=False)
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_code", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("duration_ms", sa.Integer(), nullable=True))
    # Webhook deliveries queued before: live, ahead of the new ones, in creation order.
    op.execute("UPDATE notifications SET queue_phase = 1, queue_seq = 0 WHERE recipient_kind = 'integration'")


def downgrade() -> None:
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.drop_column("duration_ms")
        batch_op.drop_column("status_code")
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index("ix_notifications_webhook_queue")
        batch_op.drop_column("queue_seq")
        batch_op.drop_column("queue_phase")
        batch_op.drop_column("event_type")
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        for column in (
            "backfill_error", "backfill_events", "backfill_status", "backfill_from", "next_seq",
            "consecutive_failures", "paused_at", "paused_reason", "status",
        ):  # fmt: skip
            batch_op.drop_column(column)
