"""The folder store's writer (archive/writer.py) over its socket, run here in a thread: one answer
per video, the stream kept in step after a failure, nothing left behind when the daemon goes.

The writer as a process, started and stopped by the folder store, is in
tests/integration/test_archive.py; what every store does is in tests/contract/.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from seedance_archiver.archive import folder, writer

WAIT = 30.0  # seconds for the writer's thread to answer: never reached unless it hangs


class Daemon:
    """The daemon's end of a writer's socket, and the writer serving the other end in a thread."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.sock, theirs = socket.socketpair()
        self.serving = pool.submit(self._serve, theirs)
        self.gave_up = False  # the socket was closed in the middle of a video

    @staticmethod
    def _serve(sock: socket.socket) -> None:
        with sock:
            writer.serve(sock)

    def frame(self, body: bytes) -> None:
        self.sock.sendall(writer.FRAME.pack(len(body)) + body)

    def job(self, root: pathlib.Path, task_id: str, expected: int | None, **extra: Any) -> str:
        temp = str(root / folder.INCOMING_DIR / f"{task_id}.{'0' * 32}.part")
        job = {"root": str(root), "task_id": task_id, "temp": temp, "expected": expected}
        self.frame(json.dumps({"sidecar": None} | job | extra).encode())
        return temp

    def answer(self) -> dict[str, Any]:
        self.sock.settimeout(WAIT)
        head = self.sock.recv(writer.FRAME.size, socket.MSG_WAITALL)
        (length,) = writer.FRAME.unpack(head)
        told: dict[str, Any] = json.loads(self.sock.recv(length, socket.MSG_WAITALL))
        return told


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        end = Daemon(pool)
        yield end
        end.sock.close()
        if not end.gave_up:
            end.serving.result(WAIT)  # a writer ends quietly when the socket closes between videos


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
        daemon.frame(piece)
    daemon.frame(b"")
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
        daemon.frame(str(n).encode())
        daemon.frame(b"")
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
    daemon.frame(b"short")
    daemon.frame(b"")
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
    daemon.frame(b"v" * 1000)
    told = daemon.answer()
    assert told["failure"] == "archive folder write failed"
    assert (told["errno"], told["strerror"]) == (28, "No space left on device")
    daemon.frame(b"v" * 1000)  # sent before the answer arrived
    daemon.frame(b"")
    monkeypatch.undo()
    daemon.job(root, "video_y", 1)
    daemon.frame(b"y")
    daemon.frame(b"")
    assert daemon.answer()["size"] == 1
    assert not (root / "video_x.mp4").exists()


def test_a_closed_socket_mid_video_removes_the_temporary_file(
    daemon: Daemon, root: pathlib.Path
) -> None:
    temp = daemon.job(root, "video_x", 10)
    daemon.frame(b"v" * 5)
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
    daemon.frame(b"x")
    daemon.frame(b"")
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
    daemon.frame(b"x")
    daemon.frame(b"")
    told = daemon.answer()
    assert (told["failure"], told["strerror"]) == (
        "archive folder write failed",
        "Input/output error",
    )
    assert list(root.glob("video_x*")) == []
    assert list((root / folder.INCOMING_DIR).iterdir()) == []
