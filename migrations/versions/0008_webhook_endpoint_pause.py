"""Webhook endpoints paused by a 410 Gone, until an operator resumes them.

Standard Webhooks readers take 410 Gone to mean "switch this endpoint off": a receiver that
answers it for one event would answer it for every other. The daemon writes the URL here and
delivers nothing to it until ``seedance-archiver webhooks resume`` deletes the row; the events
stay pending meanwhile. A new, empty table: created plainly, nothing to build on existing rows.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from seedance_archiver import models

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("url", sa.Text, primary_key=True),
        sa.Column("paused_at", models.UTCDateTime, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("webhook_endpoints")
