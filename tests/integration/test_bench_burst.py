"""bench/burst.py, run small, as its README says: one command from a checkout.

Its seconds and ratios are the benchmark's to report (bench/README.md), never asserted here. What is
asserted is what its figures rest on: the daemon it starts archives every row of the burst, and its
per-video counts are the daemon's behaviour, read from the simulator, the daemon's ``/metrics`` and
the archive: one poll and one outbox row per video, and into a folder two files (the video and its
sidecar). A benchmark whose daemon quietly archived nothing, or polled twice, would fail here.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
VIDEOS = 12
SIZE = 100_000
ROUND_SECONDS = 120  # the benchmark's own deadline for the round
RUN_SECONDS = 400  # the whole run, its start-up and clean-up included


def _bench(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench.burst`` with ``argv``, from the repository's root, as the README runs it."""
    return subprocess.run(
        [sys.executable, "-m", "bench.burst", *argv],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        check=False,
    )


def _burst(tmp_path: pathlib.Path, *options: str) -> str:
    """The benchmark's report: one round of VIDEOS x SIZE, measured at once (``--settle 0``:
    a test suite deletes files all the time, and the wait for a quiet ext4 is for real runs)."""
    command = ["--videos", str(VIDEOS), "--size", str(SIZE), "--rounds", "1", "--settle", "0"]
    # Its own deadline ends a round that never finishes through its clean-up (the daemon and the
    # simulator stopped), and its report then says how many were archived.
    command += ["--dir", str(tmp_path), "--deadline", str(ROUND_SECONDS)]
    done = _bench(*command, *options)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _line(report: str, start: str) -> str:
    """The report's line that starts with ``start``."""
    return next(line for line in report.splitlines() if line.startswith(start))


def _per_video(report: str) -> dict[str, float]:
    """The report's ``per video:`` line, as {what: how many}."""
    line = _line(report, "per video: ")
    counts: dict[str, float] = {}
    for part in line.removeprefix("per video: ").split(", "):
        number, _, what = part.partition(" ")
        counts[re.sub(r" \(.*\)$", "", what)] = float(number)
    return counts


def test_into_a_folder_every_video_is_archived_with_its_sidecar(tmp_path: pathlib.Path) -> None:
    report = _burst(tmp_path, "--kept-floor")

    assert _line(report, f"{VIDEOS} of ").startswith(
        f"{VIDEOS} of {VIDEOS} archived; sqlite + folder, 1 process(es)"
    )
    counts = _per_video(report)
    assert counts["polls"] == 1.0
    assert counts["outbox rows"] == 1.0
    assert counts["files in the archive"] == 2.0  # the video and its sidecar
    assert _line(report, "CPU ms per video: event loop ")
    assert _line(report, "context switches per video: event loop ")
    # The second floor ran beside the first, and the daemon is compared with it too.
    assert re.search(
        r"^the floor with the daemon's kept file work .* the daemon against it: ", report, re.M
    )
    assert not list(tmp_path.iterdir())  # the run's files went with it


def test_on_postgresql_into_s3(
    tmp_path: pathlib.Path, pg_available: None, s3_endpoint: str
) -> None:
    report = _burst(tmp_path, "--db", "postgresql", "--s3", s3_endpoint)

    assert _line(report, f"{VIDEOS} of ").startswith(
        f"{VIDEOS} of {VIDEOS} archived; postgresql + S3, 1 process(es)"
    )
    counts = _per_video(report)
    assert counts["polls"] == 1.0
    assert counts["outbox rows"] == 1.0
    assert counts["PostgreSQL commits"] > 0


def test_a_kept_floor_is_refused_for_s3() -> None:
    done = _bench("--kept-floor", "--s3", "http://127.0.0.1:9")
    assert done.returncode == 2
    assert "--kept-floor is the folder's" in done.stderr
