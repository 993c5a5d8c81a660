"""SqlStore where only SQL can show it: the feeding contract (rows inserted with plain SQL), the
lease clock, the schema check, LISTEN/NOTIFY, SKIP LOCKED across connections, one daemon per SQLite
file, rows the database refuses, a hung server.

What every store does (claim, save, lease, retry, list, counts, fewer polls) is written once in
tests/contract/test_store_contract.py, over the fake store, SQLite and PostgreSQL.
"""

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

from tests.helpers import wait_for

LEASE = dt.timedelta(seconds=60)
LEASE_S = LEASE.total_seconds()


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
    """A row a feeder inserts with plain SQL is a valid, claimable task (SQL only: no fake has SQL)."""

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


class TestLeaseClock:
    """Whose clock a lease follows is each database's own: PostgreSQL's, or the one SQLite daemon's."""

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


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/empty.db"
    return str(request.getfixturevalue("empty_pg_url"))


class TestSchemaCheck:
    """check_schema says to migrate when the table is missing: only a database has a schema."""

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
    """On PostgreSQL an INSERT wakes the daemon through LISTEN/NOTIFY (SQLite has none)."""

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
    """Replicas claiming at once never share a row: PostgreSQL's SKIP LOCKED across connections."""

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


class TestCountedRoundTrips:
    """Each statement and each commit is counted, the COPY of a PostgreSQL batch included: the
    daemon's metrics, and bench/burst.py's database cost per video."""

    def test_a_claim_and_a_batch_write_back_are_counted(
        self, engine: sa.Engine, sql_store: store.SqlStore
    ) -> None:
        statements: list[int] = []
        commits: list[None] = []
        sql_store.db.count(statements.append, lambda: commits.append(None))
        now = utils.utcnow()
        for name in ("video_a", "video_b"):
            insert(engine, name, next_attempt_at=now - dt.timedelta(seconds=1))
        claimed = sql_store.claim_due("daemon-a", now, LEASE_S, 10)
        # On SQLite the write lock is taken first, then the rows are read and leased by id.
        per_claim = 1 if sql_store.dialect == "postgresql" else 3
        assert (sum(statements), len(commits)) == (per_claim, 1)
        sql_store.save([t.replace(state="polling", polls=1) for t in claimed], "daemon-a")
        # One UPDATE for the batch; on PostgreSQL a temporary table, a COPY and an UPDATE.
        per_batch = 3 if sql_store.dialect == "postgresql" else 1
        assert (sum(statements), len(commits)) == (per_claim + per_batch, 2)


class TestSqliteLock:
    """One daemon per SQLite file: SQLite's own lock (PostgreSQL takes replicas)."""

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
    """A row the database cannot store never holds up its batch: each database refuses its own."""

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


class TestSqliteWriteBack:
    """SQLite's write-back makes its parameters itself (store._sqlite_row): they are stored as
    SQLAlchemy's own statement stores them, byte for byte."""

    def test_the_rows_are_the_statement_s_rows(self, sqlite_url: str) -> None:
        sql_store = store.SqlStore.from_url(sqlite_url)
        now = dt.datetime(2026, 12, 7, 5, 0, 0, tzinfo=dt.UTC)  # microsecond 0: still written
        elsewhere = dt.timezone(dt.timedelta(hours=-5, minutes=-30))
        try:
            for name in ("theirs", "ours"):
                insert(sql_store.engine, name, next_attempt_at=now - dt.timedelta(seconds=1))
            claimed = {t.task_id: t for t in sql_store.claim_due("owner", now, LEASE_S, 10)}
            fields = {
                "state": models.State.ARCHIVED,
                "provider_status": "succeeded",
                "model": "seedance-1-0-pro",
                "video_url": "https://videos.example/v.mp4?sig=x",
                "actual_duration": 5,  # an int: stored as 5.0 by both
                "error": "vidéo ✓",
                "provider_created_at": now.astimezone(elsewhere),
                "expires_at": now + dt.timedelta(days=1, microseconds=7),
                "updated_at": now,
                "next_attempt_at": now + dt.timedelta(days=1),
                "last_polled_at": now - dt.timedelta(microseconds=1),
                "completed_at": now,
                "archived_at": now,
                "polls": 3,
                "attempts": 1,
                "archive_uri": "file:///archive/v.mp4",
                "archive_bytes": 2**40,
                "archive_sha256": "ab" * 32,
                "provider": "reseller",
            }
            theirs = claimed["theirs"].replace(**fields)
            with sql_store.engine.begin() as conn:
                params = {"b_task_id": "theirs", "b_owner": "owner"} | {
                    f"v_{name}": getattr(theirs, name) for name in models.DAEMON_FIELDS
                }
                assert conn.execute(sql_store._save_stmt, [params]).rowcount == 1
            assert sql_store.save([claimed["ours"].replace(**fields)], "owner") == 1
        finally:
            sql_store.close()
        with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:
            columns = [c for c in models.TASK_FIELDS if c not in ("task_id", "inserted_at")]
            select = ", ".join(f"{c}, typeof({c})" for c in columns)
            rows = {
                row[0]: row[1:]
                for row in conn.execute(f"SELECT task_id, {select} FROM video_tasks")
            }
        assert rows["ours"] == rows["theirs"]
        assert "2026-12-07 05:00:00.000000" in rows["ours"]


class TestHungDatabase:
    """A PostgreSQL server that stops answering without closing cannot hang a store call."""

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
