"""Index completed rows by completed_at, for the learn job's recent generation times.

Without it, ``SqlStore.generation_times`` (every 5 min per daemon, and every ``status``) is a
sequential scan of the whole table: 300-600 ms with 1,000,000 finished rows (bench/README.md).
With it, the scan covers only the rows completed in the window. completed_at is written once per
task, so the index costs one non-HOT update per task; the frequent poll updates stay HOT-eligible.
Built CONCURRENTLY on PostgreSQL (``schema.build_index``): feeders insert on during the build.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from seedance_archiver import schema

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COMPLETED = "completed_at IS NOT NULL"


def upgrade() -> None:
    schema.build_index(
        "ix_video_tasks_completed",
        "video_tasks",
        ["completed_at"],
        sqlite_where=sa.text(COMPLETED),
        postgresql_where=sa.text(COMPLETED),
    )


def downgrade() -> None:
    op.drop_index("ix_video_tasks_completed", table_name="video_tasks")
