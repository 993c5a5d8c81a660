"""Remember each row's provider API: a nullable ``provider`` column.

Empty on insert; the daemon stamps it with its SEEDANCE_PROVIDER at the first answer, and claims
only rows unstamped or stamped with its own, so daemons for different providers share one table and
a changed setting never sends a task to the wrong API. No index: it is a cheap filter on the rows
ix_video_tasks_due already yields.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("video_tasks", sa.Column("provider", sa.Text(), nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN on SQLite too (3.35+): the column is in no index or constraint.
    op.drop_column("video_tasks", "provider")
