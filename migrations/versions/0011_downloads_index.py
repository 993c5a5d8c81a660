"""Index the rows waiting to download, in the download claim's order.

After a burst of finished videos, a tick that claims only downloads (``Service.tick(polls=False)``)
asks for the few rows its free slots can take, nearest deadline first, once every few videos. With
no index of its own that claim passed over every other active row each time: O(backlog) per claim,
so a backlog of N videos cost O(N^2). PostgreSQL walked ix_video_tasks_due past every row not yet
polled (their deadline unknown, they sort first): 5.5 ms a claim with 30,000 of them. SQLite took
ix_video_tasks_state and sorted every downloading row: 0.9 ms a claim with 3,000. With this index a
claim reads its own few rows: 0.03 ms and 0.012 ms (bench/README.md, "A burst of finished videos").

Each database gets the shape its planner takes, checked by tests/integration/test_migrations.py:
PostgreSQL a partial index of the downloading rows in claim order; SQLite, whose planner (without
statistics) takes the state index over a partial one, an index led by state over the active rows.
Built CONCURRENTLY on PostgreSQL (``schema.build_index``): feeders insert on.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from seedance_archiver import schema

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

ACTIVE = "state IN ('downloading', 'pending', 'polling')"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        schema.build_index(
            "ix_video_tasks_downloads",
            "video_tasks",
            [sa.text("expires_at ASC NULLS FIRST"), "next_attempt_at"],
            postgresql_where=sa.text("state = 'downloading'"),
        )
    else:
        # SQLite sorts NULLs first in ascending order already (and allows no NULLS FIRST here).
        schema.build_index(
            "ix_video_tasks_downloads",
            "video_tasks",
            ["state", "expires_at", "next_attempt_at"],
            sqlite_where=sa.text(ACTIVE),
        )


def downgrade() -> None:
    op.drop_index("ix_video_tasks_downloads", table_name="video_tasks")
