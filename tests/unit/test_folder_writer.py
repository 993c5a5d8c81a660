"""The folder store's writer (archive/writer.py) over its socket, run here in a thread: one answer
per video, the stream kept in step after a failure, nothing left behind when the daemon goes.

The writer as a process, started and stopped by the folder store, is in
tests/integration/test_archive.py; what every store does is in tests/contract/.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import mmap
import os
import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from seedance_archiver.archive import folder, writer

WAIT = 30.0  # seconds for the writer's thread to answer: never reached unless it hangs


class Daemon:
    """The daemon's end of a writer's socket, and the writer serving the other end in a thread;
    with ``shared``, a memory it shares with the writer, where the video's bytes go (the frames
    say where), as the folder store does where the system has memfd_create."""

    SHARED_BYTES = 256 * 1024

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor, *, shared: bool) -> None:
        self.sock, theirs = socket.socketpair()
        self.shared = mmap.mmap(-1, self.SHARED_BYTES) if shared else None
        self.at = 0  # where the next piece goes in the shared memory
        view = None if self.shared is None else memoryview(self.shared)
        self.serving = pool.submit(self._serve, theirs, view)
        self.gave_up = False  # the socket was closed in the middle of a video

    @staticmethod
    def _serve(sock: socket.socket, shared: memoryview | None) -> None:
        with sock:
            writer.serve(sock, shared)

    def frame(self, body: bytes) -> None:
        self.sock.sendall(writer.FRAME.pack(len(body)) + body)

    def data(self, piece: bytes) -> None:
        """A piece of the video: as it is, or copied into the shared memory and its place sent.
        The tests here wait for each answer, so nothing is copied over before it is written."""
        if self.shared is None:
            self.frame(piece)
            return
        if self.at + len(piece) > self.SHARED_BYTES:
            self.at = 0
        self.shared[self.at : self.at + len(piece)] = piece
        self.frame(writer.PIECE.pack(self.at, len(piece)))
        self.at += len(piece)

    def end(self) -> None:
        self.frame(b"")

    def job(self, root: pathlib.Path, task_id: str, expected: int | None, **extra: Any) -> str:
        temp = str(root / folder.INCOMING_DIR / f"{task_id}.{'0' * 32}.part")
        job = {"root": str(root), "task_id": task_id, "temp": temp, "expected": expected}
        self.frame(json.dumps({"sidecar": None, "leftovers": True} | job | extra).encode())
        return temp

    def next_length(self) -> int:
        """The length of the next frame the writer sends (0: a pong)."""
        self.sock.settimeout(WAIT)
        (length,) = writer.FRAME.unpack(self.sock.recv(writer.FRAME.size, socket.MSG_WAITALL))
        return int(length)

    def answer(self) -> dict[str, Any]:
        self.sock.settimeout(WAIT)
        head = self.sock.recv(writer.FRAME.size, socket.MSG_WAITALL)
        (length,) = writer.FRAME.unpack(head)
        told: dict[str, Any] = json.loads(self.sock.recv(length, socket.MSG_WAITALL))
        return told


@contextlib.contextmanager
def serving(*, shared: bool) -> Iterator[Daemon]:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        end = Daemon(pool, shared=shared)
        yield end
        end.sock.close()
        if not end.gave_up:
            end.serving.result(WAIT)  # a writer ends quietly when the socket closes between videos


@pytest.fixture(params=["socket", "shared memory"])
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    with serving(shared=request.param == "shared memory") as end:
        yield end


@pytest.fixture
def shared() -> Iterator[Daemon]:
    """The daemon's end where the bytes go through shared memory, for its own cases."""
    with serving(shared=True) as end:
        yield end


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / folder.INCOMING_DIR).mkdir()
    return tmp_path


def test_a_video_in_frames_is_written_whole_with_its_sidecar(
    daemon: Daemon, root: pathlib.Path
) -> None:
    pieces = [b"a" * 100_000, b"b" * 3, b"c" * 70_000]
    body = b"".join(pieces)
    daemon.job(root, "video_x", len(body), sidecar={"task-id": "video_x"})
    for piece in pieces:
        daemon.data(piece)
    daemon.end()
    sha256 = hashlib.sha256(body).hexdigest()
    assert daemon.answer() == {
        "size": len(body),
        "sha256": sha256,
        "uri": (root / "video_x.mp4").resolve().as_uri(),
    }
    assert (root / "video_x.mp4").read_bytes() == body
    sidecar = json.loads((root / "video_x.json").read_text())
    assert sidecar == {"task-id": "video_x", "sha256": sha256, "bytes": str(len(body))}
    assert list((root / folder.INCOMING_DIR).iterdir()) == []


def test_one_writer_writes_one_video_after_another(daemon: Daemon, root: pathlib.Path) -> None:
    for n in range(3):
        daemon.job(root, f"video_{n}", 1)
        daemon.data(str(n).encode())
        daemon.end()
        assert daemon.answer()["size"] == 1
    assert sorted(p.name for p in root.glob("*.mp4")) == [
        "video_0.mp4",
        "video_1.mp4",
        "video_2.mp4",
    ]


def test_a_size_other_than_announced_is_a_download_error(
    daemon: Daemon, root: pathlib.Path
) -> None:
    daemon.job(root, "video_x", 10)
    daemon.data(b"short")
    daemon.end()
    assert daemon.answer() == {
        "download": "truncated download: got 5 bytes, Content-Length said 10"
    }
    assert not (root / "video_x.mp4").exists()
    assert list((root / folder.INCOMING_DIR).iterdir()) == []


def test_a_failed_write_is_answered_at_once_and_the_rest_dropped(
    daemon: Daemon, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/dev/full fails every write with ENOSPC. The answer comes before the video's last frame, so
    the daemon stops its download; the frames it sent meanwhile are read and dropped, and the
    next video is written as usual."""
    monkeypatch.setattr(writer, "open_new", lambda path: os.open("/dev/full", os.O_WRONLY))
    daemon.job(root, "video_x", None)
    daemon.data(b"v" * 1000)
    told = daemon.answer()
    assert told["failure"] == "archive folder write failed"
    assert (told["errno"], told["strerror"]) == (28, "No space left on device")
    daemon.data(b"v" * 1000)  # sent before the answer arrived
    daemon.end()
    monkeypatch.undo()
    daemon.job(root, "video_y", 1)
    daemon.data(b"y")
    daemon.end()
    assert daemon.answer()["size"] == 1
    assert not (root / "video_x.mp4").exists()


def test_a_closed_socket_mid_video_removes_the_temporary_file(
    daemon: Daemon, root: pathlib.Path
) -> None:
    temp = daemon.job(root, "video_x", 10)
    daemon.data(b"v" * 5)
    daemon.sock.shutdown(socket.SHUT_WR)  # the daemon gave the video up, or died
    daemon.gave_up = True
    with pytest.raises(writer.Closed):
        daemon.serving.result(WAIT)
    assert not os.path.exists(temp)
    assert list((root / folder.INCOMING_DIR).iterdir()) == []
    assert not (root / "video_x.mp4").exists()


def test_a_dead_attempts_files_go_as_the_video_begins(daemon: Daemon, root: pathlib.Path) -> None:
    dead = root / folder.INCOMING_DIR / "video_x.deadbeef.part"
    dead_sidecar = root / folder.INCOMING_DIR / "video_x.deadbeef-json.part"
    other = root / folder.INCOMING_DIR / "video_y.deadbeef.part"
    for path in (dead, dead_sidecar, other):
        path.write_bytes(b"old")
    daemon.job(root, "video_x", 1)
    daemon.data(b"x")
    daemon.end()
    assert daemon.answer()["size"] == 1
    assert [p.name for p in (root / folder.INCOMING_DIR).iterdir()] == [other.name]


def test_a_failed_fsync_leaves_nothing(
    daemon: Daemon, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk going bad fails the fsync (EIO): the answer says so, and neither the video nor its
    temporary file is left."""

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)  # the writer runs in this process here
    daemon.job(root, "video_x", 1, sidecar={"task-id": "video_x"})
    daemon.data(b"x")
    daemon.end()
    told = daemon.answer()
    assert (told["failure"], told["strerror"]) == (
        "archive folder write failed",
        "Input/output error",
    )
    assert list(root.glob("video_x*")) == []
    assert list((root / folder.INCOMING_DIR).iterdir()) == []


def test_a_ping_is_answered_once_every_piece_before_it_is_written(
    shared: Daemon, root: pathlib.Path
) -> None:
    temp = shared.job(root, "video_x", 6)
    shared.data(b"abc")
    shared.frame(writer.PING)
    assert shared.next_length() == 0  # the pong
    assert pathlib.Path(temp).read_bytes() == b"abc"  # written before it answered
    shared.data(b"def")
    shared.end()
    assert shared.answer()["size"] == 6
    assert (root / "video_x.mp4").read_bytes() == b"abcdef"


def test_after_a_failed_write_a_ping_is_dropped_with_the_rest(
    shared: Daemon, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "open_new", lambda path: os.open("/dev/full", os.O_WRONLY))
    shared.job(root, "video_x", None)
    shared.data(b"v" * 1000)
    assert shared.answer()["failure"] == "archive folder write failed"
    shared.frame(writer.PING)  # sent before the answer arrived
    shared.end()
    monkeypatch.undo()
    shared.job(root, "video_y", 1)
    shared.data(b"y")
    shared.end()
    assert shared.answer()["size"] == 1  # no pong came first
