"""A small history of each row's moves, for the task page's timeline.

One line each time a row's state, the provider's status or its error changes, whoever changes it
(a daemon's write-back, ``retry``, an operator's SQL): written by a trigger in the same transaction
as the change, and deleted with the row (``prune``, or by hand). A poll that changes nothing writes
nothing, so a task has a handful of lines, not one per poll; each line keeps the poll count.

The table is new and empty: created plainly. The triggers only add a few rows per task from now on;
a row that moves while this revision is applied is recorded or not, never blocked.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from seedance_archiver import models

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COLUMNS = "task_id, at, state, provider_status, polls, attempts, error"
CHANGED_PG = (
    "OLD.state IS DISTINCT FROM NEW.state OR OLD.provider_status IS DISTINCT FROM "
    "NEW.provider_status OR OLD.error IS DISTINCT FROM NEW.error"
)
CHANGED_SQLITE = (
    "OLD.state IS NOT NEW.state OR OLD.provider_status IS NOT NEW.provider_status "
    "OR OLD.error IS NOT NEW.error"
)
ERROR_CHARS = models.HISTORY_ERROR_CHARS

PG_FUNCTIONS = (
    f"""
CREATE OR REPLACE FUNCTION video_tasks_moved() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    INSERT INTO public.task_history ({COLUMNS})
    VALUES (NEW.task_id, COALESCE(NEW.updated_at, now()), NEW.state, NEW.provider_status,
            NEW.polls, NEW.attempts, left(NEW.error, {ERROR_CHARS}));
    RETURN NULL;
END;
$$
""",
    """
CREATE OR REPLACE FUNCTION video_tasks_forgotten() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    DELETE FROM public.task_history WHERE task_id = OLD.task_id;
    RETURN NULL;
END;
$$
""",
)
PG_TRIGGERS = (
    f"""
CREATE TRIGGER video_tasks_moved AFTER UPDATE ON video_tasks
FOR EACH ROW WHEN ({CHANGED_PG})
EXECUTE FUNCTION video_tasks_moved()
""",
    """
CREATE TRIGGER video_tasks_forgotten AFTER DELETE ON video_tasks
FOR EACH ROW EXECUTE FUNCTION video_tasks_forgotten()
""",
)
SQLITE_TRIGGERS = (
    f"""
CREATE TRIGGER video_tasks_moved AFTER UPDATE ON video_tasks
FOR EACH ROW WHEN {CHANGED_SQLITE}
BEGIN
    INSERT INTO task_history ({COLUMNS})
    VALUES (NEW.task_id, COALESCE(NEW.updated_at, CURRENT_TIMESTAMP), NEW.state,
            NEW.provider_status, NEW.polls, NEW.attempts, substr(NEW.error, 1, {ERROR_CHARS}));
END
""",
    """
CREATE TRIGGER video_tasks_forgotten AFTER DELETE ON video_tasks
FOR EACH ROW
BEGIN
    DELETE FROM task_history WHERE task_id = OLD.task_id;
END
""",
)


def upgrade() -> None:
    op.create_table(
        "task_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.Text, nullable=False),
        sa.Column("at", models.UTCDateTime, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("provider_status", sa.Text),
        sa.Column("polls", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_task_history_task", "task_history", ["task_id", "id"])
    if op.get_bind().dialect.name == "postgresql":
        for statement in (*PG_FUNCTIONS, *PG_TRIGGERS):
            op.execute(statement)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in ("video_tasks_moved", "video_tasks_forgotten"):
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON video_tasks")
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    else:
        for name in ("video_tasks_moved", "video_tasks_forgotten"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index("ix_task_history_task", table_name="task_history")
    op.drop_table("task_history")
