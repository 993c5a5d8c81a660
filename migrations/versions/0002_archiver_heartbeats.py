"""Add archiver_heartbeats: one row per running daemon, for `status`, `check` and operators.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from seedance_archiver import models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = models.UTCDateTime
    op.create_table(
        "archiver_heartbeats",
        sa.Column("owner", sa.Text, primary_key=True),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("started_at", ts, nullable=False),
        sa.Column("last_tick_at", ts),
        sa.Column("api_key_ok", sa.Boolean, nullable=False, server_default=sa.true()),
    )


def downgrade() -> None:
    op.drop_table("archiver_heartbeats")
