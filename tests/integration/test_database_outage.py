"""The daemon outlives its database: cut or stalled, it waits, reconnects and loses no update.

PostgreSQL sits behind a fault proxy that refuses connections or stops forwarding without closing.
The outage lasts ``PG_OUTAGE_SECONDS`` (10 s by default, to keep ``make test`` short); a minute-long
outage is the same test run with ``SEEDANCE_TEST_PG_OUTAGE_SECONDS=60``.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import time
from collections.abc import Iterator

import pytest
from seedance_archiver import simulator, utils

from tests.helpers import (
    SMALL,
    STALL_SECONDS,
    Launcher,
    assert_archived_intact,
    free_port,
    http_get,
    insert,
    no_crashes,
    readyz,
    via_proxy,
)
from tests.integration.faultproxy import FaultProxy


@pytest.fixture
def pg_proxy(pg_url: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of this test's PostgreSQL server."""
    with FaultProxy(5432) as proxy:
        yield proxy


@pytest.fixture
def launch_pg(
    sim: simulator.SimulatorThread,
    pg_url: str,
    pg_proxy: FaultProxy,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Launcher:
    """The daemon on PostgreSQL through ``pg_proxy``; the feeding application connects directly."""
    return Launcher(sim, via_proxy(pg_url, pg_proxy), tmp_path, monkeypatch, pg_url)


PG_OUTAGE_SECONDS = float(os.environ.get("SEEDANCE_TEST_PG_OUTAGE_SECONDS", "10"))


class TestDatabaseUnreachable:
    """The daemon outlives its database: it waits, reconnects, keeps its leases, loses nothing."""

    @pytest.mark.postgres
    async def test_outage_loses_no_update(
        self,
        sim: simulator.SimulatorThread,
        pg_proxy: FaultProxy,
        launch_pg: Launcher,
    ) -> None:
        """Tasks finish at the provider and in flight while PostgreSQL is cut; all are archived."""
        inflight, during, later = "video_inflight", "video_during", "video_inserted_meanwhile"
        size = 256 * 1024
        sim.simulator.add_task(inflight, ready_seconds=0.5, size=size)
        # A download slow enough to be running when the database goes, and to end during the outage.
        sim.simulator.add_fault(inflight, on="download", throttle=size / 3)
        sim.simulator.add_task(during, ready_seconds=4, size=size)
        async with launch_pg() as d:
            insert(d.rows, inflight)
            insert(d.rows, during)
            await d.until(
                lambda: sim.simulator.stats.downloads_started[inflight] >= 1, "the download"
            )
            try:
                pg_proxy.refuse()
                cut_at = time.time()
                sim.simulator.add_task(later, ready_seconds=1, size=size)
                insert(d.rows, later)  # the feeding application still reaches the database
                await d.until(
                    lambda: sim.simulator.stats.downloads_completed[inflight] == 1,
                    "the download to end during the outage",
                )
                await d.until(lambda: d.events("database_unavailable"), "the daemon to notice")
                await d.until(
                    lambda: time.time() - cut_at >= PG_OUTAGE_SECONDS,
                    "the outage",
                    PG_OUTAGE_SECONDS + 5,
                )
                assert not d.task.done(), "the daemon died with its database"
                held = d.row(inflight)
                assert d.svc.in_flight == 0
            finally:
                pg_proxy.forward()
            restored_at = time.time()
            for tid in (inflight, during, later):
                await d.until_state(tid, "archived", 60)
            assert d.events("database_available_again")
        # The archive happened during the outage; its outcome waited in memory and was written after.
        assert held.state != "archived"
        first = d.row(inflight)
        assert first.archived_at is not None and first.archived_at.timestamp() < restored_at
        assert sim.simulator.stats.downloads_completed[inflight] == 1  # not fetched twice
        for tid in (inflight, during, later):
            assert_archived_intact(d, tid, size)
            # Every poll the provider answered is counted in the row: no outcome was lost.
            assert d.row(tid).polls == sim.simulator.stats.polls[tid], tid

    @pytest.mark.postgres
    async def test_renewal_failing_in_an_outage_loses_nothing(
        self,
        sim: simulator.SimulatorThread,
        pg_proxy: FaultProxy,
        launch_pg: Launcher,
    ) -> None:
        """A long download renews its lease; renewals failing while PostgreSQL is cut lose nothing."""
        tid = "video_long_download"
        size = 256 * 1024
        sim.simulator.add_task(tid, ready_seconds=0.5, size=size)
        sim.simulator.add_fault(tid, on="download", throttle=size / 4)  # 4 s, twice the lease
        async with launch_pg(lease_seconds=2) as d:
            insert(d.rows, tid)
            await d.until(lambda: sim.simulator.stats.downloads_started[tid] >= 1, "the download")
            claimed = d.row(tid).lease_expires_at
            assert claimed is not None
            # Past the first lease, the row is still ours, on a renewed lease, downloaded once.
            await d.until(lambda: utils.utcnow() >= claimed + dt.timedelta(seconds=0.5), "a lease")
            renewed = d.row(tid).lease_expires_at
            assert renewed is not None and renewed > utils.utcnow(), "the lease ran out"
            assert sim.simulator.stats.downloads_started[tid] == 1
            try:
                pg_proxy.refuse()
                cut_at = time.time()
                await d.until(
                    lambda: any(e.get("job") == "renew_leases" for e in d.events("job_failed")),
                    "a renewal to fail",
                )
                await d.until(
                    lambda: (
                        sim.simulator.stats.downloads_completed[tid] == 1
                        and time.time() >= cut_at + 3
                    ),
                    "the download to end during the outage",
                )
            finally:
                pg_proxy.forward()
            restored_at = time.time()
            final = await d.until_state(tid, "archived", 30)
        assert final.archived_at is not None and final.archived_at.timestamp() < restored_at
        assert sim.simulator.stats.downloads_started[tid] == 1
        assert final.polls == sim.simulator.stats.polls[tid]
        assert_archived_intact(d, tid, size)


class TestStalledDatabase:
    """PostgreSQL behind a proxy that stops forwarding without closing: the daemon fails fast."""

    @pytest.mark.postgres
    async def test_the_tick_keeps_going_readyz_names_the_database_and_nothing_is_lost(
        self,
        sim: simulator.SimulatorThread,
        pg_proxy: FaultProxy,
        launch_pg: Launcher,
    ) -> None:
        ids = ("video_stall_1", "video_stall_2", "video_stall_3")
        for tid in ids:
            sim.simulator.add_task(tid, ready_seconds=3600, size=SMALL)
        port = free_port()
        async with launch_pg(http_port=port, database_statement_timeout_seconds=1) as d:
            for tid in ids:
                insert(d.rows, tid)
            await d.until(lambda: all(d.state(t) == "polling" for t in ids), "intake polls")
            try:
                pg_proxy.stall(STALL_SECONDS)
                await d.until(lambda: d.events("database_unavailable"), "the daemon to notice")
                ticks = d.svc.stats.ticks
                # The tick goes on at its interval instead of hanging on the database.
                await d.until(lambda: d.svc.stats.ticks >= ticks + 20, "ticks to go on", 60)
                status, body = await readyz(port)
                assert status == 503
                assert body["checks"]["database"] != "ok", body
                assert body["checks"]["storage"] == "ok", body
                assert (await http_get(port, "/healthz"))[0] == 200
                for tid in ids:
                    sim.simulator.tasks[tid].ready_seconds = 0  # they finish meanwhile
            finally:
                pg_proxy.forward()
            for tid in ids:
                await d.until_state(tid, "archived", 60)
            assert d.events("database_available_again")
            assert (await readyz(port))[0] == 200
            no_crashes(d)
        for tid in ids:
            assert_archived_intact(d, tid, SMALL)
            assert d.row(tid).polls == sim.simulator.stats.polls[tid], tid
