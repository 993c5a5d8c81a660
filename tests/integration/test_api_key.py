"""A rejected API key pauses polling, gives no task up, and says so; a working key resumes it.

The real daemon runs in-process against the provider simulator, whose key is rotated or refused, and
the operator's view is read where an operator reads it: /readyz, /healthz, /metrics, the heartbeat
and ``check``. When the gate checks the key, how it spaces its checks, and that downloads go on and
that one task's 403 is that task's own, are proven on the fakes with a moved clock
(``tests/unit/test_service.py``, ``TestProviderTrouble``); here the daemon's own events say when
each step has happened.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from seedance_archiver import keygate, simulator
from seedance_archiver.providers import http as provider_http

from tests.helpers import (
    CLI,
    FOREVER,
    SIM_KEY,
    SMALL,
    Launcher,
    assert_archived_intact,
    base_env,
    free_port,
    http_get,
    insert,
    readyz,
)


class TestKeyRejectedWhileRunning:
    """A key that stops working pauses every task's polling to key checks, and resumes when it works."""

    IDS = ("video_k1", "video_k2", "video_k3")
    PROBE_SECONDS = 0.5

    @pytest.mark.parametrize("code", [401, 403])
    async def test_polling_pauses_to_key_checks_and_resumes_when_the_key_works(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        monkeypatch: pytest.MonkeyPatch,
        code: int,
    ) -> None:
        """While rejected: only key checks reach the provider, rows are untouched, /readyz names the
        key. Once it works: the block lifts and every task is archived."""
        monkeypatch.setattr(keygate.KeyGate, "AUTH_PROBE_SECONDS", self.PROBE_SECONDS)
        for tid in self.IDS:
            sim.simulator.add_task(tid, ready_seconds=3600, size=SMALL)
        port = free_port()
        probe = provider_http.KEY_CHECK_TASK_ID

        def task_polls() -> int:
            return sum(sim.simulator.stats.polls[tid] for tid in self.IDS)

        async with launch(http_port=port) as d:

            def rejections() -> int:
                return len(d.events("api_key_rejected"))

            for tid in self.IDS:
                insert(d.rows, tid)
            await d.until(
                lambda: all(d.state(tid) == "polling" for tid in self.IDS), "the intake polls"
            )
            assert (await readyz(port))[0] == 200
            if code == 401:
                sim.simulator.api_key = "a-rotated-key"  # the daemon's key no longer works
            else:
                sim.simulator.add_fault("*", status=403, times=FOREVER)
            await d.until(lambda: rejections() >= 1, "the block")
            # A key check has failed since: every outcome of a poll answered before the block has
            # been written back, ticks apart.
            await d.until(lambda: rejections() >= 2, "a failed key check")
            before = {tid: d.row(tid) for tid in self.IDS}
            polls, checks = task_polls(), sim.simulator.stats.polls[probe]
            await d.until(lambda: rejections() >= 3, "another failed key check")
            assert d.svc.keygate.blocked
            assert task_polls() == polls  # no task was polled while the key is rejected
            assert sim.simulator.stats.polls[probe] > checks  # only key checks were
            after = {tid: d.row(tid) for tid in self.IDS}
            status, body = await readyz(port)
            assert status == 503 and body["checks"]["api_key"] != "ok", body

            # The key works again: the next key check lifts the block and every task is archived.
            for tid in self.IDS:
                sim.simulator.tasks[tid].ready_seconds = 0
            if code == 401:
                sim.simulator.api_key = SIM_KEY
            else:
                sim.simulator.faults["*"].clear()
            await d.until(lambda: d.events("api_key_accepted_again"), "the block to lift")
            assert not d.svc.keygate.blocked
            for tid in self.IDS:
                await d.until_state(tid, "archived")
            assert (await readyz(port))[0] == 200
        # No task changed while blocked, and none was given up.
        for tid in self.IDS:
            fields = ("state", "attempts", "polls", "error", "next_attempt_at")
            assert [getattr(after[tid], f) for f in fields] == [
                getattr(before[tid], f) for f in fields
            ]
            assert before[tid].state == "polling" and before[tid].attempts == 0
            assert_archived_intact(d, tid, SMALL)


class TestWrongKeyAtStart:
    """A mistyped key is reported before any task needs it: /readyz, the metric, the heartbeat and
    `check` all say so, the process stays healthy, and no task is touched."""

    async def test_every_report_names_the_key(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        port = free_port()
        sim.simulator.add_task("video_locked", ready_seconds=3600)
        async with launch(api_key="a-mistyped-key", http_port=port) as d:
            insert(d.rows, "video_locked")
            await d.until(lambda: d.events("api_key_rejected"), "the key to be rejected", 60)

            async def not_ready() -> bool:
                status, body = await readyz(port)
                return status == 503 and body["checks"]["api_key"] == "rejected by the provider"

            await d.until(not_ready, "readyz to report the key")
            await d.until(
                lambda: any(not beat.api_key_ok for beat in d.rows.daemons()),
                "the heartbeat to carry the verdict",
                60,
            )
            # The process itself is alive: health stays green.
            assert (await http_get(port, "/healthz"))[0] == 200
            assert d.svc.metrics.registry.get_sample_value("seedance_api_key_rejected") == 1
            env = base_env(sim.url, launch.db_url, f"file://{launch.archive_dir}")
            result = await asyncio.to_thread(
                subprocess.run,
                [str(CLI), "check"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 1, result.stdout
            assert "api key: rejected" in result.stdout
            assert sim.simulator.stats.unauthorized >= 1
            row = d.row("video_locked")
        assert (row.state, row.attempts, row.polls) == ("pending", 0, 0)
