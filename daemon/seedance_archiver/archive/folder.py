"""The folder store (``file://``): ``{root}/{task_id}.mp4``, written to a temporary file, fsynced
and renamed into place, so a partial video never appears under its final name.

A video's bytes go from the event loop to a writer process (``writer.py``), through memory the two
share where the system allows; the writer hashes, writes, fsyncs and renames, and its system calls
share no GIL with the loop. The other calls here (the look for a video, the read-back of one, the
listing and clean-up of unfinished files) are rare, and run in the archive's threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import errno
import hashlib
import json
import mmap
import os
import pathlib
import secrets
import signal
import socket
import stat
import subprocess
import sys
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from seedance_archiver import archive, errors
from seedance_archiver.archive import writer

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
        self._writers = _Writers()

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
        *,
        leftovers: bool = True,
    ) -> archive.Stored:
        # The job a writer does: writer.py's _write_one reads it.
        job = {
            "root": self._root,
            "task_id": task_id,
            "temp": os.path.join(self._incoming, _temp_name(task_id)),
            "expected": expected_size,
            "sidecar": None if metadata is None else dict(metadata),
            "leftovers": leftovers,
        }
        return await self._writers.put(job, chunks)

    async def incomplete(self) -> set[str]:
        names = await self._io("archive folder listing failed", writer.temp_names, self._incoming)
        return {writer.task_of(name) for name in names}

    async def discard_incomplete(
        self, task_id: str, started_before: dt.datetime | None = None
    ) -> int:
        before = None if started_before is None else started_before.timestamp()
        return await self._io(
            "archive folder cleanup failed", writer.discard, self._incoming, task_id, before
        )

    async def check(self) -> None:
        await self._io("archive folder not writable", self._check)

    def _check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / INCOMING_DIR
        probe.mkdir(exist_ok=True)
        if not os.access(probe, os.W_OK):
            raise PermissionError(13, "Permission denied")


# The bytes of a video are sent to its writer in batches of at least this many bytes: one system
# call on the event loop per batch, not one per piece the socket gives (~200 KB).
WRITE_BYTES = 1024 * 1024

# Idle writers kept for the next videos; one more is started whenever every kept one is busy, and
# so there are as many as downloads at once (service.MAX_DOWNLOADS), and never more are kept.
IDLE_WRITERS = 8


def _temp_name(task_id: str) -> str:
    """A video's temporary file's name: ``{task_id}.{random}.part``, which the clean-up parses
    (its sidecar's is made from it: :func:`writer.sidecar_file`)."""
    return f"{task_id}.{secrets.token_hex(16)}.part"


class _Writers:
    """The writer processes of one folder store, started as videos need them (writer.py)."""

    def __init__(self) -> None:
        self._idle: list[_Writer] = []

    async def put(self, job: dict[str, Any], chunks: AsyncIterator[bytes]) -> archive.Stored:
        """Have a writer store ``chunks`` as ``job`` says; one that fails in the middle of the
        video, or is given it up, is stopped (with what it wrote) and not kept."""
        one = None
        while self._idle and one is None:
            one = self._idle.pop()
            if not one.alive():
                one.close()  # gone since its last video (killed): another one
                one = None
        if one is None:
            one = await _Writer.start()
        try:
            stored = await one.put(job, chunks)
        except BaseException:
            await one.abandon()
            raise
        if len(self._idle) < IDLE_WRITERS:
            self._idle.append(one)
        else:
            one.close()
        return stored


class _Writer:
    """One writer process, and the daemon's end of its socket: non-blocking, and waited on with the
    running loop's ``sock_*`` calls, so it belongs to no event loop (a command's, a test's)."""

    def __init__(
        self, process: subprocess.Popen[bytes], sock: socket.socket, shared: mmap.mmap | None
    ) -> None:
        self._process = process
        self._sock = sock
        self._shared = shared
        self._inbox = bytearray()  # what the writer sent that is not a whole frame yet
        self._finalizer = weakref.finalize(self, _stop, process, sock)

    @classmethod
    async def start(cls) -> _Writer:
        ours, theirs = socket.socketpair()
        shared = None
        try:
            with theirs, _stop_signals_blocked(), _shared_memory() as memory:
                fds = (theirs.fileno(),) if memory is None else (theirs.fileno(), memory)
                if memory is not None:
                    shared = mmap.mmap(memory, SHARED_BYTES)
                # A fork and exec, a few in a process's life: asyncio's own would want a child
                # watcher, and a transport that must be closed on the loop that made it.
                process = subprocess.Popen(  # noqa: ASYNC220
                    _writer_command(*fds), pass_fds=fds, stdin=subprocess.DEVNULL
                )
        except OSError as exc:
            ours.close()
            if shared is not None:
                shared.close()
            raise errors.ArchiveError(
                f"archive folder writer could not start: {_os_reason(exc)}"
            ) from exc
        ours.setblocking(False)
        if shared is None:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        return cls(process, ours, shared)

    async def put(self, job: dict[str, Any], chunks: AsyncIterator[bytes]) -> archive.Stored:
        loop = asyncio.get_running_loop()
        body = json.dumps(job).encode()
        ring = None if self._shared is None else _Ring(self._shared)
        answer = loop.create_task(self._answer(loop, ring))
        # The job goes out with the video's first batch, and the end mark with its last: a video
        # of one batch (up to WRITE_BYTES) is one system call and one wake of the writer, not
        # three (bench/burst.py).
        frames = [writer.FRAME.pack(len(body)), body]
        try:
            async for batch, last in archive.gathered(chunks, WRITE_BYTES):
                if answer.done():
                    break  # a write failed: the download stops here
                if ring is not None:
                    frames = await self._share(loop, ring, batch, answer, frames)
                elif batch:  # (an empty frame would end the video)
                    frames += [writer.FRAME.pack(sum(map(len, batch))), *batch]
                if last:
                    break
                await self._send(loop, frames)
                frames = []
            await self._send(loop, [*frames, _END_FRAME])
            told = await answer
        except (ConnectionError, EOFError) as exc:
            raise errors.ArchiveError(
                f"archive folder writer stopped (exit status {self._process.poll()})"
            ) from exc
        finally:
            answer.cancel()
        if "download" in told:
            raise errors.DownloadError(told["download"])
        if "failure" in told:
            cause = OSError(told["errno"], told["strerror"], told["filename"])
            raise errors.ArchiveError(f"{told['failure']}: {_os_reason(cause)}") from cause
        return archive.Stored(told["uri"], told["size"], told["sha256"])

    async def _share(
        self,
        loop: asyncio.AbstractEventLoop,
        ring: _Ring,
        batch: list[bytes],
        answer: asyncio.Task[dict[str, Any]],
        frames: list[bytes],
    ) -> list[bytes]:
        """Copy ``batch`` into the shared memory: ``frames`` (not sent yet) and after them those
        that tell the writer where it lies, for the caller to send. Where the ring is full, they
        are sent, and this waits until the writer says it has written what it holds (or answers:
        a write failed, and the caller stops)."""
        for chunk in batch:
            view = memoryview(chunk)
            while view:
                room = ring.room()
                if not room:
                    pong = ring.pong
                    if pong is None:
                        pong = ring.ping(loop)
                        frames.append(_PING_FRAME)
                    await self._send(loop, frames)
                    frames = []
                    await asyncio.wait((pong, answer), return_when=asyncio.FIRST_COMPLETED)
                    if answer.done():
                        return frames
                    continue
                frames.append(ring.put(view[:room]))
                view = view[room:]
        if ring.pong is None and ring.held() >= ring.size // 2:
            # Asked now, while the other half is free: the answer comes before the ring is full.
            ring.ping(loop)
            frames.append(_PING_FRAME)
        return frames

    async def _send(self, loop: asyncio.AbstractEventLoop, pieces: list[bytes]) -> None:
        """Every byte of ``pieces``, copied by nothing but the kernel: one system call for as many
        as the socket has room for, then the rest each time it has room again."""
        views: list[bytes | memoryview] = list(pieces)
        first = 0
        while first < len(views):
            try:
                sent = self._sock.sendmsg(views[first : first + _IOV_MAX])
            except BlockingIOError:
                sent = 0
            while first < len(views) and sent >= len(views[first]):
                sent -= len(views[first])
                first += 1
            if first < len(views):
                if sent:
                    views[first] = memoryview(views[first])[sent:]
                await self._writable(loop)

    async def _writable(self, loop: asyncio.AbstractEventLoop) -> None:
        room = loop.create_future()
        fd = self._sock.fileno()
        loop.add_writer(fd, room.set_result, None)
        try:
            await room
        finally:
            loop.remove_writer(fd)

    async def _answer(self, loop: asyncio.AbstractEventLoop, ring: _Ring | None) -> dict[str, Any]:
        """The writer's answer to the job; the pongs before it are handed to ``ring``."""
        while True:
            frame = await self._frame(loop)
            if frame or ring is None:
                told: dict[str, Any] = json.loads(frame)
                return told
            ring.ponged()

    async def _frame(self, loop: asyncio.AbstractEventLoop) -> bytes:
        """The writer's next frame, read as it comes: its length and body in one call."""
        inbox = self._inbox
        while True:
            if len(inbox) >= writer.FRAME.size:
                end = writer.FRAME.size + writer.FRAME.unpack_from(inbox)[0]
                if len(inbox) >= end:
                    frame = bytes(inbox[writer.FRAME.size : end])
                    del inbox[:end]
                    return frame
            piece = await loop.sock_recv(self._sock, ANSWER_BYTES)
            if not piece:
                raise EOFError("the writer closed its socket")
            inbox += piece

    def alive(self) -> bool:
        return self._process.poll() is None

    async def abandon(self) -> None:
        """Give the video up: the writer removes its temporary file and exits, and this returns
        once it has (or ABANDON_SECONDS have passed: a writer stuck on a dead disk)."""
        loop = asyncio.get_running_loop()
        try:
            self._sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(ABANDON_SECONDS):
                while await loop.sock_recv(self._sock, 4096):
                    pass  # an answer it was sending as the video was given up
        except (OSError, TimeoutError):
            pass  # gone already, or stuck: it exits once it sees the closed socket
        finally:
            self.close()

    def close(self) -> None:
        self._finalizer()


class _Ring:
    """The memory a writer shares with the daemon, as a ring for one job: the daemon copies a
    video's bytes in one after another, wrapping at the end, and may copy over bytes once the
    writer has said (a pong) that it wrote them. Every job starts at the beginning: the writer
    answered the one before only once it had written all of it."""

    def __init__(self, shared: mmap.mmap) -> None:
        self._shared = shared
        self.size = len(shared)
        self._copied = 0  # bytes of this job copied in
        self._written = 0  # of them, those the writer said it wrote
        self._pinged_at = 0
        self.pong: asyncio.Future[None] | None = None  # the answer to the ping under way

    def held(self) -> int:
        """Bytes copied in that the writer has not said it wrote."""
        return self._copied - self._written

    def room(self) -> int:
        """How many bytes may be copied in at once now: free, and before the ring's end."""
        at = self._copied % self.size
        return min(self.size - self.held(), self.size - at)

    def put(self, piece: memoryview) -> bytes:
        """Copy ``piece`` in (at most :meth:`room` bytes): the frame that tells the writer."""
        at = self._copied % self.size
        self._shared[at : at + len(piece)] = piece
        self._copied += len(piece)
        return _PIECE_FRAME_HEAD + writer.PIECE.pack(at, len(piece))

    def ping(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A ping is being sent (:data:`_PING_FRAME`): the writer will say once it wrote every byte
        copied in so far. What resolves then."""
        self._pinged_at = self._copied
        self.pong = loop.create_future()
        return self.pong

    def ponged(self) -> None:
        self._written = self._pinged_at
        if self.pong is not None and not self.pong.done():
            self.pong.set_result(None)
        self.pong = None


_PIECE_FRAME_HEAD = writer.FRAME.pack(writer.PIECE.size)
_PING_FRAME = writer.FRAME.pack(len(writer.PING)) + writer.PING
_END_FRAME = writer.FRAME.pack(0)  # the video's bytes have all been sent
ANSWER_BYTES = 64 * 1024  # read at once from a writer: its answers and pongs are far smaller


@contextlib.contextmanager
def _shared_memory() -> Iterator[int | None]:
    """A new memory file of SHARED_BYTES for a writer, open while it starts (the writer's copy of
    the descriptor and the daemon's mapping keep it); None where the system has no
    ``memfd_create``: the bytes then go through the socket."""
    if not hasattr(os, "memfd_create"):
        yield None
        return
    fd = os.memfd_create("seedance-archiver-writer", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, SHARED_BYTES)
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """SIGTERM and SIGINT blocked in this thread while a writer is started: the writer inherits the
    mask through its exec, so no stop reaches it in the milliseconds before it ignores them
    (writer.main). A stop for the daemon meanwhile goes to another of its threads, whose handler
    wakes the event loop as ever, or waits until the mask is restored."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, writer.STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _writer_command(*fds: int) -> list[str]:
    """How a writer is started: this Python, isolated from the environment and without
    site-packages (it needs only the standard library), on writer.py, given its socket (and its
    shared memory)."""
    return [sys.executable, "-I", "-S", writer.__file__, *map(str, fds)]


def _stop(process: subprocess.Popen[bytes], sock: socket.socket) -> None:
    """Close a writer's socket: it exits (and removes what it was writing) once it sees that."""
    sock.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(0)  # reaped now if it is gone already; else by subprocess on a later start


ABANDON_SECONDS = 10.0
SEND_BUFFER_BYTES = 1024 * 1024  # asked for; Linux grants at most net.core.wmem_max (x2)
# Each writer's shared memory: four batches. A video of up to half of it (2 MiB) goes without a
# ping; a longer one asks at every half, so the daemon copies into one half while the writer
# writes the other. Once written, it stays in memory while its writer lives: with one writer per
# download under way (service.MAX_DOWNLOADS: 4), 16 MiB.
SHARED_BYTES = 4 * WRITE_BYTES
_IOV_MAX = 512  # Linux allows 1024 buffers per sendmsg


# What a stat of a path that names no file fails with (as pathlib's ``is_file`` reads them).
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason} ({exc.filename})" if exc.filename else reason
