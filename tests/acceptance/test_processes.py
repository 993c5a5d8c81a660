"""``run --processes N``: several daemon processes on one machine, one PostgreSQL, a supervisor that
restarts a dead one and stops them all cleanly."""

from __future__ import annotations

import http.client
import os
import pathlib
import signal
import subprocess

import psycopg
import pytest
from seedance_archiver import simulator

from tests.acceptance.conftest import CLI, base_env, cli
from tests.acceptance.test_end_to_end import PostgresFeeder
from tests.conftest import free_ports, wait_for


def _daemon_pids(pg_url: str) -> set[int]:
    """The pids of the daemons whose heartbeat says they completed a tick."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM archiver_heartbeats WHERE last_tick_at IS NOT NULL"
        ).fetchall()
    return {int(r[0]) for r in rows}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.postgres
class TestProcesses:
    def test_two_processes_archive_survive_a_kill_and_stop_cleanly(
        self, tmp_path: pathlib.Path, pg_url: str, sim: simulator.SimulatorThread
    ) -> None:
        port = free_ports(2)  # process i serves port + i
        env = base_env(sim.url, pg_url, (tmp_path / "archive").as_uri())
        env["SEEDANCE_HTTP_PORT"] = str(port)
        ids = [f"video_proc_{i:02d}" for i in range(12)]
        for task_id in ids:
            sim.simulator.add_task(task_id, outcome="completed", ready_seconds=1.0, size=4096)
        feeder = PostgresFeeder(pg_url)
        log_path = tmp_path / "supervisor.log"
        with log_path.open("wb") as log:
            parent = subprocess.Popen(
                [str(CLI), "run", "--processes", "2"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            first = wait_for(lambda: len(p := _daemon_pids(pg_url)) == 2 and p, timeout=60,
                             what="two daemon processes ticking")  # fmt: skip
            assert isinstance(first, set) and parent.pid not in first
            for task_id in ids:
                feeder.insert(task_id)
            wait_for(
                lambda: all(r["state"] == "archived" for r in feeder.rows().values()),
                timeout=60,
                what="every video archived",
            )
            assert sorted(feeder.rows()) == ids

            # One child dies hard: the supervisor starts another, which ticks too.
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: not _alive(victim) or _zombie(victim), timeout=10, what="the kill")
            wait_for(
                lambda: len((p := _daemon_pids(pg_url)) - {victim}) == 2 and p,
                timeout=60,
                what="a replacement process ticking",
            )
            # Each child serves its own port: SEEDANCE_HTTP_PORT + i.
            for i in range(2):
                assert _healthz(port + i) == 200
        finally:
            parent.send_signal(signal.SIGTERM)
            code = parent.wait(timeout=60)
        log_text = log_path.read_text(errors="replace")
        assert code == 0, log_text[-3000:]
        assert "daemon_process_died" in log_text and "supervisor_stopped" in log_text
        # Each child stopped by the supervisor removed its heartbeat; only the killed one's is left.
        assert _daemon_pids_any(pg_url) == {victim}
        assert not any(_alive(pid) and not _zombie(pid) for pid in first - {victim})

    def test_several_processes_are_refused_on_sqlite(self, tmp_path: pathlib.Path) -> None:
        env = base_env("http://127.0.0.1:9", f"sqlite:///{tmp_path}/t.db", tmp_path.as_uri())
        result = cli(env, "run", "--processes", "2", check=False)
        assert result.returncode == 2
        assert "--processes" in result.stderr and "PostgreSQL" in result.stderr


def _daemon_pids_any(pg_url: str) -> set[int]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return {int(r[0]) for r in conn.execute("SELECT pid FROM archiver_heartbeats").fetchall()}


def _zombie(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return False


def _healthz(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()
