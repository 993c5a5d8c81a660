"""A rejected API key pauses polling, gives no task up, and says so; a working key resumes it.

The real daemon runs in-process against the provider simulator, whose key is rotated or refused.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
from seedance_archiver import keygate, simulator
from seedance_archiver.providers import reseller

from tests.acceptance.conftest import CLI, base_env
from tests.conftest import SIM_KEY, free_port
from tests.helpers import (
    FOREVER,
    SMALL,
    Launcher,
    assert_archived_intact,
    gaps,
    insert,
    no_crashes,
    readyz,
)


class TestKeyRejected:
    """A rejected key pauses polling to one key check at a time, gives no task up, and resumes."""

    IDS = ("video_k1", "video_k2", "video_k3")
    PROBE_SECONDS = 1.0
    BLOCKED_SECONDS = 3.5

    @pytest.mark.parametrize("code", [401, 403])
    async def test_polling_pauses_to_key_checks_and_resumes_when_the_key_works(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        monkeypatch: pytest.MonkeyPatch,
        code: int,
    ) -> None:
        """One key check per AUTH_PROBE_SECONDS, each logged loudly; rows untouched; then resume."""
        monkeypatch.setattr(keygate.KeyGate, "AUTH_PROBE_SECONDS", self.PROBE_SECONDS)
        for tid in self.IDS:
            sim.simulator.add_task(tid, ready_seconds=3600, size=SMALL)
        port = free_port()
        probe = reseller.KEY_CHECK_TASK_ID

        def task_polls() -> int:
            return sum(sim.simulator.stats.polls[tid] for tid in self.IDS)

        async with launch(http_port=port) as d:
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
            await d.until(lambda: d.svc.keygate.blocked, "the block")
            blocked_at = time.time()
            # Outcomes of polls answered just before the key broke are written by the next ticks.
            await d.until(lambda: time.time() >= blocked_at + 0.5, "pending writes")
            before = {tid: d.row(tid) for tid in self.IDS}
            polls, checks, since = task_polls(), sim.simulator.stats.polls[probe], time.time()
            await d.until(lambda: time.time() - since >= self.BLOCKED_SECONDS, "the blocked window")
            assert d.svc.keygate.blocked
            assert task_polls() == polls  # no task was polled while the key is rejected
            key_checks = sim.simulator.stats.polls[probe] - checks
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
            await d.until(
                lambda: not d.svc.keygate.blocked, "the block to lift", self.PROBE_SECONDS + 12
            )
            for tid in self.IDS:
                await d.until_state(tid, "archived")
            assert d.events("api_key_accepted_again")
            assert (await readyz(port))[0] == 200
        rejections = d.events("api_key_rejected")
        assert len(rejections) >= 2
        assert all(e["log_level"] == "error" for e in rejections)
        assert all("SEEDANCE_API_KEY" in e["action"] for e in rejections)
        # Three tasks at a 0.3-0.6 s cadence would make ~20 polls in the window: only key checks
        # came, spaced by the probe interval.
        assert 1 <= key_checks <= self.BLOCKED_SECONDS / self.PROBE_SECONDS + 1.5, key_checks
        checks_at = [x for x in d.polls(probe) if since <= x <= since + self.BLOCKED_SECONDS]
        assert all(g >= self.PROBE_SECONDS - 0.1 for g in gaps(checks_at)), checks_at
        # No task changed while blocked, and none was given up.
        for tid in self.IDS:
            fields = ("state", "attempts", "polls", "error", "next_attempt_at")
            assert [getattr(after[tid], f) for f in fields] == [
                getattr(before[tid], f) for f in fields
            ]
            assert before[tid].state == "polling" and before[tid].attempts == 0
            assert_archived_intact(d, tid, SMALL)


class TestRejectedKey:
    """Downloads need no key; a task refused on its own is that task's problem."""

    async def test_downloads_finish_while_polling_is_paused(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        downloading, waiting = "video_dl_during_block", "video_waits_for_key"
        sim.simulator.add_task(downloading, ready_seconds=0.5, size=SMALL)
        sim.simulator.add_fault(downloading, on="download", status=503, times=FOREVER)
        sim.simulator.add_task(waiting, ready_seconds=3600, size=SMALL)
        async with launch() as d:
            insert(d.rows, downloading)
            insert(d.rows, waiting)
            await d.until(
                lambda: d.state(downloading) == "downloading" and d.row(downloading).attempts >= 1,
                "a failed download, saved",
            )
            sim.simulator.api_key = "a-rotated-key"
            await d.until(lambda: d.svc.keygate.blocked, "the block")
            polls = sim.simulator.stats.polls[waiting]
            sim.simulator.faults[downloading].clear()  # the file host answers again
            await d.until_state(downloading, "archived")
            assert d.svc.keygate.blocked
            assert sim.simulator.stats.polls[waiting] == polls  # polling stayed paused
            assert d.state(waiting) == "polling" and d.row(waiting).attempts == 0
            no_crashes(d)
        assert_archived_intact(d, downloading, SMALL)

    async def test_a_403_for_one_task_rejects_it_and_the_rest_go_on(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        refused, others = "video_not_ours", ("video_ours_1", "video_ours_2")
        sim.simulator.add_task(refused, ready_seconds=0.5, size=SMALL)
        sim.simulator.add_fault(refused, status=403, times=100)
        for tid in others:
            sim.simulator.add_task(tid, ready_seconds=0.5, size=SMALL)
        async with launch() as d:
            for tid in (refused, *others):
                insert(d.rows, tid)
            row = await d.until_state(refused, "rejected")
            for tid in others:
                await d.until_state(tid, "archived")
            assert not d.svc.keygate.blocked
            assert d.events("api_key_rejected") == []
        assert row.error is not None and "refuses this task" in row.error
        assert "HTTP 403" in row.error


class TestWrongKeyAtStart:
    """A mistyped key with an empty table: not ready, and `check` says so, within a minute."""

    async def test_readyz_and_check_report_the_key(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        port = free_port()
        async with launch(api_key="a-mistyped-key", http_port=port) as d:

            async def not_ready() -> bool:
                status, body = await readyz(port)
                return status == 503 and body["checks"]["api_key"] != "ok"

            deadline = time.monotonic() + 60
            while not await not_ready():
                assert time.monotonic() < deadline, "readyz did not report the key"
                await asyncio.sleep(0.2)
            await d.until(
                lambda: any(not beat.api_key_ok for beat in d.rows.daemons()),
                "the heartbeat to carry the verdict",
                60,
            )
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
            assert d.events("api_key_rejected")
