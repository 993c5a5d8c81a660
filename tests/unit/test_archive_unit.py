"""seedance_archiver.archive without a server: which S3 answers are refusals, and where blocking I/O runs."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import threading
from typing import Any

import botocore.exceptions
import pytest
from seedance_archiver import archive, errors, metrics


def client_error(status: int, code: str, message: str = "") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
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
        assert archive.refusal(client_error(status, code, "not here")) == reason

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
        assert archive.refusal(client_error(status, code)) is None


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

    async def test_file_archive_uses_the_given_executor(self, tmp_path: pathlib.Path) -> None:
        with Recording() as executor:
            store = archive.FileArchive(tmp_path, executor=executor)
            await store.check()
            assert await store.find("video_x") is None
            assert await store.incomplete() == set()
        assert executor.calls == ["_check", "_find", "_temp_files"]
        assert all(name.startswith("recording") for name in executor.threads)

    async def test_s3_archive_uses_the_given_executor(self) -> None:
        with Recording() as executor:
            store = archive.S3Archive("bucket", "videos", FakeS3(), executor=executor)  # type: ignore[arg-type]
            await store.check()
            assert await store.find("video_x") is None
        assert executor.calls == ["head_bucket", "head_object"]


class TestCheckFallback:
    """check(): a refused HeadBucket is remembered and replaced by a read of a missing key."""

    async def test_refused_head_bucket(self) -> None:
        m = metrics.Metrics()
        store = archive.S3Archive(
            "bucket",
            "videos",
            FakeS3(client_error(501, "501")),
            meters=m,  # type: ignore[arg-type]
        )
        await store.check()
        await store.check()
        assert set(store.refused) == {archive.HEAD_BUCKET}
        sample = m.registry.get_sample_value(
            "seedance_storage_optional_refusals_total", {"call": archive.HEAD_BUCKET}
        )
        assert sample == 1

    async def test_missing_bucket(self) -> None:
        store = archive.S3Archive("bucket", "videos", FakeS3(client_error(404, "404")))  # type: ignore[arg-type]
        with pytest.raises(errors.ArchiveError, match="not found"):
            await store.check()


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (None, archive.PART_BYTES),
        (0, archive.PART_BYTES),
        (archive.PART_BYTES * archive.MAX_PARTS, archive.PART_BYTES),
        (archive.PART_BYTES * archive.MAX_PARTS + 1, archive.PART_BYTES + 1),
        (100 * 1024**3, -(-100 * 1024**3 // archive.MAX_PARTS)),
    ],
)
def test_parts_are_the_minimum_unless_a_video_would_need_too_many(
    size: int | None, expected: int
) -> None:
    part = archive.part_size(size)
    assert part == expected
    assert size is None or -(-size // part) <= archive.MAX_PARTS


class TestPartBody:
    """A part's body is read in place from its buffer, as botocore reads a file: by pieces, with
    rewinds between its passes (SigV4 hash, CRC32, the send)."""

    def test_reads_the_first_bytes_of_the_buffer_in_pieces(self) -> None:
        buffer = bytearray(b"0123456789" + b"\0" * 6)  # a part buffer filled to 10 of 16
        body = archive._PartBody(buffer, 10)
        assert len(body) == 10
        assert [body.read(4), body.read(4), body.read(4), body.read(4)] == [
            b"0123",
            b"4567",
            b"89",
            b"",
        ]
        assert body.tell() == 10

    def test_seeks_as_a_file_does(self) -> None:
        body = archive._PartBody(bytearray(b"abcdefgh"), 8)
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
        piece = archive._PartBody(buffer, 4).read(2)
        buffer[:2] = b"zz"
        assert piece == b"ab"
