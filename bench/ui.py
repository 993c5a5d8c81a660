"""The page under ``/ui/`` on a large table: how long the task list takes at 1,000,000 rows.

A PostgreSQL database of its own (dropped at the end) is migrated and filled with ``--rows`` rows
(one in 100 still polling, due in a day; the rest archived), spread over the modes and two
providers, inserted a second apart. The installed ``seedance-archiver run`` serves it (against the
simulator, in a process of its own; nothing is due, so it only ticks), and each page is asked for
``--rounds`` times over HTTP on loopback: the task list, first page and a page deep in the table
(by its keyset cursor), filtered by state, by mode and provider, one id; a task's page; the
overview. The floor, in the same run, is ``/healthz`` on the same server: an HTTP round trip with
no database. The plan of each list query is printed: index scans only, no sequential scan, no sort.

    .venv/bin/python -m bench.ui --rows 1000000
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import psycopg

from bench import common

CLI = pathlib.Path(sys.executable).parent / "seedance-archiver"
TARGET_MS = 200.0

FILL = """
INSERT INTO video_tasks (task_id, mode, state, provider, provider_status, model, inserted_at,
    updated_at, next_attempt_at, polls, archive_uri, archive_bytes, archive_sha256, expires_at)
SELECT
    'video_bench_' || lpad(i::text, 8, '0'),
    (ARRAY['draft', 'standard', 'flex'])[1 + i %% 3],
    CASE WHEN i %% 100 = 0 THEN 'polling' ELSE 'archived' END,
    CASE WHEN i %% 7 = 0 THEN 'ark' ELSE 'reseller' END,
    CASE WHEN i %% 100 = 0 THEN 'processing' ELSE 'completed' END,
    'seedance_1_5_pro_720p',
    now() - make_interval(secs => %(rows)s - i),
    now() - make_interval(secs => %(rows)s - i),
    now() + interval '1 day',
    3,
    CASE WHEN i %% 100 = 0 THEN NULL ELSE 'file:///archive/video_bench_' || i || '.mp4' END,
    CASE WHEN i %% 100 = 0 THEN NULL ELSE 2000000 END,
    CASE WHEN i %% 100 = 0 THEN NULL ELSE md5(i::text) || md5(i::text) END,
    now() + interval '1 day'
FROM generate_series(1, %(rows)s) AS i
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    with common.database("bench_ui") as (name, url), tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE_")}
        port = common.free_port()
        with common.simulator() as (sim_url, _):
            env.update(
                {
                    "SEEDANCE_API_KEY": common.API_KEY,
                    "SEEDANCE_API_BASE_URL": sim_url,
                    "SEEDANCE_DATABASE_URL": url,
                    "SEEDANCE_ARCHIVE_URL": f"file://{tmp}/archive",
                    "SEEDANCE_HTTP_PORT": str(port),
                    "SEEDANCE_LOG_FORMAT": "json",
                }
            )
            subprocess.run([str(CLI), "migrate"], env=env, check=True, capture_output=True)
            started = time.monotonic()
            with psycopg.connect(common.pg_dsn(name), autocommit=True) as conn:
                conn.execute(FILL, {"rows": args.rows})
                conn.execute("VACUUM ANALYZE video_tasks")
                deep = conn.execute(
                    "SELECT inserted_at, task_id FROM video_tasks ORDER BY inserted_at, task_id "
                    "OFFSET %s LIMIT 1",
                    (args.rows // 10,),
                ).fetchone()
                plans = _plans(conn, deep)
            print(f"{args.rows:,} rows in {time.monotonic() - started:.0f} s")
            assert deep is not None
            cursor = f"{deep[0].isoformat()}|{deep[1]}"
            pages = {
                "list, first page": "/ui/tasks",
                "list, 90% deep (keyset)": "/ui/tasks?"
                + urllib.parse.urlencode({"before": cursor}),
                "list, state=polling": "/ui/tasks?state=polling",
                "list, mode=flex provider=ark": "/ui/tasks?mode=flex&provider=ark",
                "list, one id": "/ui/tasks?id=video_bench_00500000",
                "a task's page": "/ui/tasks/video_bench_00500001",
                "overview": "/ui/",
            }
            log_path = pathlib.Path(tmp) / "daemon.log"
            with log_path.open("wb") as out:
                daemon = subprocess.Popen(
                    [str(CLI), "run"], env=env, stdout=out, stderr=subprocess.STDOUT
                )
            try:
                common.wait_for_port(port, 60)
                floor = _times(port, "/healthz", args.rounds)
                rows = []
                for label, path in pages.items():
                    took = _times(port, path, args.rounds)
                    p50, p95 = common.percentile(took, 50), common.percentile(took, 95)
                    rows.append(
                        [
                            label,
                            f"{p50:.1f}",
                            f"{p95:.1f}",
                            f"{p50 / common.percentile(floor, 50):.1f}",
                            "yes" if p95 < TARGET_MS else "NO",
                        ]
                    )
            finally:
                daemon.terminate()
                daemon.wait(timeout=60)
    print(f"floor (/healthz): p50 {common.percentile(floor, 50):.1f} ms")
    print(
        common.markdown_table(
            ["page", "p50 ms", "p95 ms", "p50 / floor", f"p95 < {TARGET_MS:.0f} ms"], rows
        )
    )
    print("\n".join(plans))


def _times(port: int, path: str, rounds: int) -> list[float]:
    """Milliseconds of each of ``rounds`` GETs of ``path`` (one warm-up first)."""
    took = []
    for n in range(rounds + 1):
        started = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            response.read()
            assert response.status == 200, (path, response.status)
        if n:
            took.append((time.perf_counter() - started) * 1000)
    return took


def _plans(
    conn: psycopg.Connection[tuple[object, ...]], deep: tuple[object, ...] | None
) -> list[str]:
    """The plan of each list query as the store sends it: its scan nodes, one line each."""
    queries = {
        "first page": ("ORDER BY inserted_at DESC, task_id DESC LIMIT 50", ()),
        "deep page": (
            "WHERE (inserted_at, task_id) < (%s, %s) ORDER BY inserted_at DESC, task_id DESC "
            "LIMIT 50",
            deep or (),
        ),
        "state": ("WHERE state = 'polling' ORDER BY inserted_at DESC, task_id DESC LIMIT 50", ()),
    }
    lines = []
    for label, (tail, params) in queries.items():
        plan = conn.execute(f"EXPLAIN SELECT * FROM video_tasks {tail}", params).fetchall()
        nodes = [
            str(row[0]).strip() for row in plan if "Scan" in str(row[0]) or "Sort" in str(row[0])
        ]
        lines.append(f"plan, {label}: " + "; ".join(nodes))
    return lines


if __name__ == "__main__":
    main()
