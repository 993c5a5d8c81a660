"""Create video_tasks, the table feeders insert into, and the PostgreSQL insert notification.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from seedance_archiver import models

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ACTIVE = "state IN ('downloading', 'pending', 'polling')"
MODES = "mode IN ('draft', 'flex', 'standard')"
STATES = (
    "state IN ('archived', 'cancelled', 'downloading', 'expired', 'failed', 'pending', "
    "'polling', 'rejected')"
)

# One notification per INSERT statement (not per row), so a bulk insert of 100,000 rows wakes the
# daemon once. The payload is empty: the daemon claims due rows, it does not trust the payload.
NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION video_tasks_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('video_tasks', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER video_tasks_notify AFTER INSERT ON video_tasks
FOR EACH STATEMENT EXECUTE FUNCTION video_tasks_notify()
"""


def upgrade() -> None:
    ts = models.UTCDateTime
    op.create_table(
        "video_tasks",
        sa.Column("task_id", sa.Text, primary_key=True),
        sa.Column("mode", sa.Text, nullable=False, server_default="standard"),
        sa.Column("state", sa.Text, nullable=False, server_default="pending"),
        sa.Column("provider_status", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("video_url", sa.Text),
        sa.Column("actual_duration", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("provider_created_at", ts),
        sa.Column("expires_at", ts),
        sa.Column("inserted_at", ts, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", ts, nullable=False, server_default=sa.func.now()),
        sa.Column("next_attempt_at", ts, nullable=False, server_default=sa.func.now()),
        sa.Column("last_polled_at", ts),
        sa.Column("completed_at", ts),
        sa.Column("archived_at", ts),
        sa.Column("polls", sa.Integer, nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("archive_uri", sa.Text),
        sa.Column("archive_bytes", sa.BigInteger),
        sa.Column("archive_sha256", sa.Text),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", ts),
        sa.CheckConstraint(MODES, name="ck_video_tasks_mode"),
        sa.CheckConstraint(STATES, name="ck_video_tasks_state"),
    )
    op.create_index(
        "ix_video_tasks_due",
        "video_tasks",
        ["next_attempt_at"],
        sqlite_where=sa.text(ACTIVE),
        postgresql_where=sa.text(ACTIVE),
    )
    op.create_index("ix_video_tasks_state", "video_tasks", ["state"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(NOTIFY_FUNCTION)
        op.execute(NOTIFY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS video_tasks_notify ON video_tasks")
        op.execute("DROP FUNCTION IF EXISTS video_tasks_notify()")
    op.drop_index("ix_video_tasks_state", table_name="video_tasks")
    op.drop_index("ix_video_tasks_due", table_name="video_tasks")
    op.drop_table("video_tasks")
