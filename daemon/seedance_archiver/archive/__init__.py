"""Archive storage: the seam the service archives through, and the registry of stores behind it.

A store streams a video in, verifies it, and commits it under ``{prefix}/{task_id}.mp4`` so that a
partial object never appears under the final key: ``folder`` (``file://``: a temporary file, fsync,
atomic rename) and ``s3`` (``s3://``: one PUT below a part's size, else a multipart upload completed
only when every byte arrived). :data:`SCHEMES` names each; config checks SEEDANCE_ARCHIVE_URL with
:func:`check_url`, and :func:`from_url` imports the one store a URL names, so a store's library (boto3
for ``s3``) loads only where that store is used. Another store is one module and one line here.

Every blocking call runs in a bounded executor of its own (not asyncio's default one), so slow storage
never starves the database calls, which have theirs; the folder store's writing runs in processes
of its own (``writer.py``). Every library error (botocore, OSError) becomes
:class:`errors.ArchiveError` in the store that meets it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib
import pathlib
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from seedance_archiver import errors

if TYPE_CHECKING:
    import datetime as dt

    from seedance_archiver import metrics, models

_T = TypeVar("_T")

HASH_READ_BYTES = 1024 * 1024
# Threads for archive I/O when the caller passes no executor. At most service.MAX_DOWNLOADS (4)
# videos stream at once, each holding up to s3.PARTS_IN_FLIGHT (2) part uploads plus the call that
# feeds them (create, complete): 4 x 3 = 12; four more leave room for find(),
# housekeeping and /readyz's check() while every download is busy (tests/unit/test_archive_unit.py).
ARCHIVE_IO_THREADS = 16
# How long a link (Archive.link) works unless asked otherwise, and the longest a store signs one for
# (S3's own limit for a presigned URL).
LINK_SECONDS = 3600
MAX_LINK_SECONDS = 7 * 86400

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
        *,
        leftovers: bool = True,
    ) -> Stored:
        """Stream ``chunks`` in and commit them, or raise and leave nothing under the final key.

        The caller holds ``task_id``'s lease, so an unfinished upload of it is a dead attempt's.
        With ``leftovers`` (an earlier attempt may have left one: a holder whose lease ran out, a
        download that failed) the store first removes those its upload could meet (a folder's
        temporary files; S3's multipart uploads, when this one is multipart too); done here, not
        by the caller, it costs no call of its own. Without, it does not look (a folder listing,
        or an S3 LIST, spared per video). Housekeeping removes every other one.

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

    def link(self, uri: str, expires_seconds: int) -> str:
        """A link to the stored video ``uri`` (a :attr:`Stored.uri` of this store) that works for
        ``expires_seconds`` without credentials of its own: what the feeding application shows."""
        ...


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One kind of store: the module and class that hold it (imported on first use) and what its
    URLs look like."""

    module: str
    store: str
    example: str
    # The URL's host names a bucket, which it must; else host and path together name a folder.
    bucket: bool

    def valid(self, parts: urllib.parse.SplitResult) -> bool:
        return bool(parts.netloc) if self.bucket else bool(parts.netloc or parts.path)

    def load(self) -> Any:
        """The store's class; importing its module may raise errors.MissingDependencyError."""
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.store)


# The stores by URL scheme, in the order errors name them.
SCHEMES: dict[str, Scheme] = {
    "s3": Scheme("s3", "S3Archive", "s3://bucket/prefix", bucket=True),
    "file": Scheme("folder", "FileArchive", "file:///directory", bucket=False),
}


def check_url(url: str) -> str:
    """``url`` if it names a store of :data:`SCHEMES`, else ValueError saying what would (config's
    check of SEEDANCE_ARCHIVE_URL: it imports no store)."""
    parts = urllib.parse.urlsplit(url)
    scheme = SCHEMES.get(parts.scheme)
    if scheme is None or not scheme.valid(parts):
        raise ValueError("expected " + " or ".join(s.example for s in SCHEMES.values()))
    return url


def from_url(
    url: str,
    *,
    meters: metrics.Metrics | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> Archive:
    """The store for SEEDANCE_ARCHIVE_URL (``s3://bucket/prefix`` or ``file:///dir``)."""
    scheme = SCHEMES.get(urllib.parse.urlsplit(url).scheme)
    if scheme is None:
        expected = " or ".join(f"{name}://" for name in SCHEMES)
        raise errors.ConfigError(f"invalid setting SEEDANCE_ARCHIVE_URL: expected {expected}")
    store: Archive = scheme.load().from_url(url, meters=meters, executor=executor)
    return store


def local_folder(url: str) -> pathlib.Path | None:
    """The folder of a ``file://`` archive URL (``file://./dir`` is relative to the working
    directory); None for a store of another scheme."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file":
        return None
    return pathlib.Path(urllib.parse.unquote(parts.netloc + parts.path))


def link(uri: str, expires_seconds: int) -> str:
    """A link to the stored video ``uri`` (valid ``expires_seconds``), from the store that holds it:
    ``from_url`` of the folder ``uri`` is in."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme not in SCHEMES:
        raise errors.ArchiveError(f"no link for an archive of scheme {scheme!r}")
    return from_url(uri.rsplit("/", 1)[0]).link(uri, expires_seconds)


class Counter:
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


async def gathered(
    chunks: AsyncIterator[bytes], size: int
) -> AsyncIterator[tuple[list[bytes], bool]]:
    """``chunks`` in batches of at least ``size`` bytes, as they came (nothing is copied), each
    with whether it is the last: a full batch is given once the chunk after it has come, and the
    last one (smaller, or empty for no chunks at all) once the chunks have ended."""
    batch: list[bytes] = []
    held = 0
    async for chunk in chunks:
        if held >= size:
            yield batch, False
            batch, held = [], 0
        batch.append(chunk)
        held += len(chunk)
    yield batch, True


async def run(
    executor: concurrent.futures.Executor, fn: Callable[..., _T], /, *args: Any, **kwargs: Any
) -> _T:
    """``fn(*args, **kwargs)`` in the archive executor, awaited."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))


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
