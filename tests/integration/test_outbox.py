"""The outbox where only SQL can show it: the trigger's transaction, row locks across connections,
and the terminal-state NOTIFY (migration 0006).

Every other behaviour of the outbox (enqueue, claim, lease, retry, give up, redeliver, discard,
prune) is in tests/contract/test_outbox_contract.py, over the fake store, SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json

import psycopg
import pytest
import sqlalchemy as sa
from seedance_archiver import db, listener, store, utils

TERMINAL = ("archived", "failed", "cancelled", "expired", "rejected")
OWNER = "test-owner"


def finish(s: store.Store, task_id: str, state: str, **changes: object) -> None:
    """Add a task, claim it and save it in ``state``, as the daemon does."""
    s.add(task_id)
    [task] = [t for t in s.claim_due(OWNER, utils.utcnow(), 60, 100) if t.task_id == task_id]
    done = task.replace(state=state, updated_at=utils.utcnow(), **changes)
    assert s.save([done], OWNER) == 1


class TestTriggerTransaction:
    """The trigger writes the event in the move's own transaction: a rollback leaves none (SQL)."""

    def test_a_rolled_back_state_leaves_no_event(self, db_url: str) -> None:
        engine = db.make_engine(db_url)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO video_tasks (task_id) VALUES ('video_a')"))
            with pytest.raises(RuntimeError), engine.begin() as conn:
                conn.execute(sa.text("UPDATE video_tasks SET state = 'failed'"))
                raise RuntimeError("roll back")
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM webhook_outbox")).scalar() == 0
        finally:
            engine.dispose()


class TestAtRiskLocks:
    """task.at_risk never races an archive on another connection: PostgreSQL's row locks."""

    def test_a_row_archived_while_warnings_are_written_gets_none(self, pg_url: str) -> None:
        """The archive's transaction is open (the row locked, archived but not committed) while
        add_at_risk_events runs on another connection: after the commit, no task.at_risk."""
        sql_store = store.SqlStore.from_url(pg_url)
        archiver = db.make_engine(pg_url)
        try:
            now = utils.utcnow()
            finish(sql_store, "video_a", "polling", expires_at=now + dt.timedelta(minutes=30))
            with archiver.begin() as conn:
                conn.execute(
                    sa.text("UPDATE video_tasks SET state = 'archived' WHERE task_id = 'video_a'")
                )
                sql_store.add_at_risk_events(now)  # while the archive is not yet committed
            assert sql_store.add_at_risk_events(now) == 0  # and after it
            events = [e.event for e in sql_store.webhooks()]
            assert events == ["task.archived"]
        finally:
            archiver.dispose()
            sql_store.close()


class TestTerminalNotify:
    """NOTIFY video_tasks_done in the transaction that ends a task: PostgreSQL only (LISTEN)."""

    def test_listen_receives_each_terminal_state(self, pg_url: str) -> None:
        dsn = db.engine_url(pg_url).set(drivername="postgresql").render_as_string(False)
        s = store.SqlStore.from_url(pg_url)
        try:
            with psycopg.connect(dsn, autocommit=True) as listening:
                listening.execute(f"LISTEN {listener.DONE_CHANNEL}")
                for state in TERMINAL:
                    finish(s, f"video_{state}", state, error="x" * 100_000, archive_sha256="ab")
                received = list(listening.notifies(timeout=5.0, stop_after=len(TERMINAL)))
        finally:
            s.close()
        payloads = [json.loads(n.payload) for n in received]
        assert [p["state"] for p in payloads] == list(TERMINAL)
        assert [p["task_id"] for p in payloads] == [f"video_{s}" for s in TERMINAL]
        assert all(
            set(p) == {"task_id", "state", "archive_uri", "archive_sha256", "error"}
            for p in payloads
        )
        assert all(len(n.payload.encode()) < 8000 for n in received)  # the error was capped
