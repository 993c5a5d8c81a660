"""Index the claim in its own order: (expires_at NULLS FIRST, next_attempt_at) over active rows.

The first index, on next_attempt_at alone, let PostgreSQL's planner misjudge how many rows are due
(finished rows all have past times) and fall back to a bitmap scan of every active row plus a sort:
about 30 ms a claim with 100,000 active rows. In claim order the scan stops after the batch is full
(4-6 ms; bench/README.md). fillfactor 70 leaves room for the daemon's frequent updates to stay HOT.

On PostgreSQL the new index is built CONCURRENTLY beside the old one, under another name, then the
old one dropped CONCURRENTLY and the new one renamed (``schema.build_index``): feeders insert on
throughout, the claim always has an index, and a run cut at any point picks up where it stopped.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from seedance_archiver import schema

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ACTIVE = "state IN ('downloading', 'pending', 'polling')"
BUILDING = "ix_video_tasks_due_0003"  # the new index's name until it replaces the old one


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Skipped when a cut run got as far as the rename.
        if "expires_at" not in (schema.index_definition("ix_video_tasks_due") or ""):
            schema.build_index(
                BUILDING,
                "video_tasks",
                [sa.text("expires_at ASC NULLS FIRST"), "next_attempt_at"],
                postgresql_where=sa.text(ACTIVE),
            )
            schema.drop_index("ix_video_tasks_due")
            # A SHARE UPDATE EXCLUSIVE lock (PostgreSQL 12+): inserts go on.
            op.execute(f"ALTER INDEX {BUILDING} RENAME TO ix_video_tasks_due")
        op.execute("ALTER TABLE video_tasks SET (fillfactor = 70)")
    else:
        op.drop_index("ix_video_tasks_due", table_name="video_tasks")
        # SQLite sorts NULLs first in ascending order already (and allows no NULLS FIRST here).
        op.create_index(
            "ix_video_tasks_due",
            "video_tasks",
            ["expires_at", "next_attempt_at"],
            sqlite_where=sa.text(ACTIVE),
        )


def downgrade() -> None:
    op.drop_index("ix_video_tasks_due", table_name="video_tasks")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE video_tasks RESET (fillfactor)")
    op.create_index(
        "ix_video_tasks_due",
        "video_tasks",
        ["next_attempt_at"],
        sqlite_where=sa.text(ACTIVE),
        postgresql_where=sa.text(ACTIVE),
    )
