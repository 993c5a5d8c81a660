"""``run --processes N``: several daemon processes on one machine, one PostgreSQL, a supervisor that
restarts a dead one and stops them all cleanly."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pathlib
import signal

import psycopg
import pytest
from seedance_archiver import simulator

from tests.helpers import (
    CLI,
    Daemon,
    NotifySocket,
    PostgresFeeder,
    base_env,
    cli,
    free_ports,
    wait_for,
)


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
        supervisor = Daemon.start(env, log_path, argv=[str(CLI), "run", "--processes", "2"])
        parent = supervisor.process
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
            code = supervisor.terminate(timeout=60)
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


def _events(log_path: pathlib.Path, event: str) -> list[dict[str, object]]:
    """The JSON log lines of ``event`` so far (the supervisor's and its children's share a file)."""
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


@pytest.mark.postgres
class TestProcessesUnderSystemd:
    """Under Type=notify the supervisor speaks for its children to systemd."""

    WATCHDOG_SECONDS = 4

    def test_ready_once_every_child_is_and_watchdog_only_while_every_child_ticks(
        self, tmp_path: pathlib.Path, pg_url: str, sim: simulator.SimulatorThread
    ) -> None:
        port = free_ports(2)
        env = base_env(sim.url, pg_url, (tmp_path / "archive").as_uri())
        env["SEEDANCE_HTTP_PORT"] = str(port)
        notify = NotifySocket(tmp_path / "notify")
        env["NOTIFY_SOCKET"] = notify.address
        env["WATCHDOG_USEC"] = str(self.WATCHDOG_SECONDS * 1_000_000)
        log_path = tmp_path / "supervisor.log"
        supervisor = Daemon.start(env, log_path, argv=[str(CLI), "run", "--processes", "2"])
        parent = supervisor.process
        try:
            # READY=1 comes once both children are ready: each already serves its port.
            before_ready = notify.until("READY=1", timeout=60)
            for i in range(2):
                assert _healthz(port + i) in (200, 503)
            assert not any("READY=1" in m.splitlines() for m in before_ready[:-1]), before_ready
            ready = {int(str(e["pid"])) for e in _events(log_path, "daemon_process_ready")}
            assert len(ready) == 2 and parent.pid not in ready

            # WATCHDOG=1 keeps coming while both tick.
            for _ in range(3):
                notify.until("WATCHDOG=1", timeout=60)

            # One child stops (SIGSTOP): once its silence outlasts WatchdogSec, every ping due is
            # withheld. (A child may have been named before, while it started.)
            victim = min(ready)

            def withheld() -> int:
                return sum(
                    victim in e["pids"]  # type: ignore[operator]
                    for e in _events(log_path, "watchdog_withheld")
                )

            before = withheld()
            os.kill(victim, signal.SIGSTOP)
            wait_for(lambda: withheld() > before, timeout=60, what="a ping withheld")
            notify.drain()
            wait_for(lambda: withheld() >= before + 3, timeout=60, what="two more pings withheld")
            since = notify.drain()
            assert not any("WATCHDOG=1" in m.splitlines() for m in since), since

            # Going on again, it pings again, and so does the supervisor.
            os.kill(victim, signal.SIGCONT)
            notify.until("WATCHDOG=1", timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                for pid in {int(str(e["pid"])) for e in _events(log_path, "daemon_process_ready")}:
                    os.kill(pid, signal.SIGCONT)
            code = supervisor.terminate(timeout=60)
        stopping = notify.drain()
        notify.close()
        log_text = log_path.read_text(errors="replace")
        assert code == 0, log_text[-3000:]
        assert any("STOPPING=1" in m.splitlines() for m in stopping), stopping


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
