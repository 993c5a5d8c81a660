"""The webhook outbox, and a trigger that tells the feeding application about every terminal state.

One AFTER UPDATE OF state trigger, per row, fires when a row moves into a terminal state. In the
same transaction as the write of the state it inserts the event into ``webhook_outbox`` and, on
PostgreSQL, sends ``NOTIFY video_tasks_done`` with a small JSON payload. A trigger rather than
statements in the daemon's save: it covers every writer (the daemon's batch and its row-by-row
fallback, ``retry``, an operator's SQL) and is atomic by construction, so an event can neither be
lost nor sent for a state that was rolled back. SQLite gets the same trigger minus the NOTIFY.

Payloads carry the row's public fields (never ``video_url``: a signed link), times as UTC ISO 8601
with milliseconds. The NOTIFY payload caps each text so it stays far below PostgreSQL's 8000 bytes
even when every character is JSON-escaped (6 bytes).

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from seedance_archiver import models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TERMINAL = "('archived', 'cancelled', 'expired', 'failed', 'rejected')"
DELIVERY_STATES = "state IN ('delivered', 'disabled', 'failed', 'pending')"

PG_TIME = """to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""
SQLITE_TIME = "strftime('%Y-%m-%dT%H:%M:%fZ', {})"
TIMES = ("provider_created_at", "expires_at", "inserted_at", "completed_at", "archived_at")
FIELDS = (
    "task_id",
    "mode",
    "state",
    "provider_status",
    "model",
    "actual_duration",
    "error",
    "provider_created_at",
    "expires_at",
    "inserted_at",
    "completed_at",
    "archived_at",
    "polls",
    "archive_uri",
    "archive_bytes",
    "archive_sha256",
)


def _pairs(time_format: str) -> str:
    return ", ".join(
        f"'{f}', " + (time_format.format(f"NEW.{f}") if f in TIMES else f"NEW.{f}") for f in FIELDS
    )


PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION video_tasks_done() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, public
AS $$
BEGIN
    INSERT INTO public.webhook_outbox (webhook_id, task_id, event, payload)
    VALUES (
        'msg_' || replace(gen_random_uuid()::text, '-', ''),
        NEW.task_id,
        'task.' || NEW.state,
        json_build_object({_pairs(PG_TIME)})::text
    );
    PERFORM pg_notify('video_tasks_done', json_build_object(
        'task_id', left(NEW.task_id, 200),
        'state', NEW.state,
        'archive_uri', left(NEW.archive_uri, 500),
        'archive_sha256', left(NEW.archive_sha256, 64),
        'error', left(NEW.error, 300)
    )::text);
    RETURN NULL;
END;
$$
"""
PG_TRIGGER = f"""
CREATE TRIGGER video_tasks_done AFTER UPDATE OF state ON video_tasks
FOR EACH ROW
WHEN (NEW.state IN {TERMINAL} AND OLD.state IS DISTINCT FROM NEW.state)
EXECUTE FUNCTION video_tasks_done()
"""
SQLITE_TRIGGER = f"""
CREATE TRIGGER video_tasks_done AFTER UPDATE OF state ON video_tasks
FOR EACH ROW
WHEN NEW.state IN {TERMINAL} AND OLD.state IS NOT NEW.state
BEGIN
    INSERT INTO webhook_outbox (webhook_id, task_id, event, payload)
    VALUES (
        'msg_' || lower(hex(randomblob(16))),
        NEW.task_id,
        'task.' || NEW.state,
        json_object({_pairs(SQLITE_TIME)})
    );
END
"""


def upgrade() -> None:
    ts = models.UTCDateTime
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("webhook_id", sa.Text, nullable=False, unique=True),
        sa.Column("task_id", sa.Text, nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", ts, nullable=False, server_default=sa.func.now()),
        sa.Column("state", sa.Text, nullable=False, server_default="pending"),
        sa.Column("next_attempt_at", ts, nullable=False, server_default=sa.func.now()),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("delivered_at", ts),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", ts),
        sa.CheckConstraint(DELIVERY_STATES, name="ck_webhook_outbox_state"),
        # SQLite: ids never reused after a prune, so `webhooks redeliver ID` never names another.
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_webhook_outbox_due",
        "webhook_outbox",
        ["next_attempt_at"],
        sqlite_where=sa.text("state = 'pending'"),
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index("ix_webhook_outbox_task", "webhook_outbox", ["task_id"])
    op.create_index(
        "ux_webhook_outbox_at_risk",
        "webhook_outbox",
        ["task_id"],
        unique=True,
        sqlite_where=sa.text("event = 'task.at_risk'"),
        postgresql_where=sa.text("event = 'task.at_risk'"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        op.execute(PG_TRIGGER)
    else:
        op.execute(SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS video_tasks_done ON video_tasks")
        op.execute("DROP FUNCTION IF EXISTS video_tasks_done()")
    else:
        op.execute("DROP TRIGGER IF EXISTS video_tasks_done")
    op.drop_index("ux_webhook_outbox_at_risk", table_name="webhook_outbox")
    op.drop_index("ix_webhook_outbox_task", table_name="webhook_outbox")
    op.drop_index("ix_webhook_outbox_due", table_name="webhook_outbox")
    op.drop_table("webhook_outbox")
