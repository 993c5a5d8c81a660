"""Archive storage: stream a video in, verify it, and commit it under ``{prefix}/{task_id}.mp4``.

Two backends: ``file://`` (write a temporary file, fsync, atomic rename) and ``s3://`` (one PUT below a
part's size, else a multipart upload that is completed only when every byte arrived, aborted otherwise).
Either way a partial object never appears under the final key. Only this module imports boto3.

Every blocking call runs in a bounded executor of its own (not asyncio's default one), so slow storage
never starves the database calls, which have theirs. Every library error (botocore, OSError) becomes
:class:`errors.ArchiveError` here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import os
import pathlib
import threading
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import structlog

from seedance_archiver import errors, metrics, models

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

# The aws CLI's part size. A transfer holds PARTS_IN_FLIGHT + 1 part buffers, reused: 8 MiB parts
# peaked at 133 MiB for 1 GiB and uploaded to radosgw 25% faster than S3's minimum of 5 MiB, which
# costs radosgw more per byte (bench/README.md, issue 14).
PART_BYTES = 8 * 1024 * 1024
MAX_PARTS = 10_000  # S3's most parts per upload: 78 GiB at PART_BYTES


def part_size(expected_size: int | None) -> int:
    """The part size for a video of ``expected_size`` bytes: PART_BYTES, or more where the video
    would otherwise need more than MAX_PARTS parts."""
    if expected_size is None:
        return PART_BYTES
    return max(PART_BYTES, -(-expected_size // MAX_PARTS))


PARTS_IN_FLIGHT = 2  # parts uploading at once while the download goes on (bench/README.md)
HASH_READ_BYTES = 1024 * 1024
INCOMING_DIR = ".incoming"
# Threads for archive I/O when the caller passes no executor. At most service.MAX_DOWNLOADS (4)
# videos stream at once, each holding up to PARTS_IN_FLIGHT (2) part uploads plus the call that
# feeds them (create, complete, a file write): 4 x 3 = 12; four more leave room for find(),
# housekeeping and /readyz's check() while every download is busy.
ARCHIVE_IO_THREADS = 16

_default_executor: concurrent.futures.ThreadPoolExecutor | None = None
_default_executor_lock = threading.Lock()


def default_executor() -> concurrent.futures.Executor:
    """The shared archive I/O pool (ARCHIVE_IO_THREADS threads), created on first use."""
    global _default_executor
    with _default_executor_lock:
        if _default_executor is None:
            _default_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=ARCHIVE_IO_THREADS, thread_name_prefix="archive-io"
            )
        return _default_executor


@dataclasses.dataclass(frozen=True)
class Stored:
    """A committed video: where it is, its size and its SHA-256 (hex)."""

    uri: str
    size: int
    sha256: str


class Archive(Protocol):
    """What the service needs from archive storage."""

    async def find(self, task_id: str, *, read_back: bool = False) -> Stored | None:
        """The committed video of ``task_id``, if one is already stored (archived before a crash).

        An object whose SHA-256 was never recorded (a store that refused the tag) counts only with
        ``read_back``: it is then read back whole to hash it. Every object under a task's key is
        complete (a single PUT and a completed multipart upload are atomic), so this is how a task
        is looked for before it is given up.
        """
        ...

    async def put(
        self,
        task_id: str,
        chunks: AsyncIterator[bytes],
        expected_size: int | None,
        metadata: Mapping[str, str] | None = None,
    ) -> Stored:
        """Stream ``chunks`` in and commit them, or raise and leave nothing under the final key.

        ``metadata`` (ASCII-safe: see :func:`describe`) describes the video: S3 user metadata on the
        object, or a ``{task_id}.json`` sidecar beside a folder's video.
        """
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


def from_url(
    url: str,
    *,
    meters: metrics.Metrics | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> Archive:
    """The backend for SEEDANCE_ARCHIVE_URL (``s3://bucket/prefix`` or ``file:///dir``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "s3":
        return S3Archive(parts.netloc, parts.path.strip("/"), meters=meters, executor=executor)
    if parts.scheme == "file":
        return FileArchive(pathlib.Path(parts.netloc + parts.path), executor=executor)
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


class _PartBody:
    """The first ``size`` bytes of a part's buffer as the file botocore reads a body from.

    botocore hashes (SigV4, CRC32) and sends a file body by ``read(n)``, rewinding with ``seek``
    between passes and before a retry, so the part is read in place, a piece at a time, and never
    copied whole. Joining each part's chunks into a ``bytes`` instead made a new part-sized block
    per part, and the allocator kept the freed ones: peak RSS grew by about twice the bytes in
    flight (bench/README.md).
    """

    def __init__(self, buffer: bytearray, size: int) -> None:
        self._view = memoryview(buffer)[:size]
        self._position = 0

    def __len__(self) -> int:
        return len(self._view)

    def read(self, size: int | None = -1) -> bytes:
        start = self._position
        end = len(self._view) if size is None or size < 0 else min(start + size, len(self._view))
        self._position = end
        return self._view[start:end].tobytes()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: len(self._view)}[whence]
        self._position = min(max(base + offset, 0), len(self._view))
        return self._position

    def tell(self) -> int:
        return self._position


async def _run(
    executor: concurrent.futures.Executor, fn: Callable[..., _T], /, *args: Any, **kwargs: Any
) -> _T:
    """``fn(*args, **kwargs)`` in the archive executor, awaited."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))


# --- file:// -----------------------------------------------------------------------------------


class FileArchive:
    """Videos in a local folder: ``{root}/{task_id}.mp4``.

    Any OSError (a full disk, an I/O error, a path that cannot be a folder) is an ArchiveError that
    names the cause, so the task is retried and the failure counts as "storage".
    """

    def __init__(
        self, root: pathlib.Path, *, executor: concurrent.futures.Executor | None = None
    ) -> None:
        self.root = root
        self._executor = executor or default_executor()

    def _final(self, task_id: str) -> pathlib.Path:
        return self.root / f"{task_id}.mp4"

    async def _io(self, failure: str, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run a blocking file operation; an OSError becomes ``ArchiveError("{failure}: ...")``."""
        try:
            return await _run(self._executor, fn, *args, **kwargs)
        except OSError as exc:
            raise errors.ArchiveError(f"{failure}: {_os_reason(exc)}") from exc

    @staticmethod
    async def _wait(failure: str, work: concurrent.futures.Future[None]) -> None:
        """Await a file operation already submitted; an OSError becomes an ArchiveError."""
        try:
            await asyncio.wrap_future(work)
        except OSError as exc:
            raise errors.ArchiveError(f"{failure}: {_os_reason(exc)}") from exc

    async def find(self, task_id: str, *, read_back: bool = False) -> Stored | None:
        # A file is hashed as it is read: its hash is always known.
        return await self._io("archive folder read failed", self._find, task_id)

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
        self,
        task_id: str,
        chunks: AsyncIterator[bytes],
        expected_size: int | None,
        metadata: Mapping[str, str] | None = None,
    ) -> Stored:
        failure = "archive folder write failed"
        incoming = self.root / INCOMING_DIR
        await self._io(failure, incoming.mkdir, parents=True, exist_ok=True)
        temp = incoming / f"{task_id}.{uuid.uuid4().hex}.part"
        counter = _Counter()
        try:
            fh: BinaryIO = await self._io(failure, _open_binary, temp)
            # A chunk is hashed in one worker thread and written in another, side by side, while
            # the next chunk downloads (all three release the GIL); one chunk in flight keeps
            # memory at two chunks. bench/README.md: 0.37x of `curl -o && sync` with hash, write
            # and download one after another; 0.58x with hash and write in one thread.
            writing: list[concurrent.futures.Future[Any]] = []
            try:
                async for chunk in chunks:
                    for work in writing:
                        await self._wait(failure, work)
                    writing = [
                        self._executor.submit(counter.add, chunk),
                        self._executor.submit(_write, fh, chunk),
                    ]
                for work in writing:
                    await self._wait(failure, work)
                counter.verify(expected_size)
                await self._io(failure, _flush_and_sync, fh)
            except BaseException:
                # Never close the file under a write still running in its thread.
                if writing:
                    await asyncio.wait([asyncio.wrap_future(work) for work in writing])
                # Closing flushes what is buffered: on a full disk that fails again, and must not
                # hide the first error (or a broken download) behind a second one.
                with contextlib.suppress(OSError):
                    await _run(self._executor, fh.close)
                raise
            await self._io(failure, fh.close)
            final = self._final(task_id)
            await self._io(failure, os.replace, temp, final)
            await self._io(failure, _sync_dir, self.root)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        stored = Stored(final.resolve().as_uri(), counter.size, counter.hash.hexdigest())
        if metadata is not None:
            # After the video's commit: a sidecar never describes a video that is not there.
            sidecar = dict(metadata) | {"sha256": stored.sha256, "bytes": str(stored.size)}
            await self._io(failure, self._write_sidecar, task_id, sidecar)
        return stored

    def _write_sidecar(self, task_id: str, sidecar: Mapping[str, str]) -> None:
        """``{task_id}.json`` beside the video, atomically: a temp file, fsync, rename."""
        # Named like the video's temp file ({task_id}.{random}.part), so the same clean-up finds
        # one a kill left behind.
        temp = self.root / INCOMING_DIR / f"{task_id}.{uuid.uuid4().hex}-json.part"
        try:
            with temp.open("w", encoding="utf-8") as fh:
                json.dump(sidecar, fh, indent=2, sort_keys=True)
                _flush_and_sync(fh)
            os.replace(temp, self.root / f"{task_id}.json")
            _sync_dir(self.root)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise

    def _temp_files(self) -> list[pathlib.Path]:
        incoming = self.root / INCOMING_DIR
        return list(incoming.glob("*.part")) if incoming.is_dir() else []

    async def incomplete(self) -> set[str]:
        files = await self._io("archive folder listing failed", self._temp_files)
        return {path.name.rsplit(".", 2)[0] for path in files}

    async def discard_incomplete(
        self, task_id: str, started_before: dt.datetime | None = None
    ) -> int:
        return await self._io(
            "archive folder cleanup failed", self._discard, task_id, started_before
        )

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
        await self._io("archive folder not writable", self._check)

    def _check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / INCOMING_DIR
        probe.mkdir(exist_ok=True)
        if not os.access(probe, os.W_OK):
            raise PermissionError(13, "Permission denied")


# While a video streams to a file, its bytes are handed to the disk every this many bytes
# (posix_fadvise DONTNEED starts their writeback and frees their page cache), so the fsync at the end
# waits for the last few MiB, not for the whole video, and archiving evicts no one's cache.
WRITEBACK_BYTES = 8 * 1024 * 1024


_FADVISE = getattr(os, "posix_fadvise", None)  # not on macOS: there the fsync does it all


def _write(fh: BinaryIO, chunk: bytes) -> None:
    fh.write(chunk)
    end = fh.tell()
    if _FADVISE is not None and end // WRITEBACK_BYTES != (end - len(chunk)) // WRITEBACK_BYTES:
        # A WRITEBACK_BYTES stretch was just completed: hand it to the disk.
        fh.flush()
        start = (end // WRITEBACK_BYTES - 1) * WRITEBACK_BYTES
        _FADVISE(fh.fileno(), start, WRITEBACK_BYTES, os.POSIX_FADV_DONTNEED)


def _open_binary(path: pathlib.Path) -> BinaryIO:
    return path.open("wb")


def _flush_and_sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _sync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason} ({exc.filename})" if exc.filename else reason


# --- s3:// -------------------------------------------------------------------------------------

# The optional S3 calls, by the name they carry in logs and in the storage_refusals metric. The
# critical path (HeadObject, GetObject, PutObject and the four multipart calls) needs none of them.
LIST_UPLOADS = "ListMultipartUploads"
PUT_TAGS = "PutObjectTagging"
GET_TAGS = "GetObjectTagging"
CHECKSUM = "ChecksumCRC32"  # the x-amz-checksum-* headers of CreateMultipartUpload and UploadPart
HEAD_BUCKET = "HeadBucket"

_EFFECTS = {
    LIST_UPLOADS: "stale multipart uploads are not cleaned up (a bucket lifecycle rule can)",
    PUT_TAGS: "multipart objects carry no SHA-256 tag: after a crash before the database write, "
    "such a video is uploaded again",
    GET_TAGS: "stored multipart objects are not recognised: after a crash before the database "
    "write, such a video is uploaded again",
    CHECKSUM: "parts are sent without a CRC32 checksum",
    HEAD_BUCKET: "the storage check reads a missing key instead of asking for the bucket",
}

# Answers that mean "this store, or these credentials, do not offer that call", for good.
REFUSAL_STATUSES = frozenset({400, 403, 405, 501})
REFUSAL_CODES = frozenset(
    {
        "NotImplemented",
        "AccessDenied",
        "InvalidRequest",
        "InvalidArgument",
        "MethodNotAllowed",
        "NotSupported",
        "UnsupportedOperation",
    }
)
# 400 and 403 answers that say nothing about the call itself, only about this moment (a slow
# socket, a skewed clock, credentials being rotated, throttling): never remembered.
PASSING_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "RequestExpired",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidToken",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
    }
)
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# Read by check() when HeadBucket is refused; nothing ever writes it.
CHECK_KEY_NAME = ".seedance-archiver-check"


def refusal(exc: botocore.exceptions.ClientError) -> str | None:
    """Why the store refused an optional call for good ("NotImplemented 501 ..."), or None when
    the failure is transient (5xx other than 501, throttling, a timeout) and worth trying again."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = _status(exc)
    if code in PASSING_CODES:
        return None
    if status in REFUSAL_STATUSES or code in REFUSAL_CODES:
        message = str(exc.response.get("Error", {}).get("Message", "")).strip()
        words = [code, str(status or ""), message]
        return " ".join(dict.fromkeys(word for word in words if word))  # HEAD: "403 Forbidden"
    return None


def _status(exc: botocore.exceptions.ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


# Connections per client: more than ARCHIVE_IO_THREADS, so no archive thread waits for a connection.
MAX_POOL_CONNECTIONS = 20


def describe(task: models.Task) -> dict[str, str]:
    """What an archived video says about itself: S3 user metadata / the folder's sidecar.

    Values are ASCII (S3 user metadata must be): anything else is percent-encoded.
    """
    values = {
        "task-id": task.task_id,
        "model": task.model,
        "actual-duration": None if task.actual_duration is None else f"{task.actual_duration:g}",
        "provider-created": None
        if task.provider_created_at is None
        else task.provider_created_at.isoformat(),
    }
    return {k: urllib.parse.quote(v, safe=" :/+-.,_") for k, v in values.items() if v is not None}


def link(archive_uri: str, expires_seconds: int, client: S3Client | None = None) -> str:
    """A presigned GET URL for an ``s3://`` archive (valid ``expires_seconds``), or a folder
    archive's local path: what the feeding application shows without credentials of its own."""
    parts = urllib.parse.urlsplit(archive_uri)
    if parts.scheme == "file":
        return urllib.parse.unquote(parts.path)
    if parts.scheme != "s3":
        raise errors.ArchiveError(f"no link for an archive of scheme {parts.scheme!r}")
    signer = client or s3_client()
    try:
        return str(
            signer.generate_presigned_url(
                "get_object",
                Params={"Bucket": parts.netloc, "Key": parts.path[1:]},
                ExpiresIn=expires_seconds,
            )
        )
    except botocore.exceptions.BotoCoreError as exc:
        reason = unreachable(exc, signer.meta.endpoint_url)
        raise errors.ArchiveError(f"cannot sign a link: {reason}") from exc
    except botocore.exceptions.ClientError as exc:
        raise errors.ArchiveError(f"cannot sign a link: {_s3_reason(exc)}") from exc


def s3_client(**kwargs: Any) -> S3Client:
    """A boto3 S3 client as the archive needs it; ``kwargs`` go to ``boto3.client`` (an endpoint,
    credentials), the rest comes from boto3's own chain (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID...)."""
    return boto3.client(
        "s3",
        config=botocore.config.Config(
            max_pool_connections=MAX_POOL_CONNECTIONS,
            retries={"mode": "standard", "max_attempts": 3},
            # Checksums where we ask for them (multipart parts, as the aws CLI sends them), not on
            # every request: some S3-compatible stores reject botocore's defaults.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # SigV4 everywhere, presigned links too: R2 and other S3-compatible stores refuse
            # SigV2, which botocore otherwise signs links with for a custom endpoint.
            signature_version="s3v4",
        ),
        **kwargs,
    )


class S3Archive:
    """Videos in an S3 bucket: ``s3://{bucket}/{prefix}/{task_id}.mp4``.

    Endpoint and credentials come from boto3's own chain (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...).
    The SHA-256 is kept in the object's metadata (single PUT) or tags (multipart, where it is known
    only at the end); an object without it is written again while its link works, and read back to
    hash it before a task is given up (``find(read_back=True)``).

    Archiving needs only HeadObject, GetObject, PutObject and the multipart calls. Everything else
    (listing uploads, tags, checksum headers, HeadBucket) is best effort: when the store refuses one
    (501, 403, 405, 400), that is logged once, counted in ``storage_refusals`` and remembered in
    :attr:`refused`, and the call is not sent again by this instance.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        client: S3Client | None = None,
        *,
        meters: metrics.Metrics | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client: S3Client = client or s3_client()
        self.metrics = meters or metrics.Metrics()
        self._executor = executor or default_executor()
        #: The optional calls this store refused, with the reason: never sent again.
        self.refused: dict[str, str] = {}
        self._head_403_seen = False

    def key(self, task_id: str) -> str:
        name = f"{task_id}.mp4"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _unreachable(self, exc: botocore.exceptions.BotoCoreError) -> str:
        return unreachable(exc, self.client.meta.endpoint_url)

    # --- calls -------------------------------------------------------------------------------------

    async def _run(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        return await _run(self._executor, method, **kwargs)

    async def _call(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        """A call on the critical path: any failure is an ArchiveError."""
        try:
            return await self._run(method, **kwargs)
        except botocore.exceptions.ClientError as exc:
            raise errors.ArchiveError(f"S3 refused the upload: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(self._unreachable(exc)) from exc

    async def _optional(
        self, call: str, method: Callable[..., Any], **kwargs: Any
    ) -> dict[str, Any] | None:
        """A best-effort call: its answer, or None when it was refused (now or before) or failed."""
        if call in self.refused:
            return None
        try:
            answer: dict[str, Any] = await self._run(method, **kwargs)
        except botocore.exceptions.ClientError as exc:
            reason = refusal(exc)
            if reason is not None:
                self._refuse(call, reason)
            else:
                log.warning("storage_call_failed", call=call, error=_s3_reason(exc))
            return None
        except botocore.exceptions.BotoCoreError as exc:
            log.warning("storage_call_failed", call=call, error=type(exc).__name__)
            return None
        return answer

    async def _with_checksum(self, call: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        """A critical call with ``ChecksumAlgorithm="CRC32"``, or without it where the store refuses
        the checksum. Only a retry without it that succeeds proves the checksum was the problem."""
        if CHECKSUM in self.refused:
            return await self._call(method, **kwargs)
        try:
            return await self._run(method, ChecksumAlgorithm="CRC32", **kwargs)
        except botocore.exceptions.ClientError as exc:
            reason = refusal(exc)
            if reason is None:
                raise errors.ArchiveError(f"S3 refused the upload: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(self._unreachable(exc)) from exc
        body = kwargs.get("Body")
        if isinstance(body, _PartBody):
            body.seek(0)  # the refused attempt may have read some of it
        answer = await self._call(method, **kwargs)
        self._refuse(CHECKSUM, f"{call}: {reason}")
        return answer

    def _refuse(self, call: str, reason: str) -> None:
        if call in self.refused:
            return
        self.refused[call] = reason
        log.warning(
            "storage_feature_refused",
            call=call,
            reason=reason,
            effect=_EFFECTS[call],
            bucket=self.bucket,
        )
        self.metrics.storage_refusals.labels(call=call).inc()

    # --- the archive ---------------------------------------------------------------------------------

    async def find(self, task_id: str, *, read_back: bool = False) -> Stored | None:
        key = self.key(task_id)
        try:
            head = await self._run(self.client.head_object, Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in NOT_FOUND_CODES:
                return None
            if _status(exc) == 403:
                # AWS answers a missing object with 403, not 404, unless the caller may also
                # s3:ListBucket, which the least-privilege policy leaves out. Taking it for "not
                # archived" costs at most one upload; real trouble with the credentials shows there.
                if not self._head_403_seen:
                    self._head_403_seen = True
                    log.info(
                        "object_head_forbidden",
                        key=key,
                        reason=_s3_reason(exc),
                        effect="treated as not archived (without s3:ListBucket a missing object "
                        "answers 403)",
                    )
                return None
            raise errors.ArchiveError(f"S3 HEAD failed: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(self._unreachable(exc)) from exc
        sha = head.get("Metadata", {}).get("sha256")
        if not sha:
            tags = await self._optional(
                GET_TAGS, self.client.get_object_tagging, Bucket=self.bucket, Key=key
            )
            if tags is not None:
                sha = next(
                    (t["Value"] for t in tags.get("TagSet", []) if t["Key"] == "sha256"), None
                )
        if sha:
            return Stored(self._uri(key), int(head["ContentLength"]), sha)
        if not read_back:
            return None
        size, sha = await self._read_back(key)
        log.info("object_read_back", key=key, bytes=size, why="its SHA-256 was not recorded")
        return Stored(self._uri(key), size, sha)

    async def _read_back(self, key: str) -> tuple[int, str]:
        """The size and SHA-256 of the object at ``key``, read whole (GetObject), in constant
        memory."""

        def read() -> tuple[int, str]:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            counter = _Counter()
            try:
                for chunk in body.iter_chunks(HASH_READ_BYTES):
                    counter.add(chunk)
            finally:
                body.close()
            return counter.size, counter.hash.hexdigest()

        try:
            found: tuple[int, str] = await self._run(read)
        except botocore.exceptions.ClientError as exc:
            raise errors.ArchiveError(f"S3 GET failed: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(self._unreachable(exc)) from exc
        return found

    async def put(
        self,
        task_id: str,
        chunks: AsyncIterator[bytes],
        expected_size: int | None,
        metadata: Mapping[str, str] | None = None,
    ) -> Stored:
        key = self.key(task_id)
        described = dict(metadata or {})
        counter = _Counter()
        part_bytes = part_size(expected_size)
        # Each part is filled in a buffer of its own, reused once S3 has it: at most
        # PARTS_IN_FLIGHT uploading and one filling, so the transfer's memory is fixed.
        free: list[bytearray] = []
        filling: bytearray | None = None
        filled = 0
        upload_id: str | None = None
        # Up to PARTS_IN_FLIGHT parts upload while the download goes on; the download waits only
        # when all are busy.
        slots = asyncio.Semaphore(PARTS_IN_FLIGHT)
        uploads: list[asyncio.Task[dict[str, Any]]] = []
        try:
            async for chunk in chunks:
                counter.add(chunk)
                rest = memoryview(chunk)
                while rest:
                    if filling is None:
                        filling, filled = (free.pop() if free else bytearray(part_bytes)), 0
                    taken = min(len(rest), part_bytes - filled)
                    filling[filled : filled + taken] = rest[:taken]
                    filled += taken
                    rest = rest[taken:]
                    if filled < part_bytes:
                        continue
                    if upload_id is None:
                        # As the aws CLI does: each part carries its CRC32, so the store can
                        # check parts as they come instead of re-reading the whole object at
                        # completion (11 s of 18 for 1 GiB on moto; bench/README.md).
                        created = await self._with_checksum(
                            "CreateMultipartUpload",
                            self.client.create_multipart_upload,
                            Bucket=self.bucket,
                            Key=key,
                            ContentType="video/mp4",
                            Metadata=described,
                        )
                        upload_id = created["UploadId"]
                    await slots.acquire()
                    _raise_failed(uploads)
                    uploads.append(
                        asyncio.create_task(
                            self._upload_part(
                                key, upload_id, len(uploads) + 1, filling, filled, slots, free
                            )
                        )
                    )
                    filling = None
            counter.verify(expected_size)
            sha = counter.hash.hexdigest()
            if upload_id is None:
                await self._call(
                    self.client.put_object,
                    Bucket=self.bucket,
                    Key=key,
                    Body=b"" if filling is None else _PartBody(filling, filled),
                    ContentType="video/mp4",
                    Metadata=described | {"sha256": sha},
                )
            else:
                if filling is not None:
                    await slots.acquire()
                    uploads.append(
                        asyncio.create_task(
                            self._upload_part(
                                key, upload_id, len(uploads) + 1, filling, filled, slots, free
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
                # The object is complete either way and the database records the hash; without
                # the tag, a crash before that database write means one more upload later.
                await self._optional(
                    PUT_TAGS,
                    self.client.put_object_tagging,
                    Bucket=self.bucket,
                    Key=key,
                    Tagging={"TagSet": [{"Key": "sha256", "Value": sha}]},
                )
        except BaseException:
            # Let parts already on the wire finish first (at most PARTS_IN_FLIGHT): S3 may keep a
            # part that was still uploading when the upload was aborted.
            await asyncio.shield(asyncio.gather(*uploads, return_exceptions=True))
            if upload_id is not None:
                await self._abort(key, upload_id)
            raise
        return Stored(self._uri(key), counter.size, sha)

    async def _upload_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        buffer: bytearray,
        size: int,
        slots: asyncio.Semaphore,
        free: list[bytearray],
    ) -> dict[str, Any]:
        """Upload the first ``size`` bytes of ``buffer`` as part ``number``; then ``buffer`` goes
        back to ``free`` for the next part. After a failure it does not: the put is over, and a
        thread botocore was retrying in may still be reading it."""
        try:
            answer = await self._with_checksum(
                "UploadPart",
                self.client.upload_part,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=_PartBody(buffer, size),
            )
        finally:
            slots.release()
        free.append(buffer)
        part = {"PartNumber": number, "ETag": answer["ETag"]}
        if answer.get("ChecksumCRC32"):
            part["ChecksumCRC32"] = answer["ChecksumCRC32"]
        return part

    async def _abort(self, key: str, upload_id: str) -> None:
        loop = asyncio.get_running_loop()
        abort = functools.partial(
            self.client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id
        )
        try:
            await asyncio.shield(loop.run_in_executor(self._executor, abort))
        except Exception as exc:
            # Housekeeping removes stale uploads later; the final key was never written.
            log.warning("multipart_abort_failed", key=key, error=str(exc))

    async def check(self) -> None:
        """Raise ArchiveError unless the bucket answers and takes our credentials.

        HeadBucket (s3:ListBucket on AWS) is optional: where it is refused, a GetObject of a key
        nobody writes tells the same. A GET, not a HEAD, because only a GET's error body tells a
        missing bucket (NoSuchBucket) from a missing key.
        """
        if HEAD_BUCKET not in self.refused:
            try:
                await self._run(self.client.head_bucket, Bucket=self.bucket)
                return
            except botocore.exceptions.ClientError as exc:
                if _status(exc) == 404 or exc.response.get("Error", {}).get("Code") in (
                    "404",
                    "NoSuchBucket",
                ):
                    raise errors.ArchiveError(
                        f"S3 bucket {self.bucket!r} not found: {_s3_reason(exc)}"
                    ) from exc
                reason = refusal(exc)
                if reason is not None:
                    self._refuse(HEAD_BUCKET, reason)
                else:
                    log.warning("storage_call_failed", call=HEAD_BUCKET, error=_s3_reason(exc))
            except botocore.exceptions.BotoCoreError as exc:
                raise errors.ArchiveError(self._unreachable(exc)) from exc
        await self._probe()

    async def _probe(self) -> None:
        key = f"{self.prefix}/{CHECK_KEY_NAME}" if self.prefix else CHECK_KEY_NAME
        try:
            answer = await self._run(
                self.client.get_object, Bucket=self.bucket, Key=key, Range="bytes=0-0"
            )
            answer["Body"].close()
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in NOT_FOUND_CODES:
                return  # reachable, the bucket exists and the credentials are good
            if code == "AccessDenied":
                # AWS without s3:ListBucket: the bucket exists and the key was accepted (a bad
                # key is InvalidAccessKeyId or SignatureDoesNotMatch); the next upload shows more.
                return
            raise errors.ArchiveError(f"S3 check failed: {_s3_reason(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise errors.ArchiveError(self._unreachable(exc)) from exc

    def _task_of(self, key: str) -> str | None:
        head = f"{self.prefix}/" if self.prefix else ""
        if not key.startswith(head) or not key.endswith(".mp4"):
            return None
        name = key[len(head) : -len(".mp4")]
        return name if name and "/" not in name else None

    async def _uploads(self, prefix: str) -> list[dict[str, Any]] | None:
        """The open multipart uploads under ``prefix``, or None where they cannot be listed."""
        uploads: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = await self._optional(LIST_UPLOADS, self.client.list_multipart_uploads, **kwargs)
            if page is None:
                return None
            uploads.extend(page.get("Uploads", []))
            if not page.get("IsTruncated"):
                return uploads
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker")

    async def incomplete(self) -> set[str]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        found = (self._task_of(u["Key"]) for u in await self._uploads(prefix) or [])
        return {task_id for task_id in found if task_id}

    async def discard_incomplete(
        self, task_id: str, started_before: dt.datetime | None = None
    ) -> int:
        key = self.key(task_id)
        removed = 0
        for upload in await self._uploads(key) or []:
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


def unreachable(exc: botocore.exceptions.BotoCoreError, endpoint: str | None) -> str:
    """Why S3 could not be asked, naming the cause and the endpoint: no credentials, an endpoint
    that cannot be reached, a timeout (never a secret: credentials are not in an endpoint URL)."""
    where = _without_query(endpoint) if endpoint else "the default AWS endpoint"
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return (
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE), or run with an instance role"
        )
    if isinstance(
        exc, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError
    ):
        return f"S3 endpoint {where} timed out"
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return f"cannot reach the S3 endpoint {where} (set AWS_ENDPOINT_URL_S3 for another)"
    return f"S3 unreachable at {where}: {type(exc).__name__}"


def _without_query(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return (
        urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
        if (parts.username or parts.password or parts.query)
        else url
    )


def _s3_reason(exc: botocore.exceptions.ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', '?')} {error.get('Message', '')}".strip()
