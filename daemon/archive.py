"""Archive storage: stream a video in, verify it, and commit it under ``{prefix}/{task_id}.mp4``.

Two backends: ``file://`` (write a temporary file, fsync, atomic rename) and ``s3://`` (one PUT below a
part's size, else a multipart upload that is completed only when every byte arrived, aborted otherwise).
Either way a partial object never appears under the final key. Only this module imports boto3.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
import pathlib
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import boto3
import botocore.config
import botocore.exceptions
import structlog

from daemon import errors

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

# S3's minimum part is 5 MiB; 8 MiB keeps memory flat and requests few.
PART_BYTES = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 2  # parts uploading at once while the download goes on (bench/README.md)
HASH_READ_BYTES = 1024 * 1024
INCOMING_DIR = ".incoming"


@dataclasses.dataclass(frozen=True)
class Stored:
    """A committed video: where it is, its size and its SHA-256 (hex)."""

    uri: str
    size: int
    sha256: str


class Archive(Protocol):
    """What the service needs from archive storage."""

    async def find(self, task_id: str) -> Stored | None:
        """The committed video of ``task_id``, if one is already stored (archived before a crash)."""
        ...

    async def put(
        self, task_id: str, chunks: AsyncIterator[bytes], expected_size: int | None
    ) -> Stored:
        """Stream ``chunks`` in and commit them, or raise and leave nothing under the final key."""
        ...

    async def check(self) -> None:
        """Raise ArchiveError unless the storage is reachable and writable."""
        ...

    async def incomplete(self) -> set[str]:
        """Task ids with an unfinished upload (temp file, open multipart upload) under our prefix."""
        ...

    async def discard_incomplete(
        self, task_id: str, started_before: dt.datetime | None = None
    ) -> int:
        """Remove ``task_id``'s unfinished uploads (only those begun before ``started_before``)."""
        ...


def from_url(url: str) -> Archive:
    """The backend for SEEDANCE_ARCHIVE_URL (``s3://bucket/prefix`` or ``file:///dir``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "s3":
        return S3Archive(parts.netloc, parts.path.strip("/"))
    if parts.scheme == "file":
        return FileArchive(pathlib.Path(parts.netloc + parts.path))
    raise errors.ConfigError("invalid setting SEEDANCE_ARCHIVE_URL: expected s3:// or file://")


class _Counter:
    """SHA-256 and byte count, computed while the bytes stream past."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.size += len(chunk)

    def verify(self, expected: int | None) -> None:
        if expected is not None and self.size != expected:
            raise errors.DownloadError(
                f"truncated download: got {self.size} bytes, Content-Length said {expected}"
            )


class FileArchive:
    """Videos in a local folder: ``{root}/{task_id}.mp4``."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root

    def _final(self, task_id: str) -> pathlib.Path:
        return self.root / f"{task_id}.mp4"

    async def find(self, task_id: str) -> Stored | None:
        return await asyncio.to_thread(self._find, task_id)

    def _find(self, task_id: str) -> Stored | None:
        path = self._final(task_id)
        if not path.is_file():
            return None
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as fh:
            while chunk := fh.read(HASH_READ_BYTES):
                digest.update(chunk)
                size += len(chunk)
        return Stored(path.resolve().as_uri(), size, digest.hexdigest())

    async def put(
        self, task_id: str, chunks: AsyncIterator[bytes], expected_size: int | None
    ) -> Stored:
        incoming = self.root / INCOMING_DIR
        await asyncio.to_thread(incoming.mkdir, parents=True, exist_ok=True)
        temp = incoming / f"{task_id}.{uuid.uuid4().hex}.part"
        counter = _Counter()
        try:
            fh = await asyncio.to_thread(temp.open, "wb")
            try:
                async for chunk in chunks:
                    counter.add(chunk)
                    await asyncio.to_thread(fh.write, chunk)
                counter.verify(expected_size)
                await asyncio.to_thread(_flush_and_sync, fh)
            finally:
                await asyncio.to_thread(fh.close)
            final = self._final(task_id)
            await asyncio.to_thread(os.replace, temp, final)
            await asyncio.to_thread(_sync_dir, self.root)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        return Stored(final.resolve().as_uri(), counter.size, counter.hash.hexdigest())

    def _temp_files(self) -> list[pathlib.Path]:
        incoming = self.root / INCOMING_DIR
        return list(incoming.glob("*.part")) if incoming.is_dir() else []

    async def incomplete(self) -> set[str]:
        files = await asyncio.to_thread(self._temp_files)
        return {path.name.rsplit(".", 2)[0] for path in files}

    async def discard_incomplete(
        self, task_id: str, started_before: dt.datetime | None = None
    ) -> int:
        return await asyncio.to_thread(self._discard, task_id, started_before)

    def _discard(self, task_id: str, started_before: dt.datetime | None) -> int:
        removed = 0
        for path in self._temp_files():
            if path.name.rsplit(".", 2)[0] != task_id:
                continue
            try:
                if started_before is not None:
                    modified = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
                    if modified >= started_before:
                        continue
                path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    async def check(self) -> None:
        try:
            await asyncio.to_thread(self._check)
        except OSError as exc:
            raise errors.ArchiveError(f"archive folder not writable: {exc.strerror}") from exc

    def _check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / INCOMING_DIR
        probe.mkdir(exist_ok=True)
        if not os.access(probe, os.W_OK):
            raise PermissionError(13, "Permission denied")


def _flush_and_sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _sync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Archive:
    """Videos in an S3 bucket: ``s3://{bucket}/{prefix}/{task_id}.mp4``.

    Endpoint and credentials come from boto3's own chain (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...).
    The SHA-256 is kept in the object's metadata (single PUT) or tags (multipart, where it is known
    only at the end); an object without it is treated as not archived and written again.
    """

    MAX_POOL_CONNECTIONS = 20

    def __init__(self, bucket: str, prefix: str, client: S3Client | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client: S3Client = client or boto3.client(
            "s3",
            config=botocore.config.Config(
                max_pool_connections=self.MAX_POOL_CONNECTIONS,
                retries={"mode": "standard", "max_attempts": 3},
                # Checksums where we ask for them (multipart parts, as the aws CLI sends them),
                # not on every request: some S3-compatible stores reject botocore's defaults.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def key(self, task_id: str) -> str:
        name = f"{task_id}.mp4"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    async def find(self, task_id: str) -> Stored | None:
        key = self.key(task_id)
        try:
            head = await asyncio.to_thread(self.client.head_object, Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise errors.ArchiveError(f"S3 HEAD failed: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(f"S3 unreachable: {type(exc).__name__}") from exc
        sha = head.get("Metadata", {}).get("sha256")
        if not sha:
            try:
                tags = await asyncio.to_thread(
                    self.client.get_object_tagging, Bucket=self.bucket, Key=key
                )
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
                return None
            sha = next((t["Value"] for t in tags.get("TagSet", []) if t["Key"] == "sha256"), None)
        if not sha:
            return None
        return Stored(self._uri(key), int(head["ContentLength"]), sha)

    async def put(
        self, task_id: str, chunks: AsyncIterator[bytes], expected_size: int | None
    ) -> Stored:
        key = self.key(task_id)
        counter = _Counter()
        pending: list[bytes] = []  # the part being filled, as received (joined once when full)
        pending_size = 0
        upload_id: str | None = None
        # Up to PARTS_IN_FLIGHT parts upload while the download goes on; the download waits only
        # when all are busy, so memory stays near PART_BYTES x (PARTS_IN_FLIGHT + 1).
        slots = asyncio.Semaphore(PARTS_IN_FLIGHT)
        uploads: list[asyncio.Task[dict[str, Any]]] = []
        try:
            async for chunk in chunks:
                counter.add(chunk)
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= PART_BYTES:
                    if upload_id is None:
                        created = await self._call(
                            self.client.create_multipart_upload,
                            Bucket=self.bucket,
                            Key=key,
                            ContentType="video/mp4",
                            # As the aws CLI does: each part carries its CRC32, so the store can
                            # check parts as they come instead of re-reading the whole object at
                            # completion (11 s of 18 for 1 GiB on moto; bench/README.md).
                            ChecksumAlgorithm="CRC32",
                        )
                        upload_id = created["UploadId"]
                    await slots.acquire()
                    _raise_failed(uploads)
                    uploads.append(
                        asyncio.create_task(
                            self._upload_part(
                                key, upload_id, len(uploads) + 1, b"".join(pending), slots
                            )
                        )
                    )
                    pending, pending_size = [], 0
            counter.verify(expected_size)
            sha = counter.hash.hexdigest()
            if upload_id is None:
                await self._call(
                    self.client.put_object,
                    Bucket=self.bucket,
                    Key=key,
                    Body=b"".join(pending),
                    ContentType="video/mp4",
                    Metadata={"sha256": sha},
                )
            else:
                if pending:
                    await slots.acquire()
                    uploads.append(
                        asyncio.create_task(
                            self._upload_part(
                                key, upload_id, len(uploads) + 1, b"".join(pending), slots
                            )
                        )
                    )
                parts = [await upload for upload in uploads]
                await self._call(
                    self.client.complete_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
                upload_id = None
                await self._tag_sha256(key, sha)
        except BaseException:
            # Let parts already on the wire finish first (at most PARTS_IN_FLIGHT): S3 may keep a
            # part that was still uploading when the upload was aborted.
            await asyncio.shield(asyncio.gather(*uploads, return_exceptions=True))
            if upload_id is not None:
                await self._abort(key, upload_id)
            raise
        return Stored(self._uri(key), counter.size, sha)

    async def _tag_sha256(self, key: str, sha: str) -> None:
        """Record the SHA-256 of a multipart object as a tag, where the store supports tags.

        The object is complete either way and the database records the hash; without the tag, a
        crash before that database write means one more upload later, nothing worse.
        """
        try:
            await self._call(
                self.client.put_object_tagging,
                Bucket=self.bucket,
                Key=key,
                Tagging={"TagSet": [{"Key": "sha256", "Value": sha}]},
            )
        except errors.ArchiveError as exc:
            log.warning("sha256_tag_not_stored", key=key, error=str(exc))

    async def _upload_part(
        self, key: str, upload_id: str, number: int, data: bytes, slots: asyncio.Semaphore
    ) -> dict[str, Any]:
        try:
            answer = await self._call(
                self.client.upload_part,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ChecksumAlgorithm="CRC32",
            )
        finally:
            slots.release()
        part = {"PartNumber": number, "ETag": answer["ETag"]}
        if answer.get("ChecksumCRC32"):
            part["ChecksumCRC32"] = answer["ChecksumCRC32"]
        return part

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await asyncio.shield(
                asyncio.to_thread(
                    self.client.abort_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                )
            )
        except Exception as exc:
            # Housekeeping removes stale uploads later; the final key was never written.
            log.warning("multipart_abort_failed", key=key, error=str(exc))

    async def _call(self, method: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(method, **kwargs)
        except botocore.exceptions.ClientError as exc:
            raise errors.ArchiveError(f"S3 refused the upload: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(f"S3 unreachable: {type(exc).__name__}") from exc

    async def check(self) -> None:
        await self._call(self.client.head_bucket, Bucket=self.bucket)

    def _task_of(self, key: str) -> str | None:
        head = f"{self.prefix}/" if self.prefix else ""
        if not key.startswith(head) or not key.endswith(".mp4"):
            return None
        name = key[len(head) : -len(".mp4")]
        return name if name and "/" not in name else None

    async def _uploads(self, prefix: str) -> list[dict[str, Any]]:
        uploads: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = await self._call(self.client.list_multipart_uploads, **kwargs)
            uploads.extend(page.get("Uploads", []))
            if not page.get("IsTruncated"):
                return uploads
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker")

    async def incomplete(self) -> set[str]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        found = (self._task_of(u["Key"]) for u in await self._uploads(prefix))
        return {task_id for task_id in found if task_id}

    async def discard_incomplete(
        self, task_id: str, started_before: dt.datetime | None = None
    ) -> int:
        key = self.key(task_id)
        removed = 0
        for upload in await self._uploads(key):
            if upload["Key"] != key:
                continue
            if started_before is not None and upload["Initiated"] >= started_before:
                continue
            try:
                await self._call(
                    self.client.abort_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload["UploadId"],
                )
                removed += 1
            except errors.ArchiveError as exc:
                log.warning("stale_upload_abort_failed", key=key, error=str(exc))
        return removed


def _raise_failed(uploads: list[asyncio.Task[dict[str, Any]]]) -> None:
    """Stop the stream early if a part upload already failed."""
    for upload in uploads:
        if upload.done() and not upload.cancelled() and upload.exception() is not None:
            raise upload.exception()  # type: ignore[misc]


def _s3_reason(exc: botocore.exceptions.ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', '?')} {error.get('Message', '')}".strip()
