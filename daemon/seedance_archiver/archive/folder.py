"""The folder store (``file://``): ``{root}/{task_id}.mp4``, written to a temporary file, fsynced
and renamed into place, so a partial video never appears under its final name."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import pathlib
import secrets
import stat
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from seedance_archiver import archive, errors

if TYPE_CHECKING:
    from seedance_archiver import metrics

_T = TypeVar("_T")

INCOMING_DIR = ".incoming"


class FileArchive:
    """Videos in a local folder: ``{root}/{task_id}.mp4``.

    Any OSError (a full disk, an I/O error, a path that cannot be a folder) is an ArchiveError that
    names the cause, so the task is retried and the failure counts as "storage".
    """

    def __init__(
        self, root: pathlib.Path, *, executor: concurrent.futures.Executor | None = None
    ) -> None:
        self.root = root
        self._executor = executor or archive.default_executor()
        # As strings: the per-video file calls below skip pathlib's objects (bench/burst.py).
        self._root = os.fspath(root)
        self._incoming = os.path.join(self._root, INCOMING_DIR)
        self._sync_root = _FolderSync(self._root)
        self._real_root: str | None = None  # symbolic links resolved, at the first commit

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        meters: metrics.Metrics | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> FileArchive:
        """The folder of ``file:///dir`` (``file://./dir`` is relative to the working directory)."""
        root = archive.local_folder(url)
        if root is None:
            raise ValueError(f"not a folder's URL: {url!r}")
        return cls(root, executor=executor)

    def link(self, uri: str, expires_seconds: int) -> str:
        # A path on this machine: it needs no credentials, and never expires.
        return urllib.parse.unquote(urllib.parse.urlsplit(uri).path)

    def _final(self, task_id: str) -> pathlib.Path:
        return self.root / f"{task_id}.mp4"

    async def _io(self, failure: str, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run a blocking file operation; an OSError becomes ``ArchiveError("{failure}: ...")``."""
        try:
            return await archive.run(self._executor, fn, *args, **kwargs)
        except OSError as exc:
            raise errors.ArchiveError(f"{failure}: {_os_reason(exc)}") from exc

    @staticmethod
    async def _wait(failure: str, work: concurrent.futures.Future[None]) -> None:
        """Await a file operation already submitted; an OSError becomes an ArchiveError."""
        try:
            await asyncio.wrap_future(work)
        except OSError as exc:
            raise errors.ArchiveError(f"{failure}: {_os_reason(exc)}") from exc

    async def find(self, task_id: str, *, read_back: bool = False) -> archive.Stored | None:
        # Whether the video is there is one stat of a local path, asked here on the event loop:
        # handed to a thread, the look before every download cost 10 context switches and a
        # tenth of a burst's CPU (bench/burst.py). A video that is there is read back in a
        # thread: a file is hashed as it is read, so its hash is always known.
        failure = "archive folder read failed"
        try:
            there = stat.S_ISREG(os.stat(os.path.join(self._root, f"{task_id}.mp4")).st_mode)
        except OSError as exc:
            if exc.errno not in _ABSENT:
                raise errors.ArchiveError(f"{failure}: {_os_reason(exc)}") from exc
            there = False
        return await self._io(failure, self._find, task_id) if there else None

    def _find(self, task_id: str) -> archive.Stored | None:
        path = self._final(task_id)
        if not path.is_file():
            return None  # gone since the look
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as fh:
            while chunk := fh.read(archive.HASH_READ_BYTES):
                digest.update(chunk)
                size += len(chunk)
        return archive.Stored(path.resolve().as_uri(), size, digest.hexdigest())

    async def put(
        self,
        task_id: str,
        chunks: AsyncIterator[bytes],
        expected_size: int | None,
        metadata: Mapping[str, str] | None = None,
    ) -> archive.Stored:
        failure = "archive folder write failed"
        temp = os.path.join(self._incoming, _temp_name(task_id))
        # A dead attempt's temporary files go as this one's is made (see Archive.put).
        incoming = _Incoming(temp, lambda: self._discard(task_id, None))
        counter = archive.Counter()
        sidecar = None if metadata is None else dict(metadata)
        try:
            # The pieces are gathered to WRITE_BYTES, then hashed in one worker thread and written
            # in another, side by side, while the next ones download (all three release the GIL);
            # one batch in flight keeps memory at three (in flight, held, gathering).
            # bench/README.md: 0.37x of `curl -o && sync` with hash, write and download one after
            # another; 0.58x with hash and write in one thread. Every hand-over to a thread costs
            # CPU on both sides (a futex wake, the GIL taken back): handed over piece by piece
            # (~200 KB as the socket gives them), they cost more than the hash. So the file is
            # opened by its first write, and the last batch goes with the commit: a video under
            # WRITE_BYTES is one hand-over in all (bench/burst.py).
            writing: list[concurrent.futures.Future[Any]] = []
            last: list[bytes] = []
            try:
                async for batch in archive.gathered(chunks, WRITE_BYTES):
                    if last:
                        for work in writing:
                            await self._wait(failure, work)
                        writing = [
                            self._executor.submit(counter.add_all, last),
                            self._executor.submit(incoming.write, last),
                        ]
                    last = batch
                for work in writing:
                    await self._wait(failure, work)
            except BaseException:
                # Never close the file under a write still running in its thread.
                if writing:
                    await asyncio.wait([asyncio.wrap_future(work) for work in writing])
                with contextlib.suppress(OSError):
                    await archive.run(self._executor, incoming.close)
                raise
            # One hand-over for the rest: the last batch, fsync, rename, the folder's fsync, the
            # sidecar.
            uri = await self._io(
                failure, self._commit, incoming, last, counter, expected_size, task_id, sidecar
            )
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return archive.Stored(uri, counter.size, counter.hash.hexdigest())

    def _commit(
        self,
        incoming: _Incoming,
        last: list[bytes],
        counter: archive.Counter,
        expected_size: int | None,
        task_id: str,
        sidecar: dict[str, str] | None,
    ) -> str:
        """Write and hash the last batch, check the size, make the video whole on disk and put it
        under its name, then its sidecar: the video's URI. Runs in a worker thread.

        Each system call here lets the event loop's thread take the GIL, and getting it back
        costs this thread a wait and both a context switch, so the calls are few: one write
        and one hash of the batch joined, raw descriptors, both files made whole before either
        is renamed, and one fsync of the folder shared by every video committing at once
        (bench/burst.py)."""
        try:
            fd = incoming.write_last(last, counter)
            counter.verify(expected_size)
            os.fsync(fd)
            if _FADVISE is not None:
                # Written and on disk: its pages leave the cache (see WRITEBACK_BYTES).
                _FADVISE(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except BaseException:
            with contextlib.suppress(OSError):  # the first error is the one to tell
                incoming.close()
            raise
        incoming.close()
        described = None
        if sidecar is not None:
            sidecar |= {"sha256": counter.hash.hexdigest(), "bytes": str(counter.size)}
            described = _sidecar_file(incoming.path, sidecar)
        try:
            final = os.path.join(self._root, f"{task_id}.mp4")
            os.replace(incoming.path, final)
            self._sync_root()
            if described is not None:
                # After the video's rename is on disk: a sidecar never describes a video that
                # is not there.
                os.replace(described, os.path.join(self._root, f"{task_id}.json"))
                described = None
                self._sync_root()
        finally:
            if described is not None:
                with contextlib.suppress(OSError):
                    os.unlink(described)
        if self._real_root is None:
            # Off the event loop: the path's lookups (symbolic links resolved), once.
            self._real_root = os.path.realpath(self._root)
        return _file_uri(os.path.join(self._real_root, f"{task_id}.mp4"))

    def _temp_names(self) -> list[str]:
        """The names in ``.incoming`` of unfinished videos and sidecars (``*.part``)."""
        try:
            names = os.listdir(self._incoming)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [name for name in names if name.endswith(".part")]

    async def incomplete(self) -> set[str]:
        names = await self._io("archive folder listing failed", self._temp_names)
        return {name.rsplit(".", 2)[0] for name in names}

    async def discard_incomplete(
        self, task_id: str, started_before: dt.datetime | None = None
    ) -> int:
        return await self._io(
            "archive folder cleanup failed", self._discard, task_id, started_before
        )

    def _discard(self, task_id: str, started_before: dt.datetime | None) -> int:
        removed = 0
        for name in self._temp_names():
            if name.rsplit(".", 2)[0] != task_id:
                continue
            path = os.path.join(self._incoming, name)
            try:
                if started_before is not None:
                    modified = dt.datetime.fromtimestamp(os.stat(path).st_mtime, dt.UTC)
                    if modified >= started_before:
                        continue
                os.unlink(path)
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
# waits for the last few MiB, not for the whole video, and archiving evicts no one's cache. After
# the fsync, the whole file leaves the cache (a video under 8 MiB never reached a stretch): on a
# burst of 2 MB videos, a page cache grown by gigabytes cost the kernel 3x the CPU per write here
# (bench/burst.py).
WRITEBACK_BYTES = 8 * 1024 * 1024


_FADVISE = getattr(os, "posix_fadvise", None)  # not on macOS: there the fsync does it all


# Pieces are handed to the writing thread in batches of at least this many bytes.
WRITE_BYTES = 1024 * 1024


def _temp_name(task_id: str) -> str:
    """A video's temporary file's name: ``{task_id}.{random}.part``, which the clean-up parses
    (its sidecar's is made from it: :func:`_sidecar_file`)."""
    return f"{task_id}.{secrets.token_hex(16)}.part"


class _Incoming:
    """A video's temporary file, opened by its first write (in a worker thread, as every call
    here is made): one hand-over fewer per video than an open of its own."""

    def __init__(self, path: str, before_open: Callable[[], object]) -> None:
        self.path = path
        self._before_open = before_open
        self._fd: int | None = None
        self._written = 0

    def write(self, pieces: list[bytes]) -> int:
        """Append ``pieces``: the file's descriptor."""
        if self._fd is None:
            self._before_open()
            self._fd = _open_new(self.path)
        _write_all(self._fd, pieces)
        start, self._written = self._written, self._written + sum(map(len, pieces))
        if _FADVISE is not None and self._written // WRITEBACK_BYTES != start // WRITEBACK_BYTES:
            # A WRITEBACK_BYTES stretch was just completed: hand it to the disk.
            stretch = (self._written // WRITEBACK_BYTES - 1) * WRITEBACK_BYTES
            _FADVISE(self._fd, stretch, WRITEBACK_BYTES, os.POSIX_FADV_DONTNEED)
        return self._fd

    def write_last(self, pieces: list[bytes], counter: archive.Counter) -> int:
        """Hash and append the last batch, joined: one hash and one write, each letting the GIL
        go once, not once per piece (a copy costs less than the switches it saves)."""
        joined = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        counter.add(joined)
        return self.write([joined])

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class _FolderSync:
    """The fsync of one folder, shared by the threads that need it at once.

    A call returns once an fsync of the folder that began after the call did has completed, so
    whatever the caller renamed in it before calling is on disk. Calls that meet an fsync under
    way wait for the next one, which serves them all: four videos committing at once cost one or
    two fsyncs of their folder, not four. An fsync that fails wakes its waiters, and the next
    caller tries its own."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._changed = threading.Condition()
        self._asked = 0  # calls so far, numbered
        self._done = 0  # every call up to this number is covered by a finished fsync
        self._syncing = False

    def __call__(self) -> None:
        with self._changed:
            self._asked += 1
            ticket = self._asked
            while self._syncing and self._done < ticket:
                self._changed.wait()
            if self._done >= ticket:
                return
            self._syncing = True
            covers = self._asked  # every call numbered so far renamed before this fsync begins
        synced = False
        try:
            _sync_dir(self._path)
            synced = True
        finally:
            with self._changed:
                self._syncing = False
                if synced:
                    self._done = max(self._done, covers)
                self._changed.notify_all()


def _sidecar_file(video_temp: str, sidecar: Mapping[str, str]) -> str:
    """``sidecar`` written whole to a temporary file beside the video's, on disk: its path, for the
    rename to ``{task_id}.json``. Named after the video's temporary file
    (``{task_id}.{random}-json.part``), so the same clean-up finds one a kill left behind."""
    temp = video_temp.removesuffix(".part") + "-json.part"
    fd = _open_new(temp)
    try:
        _write_all(fd, [json.dumps(sidecar, indent=2, sort_keys=True).encode()])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    os.close(fd)
    return temp


def _write_all(fd: int, pieces: list[bytes]) -> None:
    """Every byte of ``pieces`` to ``fd``: one system call for up to _IOV_MAX pieces."""
    for start in range(0, len(pieces), _IOV_MAX):
        group = pieces[start : start + _IOV_MAX]
        left = sum(map(len, group)) - os.writev(fd, group)
        if left:  # a short write (a signal, a disk filling up): the rest, until it errors
            rest = memoryview(b"".join(group))[-left:]
            while rest:
                rest = rest[os.write(fd, rest) :]


_IOV_MAX = 512  # Linux allows 1024 buffers per writev


def _open_new(path: str) -> int:
    """``path`` opened to write, its folder made if it is missing (``check`` made it at start)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, flags, 0o666)


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_uri(path: str) -> str:
    """``file://`` and the absolute ``path``, as pathlib's ``as_uri`` writes it."""
    return "file://" + urllib.parse.quote_from_bytes(os.fsencode(path))


# What a stat of a path that names no file fails with (as pathlib's ``is_file`` reads them).
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason} ({exc.filename})" if exc.filename else reason
