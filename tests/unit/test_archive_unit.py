"""seedance_archiver.archive without a server: which S3 answers are refusals, where blocking I/O runs,
and which store a URL loads."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import botocore.exceptions
import pytest
from seedance_archiver import archive, errors, metrics, service
from seedance_archiver.archive import folder, s3


def client_error(status: int, code: str, message: str = "") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {
                "HTTPStatusCode": status,
                "RequestId": "",
                "HostId": "",
                "HTTPHeaders": {},
                "RetryAttempts": 0,
            },
        },
        "AnyOperation",
    )


class TestRefusal:
    """Refusals (for good) are told apart from failures that may pass."""

    @pytest.mark.parametrize(
        ("status", "code", "reason"),
        [
            (501, "NotImplemented", "NotImplemented 501 not here"),
            (403, "AccessDenied", "AccessDenied 403 not here"),
            (400, "InvalidRequest", "InvalidRequest 400 not here"),
            (400, "InvalidArgument", "InvalidArgument 400 not here"),
            (405, "MethodNotAllowed", "MethodNotAllowed 405 not here"),
            (403, "403", "403 not here"),  # a HEAD: no body, the code is the status
            (500, "NotImplemented", "NotImplemented 500 not here"),
        ],
    )
    def test_refusals(self, status: int, code: str, reason: str) -> None:
        assert s3.refusal(client_error(status, code, "not here")) == reason

    @pytest.mark.parametrize(
        ("status", "code"),
        [
            (503, "SlowDown"),
            (503, "ServiceUnavailable"),
            (500, "InternalError"),
            (502, "502"),
            (400, "RequestTimeout"),
            (403, "RequestTimeTooSkewed"),
            (403, "SignatureDoesNotMatch"),
            (400, "ExpiredToken"),
            (404, "NoSuchKey"),
        ],
    )
    def test_failures_that_may_pass(self, status: int, code: str) -> None:
        assert s3.refusal(client_error(status, code)) is None


class Recording(concurrent.futures.ThreadPoolExecutor):
    """An executor that records the names of the calls it runs."""

    def __init__(self) -> None:
        super().__init__(max_workers=2, thread_name_prefix="recording")
        self.calls: list[str] = []
        self.threads: set[str] = set()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(getattr(getattr(fn, "func", fn), "__name__", "?"))

        def run() -> Any:
            self.threads.add(threading.current_thread().name)
            return fn(*args, **kwargs)

        return super().submit(run)


class FakeS3:
    """The few S3 calls check() and find() make, answering from memory."""

    def __init__(self, head_bucket: botocore.exceptions.ClientError | None = None) -> None:
        self._head_bucket = head_bucket

    def head_bucket(self, **_: Any) -> dict[str, Any]:
        if self._head_bucket is not None:
            raise self._head_bucket
        return {}

    def head_object(self, **_: Any) -> dict[str, Any]:
        raise client_error(404, "404", "Not Found")

    def get_object(self, **_: Any) -> dict[str, Any]:
        raise client_error(404, "NoSuchKey", "The specified key does not exist.")


class TestS3Buffers:
    """A video announced smaller than a part goes up in one PUT from a buffer of its own size."""

    async def test_a_small_video_takes_no_part_sized_buffer(self) -> None:
        size = 1024 * 1024
        sent: list[bytes] = []

        class OnePut(FakeS3):
            def put_object(self, **kwargs: Any) -> dict[str, Any]:
                sent.append(kwargs["Body"].read())
                return {}

        async def pieces() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"v" * (size // 4)

        store = s3.S3Archive("bucket", "videos", OnePut())  # type: ignore[arg-type]
        tracemalloc.start()
        try:
            await store.put("video_x", pieces(), size)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert sent == [b"v" * size]
        # A part's buffer (8 MiB) zero-filled for each video was a seventh of the daemon's CPU on
        # S3 in bench/burst.py.
        assert peak < s3.PART_BYTES // 2

    async def test_a_video_of_unknown_size_still_fills_parts(self) -> None:
        sent: list[int] = []

        class OnePut(FakeS3):
            def put_object(self, **kwargs: Any) -> dict[str, Any]:
                sent.append(len(kwargs["Body"].read()))
                return {}

        async def pieces() -> AsyncIterator[bytes]:
            yield b"v" * 1000

        store = s3.S3Archive("bucket", "videos", OnePut())  # type: ignore[arg-type]
        await store.put("video_x", pieces(), None)
        assert sent == [1000]


class TestExecutor:
    """Archive I/O runs in the executor given, else in the shared bounded archive-io pool."""

    def test_the_default_pool_is_shared_and_bounded(self) -> None:
        pool = archive.default_executor()
        assert pool is archive.default_executor()
        assert isinstance(pool, concurrent.futures.ThreadPoolExecutor)
        assert pool._max_workers == archive.ARCHIVE_IO_THREADS
        assert (
            pool.submit(lambda: threading.current_thread().name).result().startswith("archive-io")
        )

    def test_the_default_pool_holds_every_download_and_room_beside(self) -> None:
        """Each download holds up to PARTS_IN_FLIGHT part uploads and the call feeding them."""
        downloads = service.Service.MAX_DOWNLOADS * (s3.PARTS_IN_FLIGHT + 1)
        assert archive.ARCHIVE_IO_THREADS > downloads
        assert s3.MAX_POOL_CONNECTIONS > archive.ARCHIVE_IO_THREADS

    async def test_file_archive_uses_the_given_executor(self, tmp_path: pathlib.Path) -> None:
        with Recording() as executor:
            store = folder.FileArchive(tmp_path, executor=executor)
            await store.check()
            assert await store.find("video_x") is None  # one stat, on the event loop
            (tmp_path / "video_y.mp4").write_bytes(b"y")
            found = await store.find("video_y")  # read back and hashed in a thread
            assert await store.incomplete() == set()
        assert found is not None and found.sha256 == hashlib.sha256(b"y").hexdigest()
        assert executor.calls == ["_check", "_find", "temp_names"]
        assert all(name.startswith("recording") for name in executor.threads)

    @pytest.mark.parametrize("size", [0, 1, folder.WRITE_BYTES - 1, 2 * folder.WRITE_BYTES + 1])
    async def test_a_folder_writes_in_its_writer_not_in_a_thread(
        self, tmp_path: pathlib.Path, size: int
    ) -> None:
        """Every system call of a write made in the archive's threads let the event loop take the
        GIL and cost two context switches: a folder's videos are written by its writer processes
        (writer.py), and the archive's threads see none of it (bench/burst.py)."""
        body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, size, 200_000):
                yield body[start : start + 200_000]

        with Recording() as executor:
            store = folder.FileArchive(tmp_path, executor=executor)
            stored = await store.put("video_x", pieces(), size, {"task-id": "x"})
        assert executor.calls == []
        assert (tmp_path / "video_x.mp4").read_bytes() == body
        assert stored == archive.Stored(
            (tmp_path / "video_x.mp4").resolve().as_uri(), size, hashlib.sha256(body).hexdigest()
        )
        sidecar = json.loads((tmp_path / "video_x.json").read_text())
        assert sidecar == {"task-id": "x", "bytes": str(size), "sha256": stored.sha256}
        assert list((tmp_path / folder.INCOMING_DIR).iterdir()) == []

    async def test_s3_archive_uses_the_given_executor(self) -> None:
        with Recording() as executor:
            store = s3.S3Archive("bucket", "videos", FakeS3(), executor=executor)  # type: ignore[arg-type]
            await store.check()
            assert await store.find("video_x") is None
        assert executor.calls == ["head_bucket", "head_object"]


class TestCheckFallback:
    """check(): a refused HeadBucket is remembered and replaced by a read of a missing key."""

    async def test_refused_head_bucket(self) -> None:
        m = metrics.Metrics()
        store = s3.S3Archive(
            "bucket",
            "videos",
            FakeS3(client_error(501, "501")),  # type: ignore[arg-type]
            meters=m,
        )
        await store.check()
        await store.check()
        assert set(store.refused) == {s3.HEAD_BUCKET}
        sample = m.registry.get_sample_value(
            "seedance_storage_optional_refusals_total", {"call": s3.HEAD_BUCKET}
        )
        assert sample == 1

    async def test_missing_bucket(self) -> None:
        store = s3.S3Archive("bucket", "videos", FakeS3(client_error(404, "404")))  # type: ignore[arg-type]
        with pytest.raises(errors.ArchiveError, match="not found"):
            await store.check()


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (None, s3.PART_BYTES),
        (0, s3.PART_BYTES),
        (s3.PART_BYTES * s3.MAX_PARTS, s3.PART_BYTES),
        (s3.PART_BYTES * s3.MAX_PARTS + 1, s3.PART_BYTES + 1),
        (100 * 1024**3, -(-100 * 1024**3 // s3.MAX_PARTS)),
    ],
)
def test_parts_are_the_minimum_unless_a_video_would_need_too_many(
    size: int | None, expected: int
) -> None:
    part = s3.part_size(size)
    assert part == expected
    assert size is None or -(-size // part) <= s3.MAX_PARTS


class TestGathered:
    """A download's chunks in batches of at least a size, each marked whether it is the last."""

    @staticmethod
    async def batches(sizes: list[int], size: int) -> list[tuple[list[int], bool]]:
        async def chunks() -> AsyncIterator[bytes]:
            for n in sizes:
                yield b"x" * n

        return [
            ([len(chunk) for chunk in batch], last)
            async for batch, last in archive.gathered(chunks(), size)
        ]

    @pytest.mark.parametrize(
        ("sizes", "expected"),
        [
            ([], [([], True)]),
            ([3], [([3], True)]),
            ([4, 6], [([4, 6], True)]),  # a full batch, known to be the last once chunks end
            ([4, 6, 1], [([4, 6], False), ([1], True)]),
            ([10, 10, 2, 9], [([10], False), ([10], False), ([2, 9], True)]),
        ],
        ids=["no-chunks", "one-short", "full-at-the-end", "one-past", "several"],
    )
    async def test_batches_and_the_last(
        self, sizes: list[int], expected: list[tuple[list[int], bool]]
    ) -> None:
        assert await self.batches(sizes, 10) == expected


class TestPartBody:
    """A part's body is read in place from its buffer, as botocore reads a file: by pieces, with
    rewinds between its passes (SigV4 hash, CRC32, the send)."""

    def test_reads_the_first_bytes_of_the_buffer_in_pieces(self) -> None:
        buffer = bytearray(b"0123456789" + b"\0" * 6)  # a part buffer filled to 10 of 16
        body = s3._PartBody(buffer, 10)
        assert len(body) == 10
        assert [body.read(4), body.read(4), body.read(4), body.read(4)] == [
            b"0123",
            b"4567",
            b"89",
            b"",
        ]
        assert body.tell() == 10

    def test_seeks_as_a_file_does(self) -> None:
        body = s3._PartBody(bytearray(b"abcdefgh"), 8)
        assert body.seek(3) == 3
        assert body.read() == b"defgh"
        assert body.seek(-2, os.SEEK_END) == 6
        assert body.read(None) == b"gh"
        assert body.seek(0) == 0
        assert body.seek(2, os.SEEK_CUR) == 2
        assert body.read(-1) == b"cdefgh"
        assert body.seek(100) == 8  # clamped, as a read past the end gives nothing
        assert body.read(1) == b""

    def test_a_read_copies_so_a_reused_buffer_cannot_change_it(self) -> None:
        buffer = bytearray(b"abcd")
        piece = s3._PartBody(buffer, 4).read(2)
        buffer[:2] = b"zz"
        assert piece == b"ab"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter: what a module imports shows only there."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


class TestRegistry:
    """A URL's scheme picks its store; only the store a URL names is imported."""

    @pytest.mark.parametrize(
        "url", ["s3://bucket", "s3://bucket/some/prefix", "file:///srv/videos", "file://./archive"]
    )
    def test_urls_of_a_store_pass(self, url: str) -> None:
        assert archive.check_url(url) == url

    @pytest.mark.parametrize("url", ["s3:///prefix", "file://", "ftp://host/dir", "/srv/videos"])
    def test_other_urls_name_what_would_do(self, url: str) -> None:
        with pytest.raises(ValueError, match=r"s3://bucket/prefix or file:///directory"):
            archive.check_url(url)

    def test_each_scheme_names_a_store_of_the_archive(self) -> None:
        for name, scheme in archive.SCHEMES.items():
            store = scheme.load()
            assert hasattr(store, "link") and hasattr(store, "from_url"), name

    def test_a_folder_link_is_its_path(self, tmp_path: pathlib.Path) -> None:
        path = tmp_path / "a b" / "video_a.mp4"
        assert archive.link(path.as_uri(), 60) == str(path)

    def test_an_unknown_scheme_has_no_link(self) -> None:
        with pytest.raises(errors.ArchiveError, match="no link for an archive of scheme 'mem'"):
            archive.link("mem://video_a.mp4", 60)

    def test_the_seam_and_a_folder_load_no_boto3(self, tmp_path: pathlib.Path) -> None:
        """The daemon, config's check of an s3:// URL and a file:// archive load no boto3."""
        code = (
            "import sys\n"
            "from seedance_archiver import archive, cli, config, scheduler\n"
            "config.Settings(archive_url='s3://bucket/prefix')\n"
            f"archive.from_url({tmp_path.as_uri()!r})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))\n"
        )
        result = _python(code)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"

    def test_without_boto3_an_s3_url_names_what_to_install(self) -> None:
        code = (
            "import sys\n"
            "sys.modules['boto3'] = None  # an install that trimmed boto3\n"
            "from seedance_archiver import archive, errors\n"
            "try:\n"
            "    archive.from_url('s3://bucket/prefix')\n"
            "except errors.MissingDependencyError as exc:\n"
            "    print(isinstance(exc, errors.ConfigError), exc)\n"
        )
        result = _python(code)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == (
            "True an s3:// archive needs boto3, which is not installed: pip install boto3"
        )
