"""Chaos at the process level: SIGTERM in the middle of work, and kill -9 at random moments.

SIGTERM must stop claiming, let in-flight downloads finish within the grace period (or abandon them
cleanly), release every lease and exit 0; a second SIGTERM exits at once.
kill -9 at any moment must lose nothing: a partial object never shows under a final key, leftovers of a
killed process are removed, and another start archives every video intact.

The kill tests draw their sizes and delays from ``random.Random(seed)``; the seed is printed (shown on
failure) and named in every assertion message. Replay a failure with ``SEEDANCE_CHAOS_SEED=<seed>``.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from seedance_archiver import simulator

from tests.helpers import Daemon, PostgresFeeder, SqliteFeeder, base_env, cli, wait_for

KiB = 1024
MiB = 1024 * KiB
# A killed daemon's rows come back after this long. Every download in the kill tests takes less, so
# they do not lean on lease renewal, which has a test of its own.
LEASE_SECONDS = 6
KILL_DELAY_SECONDS = (0.5, 3.0)  # after the daemon holds leases


def _sizes(
    rng: random.Random, prefix: str, count: int, low: int, high: int, rate: int
) -> dict[str, int]:
    """Random video sizes in [low, high); the last one takes longer than the longest kill delay to
    download at ``rate``, so every kill cycle still has work in flight."""
    sizes = {f"{prefix}_{i}": rng.randrange(low, high) for i in range(count - 1)}
    slowest = int(rate * (KILL_DELAY_SECONDS[1] + 0.5))
    assert low <= slowest < high and high / rate < LEASE_SECONDS - 1
    sizes[f"{prefix}_{count - 1}"] = rng.randrange(slowest, high)
    return sizes


StartDaemon = Callable[[dict[str, str]], Daemon]


def _seed() -> int:
    """The chaos seed: SEEDANCE_CHAOS_SEED to replay a failure, else a fresh one (printed)."""
    seed = int(os.environ.get("SEEDANCE_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"chaos seed={seed} (replay with SEEDANCE_CHAOS_SEED={seed})")
    return seed


def _logged(daemon: Daemon, event: str) -> bool:
    return f'"event": "{event}"' in daemon.log()


def _started(daemon: Daemon) -> None:
    def started() -> bool:
        code = daemon.process.poll()
        assert code is None, f"the daemon exited {code} at start: {daemon.log()[-2000:]}"
        return _logged(daemon, "daemon_started")

    # A start on a machine busy with six test workers (and more) has taken over 30 s.
    wait_for(started, timeout=90, what="the daemon to start")


def _eventually(condition: Callable[[], bool], timeout: float) -> bool:
    """Like wait_for, but a condition that never comes true is an answer, not a failure."""
    try:
        wait_for(condition, timeout=timeout)
    except AssertionError:
        return False
    return True


def _exit_code(daemon: Daemon, timeout: float) -> tuple[int, float]:
    """Wait (bounded) for the process to end: its exit code and how long that took."""
    began = time.monotonic()
    code = daemon.process.wait(timeout=timeout)
    return code, time.monotonic() - began


def _parts(archive_dir: pathlib.Path) -> list[pathlib.Path]:
    incoming = archive_dir / ".incoming"
    return sorted(incoming.glob("*.part")) if incoming.is_dir() else []


def _writing(archive_dir: pathlib.Path) -> bool:
    """A download is being written: a temp file with some bytes in it exists."""
    for path in _parts(archive_dir):
        try:
            if path.stat().st_size > 0:
                return True
        except FileNotFoundError:  # committed or removed since it was listed
            continue
    return False


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_env(
    sim_url: str, tmp_path: pathlib.Path, grace: float, lease: float | None = None
) -> dict[str, str]:
    """SQLite + a local folder, migrated; the lease stays at its default unless given."""
    env = base_env(sim_url, f"sqlite:///{tmp_path}/tasks.db", f"file://{tmp_path}/archive")
    env["SEEDANCE_SHUTDOWN_GRACE_SECONDS"] = str(grace)
    if lease is not None:
        env["SEEDANCE_LEASE_SECONDS"] = str(lease)
    cli(env, "migrate")
    return env


def _slow_video(sim: simulator.Simulator, task_id: str, size: int, seconds: float) -> None:
    """A completed task whose first download is throttled to take about ``seconds``."""
    sim.add_task(task_id, queued_seconds=0, ready_seconds=0, size=size)
    sim.add_fault(task_id, on="download", throttle=size / seconds)


# --- point 11: SIGTERM ---------------------------------------------------------------------------


class TestSigterm:
    """SIGTERM: stop claiming, drain or abandon in-flight work within the grace, release leases."""

    @pytest.mark.postgres
    def test_no_task_is_polled_for_the_first_time_after_the_signal(
        self, pg_url: str, tmp_path: pathlib.Path, sim: simulator.SimulatorThread, start_daemon: Any
    ) -> None:
        """Rows that become due during the drain, and rows inserted after it, are left alone."""
        slow = "video_term_drain"
        _slow_video(sim.simulator, slow, 4 * MiB, seconds=4)
        due_soon = [f"video_term_due_soon_{i}" for i in range(3)]
        inserted_after = [f"video_term_after_{i}" for i in range(3)]
        for task_id in due_soon + inserted_after:
            sim.simulator.add_task(task_id, queued_seconds=0, ready_seconds=0, size=64 * KiB)
        env = base_env(sim.url, pg_url, f"file://{tmp_path}/archive")
        env["SEEDANCE_SHUTDOWN_GRACE_SECONDS"] = "15"
        feeder = PostgresFeeder(pg_url)
        feeder.insert(slow)
        daemon = start_daemon(env)
        _started(daemon)
        wait_for(
            lambda: sim.simulator.stats.downloads_started[slow] >= 1,
            timeout=30,
            what="the slow download to start",
        )
        # Not due yet when the signal arrives; due a second later, while the slow download drains.
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for task_id in due_soon:
                conn.execute(
                    "INSERT INTO video_tasks (task_id, next_attempt_at)"
                    " VALUES (%s, now() + interval '1 second')",
                    (task_id,),
                )
        signalled = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        wait_for(lambda: _logged(daemon, "daemon_stopping"), timeout=10, what="daemon_stopping")
        for task_id in inserted_after:  # due at once, and announced by NOTIFY
            feeder.insert(task_id)

        code, _ = _exit_code(daemon, timeout=30)
        drained = time.monotonic() - signalled
        assert code == 0, daemon.log()[-3000:]
        # The drain outlasted the due time, so a daemon that kept claiming would have polled them.
        assert drained > 2.0, f"the drain took only {drained:.1f}s: the test proves nothing"
        rows = feeder.rows()
        assert rows[slow]["state"] == "archived", rows[slow]["error"]
        for task_id in due_soon + inserted_after:
            assert sim.simulator.stats.polls[task_id] == 0, f"{task_id} polled after SIGTERM"
            assert rows[task_id]["state"] == "pending"
            assert rows[task_id]["polls"] == 0
        assert {r["lease_owner"] for r in rows.values()} == {None}

    def test_an_in_flight_download_finishes_within_the_grace(
        self, tmp_path: pathlib.Path, sim: simulator.SimulatorThread, start_daemon: Any
    ) -> None:
        """Grace 15 s, a download of about 3 s under way: exit 0 with the video archived intact."""
        task_id, size = "video_term_finish", 3 * MiB
        _slow_video(sim.simulator, task_id, size, seconds=3)
        env = _file_env(sim.url, tmp_path, grace=15)
        archive_dir = tmp_path / "archive"
        feeder = SqliteFeeder(tmp_path / "tasks.db")
        daemon = start_daemon(env)
        _started(daemon)
        feeder.insert(task_id)
        wait_for(lambda: _writing(archive_dir), timeout=30, what="the download to be written")
        daemon.process.send_signal(signal.SIGTERM)

        code, _ = _exit_code(daemon, timeout=25)
        assert code == 0, daemon.log()[-3000:]
        row = feeder.rows()[task_id]
        expected = simulator.video_sha256(task_id, size)
        assert row["state"] == "archived", (row["state"], row["error"])
        assert (row["archive_sha256"], row["archive_bytes"]) == (expected, size)
        assert row["lease_owner"] is None
        data = (archive_dir / f"{task_id}.mp4").read_bytes()
        assert len(data) == size and _sha(data) == expected
        assert _parts(archive_dir) == []
        assert sim.simulator.stats.downloads_completed[task_id] == 1

    def test_a_download_longer_than_the_grace_is_abandoned_cleanly(
        self, tmp_path: pathlib.Path, sim: simulator.SimulatorThread, start_daemon: Any
    ) -> None:
        """Grace 1 s, a download of about 10 s: a prompt exit 0, nothing half-written, the lease
        released; a later run archives the video intact."""
        task_id, size = "video_term_abandon", 5 * MiB
        env = _file_env(sim.url, tmp_path, grace=1)
        archive_dir = tmp_path / "archive"
        feeder = SqliteFeeder(tmp_path / "tasks.db")
        daemon = start_daemon(env)
        _started(daemon)
        # Processing at the first poll (so the row is saved as `polling`), completed a second later.
        sim.simulator.add_task(task_id, queued_seconds=0, ready_seconds=1.0, size=size)
        sim.simulator.add_fault(task_id, on="download", throttle=size / 10)
        feeder.insert(task_id)
        wait_for(lambda: _writing(archive_dir), timeout=30, what="the download to be written")
        daemon.process.send_signal(signal.SIGTERM)

        code, took = _exit_code(daemon, timeout=15)
        assert code == 0, daemon.log()[-3000:]
        assert took < 6, f"exit took {took:.1f}s with a 1 s grace"
        row = feeder.rows()[task_id]
        assert row["state"] in ("polling", "downloading"), (row["state"], row["error"])
        assert row["archive_uri"] is None and row["archive_sha256"] is None
        assert row["lease_owner"] is None
        assert not (archive_dir / f"{task_id}.mp4").exists(), "a partial video under the final name"
        assert sim.simulator.stats.downloads_completed[task_id] == 0

        again = start_daemon(env)
        wait_for(
            lambda: feeder.rows()[task_id]["state"] == "archived",
            timeout=30,
            what="the next run to archive it",
        )
        assert again.terminate() == 0, again.log()[-3000:]
        expected = simulator.video_sha256(task_id, size)
        assert feeder.rows()[task_id]["archive_sha256"] == expected
        data = (archive_dir / f"{task_id}.mp4").read_bytes()
        assert len(data) == size and _sha(data) == expected
        assert _parts(archive_dir) == [], "the abandoned temp file is still there"

    def test_a_second_sigterm_exits_at_once(
        self, tmp_path: pathlib.Path, sim: simulator.SimulatorThread, start_daemon: Any
    ) -> None:
        """Grace 60 s, a slow download draining: the second SIGTERM ends the process promptly, non-zero."""
        task_id, size = "video_term_twice", 4 * MiB
        _slow_video(sim.simulator, task_id, size, seconds=10)
        # A short lease, so the row the forced exit leaves leased comes back quickly.
        env = _file_env(sim.url, tmp_path, grace=60, lease=3)
        archive_dir = tmp_path / "archive"
        feeder = SqliteFeeder(tmp_path / "tasks.db")
        daemon = start_daemon(env)
        _started(daemon)
        feeder.insert(task_id)
        wait_for(lambda: _writing(archive_dir), timeout=30, what="the download to be written")
        daemon.process.send_signal(signal.SIGTERM)
        wait_for(lambda: _logged(daemon, "draining"), timeout=10, what="the drain to begin")
        assert daemon.process.poll() is None, "exited on the first SIGTERM, before the grace"
        daemon.process.send_signal(signal.SIGTERM)

        code, took = _exit_code(daemon, timeout=10)
        assert code != 0, "a forced exit must not look like a clean one"
        assert took < 10
        assert not (archive_dir / f"{task_id}.mp4").exists(), "a partial video under the final name"
        # Nothing is lost: once the dead lease runs out, the next run archives the video.
        again = start_daemon(env)
        wait_for(
            lambda: feeder.rows()[task_id]["state"] == "archived",
            timeout=30,
            what="the next run to archive it",
        )
        assert again.terminate() == 0, again.log()[-3000:]
        data = (archive_dir / f"{task_id}.mp4").read_bytes()
        assert _sha(data) == simulator.video_sha256(task_id, size)
        assert _parts(archive_dir) == []
        assert feeder.rows()[task_id]["lease_owner"] is None

    @pytest.mark.postgres
    def test_leases_are_released_when_the_signal_lands_during_a_claim(
        self, pg_url: str, tmp_path: pathlib.Path, sim: simulator.SimulatorThread, start_daemon: Any
    ) -> None:
        """A claim still running when SIGTERM arrives must not leave rows leased to a dead daemon.

        The claim is held up by a table lock (a slow database), so the signal lands while it waits.
        """
        ids = [f"video_term_claim_{i}" for i in range(3)]
        for task_id in ids:
            sim.simulator.add_task(task_id, queued_seconds=0, ready_seconds=0, size=64 * KiB)
        env = base_env(sim.url, pg_url, f"file://{tmp_path}/archive")
        daemon = start_daemon(env)
        _started(daemon)
        with psycopg.connect(pg_url) as locker:
            locker.execute("LOCK TABLE video_tasks IN EXCLUSIVE MODE")
            for task_id in ids:
                locker.execute("INSERT INTO video_tasks (task_id) VALUES (%s)", (task_id,))

            def claim_blocked() -> bool:
                with psycopg.connect(pg_url, autocommit=True) as conn:
                    found = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query ILIKE '%%UPDATE video_tasks%%' AND pid <> %s",
                        (locker.info.backend_pid,),
                    ).fetchone()
                return bool(found and found[0])

            wait_for(claim_blocked, timeout=10, what="the daemon's claim to wait on the lock")
            daemon.process.send_signal(signal.SIGTERM)
            wait_for(lambda: _logged(daemon, "daemon_stopping"), timeout=10, what="the stop")
            # A daemon that does not wait for its claim says it stopped; one that waits never will
            # while the lock is held, so this wait may run out without failing the test.
            _eventually(lambda: _logged(daemon, "daemon_stopped"), timeout=3)
            locker.commit()  # the claim goes through now

        code, _ = _exit_code(daemon, timeout=30)
        assert code == 0, daemon.log()[-3000:]
        rows = PostgresFeeder(pg_url).rows()
        for task_id in ids:
            assert sim.simulator.stats.polls[task_id] == 0, f"{task_id} polled after SIGTERM"
        leased = {t: r["lease_owner"] for t, r in rows.items() if r["lease_owner"] is not None}
        assert leased == {}, "rows left leased to a daemon that exited"


# --- point 12: kill -9 at random moments ------------------------------------------------------


def _kill_at_random(
    daemon: Daemon, rng: random.Random, holds_leases: Callable[[int], bool]
) -> float:
    """Wait until the daemon works on rows, then a random 0.5-3 s (the chaos), then SIGKILL it."""
    _started(daemon)
    pid = daemon.process.pid
    wait_for(lambda: holds_leases(pid), timeout=20, what=f"daemon {pid} to hold leases")
    delay = rng.uniform(*KILL_DELAY_SECONDS)
    time.sleep(delay)
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=10)
    return delay


def _all_archived(feeder: PostgresFeeder | SqliteFeeder, ids: list[str]) -> bool:
    rows = feeder.rows()
    return all(rows[i]["state"] == "archived" for i in ids)


class TestKillNine:
    """kill -9 at random moments while large videos stream in loses nothing and leaves nothing."""

    def test_a_download_longer_than_the_lease_keeps_its_lease(
        self, tmp_path: pathlib.Path, sim: simulator.SimulatorThread, start_daemon: StartDaemon
    ) -> None:
        """The short lease these tests need must not hand a live download to another claim."""
        task_id, size = "video_kill_long_lease", 3 * MiB
        env = _file_env(sim.url, tmp_path, grace=5, lease=2)
        _slow_video(sim.simulator, task_id, size, seconds=6)
        feeder = SqliteFeeder(tmp_path / "tasks.db")
        daemon = start_daemon(env)
        _started(daemon)
        feeder.insert(task_id)
        wait_for(
            lambda: sim.simulator.stats.downloads_completed[task_id] >= 1,
            timeout=30,
            what="the download to complete",
        )
        wait_for(lambda: _all_archived(feeder, [task_id]), timeout=10, what="the row archived")
        assert daemon.terminate() == 0, daemon.log()[-3000:]
        assert sim.simulator.stats.downloads_started[task_id] == 1, "downloaded twice at once"
        assert not _logged(daemon, "task_work_crashed"), daemon.log()[-3000:]
        row = feeder.rows()[task_id]
        assert row["archive_sha256"] == simulator.video_sha256(task_id, size)
        assert row["lease_owner"] is None
        assert _parts(tmp_path / "archive") == []

    @pytest.mark.postgres
    def test_postgresql_and_s3(
        self,
        pg_url: str,
        s3_client: Any,
        s3_bucket: str,
        sim: simulator.SimulatorThread,
        start_daemon: StartDaemon,
    ) -> None:
        """Four kills at random moments (0.5-3 s after the daemon holds leases), plus one kill aimed
        at an open multipart upload if none of the four left one; then a run to completion.

        Four videos of 10-24 MiB (above the 8 MiB part size) at 6 MiB/s, so kills land mid-upload.
        """
        seed = _seed()
        rng = random.Random(seed)
        rate = 6 * MiB
        sizes = _sizes(rng, f"video_kill_s3_{seed}", 4, 10 * MiB, 24 * MiB, rate)
        ids = list(sizes)
        for task_id, size in sizes.items():
            sim.simulator.add_task(task_id, queued_seconds=0, ready_seconds=0, size=size)
            sim.simulator.add_fault(task_id, on="download", throttle=rate, times=100)
        prefix = "chaos"
        env = base_env(sim.url, pg_url, f"s3://{s3_bucket}/{prefix}")
        env["SEEDANCE_LEASE_SECONDS"] = str(LEASE_SECONDS)
        feeder = PostgresFeeder(pg_url)
        for task_id in ids:
            feeder.insert(task_id)
        keys = {f"{prefix}/{task_id}.mp4": task_id for task_id in ids}

        def holds_leases(pid: int) -> bool:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                found = conn.execute(
                    "SELECT count(*) FROM video_tasks WHERE lease_owner LIKE %s",
                    (f"%:{pid}:%",),
                ).fetchone()
            return bool(found and found[0])

        def open_uploads() -> list[str]:
            answer = s3_client.list_multipart_uploads(Bucket=s3_bucket)
            return [u["Key"] for u in answer.get("Uploads", [])]

        def objects() -> dict[str, int]:
            listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix=f"{prefix}/")
            return {o["Key"]: int(o["Size"]) for o in listed.get("Contents", [])}

        def assert_no_partial_object(when: str) -> None:
            for key, size in objects().items():
                assert key in keys, f"seed={seed}: stray object {key} {when}"
                assert size == sizes[keys[key]], (
                    f"seed={seed}: partial object {key} ({size} of {sizes[keys[key]]} bytes) {when}"
                )

        kills: list[tuple[float, list[str]]] = []
        for cycle in range(4):
            delay = _kill_at_random(start_daemon(env), rng, holds_leases)
            kills.append((round(delay, 2), open_uploads()))
            assert_no_partial_object(f"after kill {cycle + 1}")
        if not any(uploads for _, uploads in kills):
            victim = start_daemon(env)
            wait_for(open_uploads, timeout=30, what="a multipart upload to be open")
            victim.kill()
            kills.append((-1.0, open_uploads()))
            assert_no_partial_object("after the targeted kill")
        print(f"seed={seed} kills (delay s, open uploads after): {kills}")

        final = start_daemon(env)
        wait_for(lambda: _all_archived(feeder, ids), timeout=60, what="every video archived")
        assert final.terminate() == 0, final.log()[-3000:]

        rows = feeder.rows()
        for task_id, size in sizes.items():
            expected = simulator.video_sha256(task_id, size)
            row = rows[task_id]
            assert (row["archive_sha256"], row["archive_bytes"]) == (expected, size), seed
            body = s3_client.get_object(Bucket=s3_bucket, Key=f"{prefix}/{task_id}.mp4")["Body"]
            assert _sha(body.read()) == expected, f"seed={seed}: {task_id} corrupt in S3"
            assert row["lease_owner"] is None, f"seed={seed}: {task_id} still leased"
        assert set(objects()) == set(keys), f"seed={seed}: stray or missing objects"
        assert_no_partial_object("at the end")
        assert open_uploads() == [], f"seed={seed}: multipart uploads left behind"

    def test_sqlite_and_folder(
        self, tmp_path: pathlib.Path, sim: simulator.SimulatorThread, start_daemon: StartDaemon
    ) -> None:
        """Three kills at random moments (0.5-3 s after the daemon holds leases) while three videos
        of 4-9 MiB are written at 2 MiB/s; then a run to completion."""
        seed = _seed()
        rng = random.Random(seed)
        rate = 2 * MiB
        sizes = _sizes(rng, f"video_kill_file_{seed}", 3, 4 * MiB, 9 * MiB, rate)
        ids = list(sizes)
        for task_id, size in sizes.items():
            sim.simulator.add_task(task_id, queued_seconds=0, ready_seconds=0, size=size)
            sim.simulator.add_fault(task_id, on="download", throttle=rate, times=100)
        env = _file_env(sim.url, tmp_path, grace=5, lease=LEASE_SECONDS)
        archive_dir = tmp_path / "archive"
        feeder = SqliteFeeder(tmp_path / "tasks.db")
        for task_id in ids:
            feeder.insert(task_id)

        def holds_leases(pid: int) -> bool:
            rows = feeder.rows().values()
            return any(f":{pid}:" in (r["lease_owner"] or "") for r in rows)

        def assert_no_partial_file(when: str) -> None:
            for path in archive_dir.glob("*.mp4"):
                task_id = path.name.removesuffix(".mp4")
                assert task_id in sizes, f"seed={seed}: stray file {path.name} {when}"
                data = path.read_bytes()
                assert _sha(data) == simulator.video_sha256(task_id, sizes[task_id]), (
                    f"seed={seed}: partial file {path.name} ({len(data)} bytes) {when}"
                )

        kills: list[tuple[float, int]] = []
        for cycle in range(3):
            delay = _kill_at_random(start_daemon(env), rng, holds_leases)
            kills.append((round(delay, 2), len(_parts(archive_dir))))
            assert_no_partial_file(f"after kill {cycle + 1}")
        print(f"seed={seed} kills (delay s, temp files left): {kills}")

        final = start_daemon(env)
        wait_for(lambda: _all_archived(feeder, ids), timeout=60, what="every video archived")
        assert final.terminate() == 0, final.log()[-3000:]

        rows = feeder.rows()
        for task_id, size in sizes.items():
            expected = simulator.video_sha256(task_id, size)
            assert rows[task_id]["archive_sha256"] == expected, seed
            assert rows[task_id]["lease_owner"] is None, seed
        assert_no_partial_file("at the end")
        assert sorted(p.name for p in archive_dir.glob("*.mp4")) == sorted(
            f"{task_id}.mp4" for task_id in ids
        ), seed
        assert _parts(archive_dir) == [], f"seed={seed}: temp files left in .incoming"
