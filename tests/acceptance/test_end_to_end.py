"""The installed CLI, fed by plain SQL, archives every completed video intact.

Two set-ups, as users run them: SQLite + a local folder (the embedded default), and PostgreSQL + S3
(moto's server over HTTP). The daemon is a subprocess; the provider is the simulator on loopback,
in each dialect the daemon speaks (SEEDANCE_PROVIDER): the reseller's and Ark's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import signal
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from seedance_archiver import simulator

from tests.helpers import (
    SIM_KEY,
    Daemon,
    PostgresFeeder,
    SqliteFeeder,
    base_env,
    cli,
    serving,
    wait_for,
)

DIALECTS = ["reseller", "ark"]

KiB = 1024
MiB = 1024 * KiB

# (task id, mode, outcome, size): every mode, every terminal outcome, one video above a part's size.
TASKS = [
    ("video_e2e_draft_ok", "draft", "completed", 300 * KiB),
    ("video_e2e_draft_cancel", "draft", "cancelled", 0),
    ("video_e2e_std_ok", "standard", "completed", 2 * MiB),
    ("video_e2e_std_big", "standard", "completed", 12 * MiB),
    ("video_e2e_std_fail", "standard", "failed", 0),
    ("video_e2e_flex_ok", "flex", "completed", 1 * MiB),
    ("video_e2e_flex_fail", "flex", "failed", 0),
]
# Ark's expired (timed out before it ran) is our failed, with its reason.
EXPECTED = {
    "completed": "archived",
    "failed": "failed",
    "cancelled": "cancelled",
    "expired": "failed",
}


# Ark only: a task that timed out in Ark's queue before it ran (its own status, expired).
ARK_ONLY = [("video_e2e_std_expired", "standard", "expired", 0)]


@dataclasses.dataclass(frozen=True)
class Dialect:
    """The scenario as one provider's dialect plays it: its ids, its tasks, what its errors read."""

    name: str

    def id(self, task_id: str) -> str:
        """Ark's ids look like ``cgt-20250101…``; the reseller's like ``video_…``."""
        return task_id.replace("video_", "cgt-20261202-") if self.name == "ark" else task_id

    @property
    def tasks(self) -> list[tuple[str, str, str, int]]:
        tasks = TASKS + (ARK_ONLY if self.name == "ark" else [])
        return [(self.id(task_id), mode, outcome, size) for task_id, mode, outcome, size in tasks]

    @property
    def failure(self) -> str:
        """The failed task's error: Ark's error object reads as ``message (code)``."""
        if self.name == "ark":
            return "content policy violation (OutputVideoSensitiveContentDetected)"
        return "content policy violation"


@pytest.fixture(params=DIALECTS)
def dialect(request: pytest.FixtureRequest) -> Dialect:
    return Dialect(str(request.param))


@pytest.fixture
def dialect_sim(dialect: Dialect) -> Iterator[simulator.SimulatorThread]:
    """The simulator, speaking the dialect under test."""
    with serving(dialect.name) as server:
        yield server


def _plan(sim: simulator.Simulator, dialect: Dialect) -> None:
    for task_id, _mode, outcome, size in dialect.tasks:
        sim.add_task(task_id, outcome=outcome, queued_seconds=0.3, ready_seconds=1.0, size=size)
    # A transient provider error and a broken download on the way: both must be retried.
    sim.add_fault(dialect.id("video_e2e_std_ok"), on="poll", status=503)
    sim.add_fault(dialect.id("video_e2e_std_big"), on="download", truncate_at=3 * MiB)


def _all_finished(feeder: SqliteFeeder | PostgresFeeder, ids: list[str]) -> bool:
    rows = feeder.rows()
    return all(
        i in rows and rows[i]["state"] not in ("pending", "polling", "downloading") for i in ids
    )


def _run_scenario(
    feeder: SqliteFeeder | PostgresFeeder,
    env: dict[str, str],
    sim: simulator.SimulatorThread,
    start_daemon: Callable[[dict[str, str]], Daemon],
    read_object: Callable[[str], bytes],
    dialect: Dialect,
) -> Daemon:
    _plan(sim.simulator, dialect)
    env = {**env, "SEEDANCE_PROVIDER": dialect.name}
    tasks = dialect.tasks
    cli(env, "migrate")
    # Half the rows exist before the daemon starts, half arrive while it runs.
    first, later = tasks[:3], tasks[3:]
    for task_id, mode, _, _ in first:
        feeder.insert(task_id, mode)
    daemon = start_daemon(env)
    for task_id, mode, _, _ in later:
        feeder.insert(task_id, None if mode == "standard" else mode)
    ids = [t[0] for t in tasks]
    wait_for(lambda: _all_finished(feeder, ids), timeout=90, what="every task to finish")
    assert daemon.terminate() == 0, daemon.log()[-3000:]

    rows = feeder.rows()
    for task_id, _mode, outcome, size in tasks:
        row = rows[task_id]
        assert row["state"] == EXPECTED[outcome], (task_id, row["state"], row["error"])
        if outcome == "completed":
            expected_sha = simulator.video_sha256(task_id, size)
            assert row["archive_sha256"] == expected_sha
            assert row["archive_bytes"] == size
            data = read_object(row["archive_uri"])
            assert len(data) == size and hashlib.sha256(data).hexdigest() == expected_sha
            if dialect.name == "ark":
                assert "X-Tos-Expires=86400" in row["video_url"]  # Ark's 24 h link
        else:
            assert row["archive_uri"] is None
        assert row["lease_owner"] is None
        assert row["provider"] == dialect.name  # stamped at intake
    assert rows[dialect.id("video_e2e_std_fail")]["error"] == dialect.failure
    if dialect.name == "ark":
        expired = rows[dialect.id("video_e2e_std_expired")]
        assert expired["error"] == "expired at the provider before it ran"
    # Every completed video was downloaded once, except the one whose first download broke.
    completed = sim.simulator.stats.downloads_completed
    assert {k: v for k, v in completed.items()} == {t[0]: 1 for t in tasks if t[2] == "completed"}
    log = daemon.log()
    assert SIM_KEY not in log
    assert "sig=" not in log and "expires=" not in log
    assert "X-Tos-Signature" not in log and "X-Tos-Expires" not in log
    return daemon


class TestSqliteAndFolder:
    """The embedded default: SQLite + a local folder."""

    def test_every_completed_video_is_archived_intact(
        self,
        tmp_path: pathlib.Path,
        dialect_sim: simulator.SimulatorThread,
        dialect: Dialect,
        start_daemon: Any,
    ) -> None:
        sim = dialect_sim
        db = tmp_path / "tasks.db"
        archive_dir = tmp_path / "archive"
        env = base_env(sim.url, f"sqlite:///{db}", f"file://{archive_dir}")
        feeder = SqliteFeeder(db)

        def read(uri: str) -> bytes:
            return pathlib.Path(urllib.parse.urlsplit(uri).path).read_bytes()

        _run_scenario(feeder, env, sim, start_daemon, read, dialect)
        names = sorted(p.name for p in archive_dir.iterdir() if p.is_file())
        done = [t[0] for t in dialect.tasks if t[2] == "completed"]
        # Each video, and the JSON sidecar that describes it to a reader of the archive alone.
        assert names == sorted([f"{t}.mp4" for t in done] + [f"{t}.json" for t in done])
        sidecar = json.loads((archive_dir / f"{done[0]}.json").read_text())
        assert sidecar["task-id"] == done[0] and len(sidecar["sha256"]) == 64
        assert list((archive_dir / ".incoming").iterdir()) == []

    def test_second_daemon_on_the_same_file_exits_with_a_clear_message(
        self, tmp_path: pathlib.Path, sim: simulator.SimulatorThread, start_daemon: Any
    ) -> None:
        db = tmp_path / "tasks.db"
        env = base_env(sim.url, f"sqlite:///{db}", f"file://{tmp_path}/archive")
        cli(env, "migrate")
        first = start_daemon(env)
        wait_for(lambda: "daemon_started" in first.log(), timeout=30, what="first daemon")
        second = cli(env, "run", check=False)
        assert second.returncode == 1
        assert "another seedance-archiver already runs" in second.stderr
        assert first.process.poll() is None
        assert first.terminate() == 0

    def test_a_sigterm_while_starting_stops_it_cleanly(
        self, tmp_path: pathlib.Path, sim: simulator.SimulatorThread, start_daemon: Any
    ) -> None:
        """The handlers are in place before the first start step (PID 1 in a container)."""
        db = tmp_path / "tasks.db"
        env = base_env(sim.url, f"sqlite:///{db}", f"file://{tmp_path}/archive")
        cli(env, "migrate")
        daemon = start_daemon(env)
        # Logged right after the handlers are installed, before the database is opened.
        wait_for(lambda: "daemon_starting" in daemon.log(), timeout=30, what="the first log line")
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=30) == 0, daemon.log()[-3000:]
        assert "signal_received" in daemon.log()
        assert "Traceback" not in daemon.log()


@pytest.mark.postgres
class TestPostgresAndS3:
    """Production: PostgreSQL + S3 (moto's server over HTTP)."""

    def test_every_completed_video_is_archived_intact(
        self,
        pg_url: str,
        s3_client: Any,
        s3_bucket: str,
        dialect_sim: simulator.SimulatorThread,
        dialect: Dialect,
        start_daemon: Any,
    ) -> None:
        sim = dialect_sim
        env = base_env(sim.url, pg_url, f"s3://{s3_bucket}/videos")
        feeder = PostgresFeeder(pg_url)

        def read(uri: str) -> bytes:
            parts = urllib.parse.urlsplit(uri)
            body = s3_client.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))["Body"]
            return bytes(body.read())

        _run_scenario(feeder, env, sim, start_daemon, read, dialect)
        listed = s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
        keys = sorted(o["Key"] for o in listed)
        assert keys == sorted(f"videos/{t[0]}.mp4" for t in dialect.tasks if t[2] == "completed")
        uploads = s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        assert uploads == []
