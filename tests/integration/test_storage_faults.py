"""A store that fails, refuses, stalls or cannot be written costs time, never a video or a partial object.

The real daemon runs in-process on loopback; moto's S3 sits behind a fault proxy (refusing, answering
503, stalling, cutting), or behind a proxy that refuses every optional S3 call, or the archive folder
cannot be created. (S3 stores under a least-privilege policy are tested in ``test_s3_compat.py``.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
import time
import urllib.parse
from typing import Any

import botocore.exceptions
import pytest
from seedance_archiver import service, simulator, utils
from seedance_archiver.archive import s3

from tests.helpers import (
    DOWNLOAD_RETRY_SECONDS,
    MIB,
    OPTIONAL_CALLS,
    S3_PREFIX,
    SMALL,
    STALL_SECONDS,
    Launcher,
    assert_archived_intact,
    feed,
    insert,
    no_crashes,
    s3_key,
    s3_sha256,
    s3_uploads,
)
from tests.integration.faultproxy import FaultProxy

SERVICE_UNAVAILABLE = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def s3_missing(client: Any, bucket: str, task_id: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=s3_key(task_id))
    except botocore.exceptions.ClientError as exc:
        return exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound")
    return False


class TestS3Faults:
    """S3 failing, refusing or crawling costs time, never the video or a partial object."""

    @pytest.mark.parametrize("failure", ["refused", "503"])
    async def test_failing_s3_keeps_the_task_downloading_until_it_recovers(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        s3_proxy: FaultProxy,
        s3_client: Any,
        s3_bucket: str,
        failure: str,
    ) -> None:
        """The row waits in `downloading` with backoff and the cause; S3 back: archived once."""
        tid = "video_s3_down"
        sim.simulator.add_task(tid, ready_seconds=1.0, size=SMALL)
        async with launch(archive_url=f"s3://{s3_bucket}/{S3_PREFIX}") as d:
            if failure == "refused":
                s3_proxy.refuse()
            else:
                s3_proxy.answer(503, "Service Unavailable", SERVICE_UNAVAILABLE)
            insert(d.rows, tid)
            await d.until(lambda: d.row(tid).attempts >= 1, "a failed upload", 40)
            row = d.row(tid)
            assert s3_missing(s3_client, s3_bucket, tid)
            s3_proxy.forward()
            final = await d.until_state(tid, "archived", 40)
        assert row.state == "downloading"
        assert "S3" in (row.error or ""), row.error
        assert row.next_attempt_at is not None and row.updated_at is not None
        wait = (row.next_attempt_at - row.updated_at).total_seconds()
        assert wait >= DOWNLOAD_RETRY_SECONDS - 0.01
        expected = simulator.video_sha256(tid, SMALL)
        assert final.archive_uri == f"s3://{s3_bucket}/{s3_key(tid)}"
        assert final.archive_sha256 == expected == s3_sha256(s3_client, s3_bucket, tid)
        assert sim.simulator.stats.downloads_completed[tid] >= 1
        assert s3_uploads(s3_client, s3_bucket) == []

    async def test_slow_s3_only_delays_the_archive(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        s3_proxy: FaultProxy,
        s3_client: Any,
        s3_bucket: str,
    ) -> None:
        """S3 holding every byte for seconds: the task waits, is not failed, and is archived after."""
        tid = "video_s3_slow"
        stall = 3.0
        sim.simulator.add_task(tid, created=time.time() - 60, ready_seconds=1, size=SMALL)
        async with launch(archive_url=f"s3://{s3_bucket}/{S3_PREFIX}") as d:
            stalled_at = time.time()
            s3_proxy.stall(stall)
            insert(d.rows, tid)
            final = await d.until_state(tid, "archived", 30)
        assert final.polls == 1  # one poll, then it simply waited for S3
        assert final.archived_at is not None
        assert final.archived_at.timestamp() >= stalled_at + stall - 0.2
        assert final.archive_sha256 == s3_sha256(s3_client, s3_bucket, tid)
        assert final.archive_sha256 == simulator.video_sha256(tid, SMALL)
        assert d.svc.stats.download_failures == 0

    async def test_upload_cut_mid_multipart_leaves_nothing_behind(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        s3_proxy: FaultProxy,
        s3_client: Any,
        s3_bucket: str,
    ) -> None:
        """S3 gone in the middle of part 2: no object appears; the open upload is cleared, then
        the video is archived whole."""
        tid = "video_multipart"
        size = s3.PART_BYTES + 2 * MIB
        sim.simulator.add_task(tid, created=time.time() - 60, ready_seconds=1, size=size)
        async with launch(archive_url=f"s3://{s3_bucket}/{S3_PREFIX}") as d:
            s3_proxy.cut_after(s3.PART_BYTES + MIB)  # part 1 went through; part 2 breaks
            insert(d.rows, tid)
            await d.until(lambda: s3_proxy.cut_fired, "the cut", 30)
            await d.until(lambda: d.row(tid).attempts >= 1, "the failed upload", 40)
            row = d.row(tid)
            # The abort could not reach S3 either: the interrupted upload is still open, yet no
            # partial object is visible under the final key.
            open_uploads = s3_uploads(s3_client, s3_bucket, S3_PREFIX)
            assert s3_missing(s3_client, s3_bucket, tid)
            s3_proxy.forward()
            final = await d.until_state(tid, "archived", 40)
        assert row.state == "downloading" and "S3" in (row.error or "")
        assert open_uploads == [s3_key(tid)]
        assert s3_uploads(s3_client, s3_bucket) == []
        head = s3_client.head_object(Bucket=s3_bucket, Key=s3_key(tid))
        assert head["ContentLength"] == size
        expected = simulator.video_sha256(tid, size)
        assert final.archive_sha256 == expected == s3_sha256(s3_client, s3_bucket, tid)
        assert final.archive_bytes == size

    async def test_stale_uploads_are_aborted_at_start(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        s3_client: Any,
        s3_bucket: str,
    ) -> None:
        """Housekeeping at start aborts our prefix's uploads nobody leases, and nothing else."""
        created = {
            name: s3_client.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
            for name, key in {
                "stale": s3_key("video_stale"),  # a row nobody leases
                "orphan": s3_key("video_orphan"),  # no row at all
                "leased": s3_key("video_leased"),  # another replica is uploading it now
                "foreign": "elsewhere/video_stale.mp4",  # not under our prefix
            }.items()
        }
        assert len(created) == 4
        later = utils.utcnow() + dt.timedelta(hours=1)
        feed(
            launch.db_url,
            {"task_id": "video_stale", "state": "downloading", "next_attempt_at": later},
            {
                "task_id": "video_leased",
                "state": "downloading",
                "next_attempt_at": later,
                "lease_owner": "replica-b",
                "lease_expires_at": later,
            },
        )
        async with launch(archive_url=f"s3://{s3_bucket}/{S3_PREFIX}") as d:
            await d.until(lambda: d.events("stale_uploads_removed"), "housekeeping")
            removed = d.events("stale_uploads_removed")[0]["count"]
        assert removed == 2
        assert sorted(s3_uploads(s3_client, s3_bucket)) == [
            "elsewhere/video_stale.mp4",
            s3_key("video_leased"),
        ]
        assert s3_missing(s3_client, s3_bucket, "video_stale")


class TestUnwritableFolder:
    """A folder that cannot be written is a retried storage error, never a crash."""

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
