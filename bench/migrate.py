"""`seedance-archiver migrate` on a large video_tasks while a feeder inserts: how long inserts wait.

Creates its own database, migrates it to the first revision (0001), fills ``--rows`` rows with one
``INSERT ... SELECT generate_series`` (every tenth row active, the others archived with a
``completed_at``: the partial indexes of 0003 and 0007 cover 10% and 90% of them), then VACUUM
ANALYZE. Then, for the code as it is here and, with ``--before REF``, for the code of commit REF
(``git archive`` into a temporary folder, run with that folder first on PYTHONPATH), each on its own
copy of that database (``CREATE DATABASE ... TEMPLATE``):

- a feeder on its own connection inserts one row every ``--interval-ms`` (autocommit), timing each
  INSERT from send to answer (its wait);
- ``seedance-archiver migrate`` (the CLI, a child process) upgrades 0001 to head, timed;
- once it has exited, ``migrate`` runs again, timed, and the schema before and after it is compared
  (alembic_version, and each index's name, OID and validity): a no-op changes none of them.

Reported: rows, the migrate's seconds and exit, the feeder's inserts during it (count, failures,
p50, p99, longest wait, how many waited over 1 s), and the second migrate's seconds, exit, longest
insert wait and whether it was a no-op. Loops are bounded: each migrate gets ``--timeout`` seconds.

    .venv/bin/python -m bench.migrate --rows 10000000 --before 43440c4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import psycopg
from seedance_archiver import schema

from bench import common

FILL = """
INSERT INTO video_tasks (task_id, mode, state, next_attempt_at, expires_at, completed_at,
                         archived_at, polls)
SELECT 'bench_' || lpad(i::text, 9, '0'),
       (ARRAY['draft', 'standard', 'flex'])[1 + i %% 3],
       CASE WHEN i %% 10 = 0 THEN 'pending' ELSE 'archived' END,
       now() - (i %% 86400) * interval '1 second',
       now() + interval '1 day' - (i %% 86400) * interval '1 second',
       CASE WHEN i %% 10 = 0 THEN NULL ELSE now() - (i %% 86400) * interval '1 second' END,
       CASE WHEN i %% 10 = 0 THEN NULL ELSE now() - (i %% 86400) * interval '1 second' END,
       5
FROM generate_series(1, %(rows)s) AS i
"""
SCHEMA_STATE = """
SELECT (SELECT string_agg(version_num, ',') FROM alembic_version),
       (SELECT string_agg(c.relname || ':' || i.indexrelid || ':' || i.indisvalid, ' '
                          ORDER BY c.relname)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid IN (SELECT oid FROM pg_class WHERE relname IN
                              ('video_tasks', 'webhook_outbox', 'archiver_heartbeats')))
"""


class Feeder:
    """Inserts one row every ``interval`` seconds on its own connection and times each insert."""

    def __init__(self, dsn: str, interval: float, prefix: str) -> None:
        self.dsn, self.interval, self.prefix = dsn, interval, prefix
        self.waits: list[tuple[float, float]] = []  # (monotonic start, seconds)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            n, tick = 0, time.monotonic()
            while not self._stop.is_set():
                n += 1
                start = time.monotonic()
                try:
                    conn.execute(
                        "INSERT INTO video_tasks (task_id) VALUES (%s)", [f"{self.prefix}_{n}"]
                    )
                except psycopg.Error as exc:
                    self.failures.append(str(exc).splitlines()[0])
                    if conn.closed:
                        return
                self.waits.append((start, time.monotonic() - start))
                tick += self.interval
                self._stop.wait(max(0.0, tick - time.monotonic()))

    def between(self, start: float, end: float) -> list[float]:
        return [wait for at, wait in self.waits if start <= at < end]


@dataclasses.dataclass
class Run:
    code: str
    seconds: float
    exit: int
    inserts: list[float]
    failures: int
    again_seconds: float
    again_exit: int
    again_longest: float
    no_op: bool
    message: str


def _fill(name: str, rows: int) -> None:
    url = common.PG_URL_TEMPLATE.format(name=name)
    schema.upgrade(url, "0001")
    with psycopg.connect(common.pg_dsn(name), autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        start = time.monotonic()
        conn.execute(FILL, {"rows": rows})
        filled = time.monotonic() - start
        conn.execute("VACUUM ANALYZE video_tasks")
        count, size = conn.execute(
            "SELECT count(*), pg_size_pretty(pg_total_relation_size('video_tasks'))"
            " FROM video_tasks"
        ).fetchone() or (0, "?")
        print(f"filled {count:,} rows in {filled:.0f} s ({size} with indexes)")


@contextlib.contextmanager
def _copy(template: str, suffix: str) -> Iterator[str]:
    name = f"{template}_{suffix}"
    with psycopg.connect(common.PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
    try:
        yield name
    finally:
        with psycopg.connect(common.PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def _code(ref: str | None) -> Iterator[tuple[str, dict[str, str]]]:
    """(label, environment) to run the CLI of the code here, or of commit ``ref``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE_")}
    if ref is None:
        head = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
        yield f"{head} (this tree)", env
        return
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as tmp:
        archive = subprocess.run(
            ["git", "archive", ref, "daemon", "migrations"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        # The wheel's layout: the migrations inside the package.
        (pathlib.Path(tmp) / "daemon/seedance_archiver/migrations").symlink_to("../../migrations")
        env["PYTHONPATH"] = os.pathsep.join([f"{tmp}/daemon", env.get("PYTHONPATH", "")])
        yield ref, env


def _migrate(name: str, env: dict[str, str], timeout: float) -> tuple[float, int, str]:
    env = {**env, "SEEDANCE_DATABASE_URL": common.PG_URL_TEMPLATE.format(name=name)}
    start = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "seedance_archiver", "migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return time.monotonic() - start, -1, f"still running after {timeout:.0f} s (killed)"
    lines = done.stderr.strip().splitlines() + done.stdout.strip().splitlines()
    return time.monotonic() - start, done.returncode, lines[-1] if lines else ""


def _schema_state(name: str) -> tuple[object, ...] | None:
    with psycopg.connect(common.pg_dsn(name), connect_timeout=5) as conn:
        return conn.execute(SCHEMA_STATE).fetchone()


def _measure(template: str, ref: str | None, interval: float, timeout: float) -> Run:
    with _code(ref) as (label, env), _copy(template, "before" if ref else "here") as name:
        check = subprocess.run(
            [sys.executable, "-c", "import seedance_archiver.schema as s; print(s.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        print(f"{label}: {check.stdout.strip()}")
        with Feeder(common.pg_dsn(name), interval, "fed") as feeder:
            while not feeder.waits:  # the feeder is inserting before migrate starts
                time.sleep(interval)
            start = time.monotonic()
            seconds, code, message = _migrate(name, env, timeout)
            end = time.monotonic()
            print(f"{label}: migrate exited {code} after {seconds:.1f} s: {message}")
            before = _schema_state(name)
            again, again_code, _ = _migrate(name, env, timeout)
            again_end = time.monotonic()
            after = _schema_state(name)
        inserts = feeder.between(start, end)
        return Run(
            code=label,
            seconds=seconds,
            exit=code,
            inserts=inserts,
            failures=len(feeder.failures),
            again_seconds=again,
            again_exit=again_code,
            again_longest=max(feeder.between(end, again_end), default=float("nan")),
            no_op=code == 0 and again_code == 0 and before == after,
            message=message,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--interval-ms", type=float, default=50.0)
    parser.add_argument("--before", metavar="REF", help="also measure the code of commit REF")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per migrate")
    args = parser.parse_args(argv)
    interval = args.interval_ms / 1000
    runs = []
    with common.database("bench_migrate") as (template, _url):
        _fill(template, args.rows)
        runs.append(_measure(template, None, interval, args.timeout))
        if args.before:
            runs.append(_measure(template, args.before, interval, args.timeout))
    ms = 1000.0
    print()
    print(
        common.markdown_table(
            [
                "code",
                "rows",
                "migrate s (exit)",
                "inserts during it (failed)",
                "insert wait p50 / p99 / max ms",
                "inserts > 1 s",
                "second migrate s (exit)",
                "its longest insert wait ms",
                "second is a no-op",
            ],
            [
                [
                    run.code,
                    f"{args.rows:,}",
                    f"{run.seconds:.1f} ({run.exit})",
                    f"{len(run.inserts)} ({run.failures})",
                    f"{common.percentile(run.inserts, 50) * ms:.1f} / "
                    f"{common.percentile(run.inserts, 99) * ms:.1f} / "
                    f"{max(run.inserts, default=float('nan')) * ms:.0f}",
                    sum(wait > 1.0 for wait in run.inserts),
                    f"{run.again_seconds:.1f} ({run.again_exit})",
                    f"{run.again_longest * ms:.0f}",
                    "yes" if run.no_op else "NO",
                ]
                for run in runs
            ],
        )
    )
    for run in runs:
        if run.exit != 0:
            print(f"{run.code}: migrate failed: {run.message}")


if __name__ == "__main__":
    main()
