"""Index the task list's order, newest first, whole and by state, for the page at ``/ui/tasks``.

The list pages by keyset, ``(inserted_at, task_id) < (the last shown)`` newest first, optionally of
one state: with these two indexes each page is an index scan of its own rows, however large the
table (bench/ui.py). ``inserted_at`` never changes and ``state`` only on a move, so the poll updates
stay HOT-eligible. Built CONCURRENTLY on PostgreSQL (``schema.build_index``): feeders insert on.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op
from seedance_archiver import schema

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema.build_index("ix_video_tasks_newest", "video_tasks", ["inserted_at", "task_id"])
    schema.build_index(
        "ix_video_tasks_state_newest", "video_tasks", ["state", "inserted_at", "task_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_video_tasks_state_newest", table_name="video_tasks")
    op.drop_index("ix_video_tasks_newest", table_name="video_tasks")
