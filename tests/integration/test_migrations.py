"""Migrations: they create the table DESIGN.md describes, round-trip, and agree with the models."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
import pathlib
from typing import Any

import alembic.autogenerate
import alembic.command
import alembic.migration
import alembic.script
import psycopg
import pytest
import sqlalchemy as sa
import structlog
from seedance_archiver import db, errors, models, schema, store, utils

from tests.helpers import wait_for


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/empty.db"
    return str(request.getfixturevalue("empty_pg_url"))


def _columns(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("video_tasks"):
                return set()
            return {c["name"] for c in sa.inspect(conn).get_columns("video_tasks")}
    finally:
        engine.dispose()


def _not_the_claim_index(obj: object, name: str | None, kind: str, *_: object) -> bool:
    # Their NULLS FIRST ordering (and the download claim's columns) differ by database, which one
    # model index cannot say; test_claim_index_is_in_claim_order checks the claim's exact
    # definition on each database, test_the_download_claim_walks_its_own_index the other's plan.
    return not (kind == "index" and name in ("ix_video_tasks_due", "ix_video_tasks_downloads"))


class TestMigrations:
    """Alembic upgrade/downgrade of video_tasks."""

    def test_upgrade_creates_every_designed_column(self, empty_url: str) -> None:
        schema.upgrade(empty_url)
        assert _columns(empty_url) == set(models.TASK_FIELDS)

    def test_round_trip_down_and_up_again(self, empty_url: str) -> None:
        schema.upgrade(empty_url)
        schema.downgrade(empty_url, "base")
        assert _columns(empty_url) == set()
        schema.upgrade(empty_url)
        assert _columns(empty_url) == set(models.TASK_FIELDS)

    def test_models_agree_with_migrated_schema(self, empty_url: str) -> None:
        schema.upgrade(empty_url)
        engine = db.make_engine(empty_url)
        try:
            with engine.connect() as conn:
                context = alembic.migration.MigrationContext.configure(
                    conn,
                    opts={
                        "compare_type": True,
                        "compare_server_default": False,
                        "include_object": _not_the_claim_index,
                    },
                )
                diff = alembic.autogenerate.compare_metadata(context, models.Base.metadata)
        finally:
            engine.dispose()
        assert diff == []

    def test_claim_index_is_in_claim_order(self, empty_url: str) -> None:
        schema.upgrade(empty_url)
        engine = db.make_engine(empty_url)
        try:
            with engine.connect() as conn:
                if engine.dialect.name == "postgresql":
                    sql = conn.execute(
                        sa.text(
                            "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_video_tasks_due'"
                        )
                    ).scalar_one()
                else:
                    sql = conn.execute(
                        sa.text("SELECT sql FROM sqlite_master WHERE name = 'ix_video_tasks_due'")
                    ).scalar_one()
        finally:
            engine.dispose()
        text = " ".join(sql.split())
        if engine.dialect.name == "postgresql":
            assert "(expires_at NULLS FIRST, next_attempt_at)" in text
            assert (
                "WHERE (state = ANY (ARRAY['downloading'::text, 'pending'::text, 'polling'::text]))"
                in text
            )
        else:
            assert (
                '("expires_at", "next_attempt_at")' in text
                or "(expires_at, next_attempt_at)" in text
            )
            assert "WHERE state IN ('downloading', 'pending', 'polling')" in text

    # --- migrating beside the feeders (PostgreSQL) ---------------------------------------------------

    def test_the_download_claim_walks_its_own_index(self, empty_url: str) -> None:
        """A claim of a few downloads behind a backlog of rows not yet polled reads its own rows
        in claim order (migration 0011): no sort of every downloading row (SQLite, before), no
        walk past every unpolled row (PostgreSQL, before). Either made a burst O(N^2)."""
        schema.upgrade(empty_url)
        sql_store = store.SqlStore.from_url(empty_url)
        engine = sql_store.engine
        now = utils.utcnow()
        try:
            with engine.begin() as conn:
                tasks = models.video_tasks
                conn.execute(tasks.insert(), [{"task_id": f"pending_{n}"} for n in range(2000)])
                conn.execute(
                    tasks.insert(),
                    [
                        {
                            "task_id": f"downloading_{n}",
                            "state": models.State.DOWNLOADING.value,
                            "provider": "reseller",
                            "video_url": "https://videos.example/v.mp4",
                            "expires_at": now + dt.timedelta(hours=1, seconds=n),
                            "next_attempt_at": now - dt.timedelta(seconds=n + 1),
                        }
                        for n in range(2000)
                    ],
                )
                if engine.dialect.name == "postgresql":
                    conn.exec_driver_sql("ANALYZE video_tasks")
            sent: list[tuple[str, Any]] = []

            def record(*args: Any) -> None:
                # The statement that picks the rows: on SQLite a select before the update by id.
                if args[2].startswith(("UPDATE video_tasks", "SELECT video_tasks.task_id")):
                    sent.append((args[2], args[3]))

            sa.event.listen(engine, "before_cursor_execute", record)
            try:
                claimed = sql_store.claim_due(
                    "test", now, 60.0, 4, states=["downloading"], provider_name="reseller"
                )
            finally:
                sa.event.remove(engine, "before_cursor_execute", record)
            # Nearest deadline first.
            assert [t.task_id for t in claimed] == [f"downloading_{n}" for n in range(4)]
            statement, parameters = sent[0]
            explain = "EXPLAIN " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
            with engine.connect() as conn:
                plan = " ".join(
                    str(row[-1]) for row in conn.exec_driver_sql(explain + statement, parameters)
                )
        finally:
            sql_store.close()
        assert "ix_video_tasks_downloads" in plan, plan
        assert "Sort" not in plan and "TEMP B-TREE" not in plan, plan


PROBE_REVISION = """
from alembic import op

revision = "9999"
down_revision = "{head}"


def upgrade() -> None:
    for _ in range(3):  # each statement short, the connection held for longer than the watchdog allows
        op.execute("SELECT pg_sleep(0.5)")
    op.execute(
        "CREATE TABLE migrate_probe AS SELECT current_setting('statement_timeout') AS statement, "
        "current_setting('lock_timeout') AS lock"
    )
"""


class _QuickWatchdog(db.Watchdog):
    """The daemon's watchdog, cutting at 1 s instead of the statement timeout + 2 s."""

    def guard(self, key: int, fd: int, seconds: float) -> None:
        super().guard(key, fd, 1.0)


def _pg(url: str, autocommit: bool = False) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=autocommit, connect_timeout=5)


def _version(url: str) -> str | None:
    with _pg(url) as conn:
        if conn.execute("SELECT to_regclass('alembic_version')").fetchone() == (None,):
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return None if row is None else str(row[0])


def _head() -> str:
    head = alembic.script.ScriptDirectory.from_config(schema.alembic_config("")).get_current_head()
    assert head is not None
    return head


def _indexes(url: str) -> dict[str, tuple[int, bool, str]]:
    """Every index of the daemon's tables: name -> (oid, valid, definition)."""
    with _pg(url) as conn:
        rows = conn.execute(
            "SELECT c.relname, i.indexrelid::int, i.indisvalid, pg_get_indexdef(i.indexrelid)"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid IN ('video_tasks'::regclass, 'webhook_outbox'::regclass)"
        ).fetchall()
    return {name: (oid, valid, definition) for name, oid, valid, definition in rows}


def _definitions(url: str) -> dict[str, str]:
    return {name: definition for name, (_, valid, definition) in _indexes(url).items() if valid}


@pytest.mark.postgres
class TestMigratingBesideFeeders:
    """migrate on PostgreSQL holds no lock for long, is not cut by the daemon's limits, and may be
    cut itself and run again."""

    def test_a_lock_held_elsewhere_is_waited_for_in_short_tries_that_let_inserts_through(
        self, empty_pg_url: str
    ) -> None:
        url = empty_pg_url
        schema.upgrade(url, "0004")  # 0005 adds a column: an ACCESS EXCLUSIVE lock
        with (
            # Outermost: on a failure the connections close (and free the migrate) before the
            # pool waits for it.
            concurrent.futures.ThreadPoolExecutor(1) as pool,
            _pg(url) as holder,
            _pg(url, autocommit=True) as feeder,
            structlog.testing.capture_logs() as logs,
        ):
            holder.execute("SELECT count(*) FROM video_tasks")  # ACCESS SHARE until it ends
            holder_pid = holder.info.backend_pid
            migrating = pool.submit(schema.upgrade, url)
            wait_for(
                lambda: (
                    migrating.done()
                    or feeder.execute(
                        "SELECT 1 FROM pg_locks WHERE NOT granted"
                        " AND relation = 'video_tasks'::regclass AND mode = 'AccessExclusiveLock'"
                    ).fetchone()
                ),
                what="migrate waiting for its lock on video_tasks",
            )
            # A lock request that waits queues every insert behind it; given up, it lets them by.
            feeder.execute("SET statement_timeout = '10s'")  # the deadline, not a measurement
            feeder.execute("INSERT INTO video_tasks (task_id) VALUES ('fed-while-migrating')")
            wait_for(
                lambda: any(e["event"] == "migrate_lock_wait" for e in logs),
                what="migrate saying what it waits on",
            )
            assert holder.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            holder.rollback()
            migrating.result(timeout=60)
        assert _version(url) == _head()
        wait = next(e for e in logs if e["event"] == "migrate_lock_wait")
        assert wait["at_revision"] == "0004"
        assert {"pid": holder_pid, "table": "video_tasks", "mode": "AccessShareLock"}.items() <= (
            next(h for h in wait["holders"] if h["pid"] == holder_pid).items()
        )

    def test_a_long_revision_runs_without_the_daemons_timeouts_and_watchdog(
        self, empty_pg_url: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(db, "WATCHDOG", _QuickWatchdog())
        versions = tmp_path / "versions"
        versions.mkdir()
        (versions / "9999_probe.py").write_text(PROBE_REVISION.format(head=_head()))
        cfg = schema.alembic_config(empty_pg_url)
        shipped = pathlib.Path(cfg.get_main_option("script_location") or "") / "versions"
        cfg.set_main_option("path_separator", "os")
        cfg.set_main_option("version_locations", os.pathsep.join([str(shipped), str(versions)]))
        alembic.command.upgrade(cfg, "head")
        with _pg(empty_pg_url) as conn:
            settings = conn.execute("SELECT statement, lock FROM migrate_probe").fetchone()
        assert settings == ("0", f"{db.MIGRATE_LOCK_TIMEOUT_SECONDS:g}s")

    def test_an_index_build_cut_half_way_is_dropped_and_built_again(
        self, empty_pg_url: str
    ) -> None:
        url = empty_pg_url
        schema.upgrade(url, "0006")
        with (
            concurrent.futures.ThreadPoolExecutor(1) as pool,
            _pg(url) as writer,
            _pg(url, autocommit=True) as admin,
        ):
            # A write not yet committed: a concurrent build waits for it before it starts.
            writer.execute("INSERT INTO video_tasks (task_id) VALUES ('in-flight')")
            migrating = pool.submit(schema.upgrade, url)
            pid = wait_for(
                lambda: (
                    migrating.done()
                    or admin.execute(
                        "SELECT pid FROM pg_stat_progress_create_index"
                        " WHERE index_relid = to_regclass('ix_video_tasks_completed')"
                    ).fetchone()
                ),
                what="the concurrent build of ix_video_tasks_completed",
            )
            assert not migrating.done(), migrating.exception()
            assert isinstance(pid, tuple), pid  # the row that names the building backend
            admin.execute("SELECT pg_terminate_backend(%s)", pid)
            with pytest.raises(errors.StoreError):
                migrating.result(timeout=60)
            writer.commit()
        assert _version(url) == "0006"
        assert _indexes(url)["ix_video_tasks_completed"][1] is False  # what a cut build leaves
        with structlog.testing.capture_logs() as logs:
            schema.upgrade(url)
        assert _version(url) == _head()
        assert {
            "event": "migrate_invalid_index_dropped",
            "index": "ix_video_tasks_completed",
        }.items() <= (
            next(e for e in logs if e["event"] == "migrate_invalid_index_dropped").items()
        )
        assert all(valid for _, valid, _ in _indexes(url).values())

    @pytest.mark.parametrize(
        ("at", "done_by_hand"),
        [
            # 0007 cut after its index was built, before its revision was recorded.
            (
                "0006",
                "CREATE INDEX ix_video_tasks_completed ON video_tasks (completed_at)"
                " WHERE completed_at IS NOT NULL",
            ),
            # 0003 cut after the new claim index was built, before the old one was dropped...
            (
                "0002",
                "CREATE INDEX ix_video_tasks_due_0003 ON video_tasks"
                " (expires_at NULLS FIRST, next_attempt_at)"
                " WHERE state IN ('downloading', 'pending', 'polling')",
            ),
            # ... or after it replaced the old one.
            (
                "0002",
                "DROP INDEX ix_video_tasks_due; CREATE INDEX ix_video_tasks_due ON video_tasks"
                " (expires_at NULLS FIRST, next_attempt_at)"
                " WHERE state IN ('downloading', 'pending', 'polling')",
            ),
        ],
    )
    def test_a_revision_cut_after_its_index_was_built_runs_again(
        self, empty_pg_url: str, pg_url: str, at: str, done_by_hand: str
    ) -> None:
        schema.upgrade(empty_pg_url, at)
        with _pg(empty_pg_url, autocommit=True) as conn:
            for statement in done_by_hand.split("; "):
                conn.execute(statement)
        schema.upgrade(empty_pg_url)
        assert _version(empty_pg_url) == _head()
        assert _definitions(empty_pg_url) == _definitions(pg_url)  # pg_url: migrated in one go

    def test_a_second_migrate_changes_nothing(self, empty_pg_url: str) -> None:
        schema.upgrade(empty_pg_url)
        before = _indexes(empty_pg_url)
        schema.upgrade(empty_pg_url)
        assert _indexes(empty_pg_url) == before
        assert _version(empty_pg_url) == _head()

    def test_a_migrate_waits_for_another_without_a_lock_timeout(self, empty_pg_url: str) -> None:
        """Two daemons started together both migrate; the second never sees the first's index
        half-built (it would take it for a cut build and drop it)."""
        with (
            concurrent.futures.ThreadPoolExecutor(1) as pool,
            _pg(empty_pg_url, autocommit=True) as other,
        ):
            other.execute("SELECT pg_advisory_lock(%s)", [db.MIGRATE_ADVISORY_LOCK])
            migrating = pool.submit(schema.upgrade, empty_pg_url)
            waited_past_lock_timeout = (
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                f" AND now() - waitstart > interval '{db.MIGRATE_LOCK_TIMEOUT_SECONDS + 1}s'"
            )
            wait_for(
                lambda: migrating.done() or other.execute(waited_past_lock_timeout).fetchone(),
                what="a migrate waiting for the other one past its lock timeout",
            )
            assert not migrating.done(), migrating.exception()
            assert _version(empty_pg_url) is None
            other.execute("SELECT pg_advisory_unlock(%s)", [db.MIGRATE_ADVISORY_LOCK])
            migrating.result(timeout=60)
        assert _version(empty_pg_url) == _head()


class TestOneTransactionPerRevision:
    """A revision that fails leaves the ones before it applied."""

    def test_a_failed_revision_keeps_the_earlier_ones(self, empty_url: str) -> None:
        engine = db.make_engine(empty_url)
        try:
            with engine.begin() as conn:
                # What 0002 creates, there already: 0002 fails.
                conn.execute(sa.text("CREATE TABLE archiver_heartbeats (owner TEXT PRIMARY KEY)"))
        finally:
            engine.dispose()
        with pytest.raises(errors.StoreError, match="archiver_heartbeats"):
            schema.upgrade(empty_url)
        assert _columns(empty_url) == set(models.TASK_FIELDS) - {"provider"}
        engine = db.make_engine(empty_url)
        try:
            with engine.connect() as conn:
                version = alembic.migration.MigrationContext.configure(conn).get_current_revision()
        finally:
            engine.dispose()
        assert version == "0001"
