"""From ``succeeded`` to archived on Replicate, at the default cadence: how much of the hour is used.

Replicate removes an API prediction's data an hour after it finished, so what counts is how soon
after ``succeeded`` the video is safe. The installed command (``seedance-archiver run``) runs as a
user runs it, with ``SEEDANCE_PROVIDER=replicate`` and every cadence at its default (standard
30-60 s), on SQLite and a folder, against the simulator in Replicate's dialect (in this process, on
loopback). ``--tasks`` standard 720p predictions of ``bytedance/seedance-1-pro`` are inserted at
once; each finishes at a time drawn uniformly in ``[--min-ready, --max-ready]`` seconds, the seed's
720p range (2-5 minutes), so the defaults of the fewer-polls policy apply as for any user: no poll
before the seed's shortest time, then patient polls near the top of the 30-60 s range.

Measured, per prediction: ``archived_at`` - its ``completed_at`` at the simulator; p50, p99 and max,
against the bound the issue sets (the longest standard interval + 30 s) and the hour. Also the
polls per video. Nothing is timed by an assertion; the run prints a table.

    .venv/bin/python -m bench.replicate --tasks 60
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import pathlib
import random
import sqlite3
import subprocess
import sys
import tempfile
import time

from seedance_archiver import simulator

from bench import common

MODEL = "bytedance/seedance-1-pro"
LONGEST_STANDARD_SECONDS = 60.0  # SEEDANCE_POLL_STANDARD's default high bound
HOUR_SECONDS = 3600.0
CLI = pathlib.Path(sys.executable).parent / "seedance-archiver"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--min-ready", type=float, default=120.0)
    parser.add_argument("--max-ready", type=float, default=300.0)
    parser.add_argument("--size", type=int, default=2 * 1024 * 1024, help="bytes per video")
    parser.add_argument("--seed", type=int, default=28)
    parser.add_argument("--deadline", type=float, default=900.0, help="give up after (seconds)")
    args = parser.parse_args(argv)
    draw = random.Random(args.seed)
    ids = [f"{n:04d}{draw.getrandbits(100):x}".ljust(26, "0")[:26] for n in range(args.tasks)]
    with tempfile.TemporaryDirectory(prefix="bench-replicate-") as tmp:
        db = pathlib.Path(tmp) / "tasks.db"
        sim = simulator.Simulator(common.API_KEY, dialect="replicate")
        with simulator.SimulatorThread(sim) as server:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE_")}
            env.update(
                {
                    "SEEDANCE_PROVIDER": "replicate",
                    "SEEDANCE_API_KEY": common.API_KEY,
                    "SEEDANCE_API_BASE_URL": server.url,
                    "SEEDANCE_DATABASE_URL": f"sqlite:///{db}",
                    "SEEDANCE_ARCHIVE_URL": f"file://{tmp}/archive",
                    "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES": "http",
                    "SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS": "true",
                    "SEEDANCE_HTTP_PORT": "0",
                    "SEEDANCE_LOG_FORMAT": "json",
                }
            )
            subprocess.run([str(CLI), "migrate"], env=env, check=True, capture_output=True)
            log = pathlib.Path(tmp) / "daemon.log"
            with log.open("wb") as out:
                daemon = subprocess.Popen(
                    [str(CLI), "run"], env=env, stdout=out, stderr=subprocess.STDOUT
                )
            try:
                start = time.time()
                ready = {}
                for task_id in ids:
                    ready[task_id] = draw.uniform(args.min_ready, args.max_ready)
                    sim.add_task(
                        task_id,
                        created=start,
                        queued_seconds=min(5.0, ready[task_id] / 2),
                        ready_seconds=ready[task_id],
                        size=args.size,
                        model=MODEL,
                    )
                with sqlite3.connect(db, timeout=30) as conn:
                    conn.executemany(
                        "INSERT INTO video_tasks (task_id) VALUES (?)", [(i,) for i in ids]
                    )
                rows = _wait_archived(db, ids, start + args.deadline)
            finally:
                daemon.terminate()
                daemon.wait(timeout=60)
    delays = sorted(
        _utc(rows[i][0]).timestamp() - (start + ready[i]) for i in ids if rows[i][0] is not None
    )
    polls = sum(rows[i][1] for i in ids) / len(ids)
    bound = LONGEST_STANDARD_SECONDS + 30
    print(f"{len(delays)} of {len(ids)} archived; {polls:.1f} polls per video")
    print(
        common.markdown_table(
            ["tasks", "p50 s", "p99 s", "max s", "bound s", "p99 / bound", "p99 / hour"],
            [
                [
                    len(ids),
                    f"{common.percentile(delays, 50):.1f}",
                    f"{common.percentile(delays, 99):.1f}",
                    f"{delays[-1]:.1f}",
                    f"{bound:.0f}",
                    f"{common.percentile(delays, 99) / bound:.2f}",
                    f"{common.percentile(delays, 99) / HOUR_SECONDS:.3f}",
                ]
            ],
        )
    )


def _wait_archived(
    db: pathlib.Path, ids: list[str], until: float
) -> dict[str, tuple[str | None, int]]:
    """Every row's (archived_at, polls) once all are archived, or at ``until``."""
    while True:
        with sqlite3.connect(db, timeout=30) as conn:
            found = {
                task_id: (archived_at, polls)
                for task_id, archived_at, polls in conn.execute(
                    "SELECT task_id, archived_at, polls FROM video_tasks"
                )
            }
        if all(found.get(i, (None, 0))[0] for i in ids) or time.time() > until:
            return {i: found.get(i, (None, 0)) for i in ids}
        time.sleep(1.0)


def _utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


if __name__ == "__main__":
    main()
