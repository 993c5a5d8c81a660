"""No video lost to a picky store, one bad answer or a stuck database.

Each test injects its fault for real while the daemon runs in-process on loopback: the provider
simulator sends poisoned or hostile answers, PostgreSQL or moto's S3 sits behind a fault proxy that
stops forwarding without closing, the archive folder cannot be written, replicas' clocks disagree.
The outcome is read from the rows, the archive, the simulator's counters and the daemon's log.
(S3 stores that refuse optional calls are tested in ``test_s3_compat.py``.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.parse
from typing import Any, ClassVar

import httpx
import pytest
from seedance_archiver import service, simulator, utils
from seedance_archiver.archive import s3

from tests.acceptance.conftest import CLI, base_env
from tests.conftest import free_port
from tests.helpers import (
    FOREVER,
    MIB,
    OPTIONAL_CALLS,
    S3_PREFIX,
    Launcher,
    Running,
    assert_archived_intact,
    insert,
    readyz,
    s3_sha256,
    s3_uploads,
    via_proxy,
)
from tests.integration.faultproxy import FaultProxy

SMALL = 64 * 1024
STALL_SECONDS = 120.0  # a stall outlasting every test step; the proxy is told to resume earlier


def no_crashes(d: Running) -> None:
    """Nothing reached the catch-alls: every fault was handled where it happened."""
    assert d.events("task_work_crashed") == []
    assert d.events("tick_crashed") == []
    assert d.events("job_crashed") == []


async def http_get(port: int, path: str) -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{port}{path}")
    return response.status_code, response.json()


@pytest.fixture
def launch_db(
    sim: simulator.SimulatorThread,
    db_url: str,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Launcher:
    """The daemon on SQLite and on PostgreSQL (the same test twice)."""
    return Launcher(sim, db_url, tmp_path, monkeypatch)


# --- 2. one bad answer never holds up the rest -----------------------------------------------------

HUGE = 200 * 1024


class TestPoisonedAnswers:
    """Answers carrying NUL bytes, lone surrogates or a 200 KB model name poison nothing."""

    POISONED: ClassVar[dict[str, dict[str, Any]]] = {
        "video_nul_error": {"outcome": "failed", "error": "content\x00policy violation"},
        "video_surrogate_error": {"outcome": "failed", "error": "refused \ud800 by policy"},
        "video_huge_model": {"outcome": "failed", "model": "m" * HUGE, "error": "e" * HUGE},
        "video_nul_model": {"model": "seedance\x00_1_5_pro_720p"},
        "video_surrogate_model": {"model": "seedance_\udfff_720p"},
    }
    GOOD = ("video_good_1", "video_good_2", "video_good_3")

    async def test_every_other_task_is_archived(
        self, launch_db: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        for tid, fields in self.POISONED.items():
            sim.simulator.add_task(tid, ready_seconds=0.5, size=SMALL, **fields)
        for tid in self.GOOD:
            sim.simulator.add_task(tid, ready_seconds=0.5, size=SMALL)
        async with launch_db() as d:
            for tid in (*self.POISONED, *self.GOOD):
                insert(d.rows, tid)
            for tid in self.GOOD:
                await d.until_state(tid, "archived")
            for tid, fields in self.POISONED.items():
                state = "failed" if fields.get("outcome") == "failed" else "archived"
                await d.until_state(tid, state)
            no_crashes(d)
            assert d.events("outcome_not_saved") == []
        for tid in self.GOOD:
            assert_archived_intact(d, tid, SMALL)
        for tid, fields in self.POISONED.items():
            row = d.row(tid)
            for text in (row.error, row.model):
                if text is not None:
                    assert "\x00" not in text
                    text.encode("utf-8")  # storable: no lone surrogate
                    assert len(text) < 10_000
            if fields.get("outcome") == "failed":
                assert row.error, tid  # a reason a person can read
                assert row.error.startswith(("content", "refused", "eee")), row.error
            else:
                assert_archived_intact(d, tid, SMALL)
        assert "truncated" in (d.row("video_huge_model").model or "")


# --- 3. the database can never hang the daemon ------------------------------------------------------


class TestStalledDatabase:
    """PostgreSQL behind a proxy that stops forwarding without closing: the daemon fails fast."""

    @pytest.mark.postgres
    async def test_the_tick_keeps_going_readyz_names_the_database_and_nothing_is_lost(
        self,
        pg_url: str,
        sim: simulator.SimulatorThread,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        ids = ("video_stall_1", "video_stall_2", "video_stall_3")
        for tid in ids:
            sim.simulator.add_task(tid, ready_seconds=3600, size=SMALL)
        port = free_port()
        with FaultProxy(5432) as proxy:
            launch = Launcher(sim, via_proxy(pg_url, proxy), tmp_path, monkeypatch, pg_url)
            async with launch(http_port=port, database_statement_timeout_seconds=1) as d:
                for tid in ids:
                    insert(d.rows, tid)
                await d.until(lambda: all(d.state(t) == "polling" for t in ids), "intake polls")
                try:
                    proxy.stall(STALL_SECONDS)
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
                    proxy.forward()
                for tid in ids:
                    await d.until_state(tid, "archived", 60)
                assert d.events("database_available_again")
                assert (await readyz(port))[0] == 200
                no_crashes(d)
        for tid in ids:
            assert_archived_intact(d, tid, SMALL)
            assert d.row(tid).polls == sim.simulator.stats.polls[tid], tid


# --- 4. slow storage never starves the database -----------------------------------------------------


class TestStalledStorage:
    """Twenty multipart uploads stuck on S3 do not delay a claim or a write-back."""

    async def test_database_work_goes_on_while_every_upload_hangs(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        s3_endpoint: str,
        s3_client: Any,
        s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        uploads = [f"video_big_{n:02d}" for n in range(20)]
        size = s3.PART_BYTES + MIB  # two parts: every upload holds archive threads
        for tid in uploads:
            sim.simulator.add_task(tid, ready_seconds=0.5, size=size)
        later = [f"video_meanwhile_{n}" for n in range(3)]
        for tid in later:
            # Still processing: their polls need the database only (a verdict would wait for a
            # look in the archive, which hangs too).
            sim.simulator.add_task(tid, ready_seconds=3600, size=SMALL)
        port = int(urllib.parse.urlsplit(s3_endpoint).port or 0)

        def twenty_at_once(svc: service.Service) -> None:
            # Twenty uploads at once, as operators with fast links run it (the default is four).
            svc.worker._download_slots = asyncio.Semaphore(len(uploads))
            svc.worker.max_downloads = len(uploads)  # and claims that many downloads

        with FaultProxy(port) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
            async with launch(
                archive_url=f"s3://{s3_bucket}/{S3_PREFIX}",
                max_requests_per_second=200,
                on_build=twenty_at_once,
            ) as d:
                try:
                    proxy.stall(STALL_SECONDS)
                    for tid in uploads:
                        insert(d.rows, tid)
                    await d.until(lambda: d.svc.in_flight == len(uploads), "twenty archives", 60)
                    # More archive calls hang on S3 than the default thread pool has threads.
                    await d.until(lambda: proxy.connections >= 12, "uploads to hang on S3", 60)
                    # While every upload hangs, new rows are claimed, polled and written back.
                    for tid in later:
                        insert(d.rows, tid)
                    for tid in later:
                        await d.until(lambda t=tid: d.row(t).polls >= 1, f"{tid} written back", 60)
                        assert d.state(tid) == "polling"
                    assert all(d.state(t) != "archived" for t in uploads)
                finally:
                    proxy.forward()
                for tid in uploads:
                    await d.until_state(tid, "archived", 180)
                no_crashes(d)
        for tid in uploads:
            row = d.row(tid)
            assert row.archive_bytes == size
            assert row.archive_sha256 == simulator.video_sha256(tid, size)
            assert s3_sha256(s3_client, s3_bucket, tid) == row.archive_sha256
        assert s3_uploads(s3_client, s3_bucket) == []


# --- 6. a rejected key pauses polling, not archiving ------------------------------------------------


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


# --- 7. leases follow one clock ---------------------------------------------------------------------


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


# --- 9. every library error is translated at the edge -----------------------------------------------


class TestTranslatedErrors:
    """A broken folder or a hostile URL is a retried task, never a crash."""

    async def test_an_unwritable_folder_is_a_storage_error_then_archived(
        self, launch: Launcher, sim: simulator.SimulatorThread, tmp_path: pathlib.Path
    ) -> None:
        tid = "video_folder_broken"
        sim.simulator.add_task(tid, ready_seconds=0.5, size=SMALL)
        blocker = tmp_path / "archive"
        blocker.write_text("a file where the archive folder should be")  # ENOTDIR/EEXIST
        async with launch() as d:
            insert(d.rows, tid)
            await d.until(lambda: d.row(tid).attempts >= 2, "failed archive attempts")
            row = d.row(tid)
            assert row.state == "downloading"
            assert row.error is not None and "archive folder" in row.error, row.error
            failures = d.svc.metrics.registry.get_sample_value(
                "seedance_download_failures_total", {"reason": "storage"}
            )
            assert failures is not None and failures >= 2
            blocker.unlink()
            await d.until_state(tid, "archived")
            no_crashes(d)
        assert_archived_intact(d, tid, SMALL)

    @pytest.mark.parametrize(
        "bad_url",
        ["https://xn--a.com/v.mp4", "https://exa mple.com/v.mp4", "https://[::1/v.mp4"],
    )
    async def test_an_invalid_video_url_is_a_malformed_answer(
        self, launch: Launcher, sim: simulator.SimulatorThread, bad_url: str
    ) -> None:
        tid = "video_bad_url"
        sim.simulator.add_task(tid, ready_seconds=0, size=SMALL)
        body = json.dumps({"id": tid, "status": "completed", "video_url": bad_url})
        sim.simulator.add_fault(tid, body=body, times=2)
        async with launch() as d:
            insert(d.rows, tid)
            await d.until_state(tid, "archived")
            assert len(d.events("malformed_answer", tid)) == 2
            no_crashes(d)
        assert_archived_intact(d, tid, SMALL)


# --- 10. a download has a deadline as a whole ---------------------------------------------------


class TestDownloadDeadline:
    """A trickling host is cut off at SEEDANCE_MAX_DOWNLOAD_SECONDS and the video is retried."""

    async def test_a_trickle_is_cut_then_the_video_archived(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        tid = "video_trickle"
        size = 256 * 1024
        sim.simulator.add_task(tid, ready_seconds=0.5, size=size)
        sim.simulator.add_fault(tid, on="download", throttle=size / 30)  # 30 s: far too slow
        async with launch(max_download_seconds=1.5, request_timeout_seconds=20) as d:
            insert(d.rows, tid)
            await d.until_state(tid, "archived", 40)
            failures = d.events("video_download_failed", tid)
            no_crashes(d)
        assert len(failures) == 1
        assert "did not finish within" in failures[0]["error"]
        assert sim.simulator.stats.downloads_started[tid] == 2
        assert sim.simulator.stats.downloads_completed[tid] == 1
        assert_archived_intact(d, tid, size)


# --- 12. a wrong key is found before a task needs it ------------------------------------------------


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


# --- 13. health tells the truth --------------------------------------------------------------------


class TestHealth:
    """Crashing ticks turn /healthz 503 and starve the systemd watchdog; recovery restores both."""

    async def test_crashed_ticks_are_unhealthy(
        self,
        launch: Launcher,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        notify_path = tmp_path / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # pings every 0.5 s
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

        def drain() -> list[str]:
            got = []
            while True:
                try:
                    got.append(notify.recv(4096).decode())
                except BlockingIOError:
                    return got

        port = free_port()
        try:
            async with launch(http_port=port) as d:
                await d.until(lambda: "WATCHDOG=1" in drain(), "a watchdog ping")
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
                drain()
                crashed = d.svc.tick_failures
                # Many more crashed ticks, spanning several watchdog intervals: no ping at all.
                await d.until(lambda: d.svc.tick_failures >= crashed + 30, "more crashes")
                assert "WATCHDOG=1" not in drain()
                failures = d.svc.metrics.registry.get_sample_value("seedance_tick_failures_total")
                assert failures is not None and failures >= crashed + 30

                broken[0] = False  # the bug is fixed
                await d.until(lambda: d.svc.healthy, "ticks to complete again")
                assert (await http_get(port, "/healthz"))[0] == 200
                await d.until(lambda: "WATCHDOG=1" in drain(), "the watchdog to be fed again")
        finally:
            notify.close()
        assert d.events("tick_crashed")


# --- 1. the whole daemon on a store that refuses every optional call --------------------------------


class TestPlainStore:
    """How videos were once lost, replayed: PostgreSQL, 25 finished videos, a store answering 501 to
    every optional S3 call (listing uploads, tags, checksum headers, HeadBucket)."""

    @pytest.mark.postgres
    async def test_every_video_is_archived(
        self,
        pg_url: str,
        sim: simulator.SimulatorThread,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
        s3_endpoint: str,
        s3_client: Any,
        s3_bucket: str,
    ) -> None:
        from tests.integration import s3proxy

        ids = [f"video_plain_{n:02d}" for n in range(25)]
        big = {ids[0], ids[1]}  # two multipart uploads among them
        sizes = {tid: s3.PART_BYTES + MIB if tid in big else SMALL for tid in ids}
        for tid in ids:
            sim.simulator.add_task(tid, ready_seconds=0.5, size=sizes[tid])
        with s3proxy.S3Proxy(s3_endpoint) as store:
            for call in OPTIONAL_CALLS:
                store.refuse(call)
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", store.url)
            launch = Launcher(sim, pg_url, tmp_path, monkeypatch)
            async with launch(archive_url=f"s3://{s3_bucket}/{S3_PREFIX}") as d:
                for tid in ids:
                    insert(d.rows, tid)
                for tid in ids:
                    await d.until_state(tid, "archived", 60)
                no_crashes(d)
                refused = {e["call"] for e in d.events("storage_feature_refused")}
        assert refused >= {"ListMultipartUploads", "HeadBucket"}, refused
        # Each refusal was logged once, not once per video.
        assert len(d.events("storage_feature_refused")) == len(refused)
        for tid in ids:
            row = d.row(tid)
            assert row.archive_sha256 == simulator.video_sha256(tid, sizes[tid])
            assert s3_sha256(s3_client, s3_bucket, tid) == row.archive_sha256
