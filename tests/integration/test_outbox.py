"""The outbox and the terminal-state NOTIFY on real SQLite and PostgreSQL (migration 0006)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from seedance_archiver import db, listener, models, outbox, store, utils

TERMINAL = ("archived", "failed", "cancelled", "expired", "rejected")
OWNER = "test-owner"


@pytest.fixture
def sql_store(db_url: str) -> Iterator[store.SqlStore]:
    s = store.SqlStore.from_url(db_url)
    try:
        yield s
    finally:
        s.close()


def finish(s: store.Store, task_id: str, state: str, **changes: object) -> None:
    """Add a task, claim it and save it in ``state``, as the daemon does."""
    s.add(task_id)
    [task] = [t for t in s.claim_due(OWNER, utils.utcnow(), 60, 100) if t.task_id == task_id]
    done = task.replace(state=state, updated_at=utils.utcnow(), **changes)
    assert s.save([done], OWNER) == 1


class TestOutboxTrigger:
    """Every move into a terminal state writes one event in the same transaction."""

    @pytest.mark.parametrize("state", TERMINAL)
    def test_each_terminal_state_writes_its_event(
        self, sql_store: store.SqlStore, state: str
    ) -> None:
        created = dt.datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)
        finish(
            sql_store,
            "video_a",
            state,
            model="seedance-1.5",
            video_url="https://cdn.example/v.mp4?X-Signature=secret",
            provider_created_at=created,
            archive_uri="s3://b/video_a.mp4" if state == "archived" else None,
            archive_sha256="ab" * 32 if state == "archived" else None,
        )
        [event] = sql_store.webhooks()
        assert event.event == f"task.{state}"
        assert event.webhook_id.startswith("msg_") and len(event.webhook_id) == 36
        assert event.state == models.Delivery.PENDING
        payload = json.loads(event.payload)
        assert set(payload) == set(models.EVENT_FIELDS)
        assert payload["task_id"] == "video_a" and payload["state"] == state
        assert payload["provider_created_at"] == "2026-12-01T10:00:00.123Z"
        assert "secret" not in event.payload  # never the signed link

    def test_payload_matches_the_daemons_own_rendering(self, sql_store: store.SqlStore) -> None:
        """The trigger (SQL) and task.at_risk (Python) write the same fields in the same forms."""
        created = dt.datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)
        finish(sql_store, "video_a", "archived", provider_created_at=created, archive_bytes=7)
        [event] = sql_store.webhooks()
        task = sql_store.get("video_a")
        assert task is not None
        from_sql = json.loads(event.payload)
        from_python = json.loads(models.event_payload(task))
        for volatile in ("inserted_at",):  # stored by the database to the microsecond
            assert from_sql.pop(volatile)[:19] == from_python.pop(volatile)[:19]
        assert from_sql == from_python

    def test_no_event_without_a_move_into_a_terminal_state(self, sql_store: store.SqlStore) -> None:
        finish(sql_store, "video_a", "polling")
        assert sql_store.webhooks() == []

    def test_a_retried_task_that_ends_again_gets_a_new_event(
        self, sql_store: store.SqlStore
    ) -> None:
        finish(sql_store, "video_a", "failed")
        assert sql_store.retry("video_a", utils.utcnow(), force=True) == store.RetryOutcome.RETRIED
        [task] = sql_store.claim_due(OWNER, utils.utcnow(), 60, 10)
        sql_store.save([task.replace(state="archived")], OWNER)
        events = sql_store.webhooks()
        assert [e.event for e in events] == ["task.archived", "task.failed"]
        assert len({e.webhook_id for e in events}) == 2

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

    def test_prune_removes_the_events_with_their_rows(self, sql_store: store.SqlStore) -> None:
        finish(sql_store, "video_a", "failed")
        assert sql_store.prune(utils.utcnow() + dt.timedelta(days=1)) == 1
        assert sql_store.webhooks() == []


class TestPruneKeepsWhatIsNotDelivered:
    """While webhooks are on, prune never deletes an event that was not delivered."""

    def test_rows_wait_for_their_events(self, any_store: store.Store) -> None:
        later = utils.utcnow() + dt.timedelta(days=1)
        for task_id in ("video_pending", "video_delivered", "video_failed", "video_gone"):
            finish(any_store, task_id, "archived")  # type: ignore[arg-type]
        outcomes = {
            "video_delivered": models.Delivery.DELIVERED,
            "video_failed": models.Delivery.FAILED,
            "video_gone": models.Delivery.DISABLED,
        }
        events = any_store.claim_webhooks(OWNER, utils.utcnow(), 60, 10)
        any_store.record_webhooks(
            [
                dataclasses.replace(e, state=outcomes[e.task_id].value)
                for e in events
                if e.task_id in outcomes
            ],
            OWNER,
        )
        any_store.release_webhooks(OWNER)
        assert any_store.prune(later, keep_undelivered=True) == 2
        left = {e.task_id: e.state for e in any_store.webhooks()}
        assert left == {"video_pending": "pending", "video_failed": "failed"}
        assert any_store.get("video_pending") is not None and any_store.get("video_failed")
        assert any_store.get("video_delivered") is None and any_store.get("video_gone") is None

    def test_without_webhooks_they_go_with_their_rows(self, any_store: store.Store) -> None:
        finish(any_store, "video_a", "failed")  # type: ignore[arg-type]
        assert any_store.prune(utils.utcnow() + dt.timedelta(days=1)) == 1
        assert any_store.webhooks() == []


class TestAtRisk:
    """task.at_risk: once per task, while its deadline is under an hour away."""

    def test_written_once_per_task(self, sql_store: store.SqlStore) -> None:
        sql_store.add("video_near")
        sql_store.add("video_far")
        now = utils.utcnow()
        [far, near] = sorted(sql_store.claim_due(OWNER, now, 60, 10), key=lambda t: t.task_id)
        sql_store.save(
            [
                near.replace(state="polling", expires_at=now + dt.timedelta(minutes=30)),
                far.replace(state="polling", expires_at=now + dt.timedelta(hours=5)),
            ],
            OWNER,
        )
        assert sql_store.add_at_risk_events(now) == 1
        assert sql_store.add_at_risk_events(now) == 0
        [event] = sql_store.webhooks()
        assert (event.task_id, event.event) == ("video_near", "task.at_risk")

    def test_finished_rows_are_never_warned(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        soon = now + dt.timedelta(minutes=30)
        for state in TERMINAL:
            finish(any_store, f"video_{state}", state, expires_at=soon)
        finish(any_store, "video_polling", "polling", expires_at=soon)
        assert any_store.add_at_risk_events(now) == 1
        warned = [e.task_id for e in any_store.webhooks() if e.event == "task.at_risk"]
        assert warned == ["video_polling"]

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


class TestDeliveryClaims:
    """Claiming, recording and redelivering outbox events."""

    def test_claims_are_exclusive_until_recorded(self, sql_store: store.SqlStore) -> None:
        finish(sql_store, "video_a", "archived")
        now = utils.utcnow()
        [event] = sql_store.claim_webhooks("one", now, 60, 10)
        assert sql_store.claim_webhooks("two", now, 60, 10) == []
        retry_at = now + dt.timedelta(seconds=5)
        failed = store.dataclasses.replace(
            event, attempts=1, next_attempt_at=retry_at, last_status=500
        )
        assert not sql_store.record_webhook(failed, "two")  # not its lease
        assert sql_store.record_webhook(failed, "one")
        assert sql_store.claim_webhooks("two", now, 60, 10) == []  # not due yet
        [again] = sql_store.claim_webhooks("two", retry_at, 60, 10)
        assert (again.webhook_id, again.attempts) == (event.webhook_id, 1)
        backlog = sql_store.webhook_backlog()
        assert backlog.pending == 1 and backlog.given_up == 0
        assert backlog.oldest_pending_at is not None and backlog.oldest_pending_at.tzinfo

    def test_a_clean_stop_releases_what_it_holds(self, sql_store: store.SqlStore) -> None:
        finish(sql_store, "video_a", "archived")
        now = utils.utcnow()
        [event] = sql_store.claim_webhooks("one", now, 60, 10)
        assert sql_store.release_webhooks("two") == 0
        assert sql_store.release_webhooks("one") == 1
        [again] = sql_store.claim_webhooks("two", now, 60, 10)
        assert again.id == event.id

    def test_given_up_events_are_listed_and_redelivered(self, sql_store: store.SqlStore) -> None:
        finish(sql_store, "video_a", "archived")
        now = utils.utcnow()
        [event] = sql_store.claim_webhooks("one", now, 60, 10)
        gone = store.dataclasses.replace(event, state="disabled", attempts=1, last_status=410)
        assert sql_store.record_webhook(gone, "one")
        assert [e.id for e in sql_store.webhooks(failed=True)] == [event.id]
        assert sql_store.webhook_backlog() == outbox.WebhookBacklog(0, None, 1)
        assert sql_store.redeliver_webhook(event.id, now)
        assert not sql_store.redeliver_webhook(event.id + 1000, now)
        [again] = sql_store.claim_webhooks("two", now, 60, 10)
        assert again.webhook_id == event.webhook_id


class TestPausedEndpoints:
    """A URL paused by a 410 Gone gets no event claimed for it until it is resumed."""

    URL = "https://hooks.example/a"
    OTHER = "https://hooks.example/b"

    def test_pause_holds_claims_for_that_url_only(self, any_store: store.Store) -> None:
        finish(any_store, "video_a", "failed")
        now = utils.utcnow()
        assert any_store.pause_webhook_endpoint(self.URL, "the receiver answered 410 Gone", now)
        assert not any_store.pause_webhook_endpoint(self.URL, "again", now)  # paused already
        [paused] = any_store.paused_webhook_endpoints()
        assert (paused.url, paused.reason) == (self.URL, "the receiver answered 410 Gone")
        assert abs((paused.paused_at - now).total_seconds()) < 1
        assert any_store.claim_webhooks(OWNER, now, 60, 10, self.URL) == []
        assert any_store.webhook_backlog().paused_endpoints == 1
        [other] = any_store.claim_webhooks(OWNER, now, 60, 10, self.OTHER)
        assert any_store.release_webhooks(OWNER) == 1

        assert any_store.resume_webhook_endpoints(self.OTHER) == []
        assert any_store.resume_webhook_endpoints(self.URL) == [self.URL]
        assert any_store.paused_webhook_endpoints() == []
        assert any_store.webhook_backlog().paused_endpoints == 0
        [again] = any_store.claim_webhooks(OWNER, now, 60, 10, self.URL)
        assert again.webhook_id == other.webhook_id

    def test_resume_without_a_url_resumes_every_one(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        assert any_store.resume_webhook_endpoints() == []
        any_store.pause_webhook_endpoint(self.OTHER, "gone", now)
        any_store.pause_webhook_endpoint(self.URL, "gone", now)
        assert any_store.resume_webhook_endpoints() == [self.URL, self.OTHER]
        assert any_store.paused_webhook_endpoints() == []


class TestTerminalNotify:
    """NOTIFY video_tasks_done, in the transaction that writes the terminal state."""

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
