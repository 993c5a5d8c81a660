"""The folder store's writer: a process of its own that takes a video's bytes over a socket, hashes
them, writes them to a temporary file, fsyncs it and renames it into place, with its sidecar.

Why a process: done in the daemon's own worker threads, every system call of that work (a write,
an fsync, a rename: about ten per video) let the event loop take the GIL, and took it back with a
wait and two context switches. On a burst of finished videos that was 50 switches per video and
a third of the daemon's CPU (bench/burst.py). Here the calls share no GIL with the event loop: the
loop only sends the bytes on (one system call per batch) and reads one answer per video.

One writer writes one video at a time; the folder store keeps one per download under way
(``folder.FileArchive``). It imports nothing but the standard library, and is started as
``python -I writer.py FD [SHARED]``, FD being its end of a socket pair, and SHARED, where the
system has ``memfd_create`` (Linux), a memory file the daemon shares with it. Frames, both ways,
are a 4-byte length and that many bytes:

- to the writer: a job (JSON: see :func:`_write_one`), the video's bytes, and an empty frame once
  every byte is sent. Without SHARED, the bytes come in frames of any size. With it, the daemon
  copies them into the shared memory (a ring: ``folder._Ring``) and each frame says where a piece
  lies (:data:`PIECE`: offset and length); a frame of one byte (:data:`PING`) asks the writer to
  say when it is done with every piece before it, so the daemon may copy over them;
- from the writer: an empty frame for each ping, and one answer per job (JSON):
  ``{"size", "sha256", "uri"}``, or what went wrong: ``{"failure", "errno", "strerror",
  "filename"}`` for an OSError, ``{"download": message}`` for a video of the wrong size. An answer
  may come before the job's empty frame (a write failed): the writer then reads the rest of the
  job's frames and drops them, pings too.

Why shared memory: sent through the socket, each byte is copied by the kernel twice (into the
socket, out of it), with the socket's bookkeeping; a copy into shared memory is one plain memcpy,
and the writer hashes and writes the bytes where they lie. On a burst of 2 MB videos that is
about 5% of the daemon's CPU (bench/README.md).

When the socket closes (the daemon gave a video up, or died), a writer removes the video's
temporary file and exits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import signal
import socket
import struct
import sys
import urllib.parse
from collections.abc import Mapping
from typing import Any

FRAME = struct.Struct("!I")  # a frame's length
PIECE = struct.Struct("!QQ")  # where a piece of the video lies in the shared memory: offset, length
PING = b"?"  # the daemon asks to be told once every piece sent before is written

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})  # the daemon's, never a writer's

# While a video streams to a file, its bytes are handed to the disk every this many bytes
# (posix_fadvise DONTNEED starts their writeback and frees their page cache), so the fsync at the end
# waits for the last few MiB, not for the whole video, and archiving evicts no one's cache. After
# the fsync, the whole file leaves the cache (a video under 8 MiB never reached a stretch): on a
# burst of 2 MB videos, a page cache grown by gigabytes cost the kernel 3x the CPU per write here
# (bench/burst.py).
WRITEBACK_BYTES = 8 * 1024 * 1024

_FADVISE = getattr(os, "posix_fadvise", None)  # not on macOS: there the fsync does it all


class Closed(Exception):
    """The socket closed in the middle of a job: the daemon gave the video up, or died."""


class Frames:
    """Frames read from a socket, into one buffer that grows to the largest frame."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray(1024 * 1024)

    def read(self) -> memoryview | None:
        """The next frame (valid until the next read), or None if the socket closed before it."""
        head = self._exactly(FRAME.size, at_start=True)
        if head is None:
            return None
        (length,) = FRAME.unpack(head)
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        return self._exactly(length)

    def _exactly(self, size: int, *, at_start: bool = False) -> memoryview | None:
        view = memoryview(self._buffer)[:size]
        got = 0
        while got < size:
            n = self._sock.recv_into(view[got:])
            if n == 0:
                if at_start and got == 0:
                    return None
                raise Closed
            got += n
        return view


def send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    body = json.dumps(message).encode()
    sock.sendall(FRAME.pack(len(body)) + body)


def serve(sock: socket.socket, shared: memoryview | None = None) -> None:
    """Write the videos sent on ``sock``, one after another, until it closes; with ``shared``
    (the shared memory), their bytes lie there and the frames say where."""
    frames = Frames(sock)
    real_roots: dict[str, str] = {}
    while (job := frames.read()) is not None:
        answer = _write_one(json.loads(bytes(job)), frames, sock, real_roots, shared)
        if answer is not None:
            send(sock, answer)


def _write_one(
    job: dict[str, Any],
    frames: Frames,
    sock: socket.socket,
    real_roots: dict[str, str],
    shared: memoryview | None,
) -> dict[str, Any] | None:
    """Write one video: ``job`` holds ``root`` (the folder), ``task_id``, ``temp`` (the temporary
    file's path), ``expected`` (its size, or null), ``sidecar`` (what ``{task_id}.json`` holds
    besides the hash and size, or null) and ``leftovers`` (whether a dead attempt's temporary
    files may lie in ``temp``'s folder, to remove first). The answer to send, or None if it was
    sent already."""
    temp = job["temp"]
    digest = hashlib.sha256()
    size = 0
    fd: int | None = None
    failed: dict[str, Any] | None = None
    try:
        while (frame := frames.read()) is not None and len(frame):
            if failed is not None:
                continue  # answered already: the rest of the job's frames are dropped
            if shared is not None:
                if len(frame) != PIECE.size:  # a ping: every piece before it is written
                    sock.sendall(FRAME.pack(0))
                    continue
                offset, length = PIECE.unpack(frame)
                frame = shared[offset : offset + length]
            try:
                if fd is None:
                    fd = _open_video(job)
                digest.update(frame)
                write_all(fd, frame)
                start, size = size, size + len(frame)
                if _FADVISE is not None and size // WRITEBACK_BYTES != start // WRITEBACK_BYTES:
                    # A WRITEBACK_BYTES stretch was just completed: hand it to the disk.
                    stretch = (size // WRITEBACK_BYTES - 1) * WRITEBACK_BYTES
                    _FADVISE(fd, stretch, WRITEBACK_BYTES, os.POSIX_FADV_DONTNEED)
            except OSError as exc:
                failed = _failure(exc)
                send(sock, failed)  # now: the daemon stops the download
        if frame is None:
            raise Closed
        if failed is not None:
            return None
        expected = job["expected"]
        if expected is not None and size != expected:
            return {
                "download": f"truncated download: got {size} bytes, Content-Length said {expected}"
            }
        if fd is None:  # an empty video
            fd = _open_video(job)
        owned, fd = fd, None  # the commit closes it
        uri = _commit(job, owned, temp, digest.hexdigest(), size, real_roots)
        return {"size": size, "sha256": digest.hexdigest(), "uri": uri}
    except OSError as exc:
        return _failure(exc)
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)


def _open_video(job: dict[str, Any]) -> int:
    """The video's temporary file, made; a dead attempt's temporary files go as it is, where
    the job says there may be some: the folder's listing is read whole, every name in it."""
    if job["leftovers"]:
        discard(os.path.dirname(job["temp"]), job["task_id"], None)
    return open_new(job["temp"])


def _commit(
    job: dict[str, Any], fd: int, temp: str, sha256: str, size: int, real_roots: dict[str, str]
) -> str:
    """Make the written video whole on disk and put it under its name, then its sidecar: the
    video's URI. Closes ``fd``; removes what it leaves unfinished."""
    root, task_id = job["root"], job["task_id"]
    described = None
    try:
        try:
            os.fsync(fd)
            if _FADVISE is not None:
                # Written and on disk: its pages leave the cache (see WRITEBACK_BYTES).
                _FADVISE(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if job["sidecar"] is not None:
            sidecar = job["sidecar"] | {"sha256": sha256, "bytes": str(size)}
            described = sidecar_file(temp, sidecar)
        os.replace(temp, os.path.join(root, f"{task_id}.mp4"))
        sync_dir(root)
        if described is not None:
            # After the video's rename is on disk: a sidecar never describes a video that is
            # not there.
            os.replace(described, os.path.join(root, f"{task_id}.json"))
            described = None
            sync_dir(root)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        if described is not None:
            with contextlib.suppress(OSError):
                os.unlink(described)
    if root not in real_roots:
        real_roots[root] = os.path.realpath(root)  # symbolic links resolved, once
    return file_uri(os.path.join(real_roots[root], f"{task_id}.mp4"))


def _failure(exc: OSError) -> dict[str, Any]:
    return {
        "failure": "archive folder write failed",
        "errno": exc.errno,
        "strerror": exc.strerror or str(exc) or type(exc).__name__,
        "filename": None if exc.filename is None else os.fsdecode(exc.filename),
    }


def temp_names(incoming: str) -> list[str]:
    """The names in the folder ``incoming`` of unfinished videos and sidecars (``*.part``)."""
    try:
        names = os.listdir(incoming)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [name for name in names if name.endswith(".part")]


def task_of(name: str) -> str:
    """The task id of an unfinished file's name (``{task_id}.{token}.part``, or ``-json.part``)."""
    return name.rsplit(".", 2)[0]


def discard(incoming: str, task_id: str, started_before: float | None) -> int:
    """Remove ``task_id``'s unfinished files in ``incoming`` (only those last written before the
    POSIX time ``started_before``): how many."""
    removed = 0
    for name in temp_names(incoming):
        if task_of(name) != task_id:
            continue
        path = os.path.join(incoming, name)
        try:
            if started_before is not None and os.stat(path).st_mtime >= started_before:
                continue
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            continue
    return removed


def sidecar_file(video_temp: str, sidecar: Mapping[str, str]) -> str:
    """``sidecar`` written whole to a temporary file beside the video's, on disk: its path, for the
    rename to ``{task_id}.json``. Named after the video's temporary file
    (``{task_id}.{random}-json.part``), so the same clean-up finds one a kill left behind."""
    temp = video_temp.removesuffix(".part") + "-json.part"
    fd = open_new(temp)
    try:
        write_all(fd, json.dumps(sidecar, indent=2, sort_keys=True).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    os.close(fd)
    return temp


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Every byte of ``data`` to ``fd`` (a write may take only part: a signal, a disk filling up)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def open_new(path: str) -> int:
    """``path`` opened to write, its folder made if it is missing (``check`` made it at start)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, flags, 0o666)


def sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_uri(path: str) -> str:
    """``file://`` and the absolute ``path``, as pathlib's ``as_uri`` writes it."""
    return "file://" + urllib.parse.quote_from_bytes(os.fsencode(path))


def main(argv: list[str]) -> None:
    # A stop is the daemon's to make: systemd signals every process of the service, a terminal's
    # Ctrl-C its whole process group, and the daemon's grace period lets the videos under way
    # finish. A writer ends when the daemon closes its socket, or exits. It starts with these
    # signals blocked (folder._stop_signals_blocked): one sent meanwhile is dropped here.
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    sock = socket.socket(fileno=int(argv[1]))
    shared = memoryview(mmap.mmap(int(argv[2]), 0)) if len(argv) > 2 else None
    try:
        serve(sock, shared)
    except (Closed, ConnectionError):
        pass  # the daemon is gone, or gave the video up: its temporary file went in _write_one
    finally:
        sock.close()


if __name__ == "__main__":
    main(sys.argv)
