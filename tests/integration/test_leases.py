"""A lease keeps a row one daemon's while it works on it: renewed through long downloads, and on
one clock, the database's, however far the replicas' clocks drift apart."""

from __future__ import annotations

import datetime as dt
import pathlib

import pytest
from seedance_archiver import service, simulator, utils

from tests.helpers import (
    Launcher,
    assert_archived_intact,
    insert,
    no_crashes,
)


class TestLongDownloads:
    """Renewal keeps a row ours while its download outlasts the lease."""

    async def test_download_longer_than_the_lease_is_not_started_twice(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """While a download outlasts the lease, renewal keeps the row ours: no second download."""
        tid = "video_outlasts_lease"
        size = 192 * 1024
        sim.simulator.add_task(tid, ready_seconds=0.5, size=size)
        sim.simulator.add_fault(tid, on="download", throttle=size / 3)  # 3 s, three leases
        async with launch(lease_seconds=1) as d:
            insert(d.rows, tid)
            await d.until_state(tid, "archived")
        assert sim.simulator.stats.downloads_started[tid] == 1
        assert_archived_intact(d, tid, size)


class TestSkewedReplicas:
    """Two replicas whose clocks are 90 s apart archive every video exactly once."""

    @pytest.mark.postgres
    async def test_every_video_is_downloaded_once(
        self,
        pg_url: str,
        sim: simulator.SimulatorThread,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        ids = [f"video_skew_{n}" for n in range(8)]
        size = 192 * 1024
        for tid in ids:
            sim.simulator.add_task(tid, ready_seconds=0.5, size=size)
            # Each download outlasts the 1 s lease three times over: renewals must hold it.
            sim.simulator.add_fault(tid, on="download", throttle=size / 3)
        skew = 90.0

        class Ahead(utils.SystemClock):
            def __call__(self) -> dt.datetime:
                return utils.utcnow() + dt_seconds(skew)

        def run_ahead(svc: service.Service) -> None:
            svc.clock = Ahead()

        on_time = Launcher(sim, pg_url, tmp_path, monkeypatch)
        ahead = Launcher(sim, pg_url, tmp_path, monkeypatch)
        async with on_time(lease_seconds=1) as a, ahead(lease_seconds=1, on_build=run_ahead) as b:
            assert b.svc.clock() - a.svc.clock() > dt_seconds(skew - 5)
            for tid in ids:
                insert(a.rows, tid)
            for tid in ids:
                await a.until_state(tid, "archived", 60)
            no_crashes(a)
            no_crashes(b)
            assert a.events("lease_lost") == [] and b.events("lease_lost") == []
        for tid in ids:
            assert sim.simulator.stats.downloads_started[tid] == 1, tid
            assert_archived_intact(a, tid, size)


def dt_seconds(seconds: float) -> dt.timedelta:
    return dt.timedelta(seconds=seconds)
