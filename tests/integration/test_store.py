"""SqlStore on real SQLite and PostgreSQL: the feeding contract, claims, leases, notify."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import psycopg
import pytest
import sqlalchemy as sa
import sqlalchemy.exc
import structlog.testing
from seedance_archiver import db, errors, listener, models, store, utils

from tests.conftest import wait_for

LEASE = dt.timedelta(seconds=60)
LEASE_S = LEASE.total_seconds()
# Leases follow the database's clock on PostgreSQL; it and this process share one host clock.
CLOCKS_AGREE = dt.timedelta(seconds=30)


def close_to(value: dt.datetime | None, expected: dt.datetime) -> bool:
    return value is not None and abs(value - expected) < CLOCKS_AGREE


def expire_leases(engine: sa.Engine, *task_ids: str) -> None:
    """Make the leases on ``task_ids`` run out now, as time passing would."""
    past = utils.utcnow() - dt.timedelta(seconds=1)
    value: object = past
    if engine.dialect.name == "sqlite":
        value = past.strftime("%Y-%m-%d %H:%M:%S.%f")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE video_tasks SET lease_expires_at = :past WHERE task_id IN :ids"
            ).bindparams(sa.bindparam("ids", expanding=True)),
            {"past": value, "ids": list(task_ids)},
        )


TERMINAL = ("archived", "failed", "cancelled", "expired", "rejected")


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """An engine on the test database, for writing rows the way a feeder does (plain SQL)."""
    eng = db.make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def sql_store(db_url: str) -> Iterator[store.SqlStore]:
    s = store.SqlStore.from_url(db_url)
    try:
        yield s
    finally:
        s.close()


def feed(engine: sa.Engine, sql: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(sql), params)


def insert(engine: sa.Engine, task_id: str, **columns: Any) -> None:
    """INSERT a row with the given columns as plain SQL, as a feeder (or an old daemon) would."""
    values = {"task_id": task_id, **columns}
    for key, value in values.items():
        if isinstance(value, dt.datetime) and engine.dialect.name == "sqlite":
            # SQLite has no timestamp type: UTC text in the format SQLAlchemy writes.
            values[key] = value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    names = ", ".join(values)
    binds = ", ".join(f":{k}" for k in values)
    feed(engine, f"INSERT INTO video_tasks ({names}) VALUES ({binds})", **values)


def is_aware_utc(value: dt.datetime | None) -> bool:
    return value is not None and value.tzinfo is not None and value.utcoffset() == dt.timedelta(0)


def ids(tasks: list[models.Task]) -> set[str]:
    return {task.task_id for task in tasks}


class TestFeedingContract:
    """A row inserted with plain SQL by a feeder is a valid, claimable task."""

    def test_minimal_insert_gets_every_default(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        feed(engine, "INSERT INTO video_tasks (task_id) VALUES ('video_abc')")
        now = utils.utcnow()
        task = sql_store.get("video_abc")
        assert task is not None
        assert task.mode == "standard"
        assert task.state == "pending"
        assert task.polls == 0
        assert task.attempts == 0
        assert task.lease_owner is None
        assert task.lease_expires_at is None
        for value in (task.inserted_at, task.next_attempt_at, task.updated_at):
            assert is_aware_utc(value), value
            assert value is not None
            # SQLite's CURRENT_TIMESTAMP has whole seconds; allow for that and a slow machine.
            assert abs(value - now) < dt.timedelta(seconds=30)

    def test_minimal_insert_is_claimable_at_once(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        feed(engine, "INSERT INTO video_tasks (task_id) VALUES ('video_abc')")
        now = utils.utcnow()
        claimed = sql_store.claim_due("daemon-a", now, LEASE_S, 10)
        assert ids(claimed) == {"video_abc"}

    def test_insert_with_mode(self, engine: sa.Engine, sql_store: store.SqlStore) -> None:
        feed(engine, "INSERT INTO video_tasks (task_id, mode) VALUES ('video_d', 'draft')")
        feed(engine, "INSERT INTO video_tasks (task_id, mode) VALUES ('video_f', 'flex')")
        assert sql_store.get("video_d").mode == "draft"  # type: ignore[union-attr]
        assert sql_store.get("video_f").mode == "flex"  # type: ignore[union-attr]

    @pytest.mark.parametrize(
        ("column", "value"), [("mode", "turbo"), ("state", "bogus"), ("mode", "STANDARD")]
    )
    def test_check_constraint_refuses_unknown_values(
        self, engine: sa.Engine, sql_store: store.SqlStore, column: str, value: str
    ) -> None:
        with pytest.raises(sqlalchemy.exc.IntegrityError) as caught:
            feed(
                engine,
                f"INSERT INTO video_tasks (task_id, {column}) VALUES ('video_bad', :value)",
                value=value,
            )
        assert isinstance(caught.value.orig, sqlite3.IntegrityError | psycopg.IntegrityError)
        assert sql_store.get("video_bad") is None


class TestClaim:
    """claim_due leases due, active, unleased rows, nearest deadline first."""

    def test_only_due_active_unleased_rows_are_claimed(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        past = now - dt.timedelta(minutes=5)
        insert(engine, "pending", state="pending", next_attempt_at=past)
        insert(engine, "polling", state="polling", next_attempt_at=past)
        insert(engine, "downloading", state="downloading", next_attempt_at=past)
        insert(engine, "future", state="polling", next_attempt_at=now + dt.timedelta(minutes=1))
        insert(
            engine,
            "leased",
            state="polling",
            next_attempt_at=past,
            lease_owner="someone",
            lease_expires_at=now + dt.timedelta(minutes=1),
        )
        for state in TERMINAL:
            insert(engine, f"t_{state}", state=state, next_attempt_at=past)

        claimed = sql_store.claim_due("daemon-a", now, LEASE_S, 100)

        assert ids(claimed) == {"pending", "polling", "downloading"}
        for task in claimed:
            assert task.lease_owner == "daemon-a"
            assert close_to(task.lease_expires_at, now + LEASE)
        stored = sql_store.get("polling")
        assert stored is not None
        assert stored.lease_owner == "daemon-a"
        assert close_to(stored.lease_expires_at, now + LEASE)
        untouched = sql_store.get("leased")
        assert untouched is not None
        assert untouched.lease_owner == "someone"

    def test_terminal_rows_are_never_claimed(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        long_ago = now - dt.timedelta(days=3)
        for state in TERMINAL:
            insert(
                engine,
                f"t_{state}",
                state=state,
                next_attempt_at=long_ago,
                expires_at=now - dt.timedelta(days=2),
                lease_owner="dead-daemon",
                lease_expires_at=long_ago,
            )
        far_future = now + dt.timedelta(days=30)
        assert sql_store.claim_due("daemon-a", far_future, LEASE_S, 100) == []

    def test_no_deadline_first_then_nearest_deadline(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        past = now - dt.timedelta(minutes=1)
        insert(
            engine,
            "late",
            state="polling",
            next_attempt_at=past,
            expires_at=now + dt.timedelta(hours=20),
        )
        insert(
            engine,
            "soon",
            state="polling",
            next_attempt_at=past,
            expires_at=now + dt.timedelta(hours=1),
        )
        insert(engine, "new", state="pending", next_attempt_at=past)
        insert(
            engine,
            "mid",
            state="polling",
            next_attempt_at=past,
            expires_at=now + dt.timedelta(hours=5),
        )

        order = []
        for _ in range(4):
            batch = sql_store.claim_due("daemon-a", now, LEASE_S, 1)
            assert len(batch) == 1
            order.append(batch[0].task_id)

        assert order == ["new", "soon", "mid", "late"]
        assert sql_store.claim_due("daemon-a", now, LEASE_S, 1) == []

    def test_batch_comes_back_nearest_deadline_first(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        past = now - dt.timedelta(minutes=1)
        hours = [7, 3, 12, 1, 9, 5, 2, 11, 4, 8, 6, 10]
        for h in hours:
            insert(
                engine,
                f"h{h:02d}",
                state="polling",
                next_attempt_at=past,
                expires_at=now + dt.timedelta(hours=h),
            )
        insert(engine, "new_1", state="pending", next_attempt_at=past)

        batch = sql_store.claim_due("daemon-a", now, LEASE_S, 100)

        # The service starts work on the rows in this order, under a global request-rate limit.
        assert [task.task_id for task in batch] == ["new_1"] + [f"h{h:02d}" for h in sorted(hours)]

    def test_limit_takes_the_nearest_deadlines(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        past = now - dt.timedelta(minutes=1)
        for hours in range(1, 11):
            insert(
                engine,
                f"h{hours:02d}",
                state="polling",
                next_attempt_at=past,
                expires_at=now + dt.timedelta(hours=hours),
            )
        first = sql_store.claim_due("daemon-a", now, LEASE_S, 3)
        assert ids(first) == {"h01", "h02", "h03"}
        second = sql_store.claim_due("daemon-a", now, LEASE_S, 4)
        assert ids(second) == {"h04", "h05", "h06", "h07"}
        assert sql_store.claim_due("daemon-a", now, LEASE_S, 0) == []

    def test_each_claim_uses_its_own_time_and_states(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        # The store builds claim_due's statement once; what a call passes must still decide.
        now = utils.utcnow()
        soon = now + dt.timedelta(minutes=1)
        insert(engine, "video_soon", state="polling", next_attempt_at=soon)
        insert(engine, "video_fetching", state="downloading", next_attempt_at=now)
        insert(engine, "video_due", state="polling", next_attempt_at=now)

        assert ids(sql_store.claim_due("d", now, LEASE_S, 10, ["downloading"])) == {
            "video_fetching"
        }
        assert ids(sql_store.claim_due("d", now, LEASE_S, 10)) == {"video_due"}
        assert ids(sql_store.claim_due("d", soon, LEASE_S, 10)) == {"video_soon"}

    def test_lease_excludes_others_until_it_expires(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        feed(engine, "INSERT INTO video_tasks (task_id) VALUES ('video_abc')")
        now = utils.utcnow()
        assert ids(sql_store.claim_due("daemon-a", now, LEASE_S, 10)) == {"video_abc"}

        assert sql_store.claim_due("daemon-b", now, LEASE_S, 10) == []

        expire_leases(engine, "video_abc")
        later = utils.utcnow()
        taken = sql_store.claim_due("daemon-b", later, LEASE_S, 10)
        assert ids(taken) == {"video_abc"}
        assert taken[0].lease_owner == "daemon-b"
        stored = sql_store.get("video_abc")
        assert stored is not None
        assert stored.lease_owner == "daemon-b"
        assert close_to(stored.lease_expires_at, later + LEASE)

    def test_a_fast_clock_does_not_take_a_live_lease(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        """On PostgreSQL leases follow the database's clock, so a replica running ahead waits."""
        feed(engine, "INSERT INTO video_tasks (task_id) VALUES ('video_abc')")
        now = utils.utcnow()
        assert ids(sql_store.claim_due("daemon-a", now, LEASE_S, 10)) == {"video_abc"}
        ahead = now + LEASE + dt.timedelta(seconds=90)  # daemon-b's clock runs 2.5 min fast
        taken = sql_store.claim_due("daemon-b", ahead, LEASE_S, 10)
        if sql_store.dialect == "postgresql":
            assert taken == []
            assert sql_store.leased(["video_abc"], ahead) == {"video_abc"}
        else:
            # SQLite allows one daemon per file (SqliteLock): its clock is the only one.
            assert ids(taken) == {"video_abc"}


class TestProviderColumn:
    """A daemon claims only rows unstamped or stamped with its provider; a callback hastens one."""

    def test_the_claim_leaves_another_providers_rows_alone(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        past = now - dt.timedelta(minutes=5)
        insert(engine, "cgt-ours", state="polling", next_attempt_at=past, provider="ark")
        insert(engine, "cgt-new", next_attempt_at=past)
        insert(engine, "video_theirs", state="polling", next_attempt_at=past, provider="reseller")

        claimed = sql_store.claim_due("daemon-ark", now, LEASE_S, 100, provider_name="ark")

        assert ids(claimed) == {"cgt-ours", "cgt-new"}
        theirs = sql_store.get("video_theirs")
        assert theirs is not None and theirs.lease_owner is None
        assert ids(sql_store.claim_due("daemon-r", now, LEASE_S, 100, None, "reseller")) == {
            "video_theirs"
        }

    def test_the_stamp_is_written_back_and_read(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        insert(engine, "cgt-1", next_attempt_at=now - dt.timedelta(seconds=1))
        (row,) = sql_store.claim_due("daemon-ark", now, LEASE_S, 10, provider_name="ark")
        assert row.provider is None
        assert sql_store.save([row.replace(provider="ark", state="polling")], "daemon-ark") == 1
        saved = sql_store.get("cgt-1")
        assert saved is not None and saved.provider == "ark"
        later = now + dt.timedelta(minutes=10)
        assert sql_store.claim_due("daemon-r", later, LEASE_S, 10, provider_name="reseller") == []


class TestLeases:
    """save, renew and release act only on the leases their owner holds."""

    def _claim_one(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> tuple[models.Task, dt.datetime]:
        """Feed one row and lease it to daemon-a; the row and the claim's ``now``."""
        feed(engine, "INSERT INTO video_tasks (task_id) VALUES ('video_abc')")
        now = utils.utcnow()
        (task,) = sql_store.claim_due("daemon-a", now, LEASE_S, 10)
        return task, now

    def test_save_writes_daemon_columns_and_clears_lease(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        task, now = self._claim_one(engine, sql_store)
        done = task.replace(
            state="archived",
            provider_status="completed",
            model="seedance_1_5_pro_720p",
            video_url="https://cdn.example/v.mp4?sig=x",
            actual_duration=5.5,
            error="previous hiccup",
            provider_created_at=now - dt.timedelta(hours=1),
            expires_at=now + dt.timedelta(hours=23),
            updated_at=now,
            next_attempt_at=now + dt.timedelta(days=1),
            last_polled_at=now,
            completed_at=now,
            archived_at=now,
            polls=4,
            attempts=1,
            archive_uri="s3://bucket/videos/video_abc.mp4",
            archive_bytes=123_456_789_012,
            archive_sha256="ab" * 32,
        )

        assert sql_store.save([done], "daemon-a") == 1

        stored = sql_store.get("video_abc")
        assert stored is not None
        assert stored.lease_owner is None
        assert stored.lease_expires_at is None
        for name in models.DAEMON_FIELDS:
            if name == "lease_expires_at":
                continue
            assert getattr(stored, name) == getattr(done, name), name
        assert stored.inserted_at == task.inserted_at
        assert stored.mode == "standard"

    def test_save_of_a_batch_writes_only_the_owned_rows(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        for name in ("a1", "a2", "b1"):
            insert(engine, name, next_attempt_at=now - dt.timedelta(seconds=1))
        mine = sql_store.claim_due("daemon-a", now, LEASE_S, 2)
        theirs = sql_store.claim_due("daemon-b", now, LEASE_S, 2)
        assert len(mine) == 2
        assert len(theirs) == 1
        batch = [task.replace(state="polling", polls=1) for task in [*mine, *theirs]]

        assert sql_store.save(batch, "daemon-a") == 2

        for task in sql_store.list():
            if task.task_id in ids(mine):
                assert (task.state, task.polls, task.lease_owner) == ("polling", 1, None)
            else:
                assert (task.state, task.polls, task.lease_owner) == ("pending", 0, "daemon-b")

    def test_save_by_a_stranger_changes_nothing(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        task, _ = self._claim_one(engine, sql_store)
        before = sql_store.get("video_abc")

        changed = sql_store.save([task.replace(state="failed", error="not mine")], "daemon-b")

        assert changed == 0
        assert sql_store.get("video_abc") == before

    def test_save_after_losing_the_lease_changes_nothing(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        task, _ = self._claim_one(engine, sql_store)
        expire_leases(engine, "video_abc")
        assert len(sql_store.claim_due("daemon-b", utils.utcnow(), LEASE_S, 10)) == 1

        assert sql_store.save([task.replace(state="archived")], "daemon-a") == 0
        stored = sql_store.get("video_abc")
        assert stored is not None
        assert stored.state == "pending"
        assert stored.lease_owner == "daemon-b"

    def test_renew_extends_only_the_owners_leases(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        for name in ("a1", "a2", "b1"):
            insert(engine, name, next_attempt_at=now - dt.timedelta(seconds=1))
        assert len(sql_store.claim_due("daemon-a", now, LEASE_S, 2)) == 2
        assert len(sql_store.claim_due("daemon-b", now, LEASE_S, 2)) == 1
        mine = {t.task_id for t in sql_store.list() if t.lease_owner == "daemon-a"}
        theirs = {t.task_id for t in sql_store.list() if t.lease_owner == "daemon-b"}
        until = now + dt.timedelta(minutes=10)

        held = sql_store.renew("daemon-a", ["a1", "a2", "b1", "missing"], now, 600)
        assert held == mine

        for task in sql_store.list():
            if task.task_id in mine:
                assert close_to(task.lease_expires_at, until)
                assert task.lease_owner == "daemon-a"
            else:
                assert task.task_id in theirs
                assert close_to(task.lease_expires_at, now + LEASE)
                assert task.lease_owner == "daemon-b"
        assert sql_store.renew("daemon-a", [], now, 600) == set()

    def test_release_clears_only_the_lease(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        _, now = self._claim_one(engine, sql_store)
        before = sql_store.get("video_abc")
        assert before is not None

        assert sql_store.release("daemon-b", ["video_abc"]) == 0
        assert sql_store.get("video_abc") == before

        assert sql_store.release("daemon-a", ["video_abc"]) == 1
        after = sql_store.get("video_abc")
        assert after == before.replace(lease_owner=None, lease_expires_at=None)
        assert ids(sql_store.claim_due("daemon-b", now, LEASE_S, 10)) == {"video_abc"}


class TestOperatorSide:
    """add, retry, counts and list, as the command line uses them."""

    def test_add_then_duplicate(self, sql_store: store.SqlStore) -> None:
        assert sql_store.add("video_abc", "draft") is True
        assert sql_store.add("video_abc") is False
        task = sql_store.get("video_abc")
        assert task is not None
        assert task.mode == "draft"
        assert task.state == "pending"
        assert len(sql_store.list()) == 1

    def test_add_with_invalid_mode_is_a_store_error(self, sql_store: store.SqlStore) -> None:
        with pytest.raises(errors.StoreError):
            sql_store.add("video_abc", "turbo")
        assert sql_store.get("video_abc") is None

    def test_retry_puts_a_terminal_row_back_to_polling_now(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        polled = now - dt.timedelta(hours=2)
        insert(
            engine,
            "video_abc",
            state="failed",
            polls=7,
            attempts=3,
            error="content policy violation",
            last_polled_at=polled,
            next_attempt_at=now + dt.timedelta(days=10),
        )

        assert sql_store.retry("video_abc", now) is store.RetryOutcome.RETRIED

        task = sql_store.get("video_abc")
        assert task is not None
        assert task.state == "polling"
        assert task.next_attempt_at == now
        assert task.polls == 7
        assert task.error == "content policy violation"
        assert task.last_polled_at == polled
        assert ids(sql_store.claim_due("daemon-a", now, LEASE_S, 10)) == {"video_abc"}
        assert sql_store.retry("no_such_task", now) is store.RetryOutcome.NO_SUCH_TASK

    def test_retry_leaves_archived_rows_and_live_leases_alone(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        insert(engine, "video_safe", state="archived", archive_uri="s3://b/video_safe.mp4")
        insert(engine, "video_busy", state="downloading", next_attempt_at=now)
        assert ids(sql_store.claim_due("daemon-a", now, LEASE_S, 10)) == {"video_busy"}

        assert sql_store.retry("video_safe", now) is store.RetryOutcome.ARCHIVED
        assert sql_store.get("video_safe").state == "archived"  # type: ignore[union-attr]
        for force in (False, True):
            assert sql_store.retry("video_busy", now, force=force) is store.RetryOutcome.LEASED
        busy = sql_store.get("video_busy")
        assert busy is not None and busy.lease_owner == "daemon-a"

        assert sql_store.retry("video_safe", now, force=True) is store.RetryOutcome.RETRIED
        assert sql_store.get("video_safe").state == "polling"  # type: ignore[union-attr]
        expire_leases(engine, "video_busy")
        assert sql_store.retry("video_busy", utils.utcnow()) is store.RetryOutcome.RETRIED

    def test_counts_lists_every_state(self, engine: sa.Engine, sql_store: store.SqlStore) -> None:
        assert sql_store.counts() == {state.value: 0 for state in models.State}
        insert(engine, "a", state="archived")
        insert(engine, "b", state="archived")
        insert(engine, "c", state="polling")
        counts = sql_store.counts()
        assert set(counts) == {state.value for state in models.State}
        assert counts["archived"] == 2
        assert counts["polling"] == 1
        assert sum(counts.values()) == 3

    def test_list_filters_by_state(self, engine: sa.Engine, sql_store: store.SqlStore) -> None:
        insert(engine, "a", state="archived")
        insert(engine, "b", state="failed")
        insert(engine, "c", state="archived")
        assert ids(sql_store.list(state="archived")) == {"a", "c"}
        assert ids(sql_store.list(state="failed")) == {"b"}
        assert sql_store.list(state="expired") == []
        assert ids(sql_store.list()) == {"a", "b", "c"}
        assert len(sql_store.list(limit=2)) == 2


class TestDatetimes:
    """Times come back as the same instant, timezone-aware UTC, on both databases."""

    def test_round_trip_as_aware_utc(self, engine: sa.Engine, sql_store: store.SqlStore) -> None:
        feed(engine, "INSERT INTO video_tasks (task_id) VALUES ('video_abc')")
        now = utils.utcnow()
        (task,) = sql_store.claim_due("daemon-a", now, LEASE_S, 10)
        plus8 = dt.timezone(dt.timedelta(hours=8))
        created = dt.datetime(2026, 3, 1, 20, 15, 30, 123456, tzinfo=plus8)
        saved = task.replace(
            provider_created_at=created,
            expires_at=created + dt.timedelta(days=1),
            completed_at=dt.datetime(2026, 3, 1, 12, 0, 0, 1, tzinfo=dt.UTC),
        )
        assert sql_store.save([saved], "daemon-a") == 1

        stored = sql_store.get("video_abc")
        assert stored is not None
        assert stored.provider_created_at == created
        assert stored.expires_at == created + dt.timedelta(days=1)
        assert stored.completed_at == dt.datetime(2026, 3, 1, 12, 0, 0, 1, tzinfo=dt.UTC)
        for name in ("provider_created_at", "expires_at", "completed_at", "inserted_at"):
            assert is_aware_utc(getattr(stored, name)), name
        assert stored.provider_created_at.hour == 12  # type: ignore[union-attr]

    def test_naive_datetime_is_refused(self, sql_store: store.SqlStore) -> None:
        naive = dt.datetime(2026, 3, 1, 12, 0, 0)
        with pytest.raises(errors.StoreError, match="naive"):
            sql_store.claim_due("daemon-a", naive, LEASE_S, 10)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/empty.db"
    return str(request.getfixturevalue("empty_pg_url"))


class TestSchemaCheck:
    """check_schema tells the operator to migrate when the table is missing."""

    def test_empty_database_says_migrate(self, empty_url: str) -> None:
        s = store.SqlStore.from_url(empty_url)
        try:
            with pytest.raises(errors.StoreError, match="migrate"):
                s.check_schema()
        finally:
            s.close()

    def test_migrated_database_passes(self, sql_store: store.SqlStore) -> None:
        sql_store.check_schema()
        sql_store.ping()


class TestPostgresNotify:
    """On PostgreSQL an INSERT wakes the daemon through LISTEN/NOTIFY."""

    def test_insert_sends_a_notification(self, pg_url: str) -> None:
        dsn = db.engine_url(pg_url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(dsn, autocommit=True) as listening:
            listening.execute(f"LISTEN {listener.LISTEN_CHANNEL}")
            with psycopg.connect(dsn, autocommit=True) as feeder:
                feeder.execute("INSERT INTO video_tasks (task_id) VALUES ('video_abc')")
            received = list(listening.notifies(timeout=5.0, stop_after=1))
        assert [n.channel for n in received] == [listener.LISTEN_CHANNEL]

    def test_listener_calls_back_on_insert(self, pg_url: str) -> None:
        calls: list[int] = []
        woke = threading.Event()

        def on_notify() -> None:
            calls.append(1)
            woke.set()

        waker = listener.Listener(pg_url, on_notify)
        waker.start()
        try:
            assert waker.connected.wait(5.0)
            # It wakes once on connecting (rows inserted while it was away); wait that out first.
            wait_for(lambda: len(calls) >= 1, timeout=5.0, what="the wake-up on connect")
            woke.clear()
            before = len(calls)
            engine = db.make_engine(pg_url)
            try:
                feed(engine, "INSERT INTO video_tasks (task_id) VALUES ('video_abc')")
            finally:
                engine.dispose()
            assert woke.wait(5.0), "no callback within 5 s of the insert"
            assert len(calls) > before
        finally:
            waker.stop()


class TestPostgresConcurrentClaims:
    """Two replicas claiming at the same time never get the same row (SKIP LOCKED)."""

    ROWS = 200
    LIMIT = 50
    ROUNDS = 5

    def test_concurrent_claims_are_disjoint(self, pg_url: str) -> None:
        engine = db.make_engine(pg_url)
        stores = [store.SqlStore.from_url(pg_url), store.SqlStore.from_url(pg_url)]
        all_ids = {f"video_{i:04d}" for i in range(self.ROWS)}
        try:
            with engine.begin() as conn:
                conn.execute(
                    sa.text("INSERT INTO video_tasks (task_id) VALUES (:task_id)"),
                    [{"task_id": task_id} for task_id in sorted(all_ids)],
                )
            for round_no in range(self.ROUNDS):
                now = utils.utcnow() + dt.timedelta(seconds=1)
                got: dict[str, list[list[str]]] = {"a": [], "b": []}
                failures: list[BaseException] = []
                barrier = threading.Barrier(2)

                def work(
                    owner: str,
                    s: store.SqlStore,
                    now: dt.datetime = now,
                    barrier: threading.Barrier = barrier,
                    got: dict[str, list[list[str]]] = got,
                    failures: list[BaseException] = failures,
                ) -> None:
                    try:
                        barrier.wait(5.0)
                        while batch := s.claim_due(owner, now, LEASE_S, self.LIMIT):
                            got[owner].append([task.task_id for task in batch])
                    except BaseException as exc:
                        failures.append(exc)

                threads = [
                    threading.Thread(target=work, args=(owner, s))
                    for owner, s in zip(("a", "b"), stores, strict=True)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(30.0)
                assert not failures, failures

                for batches in got.values():
                    assert all(len(batch) <= self.LIMIT for batch in batches)
                claimed_a = [i for batch in got["a"] for i in batch]
                claimed_b = [i for batch in got["b"] for i in batch]
                assert len(claimed_a) == len(set(claimed_a)), f"round {round_no}"
                assert len(claimed_b) == len(set(claimed_b)), f"round {round_no}"
                assert not set(claimed_a) & set(claimed_b), f"round {round_no}"
                assert len(claimed_a) + len(claimed_b) <= self.ROWS
                assert set(claimed_a) | set(claimed_b) == all_ids
                owners = {t.task_id: t.lease_owner for t in stores[0].list()}
                assert all(owners[i] == "a" for i in claimed_a)
                assert all(owners[i] == "b" for i in claimed_b)

                stores[0].release("a", claimed_a)
                stores[1].release("b", claimed_b)
        finally:
            for s in stores:
                s.close()
            engine.dispose()


class TestSqliteLock:
    """One daemon per SQLite file."""

    def test_second_acquire_is_refused_until_release(self, sqlite_url: str) -> None:
        first = db.SqliteLock(sqlite_url)
        second = db.SqliteLock(sqlite_url)
        first.acquire()
        try:
            with pytest.raises(errors.AlreadyRunning, match="another seedance-archiver"):
                second.acquire()
        finally:
            first.release()
        second.acquire()
        try:
            with pytest.raises(errors.AlreadyRunning):
                db.SqliteLock(sqlite_url).acquire()
        finally:
            second.release()


class TestPoisonedOutcomes:
    """One outcome the database cannot store never holds up the rest of its batch."""

    POISONS: ClassVar[dict[str, str]] = {
        "nul": "content\x00policy",
        "lone_surrogate": "bad \ud800 text",
    }

    def test_the_rest_of_the_batch_is_saved(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        names = ["good_1", *self.POISONS, "good_2"]
        for name in names:
            insert(engine, name, next_attempt_at=now - dt.timedelta(seconds=1))
        claimed = {t.task_id: t for t in sql_store.claim_due("daemon-a", now, LEASE_S, 10)}
        assert set(claimed) == set(names)
        batch = [
            claimed[name].replace(state="failed", error=self.POISONS.get(name, "fine"), polls=1)
            for name in names
        ]
        with structlog.testing.capture_logs() as logs:
            written = sql_store.save(batch, "daemon-a")

        refused = {e["task_id"] for e in logs if e["event"] == "outcome_not_saved"}
        # PostgreSQL refuses NUL in text; SQLite stores it. Neither can encode a lone surrogate.
        expected = (
            {"nul", "lone_surrogate"} if sql_store.dialect == "postgresql" else {"lone_surrogate"}
        )
        assert refused == expected
        assert written == len(names) - len(expected)
        assert sql_store.rows_refused == len(expected)
        for name in names:
            row = sql_store.get(name)
            assert row is not None
            if name in expected:
                # Left as it was, leased, for its lease to run out and the work to be done again.
                assert (row.state, row.polls, row.lease_owner) == ("pending", 0, "daemon-a")
            else:
                assert (row.state, row.polls, row.lease_owner) == ("failed", 1, None)

    def test_a_naive_time_is_refused_alone_whichever_way_the_batch_is_written(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        """COPY (PostgreSQL's batch write) refuses what the statement per row refuses."""
        now = utils.utcnow()
        for name in ("good", "naive"):
            insert(engine, name, next_attempt_at=now - dt.timedelta(seconds=1))
        claimed = {t.task_id: t for t in sql_store.claim_due("daemon-a", now, LEASE_S, 10)}
        naive = now.replace(tzinfo=None)
        batch = [
            claimed["good"].replace(polls=1),
            claimed["naive"].replace(polls=1, last_polled_at=naive),
        ]
        assert sql_store.save(batch, "daemon-a") == 1
        good, bad = sql_store.get("good"), sql_store.get("naive")
        assert good is not None and good.polls == 1
        assert bad is not None and bad.polls == 0 and bad.lease_owner == "daemon-a"

    def test_a_database_that_is_down_is_not_retried_row_by_row(self, tmp_path: Any) -> None:
        """A lost connection is StoreError at once: "down" is not a per-row problem."""
        gone = store.SqlStore.from_url(f"sqlite:///{tmp_path}/missing-dir/none.db")
        try:
            with pytest.raises(errors.StoreError):
                gone.save([models.Task(task_id="video_abc")], "daemon-a")
        finally:
            gone.close()


class TestHungDatabase:
    """A server that stops answering without closing cannot hang a store call."""

    @pytest.mark.postgres
    def test_a_silent_connection_is_cut_and_the_next_call_reconnects(self, pg_url: str) -> None:
        from tests.integration.faultproxy import FaultProxy

        with FaultProxy(5432) as proxy:
            path = pg_url.rsplit("/", 1)[1]
            hung = store.SqlStore.from_url(
                f"postgresql://postgres@127.0.0.1:{proxy.port}/{path}", statement_timeout_seconds=1
            )
            try:
                hung.ping()  # a pooled connection, established
                cuts = db.WATCHDOG.cuts
                proxy.stall(3600)  # holds every byte; closes nothing
                outcome: list[BaseException | None] = []

                def call() -> None:
                    try:
                        hung.summary(utils.utcnow())
                        outcome.append(None)
                    except BaseException as exc:
                        outcome.append(exc)

                worker = threading.Thread(target=call, daemon=True)
                worker.start()
                wait_for(lambda: outcome, 60, what="the hung call to fail")
                assert isinstance(outcome[0], errors.StoreError), outcome
                assert db.WATCHDOG.cuts > cuts
                proxy.forward()
                wait_for(lambda: _pings(hung), 60, what="the store to reconnect")
                assert hung.counts()["pending"] == 0
            finally:
                proxy.forward()
                hung.close()


def _pings(sql_store: store.SqlStore) -> bool:
    try:
        sql_store.ping()
    except errors.StoreError:
        return False
    return True


class TestFewerPolls:
    """The store's side of fewer polls: observed generation times, starving rows, the load count."""

    def test_generation_times_per_model_latest_first_and_bounded(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        created = now - dt.timedelta(hours=2)
        for i in range(5):
            insert(
                engine,
                f"a{i}",
                state="archived",
                model="seedance_1_5_pro_720p",
                provider_created_at=created,
                completed_at=created + dt.timedelta(seconds=100 + i, minutes=i),
            )
        insert(
            engine,
            "b",
            state="downloading",
            model="seedance_1_5_pro_480p",
            provider_created_at=created,
            completed_at=created + dt.timedelta(seconds=45),
        )
        insert(engine, "not-done", state="polling", model="m", provider_created_at=created)
        insert(
            engine,
            "too-old",
            state="archived",
            model="seedance_1_5_pro_480p",
            provider_created_at=created - dt.timedelta(days=3),
            completed_at=created - dt.timedelta(days=3) + dt.timedelta(seconds=10),
        )

        times = sql_store.generation_times(now - dt.timedelta(days=1), 3)

        assert set(times) == {"seedance_1_5_pro_720p", "seedance_1_5_pro_480p"}
        assert sorted(times["seedance_1_5_pro_720p"]) == pytest.approx([222, 283, 344])
        assert times["seedance_1_5_pro_480p"] == pytest.approx([45])

    def test_claim_overdue_takes_the_longest_overdue_of_each_mode(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        ago = lambda s: now - dt.timedelta(seconds=s)  # noqa: E731
        insert(engine, "std-late", mode="standard", state="polling", next_attempt_at=ago(300))
        insert(engine, "std-later", mode="standard", state="pending", next_attempt_at=ago(900))
        insert(engine, "std-ok", mode="standard", state="polling", next_attempt_at=ago(30))
        insert(engine, "draft-late", mode="draft", state="polling", next_attempt_at=ago(40))
        insert(engine, "dl", mode="standard", state="downloading", next_attempt_at=ago(900))
        insert(engine, "done", mode="standard", state="archived", next_attempt_at=ago(900))
        due_before = {"standard": ago(60), "draft": ago(20), "flex": ago(120)}

        claimed = sql_store.claim_overdue("daemon-a", now, LEASE_S, 10, due_before)

        assert [t.task_id for t in claimed] == ["std-later", "std-late", "draft-late"]
        assert all(t.lease_owner == "daemon-a" for t in claimed)
        assert sql_store.claim_overdue("daemon-b", now, LEASE_S, 10, due_before) == []
        assert ids(sql_store.claim_due("daemon-b", now, LEASE_S, 10)) == {"std-ok", "dl"}

    def test_summary_counts_rows_due_within_the_load_window(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        now = utils.utcnow()
        soon = now + store.LOAD_WINDOW / 2
        insert(engine, "overdue", state="polling", next_attempt_at=now - dt.timedelta(hours=1))
        insert(engine, "soon", state="pending", next_attempt_at=soon)
        insert(engine, "later", state="polling", next_attempt_at=now + store.LOAD_WINDOW * 2)
        insert(engine, "dl", state="downloading", next_attempt_at=now)
        insert(engine, "done", state="archived", next_attempt_at=now)
        assert sql_store.summary(now).due_soon == 2


def claimed_and_saved(s: store.Store, task_id: str, **changes: Any) -> None:
    """Add a task, claim it and write ``changes`` back, as the daemon does."""
    s.add(task_id)
    now = utils.utcnow()
    [task] = [t for t in s.claim_due("t-owner", now, 60, 100) if t.task_id == task_id]
    assert s.save([task.replace(updated_at=now, **changes)], "t-owner") == 1


class TestWaitingOnSettings:
    """Rows whose video one of our settings refuses: counted, and due at once when a daemon
    starts (on the fake store, SQLite and PostgreSQL alike)."""

    WAITING = (
        models.WAITING_ON_SETTING + ": video is 3000000 bytes, more than SEEDANCE_MAX_VIDEO_BYTES"
    )

    def test_woken_counted_and_nothing_else_touched(self, any_store: store.Store) -> None:
        later = utils.utcnow() + dt.timedelta(hours=1)
        waiting = {"state": "downloading", "error": self.WAITING, "next_attempt_at": later}
        claimed_and_saved(any_store, "video_waits", provider="reseller", **waiting)
        claimed_and_saved(any_store, "video_other_provider", provider="ark", **waiting)
        claimed_and_saved(
            any_store,
            "video_retrying",
            state="downloading",
            error="the video host answered HTTP 503 (attempt 1; next try in 5s)",
            next_attempt_at=later,
        )
        claimed_and_saved(
            any_store, "video_polling", state="polling", error=self.WAITING, next_attempt_at=later
        )
        assert any_store.summary(utils.utcnow()).waiting_on_setting == 2
        now = utils.utcnow()
        assert any_store.wake_waiting_on_settings(now, "reseller") == 1
        assert any_store.wake_waiting_on_settings(now, "reseller") == 0  # due already
        due = {t.task_id for t in any_store.claim_due("t-owner", now, 60, 100)}
        assert due == {"video_waits"}

    def test_a_leased_row_is_left_alone(self, any_store: store.Store) -> None:
        later = utils.utcnow() + dt.timedelta(hours=1)
        claimed_and_saved(
            any_store, "video_waits", state="downloading", error=self.WAITING, next_attempt_at=later
        )
        [held] = any_store.claim_due("t-owner", later, 60, 10)
        assert any_store.wake_waiting_on_settings(utils.utcnow(), "reseller") == 0
        assert held.task_id == "video_waits"
