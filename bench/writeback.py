"""Write-backs and claims at scale: the store's ``save`` and ``claim_due`` against other ways to write
the same rows, on PostgreSQL with ``--tasks`` active rows: what a tick's write-back costs at scale.

Loads ``--tasks`` polling rows as ``bench.scale`` does, then for ``--rounds`` rounds claims ``--batch``
due rows and writes them back with each strategy in turn (each strategy gets its own fresh claim):

- executemany: SQLAlchemy's executemany of one UPDATE per row (psycopg 3 sends them in pipeline
  mode, each a prepared statement): ``SqlStore.save`` before it used COPY, and still its fallback;
- ``UPDATE ... FROM (VALUES ...)``: one statement for the whole batch, through the same engine;
- ``COPY`` into a temporary table, then one ``UPDATE ... FROM`` it, in one transaction: written here
  by hand, and ``SqlStore.save`` itself, which now does this on PostgreSQL.

Measured per call: this process's CPU (``time.thread_time``: what the daemon pays on its worker
thread), wall time, and PostgreSQL's CPU (every ``postgres`` process, from /proc). Every strategy
writes exactly the columns ``save`` writes and checks its row count.

Run from the repository root: ``.venv/bin/python -m bench.writeback [--tasks 100000] [--batch 1000]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from seedance_archiver import models, schema, store

from bench import common, scale

OWNER = "bench-writeback"
Writer = Callable[[store.SqlStore, Sequence[models.Task]], int]

# The columns save writes (it clears the lease itself), with the SQL type of each.
FIELDS = [name for name in models.DAEMON_FIELDS if name != "lease_expires_at"]
_TYPES = {
    name: models.video_tasks.c[name].type.compile(dialect=sa.dialects.postgresql.dialect())
    for name in FIELDS
}


def _outcome(task: models.Task, now: dt.datetime) -> models.Task:
    """What a poll of a still-processing task writes back."""
    return task.replace(
        polls=task.polls + 1,
        last_polled_at=now,
        updated_at=now,
        next_attempt_at=now + dt.timedelta(seconds=45),
        provider_status="processing",
    )


def write_save(sql_store: store.SqlStore, tasks: Sequence[models.Task]) -> int:
    return sql_store.save(tasks, OWNER)


def write_executemany(sql_store: store.SqlStore, tasks: Sequence[models.Task]) -> int:
    sql_store._copy_writes = False  # the statement per row, as a role without TEMPORARY gets
    try:
        return sql_store.save(tasks, OWNER)
    finally:
        sql_store._copy_writes = True


def write_values(sql_store: store.SqlStore, tasks: Sequence[models.Task]) -> int:
    columns = ["task_id", *FIELDS]
    rows = ", ".join("(" + ", ".join(f":{c}_{i}" for c in columns) + ")" for i in range(len(tasks)))
    sets = ", ".join(f"{c} = v.{c}::{_TYPES[c]}" for c in FIELDS)
    sql = sa.text(
        f"UPDATE video_tasks AS t SET {sets}, lease_owner = NULL, lease_expires_at = NULL "
        f"FROM (VALUES {rows}) AS v ({', '.join(columns)}) "
        "WHERE t.task_id = v.task_id AND t.lease_owner = :owner"
    )
    params: dict[str, Any] = {"owner": OWNER}
    for i, task in enumerate(tasks):
        for c in columns:
            params[f"{c}_{i}"] = getattr(task, c)
    with sql_store.engine.begin() as conn:
        return int(conn.execute(sql, params).rowcount)


def write_copy(sql_store: store.SqlStore, tasks: Sequence[models.Task]) -> int:
    columns = ["task_id", *FIELDS]
    sets = ", ".join(f"{c} = v.{c}" for c in FIELDS)
    with sql_store.engine.begin() as conn:
        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cur:
            # The columns only, no constraints (the rows are checked when they reach video_tasks).
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS writeback ON COMMIT DELETE ROWS AS "
                f"SELECT {', '.join(columns)} FROM video_tasks WITH NO DATA"
            )
            with cur.copy(f"COPY writeback ({', '.join(columns)}) FROM STDIN") as copy:
                for task in tasks:
                    copy.write_row([getattr(task, c) for c in columns])
            cur.execute(
                f"UPDATE video_tasks AS t SET {sets}, lease_owner = NULL, lease_expires_at = NULL "
                "FROM writeback AS v WHERE t.task_id = v.task_id AND t.lease_owner = %s",
                (OWNER,),
            )
            return int(cur.rowcount)


STRATEGIES: dict[str, Writer] = {
    "executemany, pipeline (save before; its fallback now)": write_executemany,
    "UPDATE ... FROM (VALUES ...)": write_values,
    "COPY + UPDATE ... FROM, by hand": write_copy,
    "**SqlStore.save now (COPY)**": write_save,
}


def measure(sql_store: store.SqlStore, args: argparse.Namespace) -> list[list[object]]:
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in STRATEGIES}
    claims: list[tuple[float, float]] = []
    now = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)  # every row is due
    for _ in range(args.rounds):
        for name, write in STRATEGIES.items():
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            claimed = sql_store.claim_due(OWNER, now, 600, args.batch)
            claims.append((time.thread_time() - cpu0, time.perf_counter() - wall0))
            outcomes = [_outcome(t, now) for t in claimed]
            pg0 = common.postgres_cpu_seconds()
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            written = write(sql_store, outcomes)
            cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
            pg = common.postgres_cpu_seconds() - pg0
            if written != len(outcomes):
                raise RuntimeError(f"{name} wrote {written} of {len(outcomes)} rows")
            samples[name].append((cpu, wall, pg))
    rows: list[list[object]] = []
    for name, values in samples.items():
        rows.append(
            [
                name,
                f"{1000 * statistics.median(v[0] for v in values):.1f}",
                f"{1000 * statistics.median(v[1] for v in values):.1f}",
                f"{1000 * statistics.median(v[2] for v in values):.1f}",
            ]
        )
    rows.append(
        [
            "(SqlStore.claim_due, for comparison)",
            f"{1000 * statistics.median(c[0] for c in claims):.1f}",
            f"{1000 * statistics.median(c[1] for c in claims):.1f}",
            "",
        ]
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    with common.database("bench_writeback") as (name, url):
        schema.upgrade(url)
        scale.load_rows(common.pg_dsn(name), args.tasks, 0.0)
        sql_store = store.SqlStore.from_url(url)
        try:
            rows = measure(sql_store, args)
        finally:
            sql_store.close()
    print(
        f"{args.tasks:,} active rows, batches of {args.batch:,}, median of {args.rounds} rounds "
        "(ms per call)"
    )
    print(
        common.markdown_table(
            ["write-back", "client CPU ms", "wall ms", "PostgreSQL CPU ms"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
