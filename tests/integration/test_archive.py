"""Each archive store's own ways, against a real folder and moto's S3 server over HTTP: S3's parts,
checksums and bucket checks, the folder's file system errors, each scheme's from_url.

What every store does (commit whole or nothing, find, link, unfinished uploads) is written once in
tests/contract/test_archive_contract.py, over the fake archive, a folder and S3.
"""

from __future__ import annotations

import os
import pathlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import boto3
import botocore.exceptions
import pytest
from seedance_archiver import archive, errors, simulator
from seedance_archiver.archive import folder, s3

from tests.helpers import MIB, expected_sha, free_port, new_id, stream, video

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
        """/dev/full fails every write with ENOSPC; only the temporary file's open is sent there (a
        symbolic link under its name would be taken for a dead attempt's file, and removed)."""
        root = tmp_path / "archive"
        task_id = new_id()
        (root / folder.INCOMING_DIR).mkdir(parents=True)
        monkeypatch.setattr(folder, "_open_new", lambda path: os.open("/dev/full", os.O_WRONLY))
        store = folder.FileArchive(root)

        with pytest.raises(errors.ArchiveError, match="No space left on device") as caught:
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
