"""The daemon in-process (scheduler + service + real store, provider and archive) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import structlog.testing
from seedance_archiver import config, db, errors, scheduler, simulator, store

from tests.helpers import daemon_settings, running_daemon, wait_for, wait_until


def _settings(
    sim: simulator.SimulatorThread, db_url: str, tmp_path: pathlib.Path
) -> config.Settings:
    return daemon_settings(sim.url, db_url, f"file://{tmp_path}/archive")


@contextlib.contextmanager
def _table(db_url: str) -> Iterator[store.SqlStore]:
    """The table as the feeding application reaches it, closed whatever the test does."""
    rows = store.SqlStore.from_url(db_url)
    try:
        yield rows
    finally:
        rows.close()


def _heartbeats(db_url: str) -> list[store.DaemonBeat]:
    """The heartbeat rows in the database now (a stopped daemon leaves none)."""
    with _table(db_url) as rows:
        return rows.daemons()


class TestLifecycle:
    async def test_a_stop_before_start_starts_nothing_and_exits_0(
        self, sim: simulator.SimulatorThread, sqlite_url: str, tmp_path: pathlib.Path
    ) -> None:
        stop = asyncio.Event()
        stop.set()
        daemon = scheduler.Daemon(_settings(sim, sqlite_url, tmp_path), stop=stop)
        assert await asyncio.wait_for(daemon.run(), timeout=30) == 0
        assert daemon.svc is None and daemon._server is None  # nothing was built or served
        # ... and the SQLite lock was not left behind: another daemon may start.
        lock = db.SqliteLock(sqlite_url)
        lock.acquire()
        lock.release()

    async def test_a_stop_while_starting_skips_the_remaining_steps(
        self,
        sim: simulator.SimulatorThread,
        sqlite_url: str,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A stop requested during a step lets that step end, then starts nothing more."""
        stop = asyncio.Event()
        daemon = scheduler.Daemon(_settings(sim, sqlite_url, tmp_path), stop=stop)
        opened = daemon._open

        async def open_then_stop() -> None:
            await opened()
            stop.set()  # as SIGTERM would, half-way through start-up

        monkeypatch.setattr(daemon, "_open", open_then_stop)
        assert await asyncio.wait_for(daemon.run(), timeout=30) == 0
        assert daemon.svc is not None and daemon._ticker is None and daemon._server is None
        assert _heartbeats(sqlite_url) == []  # no heartbeat was written, none left behind

    async def test_a_heartbeat_in_flight_at_stop_is_not_written_back_after_removal(
        self,
        sim: simulator.SimulatorThread,
        sqlite_url: str,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """close() waits for a beat in flight before it removes the heartbeat, so a stopped
        daemon never leaves one behind (``check`` would count it for a minute)."""
        in_flight, written = threading.Event(), threading.Event()
        original = scheduler.build_service

        def slow_beats(settings: config.Settings, api_key: str) -> Any:
            svc, task_store = original(settings, api_key)
            real_beat = task_store.beat

            def beat(beat: store.DaemonBeat) -> None:
                in_flight.set()
                time.sleep(0.5)  # a slow database: the beat is still running when stop comes
                real_beat(beat)
                written.set()

            monkeypatch.setattr(task_store, "beat", beat)
            return svc, task_store

        monkeypatch.setattr(scheduler, "build_service", slow_beats)
        stop = asyncio.Event()
        daemon = scheduler.Daemon(_settings(sim, sqlite_url, tmp_path), stop=stop)
        running = asyncio.create_task(daemon.run())
        await wait_until(in_flight.is_set, 30, "a heartbeat in flight")
        stop.set()
        assert await asyncio.wait_for(running, timeout=30) == 0
        await wait_until(written.is_set, 30, "the beat in flight to be written")
        assert _heartbeats(sqlite_url) == []

    async def test_close_waits_for_every_heartbeat_asked_for_not_the_last_only(
        self,
        sim: simulator.SimulatorThread,
        sqlite_url: str,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Two heartbeats are asked for at start (the heartbeat job's and the first tick's). The
        first is held in the database until close() has begun; the heartbeat must still be removed
        only after it is written, never before (a CI run left such a row behind)."""
        first_in_flight, first_written = threading.Event(), threading.Event()
        beats_in_flight = 0
        in_flight_at_removal: list[int] = []
        asked = 0
        original = scheduler.build_service
        stop = asyncio.Event()
        daemon = scheduler.Daemon(_settings(sim, sqlite_url, tmp_path), stop=stop)

        def held_first_beat(settings: config.Settings, api_key: str) -> Any:
            svc, task_store = original(settings, api_key)
            real_beat, real_forget = task_store.beat, task_store.forget_daemon

            def beat(beat: store.DaemonBeat) -> None:
                nonlocal beats_in_flight
                first = not first_in_flight.is_set()
                first_in_flight.set()
                beats_in_flight += 1
                try:
                    if first:  # a slow database: held until the daemon is closing
                        wait_for(lambda: daemon._closing, 30, what="close() to begin")
                    real_beat(beat)
                finally:
                    beats_in_flight -= 1
                if first:
                    first_written.set()

            def forget_daemon(owner: str) -> None:
                in_flight_at_removal.append(beats_in_flight)
                real_forget(owner)

            monkeypatch.setattr(task_store, "beat", beat)
            monkeypatch.setattr(task_store, "forget_daemon", forget_daemon)
            return svc, task_store

        real_start_beat = daemon._start_beat

        def counted_start_beat() -> asyncio.Task[None]:
            nonlocal asked
            asked += 1
            return real_start_beat()

        monkeypatch.setattr(scheduler, "build_service", held_first_beat)
        monkeypatch.setattr(daemon, "_start_beat", counted_start_beat)
        running = asyncio.create_task(daemon.run())
        await wait_until(first_in_flight.is_set, 30, "the first heartbeat in flight")
        await wait_until(lambda: asked >= 2, 30, "a second heartbeat asked for")
        stop.set()
        assert await asyncio.wait_for(running, timeout=30) == 0
        assert first_written.is_set()  # close() returned only after the held beat was written
        assert in_flight_at_removal == [0]  # ... and removed the row after it, not before
        assert _heartbeats(sqlite_url) == []


class TestHeartbeat:
    """A daemon says it ticks as soon as it does, not at its next heartbeat."""

    async def test_the_first_tick_is_beaten_at_once(
        self,
        sim: simulator.SimulatorThread,
        sqlite_url: str,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(scheduler, "HEARTBEAT_SECONDS", 3600.0)  # no beat but the first ones
        with _table(sqlite_url) as rows:
            async with running_daemon(_settings(sim, sqlite_url, tmp_path)):
                await wait_until(
                    lambda: any(d.last_tick_at is not None for d in rows.daemons()),
                    90,  # a start on a machine busy with six test workers and more
                    "a heartbeat that says the daemon ticked",
                )

    async def test_a_failed_start_leaves_no_heartbeat_warning(
        self, sim: simulator.SimulatorThread, tmp_path: pathlib.Path
    ) -> None:
        """No table: the start fails with its reason, and no `heartbeat_not_removed` before it."""
        settings = _settings(sim, f"sqlite:///{tmp_path}/no-table.db", tmp_path)
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(errors.StoreError, match="migrate"):
                await scheduler.run(settings, stop=asyncio.Event(), handle_signals=False)
        assert [e for e in logs if e["event"] == "heartbeat_not_removed"] == []


class TestPickup:
    """New rows are worked on promptly."""

    @pytest.mark.postgres
    async def test_notify_wakes_the_daemon_long_before_the_next_tick(
        self, pg_url: str, sim: simulator.SimulatorThread, tmp_path: pathlib.Path
    ) -> None:
        sim.simulator.add_task("video_warmup", ready_seconds=3600)
        sim.simulator.add_task("video_notified", ready_seconds=3600)
        with _table(pg_url) as feeder:
            polls = sim.simulator.stats.polls
            # A 30 s tick: only the NOTIFY from the insert trigger can make the poll come sooner.
            async with running_daemon(_settings(sim, pg_url, tmp_path), tick_seconds=30):
                feeder.add("video_warmup")
                # The first tick runs at start; the warm-up row proves the listener is connected.
                await wait_until(lambda: polls["video_warmup"] >= 1, 20, "the warm-up poll")
                feeder.add("video_notified")
                await wait_until(lambda: polls["video_notified"] >= 1, 10, "a poll woken by NOTIFY")

    async def test_sqlite_rows_are_picked_up_by_the_table_poll(
        self, sqlite_url: str, sim: simulator.SimulatorThread, tmp_path: pathlib.Path
    ) -> None:
        sim.simulator.add_task("video_polled", ready_seconds=3600)
        with _table(sqlite_url) as feeder:
            async with running_daemon(_settings(sim, sqlite_url, tmp_path)):
                await asyncio.sleep(0)
                feeder.add("video_polled")
                await wait_until(
                    lambda: sim.simulator.stats.polls["video_polled"] >= 1, 10, "the first poll"
                )


def _terminate_connections(pg_url: str) -> int:
    """Kill every connection to the test database, as a PostgreSQL restart would."""
    dbname = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchall()
    return len(rows)


def _listening(pg_url: str) -> bool:
    dbname = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN%%'",
            (dbname,),
        ).fetchone()
    return bool(row and row[0])


@pytest.mark.postgres
class TestPostgresConnectionLoss:
    """The daemon survives its PostgreSQL connections being cut."""

    async def test_listener_reconnects_and_notify_wakes_the_daemon_again(
        self, pg_url: str, sim: simulator.SimulatorThread, tmp_path: pathlib.Path
    ) -> None:
        for name in ("video_before", "video_after"):
            sim.simulator.add_task(name, ready_seconds=3600)
        with _table(pg_url) as feeder:
            polls = sim.simulator.stats.polls
            async with running_daemon(_settings(sim, pg_url, tmp_path), tick_seconds=30):
                await wait_until(lambda: _listening(pg_url), 20, "the listener to connect")
                feeder.add("video_before")
                await wait_until(lambda: polls["video_before"] >= 1, 10, "a poll woken by NOTIFY")
                assert await asyncio.to_thread(_terminate_connections, pg_url) >= 1
                await wait_until(lambda: _listening(pg_url), 20, "the listener to reconnect")
                feeder.add("video_after")
                await wait_until(lambda: polls["video_after"] >= 1, 10, "a poll after reconnecting")

    async def test_work_carries_on_after_the_pool_loses_its_connections(
        self, pg_url: str, sim: simulator.SimulatorThread, tmp_path: pathlib.Path
    ) -> None:
        sim.simulator.add_task("video_survivor", ready_seconds=2, size=64 * 1024)
        with _table(pg_url) as feeder:
            async with running_daemon(_settings(sim, pg_url, tmp_path)):
                feeder.add("video_survivor")
                await wait_until(
                    lambda: sim.simulator.stats.polls["video_survivor"] >= 1, 10, "the first poll"
                )
                await asyncio.to_thread(_terminate_connections, pg_url)

                def archived() -> bool:
                    task = feeder.get("video_survivor")
                    return task is not None and task.state == "archived"

                await wait_until(archived, 30, "the video to be archived after the cut")


class TestSqliteLockScope:
    """The one-daemon-per-file lock applies to SQLite only."""

    def test_no_lock_file_for_postgresql_urls(self, tmp_path: pathlib.Path) -> None:
        lock = db.SqliteLock("postgresql://postgres@127.0.0.1/some_db")
        assert lock.path is None
        lock.acquire()
        lock.release()

    def test_lock_file_sits_beside_the_database(self, tmp_path: pathlib.Path) -> None:
        assert db.SqliteLock(f"sqlite:///{tmp_path}/x.db").path == f"{tmp_path}/x.db.lock"
