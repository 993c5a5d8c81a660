"""Log lines from several processes sharing one stderr (``run --processes N``, or a supervisor and
its children under systemd) stay whole: each is written in one system call, which a pipe keeps
whole up to PIPE_BUF (4 KiB), so a log shipper reads one JSON object per line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

LINES = 10000
# Each process logs LINES lines of about 300 bytes (a task id, a URI and a hash, as video_archived).
WRITER = f"""
import sys
import structlog
from seedance_archiver import logs
logs.configure("json", stream=sys.stderr)
log = structlog.get_logger("lines").bind(task_id="video_" + sys.argv[1])
sys.stdin.read(1)  # both start together, once both have imported
for n in range({LINES}):
    log.info("video_archived", n=n, uri="file:///var/lib/archive/video.mp4", sha256="ab" * 32)
"""


def test_lines_of_two_processes_on_one_pipe_are_each_whole() -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as reader:
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, name],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=write_end,
            )
            for name in ("a", "b")
        ]
        os.close(write_end)  # the pipe ends once both writers have exited
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write(b"go")
            writer.stdin.close()
        output = reader.read()
        for writer in writers:
            assert writer.wait(timeout=60) == 0
    lines = output.decode().splitlines()
    events = [json.loads(line) for line in lines]  # a split line is not JSON
    assert len(events) == 2 * LINES
    for name in ("a", "b"):
        numbers = [e["n"] for e in events if e["task_id"] == f"video_{name}"]
        assert numbers == list(range(LINES))
