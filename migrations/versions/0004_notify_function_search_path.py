"""Pin the search_path of the NOTIFY trigger's function.

A function that runs with the caller's search_path resolves names through schemas the caller
chose; a role able to create objects in one of them could shadow what the function calls. Pinned
to pg_catalog first, ``pg_notify`` is always the built-in one, whoever inserts.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER FUNCTION video_tasks_notify() SET search_path = pg_catalog, public")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER FUNCTION video_tasks_notify() RESET search_path")
