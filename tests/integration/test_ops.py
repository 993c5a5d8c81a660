"""Operations: the HTTP endpoints, metrics that move, heartbeats, `check`, pruning, sd_notify."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import pathlib
import re
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from seedance_archiver import metrics, models, simulator, store, utils

from tests.helpers import (
    CLI,
    Launcher,
    NotifySocket,
    base_env,
    daemon_settings,
    free_port,
    http_get,
    running_daemon,
    wait_until,
)

FAST = "0.3-0.6"  # the standard mode polled quickly


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-z_:]+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name:
            found = ",".join(sorted((match.group(2) or "").split(","))) if match.group(2) else ""
            if found == wanted:
                return float(match.group(3))
    return 0.0


@pytest.fixture
def notify(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """A notify socket the daemon started in this test reports to, with a 1 s watchdog."""
    path = tmp_path / "notify.sock"
    sock = NotifySocket(path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # pings every 0.5 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    try:
        yield sock
    finally:
        sock.close()


class TestEndpoints:
    """/healthz, /readyz and /metrics on SEEDANCE_HTTP_PORT; 404 elsewhere."""

    async def test_health_ready_metrics_and_404(
        self, sqlite_url: str, sim: simulator.SimulatorThread, tmp_path: pathlib.Path
    ) -> None:
        port = free_port()
        sim.simulator.add_task("video_ops", queued_seconds=0, ready_seconds=0.5, size=200_000)
        feeder = store.SqlStore.from_url(sqlite_url)
        base = f"http://127.0.0.1:{port}"
        settings = daemon_settings(
            sim.url, sqlite_url, f"file://{tmp_path}/a", http_port=port, poll_standard=FAST
        )
        async with running_daemon(settings), httpx.AsyncClient(base_url=base) as client:
            await wait_until(lambda: _answers(port), 10, "the HTTP server")
            # The port opens before the first tick completes; /healthz says "stalled" until then.

            async def healthy() -> bool:
                return (await client.get("/healthz")).status_code == 200

            await wait_until(healthy, 30, "a first tick")
            health = await client.get("/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            ready = await client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["checks"] == {
                "database": "ok",
                "storage": "ok",
                "api_key": "ok",
                "provider": "ok",
            }
            assert (await client.get("/nope")).status_code == 404
            assert (await client.get("/")).status_code == 404

            before = (await client.get("/metrics")).text
            feeder.add("video_ops")

            def archived() -> bool:
                task = feeder.get("video_ops")
                return task is not None and task.state == "archived"

            await wait_until(archived, 20, "the video to be archived")
            after = (await client.get("/metrics")).text
        feeder.close()
        ok = {"mode": "standard", "outcome": "ok"}
        assert _metric(after, "seedance_polls_total", **ok) > _metric(
            before, "seedance_polls_total", **ok
        )
        assert _metric(after, "seedance_provider_responses_total", code_class="2xx") >= 1
        assert _metric(after, "seedance_archived_bytes_total") == 200_000
        assert _metric(after, "seedance_completion_to_archive_seconds_count") == 1
        assert _metric(after, "seedance_archive_duration_seconds_count") == 1
        assert _metric(after, "seedance_poll_lateness_seconds_count") >= 1
        assert _metric(after, "seedance_last_tick_timestamp_seconds") > 0
        assert "task_id" not in after

    @pytest.mark.usefixtures("s3_endpoint")
    async def test_readyz_is_503_when_the_storage_is_unreachable(
        self, sqlite_url: str, sim: simulator.SimulatorThread
    ) -> None:
        port = free_port()
        settings = daemon_settings(
            sim.url, sqlite_url, "s3://no-such-bucket-here/x", http_port=port, poll_standard=FAST
        )
        async with running_daemon(settings), httpx.AsyncClient() as client:
            await wait_until(lambda: _answers(port), 10, "the HTTP server")
            ready = await client.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["database"] == "ok" and checks["storage"] != "ok"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class TestGauges:
    """Housekeeping refreshes the state gauges and the at-risk count."""

    async def test_gauges_follow_the_table(self, db_url: str) -> None:
        sql = store.SqlStore.from_url(db_url)
        now = utils.utcnow()
        rows: list[dict[str, Any]] = [
            {"task_id": "a", "state": "polling", "expires_at": now + dt.timedelta(minutes=5)},
            {"task_id": "b", "state": "polling", "expires_at": now + dt.timedelta(hours=5)},
            {"task_id": "c", "state": "archived"},
            {"task_id": "d"},
        ]
        with sql.engine.begin() as conn:
            for row in rows:
                conn.execute(sa.insert(models.video_tasks).values(row))
        summary = sql.summary(now)
        sql.close()
        assert summary.counts["polling"] == 2 and summary.counts["archived"] == 1
        assert summary.at_risk == 1
        assert summary.oldest_pending is not None and summary.oldest_pending.task_id == "d"
        m = metrics.Metrics()
        for state, n in summary.counts.items():
            m.tasks.labels(state=state).set(n)
        text = m.render().decode()
        assert _metric(text, "seedance_tasks", state="polling") == 2


class TestPrune:
    """Finished rows are pruned after N days, and nothing else is."""

    def test_prune_deletes_only_old_finished_rows(self, db_url: str) -> None:
        sql = store.SqlStore.from_url(db_url)
        now = utils.utcnow()
        old = now - dt.timedelta(days=10)
        with sql.engine.begin() as conn:
            conn.execute(
                sa.insert(models.video_tasks),
                [
                    {"task_id": "old_done", "state": "archived", "updated_at": old},
                    {"task_id": "old_failed", "state": "failed", "updated_at": old},
                    {"task_id": "old_active", "state": "polling", "updated_at": old},
                    {"task_id": "new_done", "state": "archived", "updated_at": now},
                ],
            )
        assert sql.prune(now - dt.timedelta(days=7), batch=1) == 2
        left = {t.task_id for t in sql.list()}
        sql.close()
        assert left == {"old_active", "new_done"}


class TestHeartbeatAndCheck:
    """A running daemon shows in `status`; `check` exits 0 while it ticks and 1 when it is gone."""

    async def test_check_and_status_follow_the_daemon(
        self, sqlite_url: str, sim: simulator.SimulatorThread, tmp_path: pathlib.Path
    ) -> None:
        env = base_env(sim.url, sqlite_url, f"file://{tmp_path}/a")

        def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(CLI), *args], env=env, capture_output=True, text=True, timeout=60
            )

        nobody = await asyncio.to_thread(run_cli, "check")
        assert nobody.returncode == 1 and "database: ok" in nobody.stdout
        sql = store.SqlStore.from_url(sqlite_url)
        settings = daemon_settings(sim.url, sqlite_url, f"file://{tmp_path}/a", poll_standard=FAST)
        async with running_daemon(settings):
            # A heartbeat reports the last tick that completed (none, in one written at start).
            await wait_until(
                lambda: any(d.last_tick_at is not None for d in sql.daemons()),
                30,
                "a heartbeat after a completed tick",
            )
            good = await asyncio.to_thread(run_cli, "check")
            assert good.returncode == 0, good.stdout
            status = await asyncio.to_thread(run_cli, "status", "--json")
            assert status.returncode == 0, status.stderr
            summary = json.loads(status.stdout)
            assert len(summary["daemons"]) == 1 and summary["daemons"][0]["api_key_ok"]
            text = (await asyncio.to_thread(run_cli, "status")).stdout
            assert "last tick:" in text and "at risk" in text and "oldest pending" in text
        assert sql.daemons() == []  # a graceful stop removes the heartbeat
        sql.close()
        gone = await asyncio.to_thread(run_cli, "check")
        assert gone.returncode == 1


class TestSystemdNotify:
    """READY, WATCHDOG and STOPPING reach $NOTIFY_SOCKET."""

    async def test_notifications_arrive_in_order(
        self,
        sqlite_url: str,
        sim: simulator.SimulatorThread,
        tmp_path: pathlib.Path,
        notify: NotifySocket,
    ) -> None:
        settings = daemon_settings(sim.url, sqlite_url, f"file://{tmp_path}/a", poll_standard=FAST)
        async with running_daemon(settings):
            await wait_until(lambda: any("READY=1" in m for m in notify.drain()), 10, "READY=1")
            await wait_until(lambda: "WATCHDOG=1" in notify.drain(), 10, "a watchdog ping")
        notify.drain()
        received = notify.received
        ready = next(i for i, m in enumerate(received) if "READY=1" in m)
        assert received.index("WATCHDOG=1") > ready
        assert received[-1] == "STOPPING=1"


class TestPruneJob:
    """With SEEDANCE_PRUNE_AFTER_DAYS set, the daemon prunes old finished rows on its own."""

    async def test_the_daemon_prunes_at_start(
        self, sqlite_url: str, sim: simulator.SimulatorThread, tmp_path: pathlib.Path
    ) -> None:
        sql = store.SqlStore.from_url(sqlite_url)
        old = utils.utcnow() - dt.timedelta(days=3)
        with sql.engine.begin() as conn:
            for task_id, state in (("done_long_ago", "archived"), ("still_active", "polling")):
                conn.execute(
                    sa.insert(models.video_tasks).values(
                        task_id=task_id, state=state, updated_at=old, next_attempt_at=old
                    )
                )
        settings = daemon_settings(
            sim.url, sqlite_url, f"file://{tmp_path}/a", poll_standard=FAST, prune_after_days=2
        )
        async with running_daemon(settings):
            await wait_until(lambda: sql.get("done_long_ago") is None, 10, "the prune job")
            assert sql.get("still_active") is not None
        sql.close()


class TestHealth:
    """Crashing ticks turn /healthz 503 and starve the systemd watchdog; recovery restores both."""

    async def test_crashed_ticks_are_unhealthy(
        self,
        launch: Launcher,
        notify: NotifySocket,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        port = free_port()
        async with launch(http_port=port) as d:
            await d.until(lambda: "WATCHDOG=1" in notify.drain(), "a watchdog ping")
            assert (await http_get(port, "/healthz"))[0] == 200

            real_claim = d.svc.store.claim_due
            broken = [True]

            def buggy_claim(*args: Any, **kwargs: Any) -> Any:
                if broken[0]:
                    raise RuntimeError("a bug in the claim")
                return real_claim(*args, **kwargs)

            monkeypatch.setattr(d.svc.store, "claim_due", buggy_claim)
            await d.until(lambda: not d.svc.healthy, "ticks to crash")
            status, body = await http_get(port, "/healthz")
            assert status == 503 and body["tick_failures_in_a_row"] >= 3, body
            notify.drain()
            crashed = d.svc.tick_failures
            # Many more crashed ticks, spanning several watchdog intervals: no ping at all.
            await d.until(lambda: d.svc.tick_failures >= crashed + 30, "more crashes")
            assert "WATCHDOG=1" not in notify.drain()
            failures = d.svc.metrics.registry.get_sample_value("seedance_tick_failures_total")
            assert failures is not None and failures >= crashed + 30

            broken[0] = False  # the bug is fixed
            await d.until(lambda: d.svc.healthy, "ticks to complete again")
            assert (await http_get(port, "/healthz"))[0] == 200
            await d.until(lambda: "WATCHDOG=1" in notify.drain(), "the watchdog to be fed again")
        assert d.events("tick_crashed")
