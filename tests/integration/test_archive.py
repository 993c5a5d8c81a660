"""Each archive store's own ways, against a real folder and moto's S3 server over HTTP: S3's parts,
checksums and bucket checks, the folder's file system errors, each scheme's from_url.

What every store does (commit whole or nothing, find, link, unfinished uploads) is written once in
tests/contract/test_archive_contract.py, over the fake archive, a folder and S3.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pathlib
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import boto3
import botocore.exceptions
import pytest
from seedance_archiver import archive, errors, simulator
from seedance_archiver.archive import folder, s3, writer

from tests.helpers import MIB, expected_sha, free_port, new_id, stream, video, wait_for

SMALL = 100 * 1024
LARGE = 20 * MIB + 12_345  # several parts: two of 8 MiB (PART_BYTES) and a bit
PREFIX = "videos/2026"


@pytest.fixture
def s3_archive(s3_bucket: str) -> s3.S3Archive:
    return s3.S3Archive(s3_bucket, PREFIX)


class TestS3Multipart:
    """S3 alone sends a large video in parts: one object of several parts, or an upload aborted."""

    async def test_a_large_video_is_one_object_of_several_parts(
        self, s3_archive: s3.S3Archive, s3_client: Any, s3_bucket: str
    ) -> None:
        assert s3.PART_BYTES < LARGE
        task_id = new_id()
        stored = await s3_archive.put(task_id, video(task_id, LARGE), LARGE)
        assert (stored.size, stored.sha256) == (LARGE, expected_sha(task_id, LARGE))
        assert stored.uri == f"s3://{s3_bucket}/{PREFIX}/{task_id}.mp4"
        head = s3_client.head_object(Bucket=s3_bucket, Key=s3_archive.key(task_id))
        # A multipart object's ETag is "<md5 of md5s>-<parts>".
        parts = -(-LARGE // s3.PART_BYTES)
        assert parts > 2 and head["ETag"].strip('"').endswith(f"-{parts}")
        assert await s3_archive.find(task_id) == stored

    async def test_a_stream_breaking_after_several_parts_aborts_the_upload(
        self, s3_archive: s3.S3Archive, s3_client: Any, s3_bucket: str
    ) -> None:
        task_id = new_id()
        calls: list[str] = []

        def record(event_name: str, **_: Any) -> None:
            calls.append(event_name.split(".")[-1])

        s3_archive.client.meta.events.register("after-call.s3.*", record)
        broken = stream(
            simulator.video_chunks(task_id, 17 * MIB),
            fail_with=errors.DownloadError("the download broke off"),
        )

        with pytest.raises(errors.DownloadError, match="broke off"):
            await s3_archive.put(task_id, broken, LARGE)

        key = s3_archive.key(task_id)
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            s3_client.head_object(Bucket=s3_bucket, Key=key)
        assert caught.value.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound")
        assert (
            s3_client.list_multipart_uploads(Bucket=s3_bucket, Prefix=key).get("Uploads", []) == []
        )
        # It really was a multipart upload with parts sent, and it was aborted.
        assert calls.count("CreateMultipartUpload") == 1
        # Every whole part of the 17 MiB received went out before the break.
        assert calls.count("UploadPart") == 17 * MIB // s3.PART_BYTES
        assert "AbortMultipartUpload" in calls
        assert "CompleteMultipartUpload" not in calls


class TestS3Specifics:
    """S3: checksums in metadata or tags, foreign objects, bucket checks, from_url."""

    async def test_small_object_carries_sha256_metadata(
        self, s3_archive: s3.S3Archive, s3_client: Any, s3_bucket: str
    ) -> None:
        task_id = new_id()
        await s3_archive.put(task_id, video(task_id, SMALL), SMALL)
        head = s3_client.head_object(Bucket=s3_bucket, Key=f"{PREFIX}/{task_id}.mp4")
        assert head["ContentLength"] == SMALL
        assert head["Metadata"]["sha256"] == expected_sha(task_id, SMALL)
        assert head["ContentType"] == "video/mp4"

    async def test_multipart_object_carries_sha256_tag(
        self, s3_archive: s3.S3Archive, s3_client: Any, s3_bucket: str
    ) -> None:
        task_id = new_id()
        await s3_archive.put(task_id, video(task_id, LARGE), LARGE)
        tags = s3_client.get_object_tagging(Bucket=s3_bucket, Key=f"{PREFIX}/{task_id}.mp4")
        assert {t["Key"]: t["Value"] for t in tags["TagSet"]} == {
            "sha256": expected_sha(task_id, LARGE)
        }

    async def test_foreign_object_is_not_taken_for_ours(
        self, s3_archive: s3.S3Archive, s3_client: Any, s3_bucket: str
    ) -> None:
        task_id = new_id()
        s3_client.put_object(Bucket=s3_bucket, Key=s3_archive.key(task_id), Body=b"not ours")
        assert await s3_archive.find(task_id) is None

    async def test_check_passes_for_a_real_bucket(self, s3_archive: s3.S3Archive) -> None:
        await s3_archive.check()

    async def test_check_fails_for_a_missing_bucket(self, s3_endpoint: str) -> None:
        missing = s3.S3Archive(f"missing-{uuid.uuid4().hex[:12]}", PREFIX)
        with pytest.raises(errors.ArchiveError):
            await missing.check()

    async def test_put_into_a_missing_bucket_is_an_archive_error(self, s3_endpoint: str) -> None:
        missing = s3.S3Archive(f"missing-{uuid.uuid4().hex[:12]}", PREFIX)
        task_id = new_id()
        with pytest.raises(errors.ArchiveError):
            await missing.put(task_id, video(task_id, SMALL), SMALL)

    async def test_from_url(self, s3_bucket: str, s3_client: Any) -> None:
        store = archive.from_url(f"s3://{s3_bucket}/some/prefix")
        assert isinstance(store, s3.S3Archive)
        await store.check()
        task_id = new_id()
        stored = await store.put(task_id, video(task_id, SMALL), SMALL)
        assert stored.uri == f"s3://{s3_bucket}/some/prefix/{task_id}.mp4"
        head = s3_client.head_object(Bucket=s3_bucket, Key=f"some/prefix/{task_id}.mp4")
        assert head["ContentLength"] == SMALL

    async def test_from_url_without_prefix(self, s3_bucket: str, s3_client: Any) -> None:
        store = archive.from_url(f"s3://{s3_bucket}")
        task_id = new_id()
        stored = await store.put(task_id, video(task_id, SMALL), SMALL)
        assert stored.uri == f"s3://{s3_bucket}/{task_id}.mp4"
        assert s3_client.head_object(Bucket=s3_bucket, Key=f"{task_id}.mp4")["ContentLength"]


class TestFileSpecifics:
    """file://: from_url, and check() on folders that are or are not writable."""

    async def test_from_url(self, tmp_path: pathlib.Path) -> None:
        store = archive.from_url("file://" + str(tmp_path))
        assert isinstance(store, folder.FileArchive)
        await store.check()
        task_id = new_id()
        stored = await store.put(task_id, video(task_id, SMALL), SMALL)
        assert stored.uri == (tmp_path / f"{task_id}.mp4").as_uri()
        assert (tmp_path / f"{task_id}.mp4").stat().st_size == SMALL

    async def test_check_creates_the_folder(self, tmp_path: pathlib.Path) -> None:
        root = tmp_path / "new" / "archive"
        await folder.FileArchive(root).check()
        assert root.is_dir()

    async def test_check_fails_where_no_folder_can_be(self, tmp_path: pathlib.Path) -> None:
        blocker = tmp_path / "a-file"
        blocker.write_bytes(b"")
        with pytest.raises(errors.ArchiveError):
            await folder.FileArchive(blocker / "archive").check()

    def test_unknown_scheme_is_a_config_error(self) -> None:
        with pytest.raises(errors.ConfigError):
            archive.from_url("ftp://host/dir")


# A path component longer than any filesystem allows (NAME_MAX is 255): every call on it fails.
TOO_LONG_NAME = "x" * 300


class TestFileErrors:
    """file://: a real OSError (full disk, I/O error, impossible path) is an ArchiveError, never bare."""

    async def test_put_where_no_folder_can_be(self, tmp_path: pathlib.Path) -> None:
        blocker = tmp_path / "a-file"
        blocker.write_bytes(b"")
        store = folder.FileArchive(blocker / "archive")
        task_id = new_id()
        with pytest.raises(errors.ArchiveError, match="archive folder write failed: Not a dir"):
            await store.put(task_id, video(task_id, SMALL), SMALL)

    async def test_put_on_a_full_disk(
        self, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The writer's file may grow to 1,000 bytes only (RLIMIT_FSIZE, as a quota would): the
        kernel then fails its write, as on a full disk. It says why; nothing is left."""
        root = tmp_path / "archive"
        task_id = new_id()
        monkeypatch.setattr(folder, "_writer_command", _limited_to(1000))
        store = folder.FileArchive(root)

        with pytest.raises(errors.ArchiveError, match="write failed: File too large") as caught:
            await store.put(task_id, video(task_id, SMALL), SMALL)

        assert isinstance(caught.value.__cause__, OSError)
        assert not (root / f"{task_id}.mp4").exists()
        assert list((root / folder.INCOMING_DIR).iterdir()) == []

    async def test_find_meets_an_io_error(self, tmp_path: pathlib.Path) -> None:
        """Reading /proc/self/mem from offset 0 fails with EIO: a disk going bad looks like this."""
        task_id = new_id()
        (tmp_path / f"{task_id}.mp4").symlink_to("/proc/self/mem")
        with pytest.raises(errors.ArchiveError, match="archive folder read failed: Input/output"):
            await folder.FileArchive(tmp_path).find(task_id)

    async def test_discard_meets_a_folder_named_like_a_temporary_file(
        self, tmp_path: pathlib.Path
    ) -> None:
        task_id = new_id()
        (tmp_path / folder.INCOMING_DIR / f"{task_id}.{uuid.uuid4().hex}.part").mkdir(parents=True)
        with pytest.raises(errors.ArchiveError, match="archive folder cleanup failed: Is a dir"):
            await folder.FileArchive(tmp_path).discard_incomplete(task_id)

    @pytest.mark.parametrize("call", ["find", "put", "check", "incomplete", "discard_incomplete"])
    async def test_every_call_on_an_impossible_path(
        self, call: str, tmp_path: pathlib.Path
    ) -> None:
        store = folder.FileArchive(tmp_path / TOO_LONG_NAME)
        task_id = new_id()
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "find": lambda: store.find(task_id),
            "put": lambda: store.put(task_id, video(task_id, SMALL), SMALL),
            "check": store.check,
            "incomplete": store.incomplete,
            "discard_incomplete": lambda: store.discard_incomplete(task_id),
        }
        with pytest.raises(errors.ArchiveError, match="File name too long") as caught:
            await calls[call]()
        assert isinstance(caught.value.__cause__, OSError)


def _limited_to(size: int) -> Callable[[int], list[str]]:
    """A writer's command whose files may grow to ``size`` bytes only (RLIMIT_FSIZE)."""
    script = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size}, {size})); "
        f"runpy.run_path({str(writer.__file__)!r}, run_name='__main__')"
    )
    return lambda *fds: [sys.executable, "-I", "-c", script, *map(str, fds)]


def _writers_running() -> list[int]:
    """The writer processes this test process started, alive (zombies are not).

    Found by each process's parent in ``/proc/*/stat``: ``/proc/PID/task/*/children``, read
    while another child exits, can leave a live one out (the kernel's documentation says it is
    reliable only with the children stopped), and a writer started that moment went unseen."""
    me = str(os.getpid())
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            command = (entry / "cmdline").read_bytes() if parent == me else b""
        except OSError:
            continue
        if b"writer.py" in command and state != "Z":
            pids.append(int(entry.name))
    return pids


def _dead(pid: int) -> bool:
    """The process has exited (a zombie, or reaped already)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


class TestFileWriters:
    """file://: each video is written by a writer process (archive/writer.py), kept for the next
    videos; one that dies or is given up costs that video only, and a stop signal is not its."""

    async def test_one_writer_serves_videos_one_after_another(self, tmp_path: pathlib.Path) -> None:
        store = folder.FileArchive(tmp_path)
        started = set(_writers_running())
        for _ in range(3):
            task_id = new_id()
            await store.put(task_id, video(task_id, SMALL), SMALL)
        assert len(set(_writers_running()) - started) == 1

    async def test_as_many_writers_as_videos_at_once_and_so_many_kept(
        self, tmp_path: pathlib.Path
    ) -> None:
        store = folder.FileArchive(tmp_path)
        started = set(_writers_running())
        many = folder.IDLE_WRITERS + 2
        ids = [new_id() for _ in range(many)]
        stored = await asyncio.gather(*(store.put(t, video(t, SMALL), SMALL) for t in ids))
        assert [s.sha256 for s in stored] == [expected_sha(t, SMALL) for t in ids]
        # The two not kept see their socket closed, and exit.
        wait_for(
            lambda: len(set(_writers_running()) - started) == folder.IDLE_WRITERS,
            what="the writers beyond IDLE_WRITERS to exit",
        )

    async def test_a_writer_killed_mid_video_fails_that_video_only(
        self, tmp_path: pathlib.Path
    ) -> None:
        store = folder.FileArchive(tmp_path)
        task_id = new_id()
        before = set(_writers_running())

        async def killed_after_a_batch() -> AsyncIterator[bytes]:
            yield b"v" * folder.WRITE_BYTES  # one batch, sent on
            yield b"v"
            (pid,) = set(_writers_running()) - before
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: _dead(pid), what="the writer to die")
            for _ in range(4):
                yield b"v" * folder.WRITE_BYTES

        with pytest.raises(errors.ArchiveError, match=r"writer stopped \(exit status -9\)"):
            await store.put(task_id, killed_after_a_batch(), None)
        assert not (tmp_path / f"{task_id}.mp4").exists()
        # The next attempt, in a new writer, takes the dead one's temporary file away.
        stored = await store.put(task_id, video(task_id, SMALL), SMALL)
        assert stored.sha256 == expected_sha(task_id, SMALL)
        assert await store.incomplete() == set()

    async def test_a_writer_killed_between_videos_is_replaced(self, tmp_path: pathlib.Path) -> None:
        store = folder.FileArchive(tmp_path)
        before = set(_writers_running())
        first = new_id()
        await store.put(first, video(first, SMALL), SMALL)
        (pid,) = set(_writers_running()) - before
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _dead(pid), what="the writer to die")
        second = new_id()
        stored = await store.put(second, video(second, SMALL), SMALL)
        assert stored.sha256 == expected_sha(second, SMALL)

    async def test_a_stop_signal_as_a_writer_starts_is_not_its_either(
        self, tmp_path: pathlib.Path
    ) -> None:
        """A stop can reach a writer before its Python has started (milliseconds after the
        daemon's fork): it is born with SIGTERM and SIGINT blocked, and takes them again only once
        it ignores them. The signals go the moment its first video starts, long before that."""
        store = folder.FileArchive(tmp_path)
        task_id = new_id()
        before = set(_writers_running())

        async def signalled_at_start() -> AsyncIterator[bytes]:
            (pid,) = set(_writers_running()) - before
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
            async for chunk in video(task_id, SMALL):
                yield chunk

        stored = await store.put(task_id, signalled_at_start(), SMALL)
        assert stored.sha256 == expected_sha(task_id, SMALL)

    async def test_a_stop_signal_to_a_writer_lets_its_video_finish(
        self, tmp_path: pathlib.Path
    ) -> None:
        """systemd signals every process of the service at a stop, and a terminal's Ctrl-C the
        whole group: the daemon's grace period, not the signal, decides what a writer finishes."""
        store = folder.FileArchive(tmp_path)
        task_id = new_id()
        before = set(_writers_running())
        body = b"v" * (3 * folder.WRITE_BYTES)

        async def signalled_mid_video() -> AsyncIterator[bytes]:
            yield body[: folder.WRITE_BYTES]
            yield body[folder.WRITE_BYTES : folder.WRITE_BYTES + 1]
            # The first batch is written: the writer is past its start, in the video.
            wait_for(lambda: list((tmp_path / folder.INCOMING_DIR).glob("*.part")))
            (pid,) = set(_writers_running()) - before
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
            yield body[folder.WRITE_BYTES + 1 :]

        stored = await store.put(task_id, signalled_mid_video(), len(body))
        assert stored.sha256 == hashlib.sha256(body).hexdigest()
        assert (tmp_path / f"{task_id}.mp4").read_bytes() == body


class TestFileWritersMemory:
    """Where the system has memfd_create, a video's bytes reach its writer through memory they
    share (a ring of folder.SHARED_BYTES), else through the socket: either way, whole."""

    @pytest.fixture(params=["shared memory", "socket"])
    def store(
        self,
        request: pytest.FixtureRequest,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> folder.FileArchive:
        if request.param == "socket":

            @contextlib.contextmanager
            def no_memory() -> Iterator[None]:
                yield None

            monkeypatch.setattr(folder, "_shared_memory", no_memory)
        return folder.FileArchive(tmp_path)

    async def test_a_video_longer_than_the_ring_is_written_whole(
        self, store: folder.FileArchive
    ) -> None:
        """Three rings and a bit, in pieces that do not divide it: the daemon waits for the writer
        to say it wrote a half before it copies over it, and splits pieces at the ring's end."""
        body = os.urandom(3 * folder.SHARED_BYTES + 12_345)
        task_id = new_id()

        async def pieces() -> AsyncIterator[bytes]:
            for at in range(0, len(body), 300_001):
                yield body[at : at + 300_001]

        stored = await store.put(task_id, pieces(), len(body))
        assert stored.sha256 == hashlib.sha256(body).hexdigest()
        assert (store.root / f"{task_id}.mp4").read_bytes() == body

    @pytest.mark.parametrize(
        "size",
        [0, 1, folder.WRITE_BYTES, folder.WRITE_BYTES + 1, 2 * folder.WRITE_BYTES + 5],
        ids=["empty", "one-byte", "one-batch", "past-one-batch", "past-two-batches"],
    )
    async def test_a_video_at_a_batch_s_edges_is_written_whole(
        self, store: folder.FileArchive, size: int
    ) -> None:
        """The job goes to the writer with the first batch and the end mark with the last: a video
        with no bytes, one that ends on a batch's edge (its end mark goes alone) and one a byte
        past it are each written whole, and the writer takes the next video as it should."""
        started = set(_writers_running())
        for body in (os.urandom(size), b"next"):
            task_id = new_id()

            async def pieces(body: bytes = body) -> AsyncIterator[bytes]:
                for at in range(0, len(body), 256 * 1024):
                    yield body[at : at + 256 * 1024]

            stored = await store.put(task_id, pieces(), len(body))
            assert (stored.size, stored.sha256) == (len(body), hashlib.sha256(body).hexdigest())
            assert (store.root / f"{task_id}.mp4").read_bytes() == body
            if body != b"next":
                first_writer = set(_writers_running()) - started
        assert len(first_writer) == 1
        assert set(_writers_running()) - started == first_writer  # the same one, still running

    async def test_videos_one_after_another_each_start_at_the_ring_s_beginning(
        self, store: folder.FileArchive
    ) -> None:
        bodies = [
            os.urandom(size) for size in (folder.SHARED_BYTES - 1, 3, folder.SHARED_BYTES + 7)
        ]
        for body in bodies:
            task_id = new_id()

            async def once(body: bytes = body) -> AsyncIterator[bytes]:
                yield body

            stored = await store.put(task_id, once(), len(body))
            assert (store.root / f"{task_id}.mp4").read_bytes() == body
            assert stored.size == len(body)


class TestS3SaysWhy:
    """S3 that cannot be asked: the cause and the endpoint named, never a bare exception name."""

    @pytest.fixture
    def no_aws(self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> str:
        """No credentials anywhere boto3 looks (and no instance metadata to ask): the endpoint a
        closed loopback port, so nothing leaves the machine."""
        for name in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
        ):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        endpoint = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        # boto3's default session keeps the credentials it found first: a new one looks again.
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
        return endpoint

    async def test_no_credentials(self, no_aws: str) -> None:
        with pytest.raises(errors.ArchiveError) as caught:
            await s3.S3Archive("videos", "v").check()
        assert str(caught.value).startswith("no AWS credentials found: set AWS_ACCESS_KEY_ID")

    async def test_an_endpoint_that_cannot_be_reached(
        self, no_aws: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
        with pytest.raises(errors.ArchiveError) as caught:
            await s3.S3Archive("videos", "v").check()
        assert str(caught.value) == (
            f"cannot reach the S3 endpoint {no_aws} (set AWS_ENDPOINT_URL_S3 for another)"
        )
        assert "test-secret-key" not in str(caught.value)
