"""The plan of the daemon's claim statement on PostgreSQL with 1,000,000 finished rows in the table.

Creates its own database (dropped at the end), migrates it with ``schema.upgrade``, bulk-loads
``--finished`` terminal rows (archived/failed/expired) and ``--active`` polling rows (``next_attempt_at``
spread over the next 60 s, ``expires_at`` over the next day) with ``INSERT ... SELECT generate_series``,
runs ``VACUUM ANALYZE``, then captures the exact SQL and parameters that ``SqlStore.claim_due`` sends (a
``before_cursor_execute`` listener records them and aborts the call, so nothing is claimed) and prints
``EXPLAIN (ANALYZE, BUFFERS)`` of it inside a transaction that is rolled back.

It explains the claim as of several moments (``--at``, seconds after the active rows were loaded): one
tick's worth of due rows, a few ticks' worth, and a backlog of half the active rows. Each is run
``REPEATS`` times (the first plan is printed, with the median time) and planned two ways: as psycopg
first sends it (a custom plan for these values) and as a generic plan (``plan_cache_mode =
force_generic_plan``), which PostgreSQL may switch to once psycopg prepares the statement (after 5 runs).

Last, it calls the real ``SqlStore.claim_due`` ``--claims`` times in a row (rows really get leased) and
reports each call's time and, from ``pg_prepared_statements``, how many generic and custom plans
PostgreSQL used once psycopg prepared the statement: that is the plan the daemon gets in the long run.

``--variant`` applies candidate schema or data changes (one or more) before ANALYZE, to compare plans;
none of them is a migration.

Run from the repository root: ``.venv/bin/python -m bench.explain [--finished 1000000] [--active 100000]
[--variant baseline|drop-state-index|park-finished|expires-index|hot-updates ...]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import time
from typing import Any

import psycopg
import sqlalchemy as sa
from seedance_archiver import schema, store

from bench import common

CLAIM_LIMIT = 500
LEASE = dt.timedelta(seconds=120)
REPEATS = 5
CLAIM_CALLS = 20

# Candidate schema/data changes to compare against the migrated schema (``--variant``); none is a
# migration: they are applied to the benchmark's own database after loading, before VACUUM ANALYZE.
ACTIVE = "state IN ('downloading', 'pending', 'polling')"
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    # Without it the planner has no cheaper-looking index than the partial one for the state filter.
    "drop-state-index": ["DROP INDEX ix_video_tasks_state"],
    # Terminal rows keep a far-future next_attempt_at, so the column's statistics (which are over the
    # whole table) no longer claim that nearly every row is due.
    # (Loaded that way rather than updated afterwards, so the table is not twice its size.)
    "park-finished": [],
    # An index in the claim's ORDER BY, so LIMIT stops early instead of sorting every due row.
    # Room in each page, so the claim's UPDATE (lease columns only, none indexed) can be a HOT update
    # that adds no index entries.
    "hot-updates": [
        "ALTER TABLE video_tasks SET (fillfactor = 70)",
        "VACUUM FULL video_tasks",
    ],
    "expires-index": [
        "CREATE INDEX ix_video_tasks_claim ON video_tasks (expires_at NULLS FIRST, next_attempt_at)"
        f" WHERE {ACTIVE}"
    ],
}

LOAD_FINISHED = """
INSERT INTO video_tasks (
    task_id, mode, state, provider_status, model, video_url, actual_duration, error,
    provider_created_at, expires_at, inserted_at, updated_at, next_attempt_at, last_polled_at,
    completed_at, archived_at, polls, attempts, archive_uri, archive_bytes, archive_sha256)
SELECT
    'video_done_' || lpad(g::text, 8, '0'),
    (ARRAY['draft', 'standard', 'flex'])[1 + g %% 3],
    s.state,
    CASE s.state WHEN 'archived' THEN 'completed' WHEN 'failed' THEN 'failed' ELSE 'processing' END,
    'seedance_1_5_pro_720p',
    CASE WHEN s.state = 'archived'
        THEN 'https://cdn.example.invalid/files/video_done_' || g || '.mp4?expires=1&sig=' || md5(g::text)
    END,
    CASE WHEN s.state = 'archived' THEN 5.0 END,
    CASE s.state WHEN 'failed' THEN 'content policy violation'
        WHEN 'expired' THEN 'the provider no longer has this task (404)' END,
    c.created,
    c.created + interval '1 day',
    c.created,
    c.created + interval '10 minutes',
    {finished_next_attempt},
    c.created + interval '9 minutes',
    CASE WHEN s.state = 'archived' THEN c.created + interval '9 minutes' END,
    CASE WHEN s.state = 'archived' THEN c.created + interval '10 minutes' END,
    12,
    0,
    CASE WHEN s.state = 'archived' THEN 's3://bench-bucket/videos/video_done_' || g || '.mp4' END,
    CASE WHEN s.state = 'archived' THEN 3000000 + g END,
    CASE WHEN s.state = 'archived' THEN md5(g::text) || md5((g + 1)::text) END
FROM generate_series(1, %(n)s) AS g,
    LATERAL (SELECT CASE WHEN g %% 10 < 8 THEN 'archived'
                         WHEN g %% 10 = 8 THEN 'failed' ELSE 'expired' END AS state) AS s,
    LATERAL (SELECT now() - interval '2 days' - g * interval '1 second' AS created) AS c
"""

LOAD_ACTIVE = """
INSERT INTO video_tasks (
    task_id, mode, state, provider_status, model, provider_created_at, expires_at, inserted_at,
    updated_at, next_attempt_at, last_polled_at, polls, attempts)
SELECT
    'video_active_' || lpad(c.g::text, 8, '0'),
    'standard',
    'polling',
    'processing',
    'seedance_1_5_pro_720p',
    c.created,
    c.created + interval '1 day',
    c.created,
    now(),
    now() + random() * interval '60 seconds',
    now() - random() * interval '60 seconds',
    1 + (c.g %% 50),
    0
FROM (
    SELECT g, now() - random() * interval '1 day' AS created FROM generate_series(1, %(n)s) AS g
) AS c
"""


class _Captured(Exception):
    """Raised from the cursor listener to stop claim_due after recording its statement."""

    def __init__(self, statement: str, parameters: Any) -> None:
        super().__init__("captured")
        self.statement = statement
        self.parameters = parameters


def capture_claim(sql_store: store.SqlStore, at: dt.datetime) -> tuple[str, Any]:
    """The SQL text and parameters ``claim_due`` sends for ``at``; the call is aborted, nothing claimed."""

    def listener(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, _many: bool
    ) -> None:
        if "UPDATE video_tasks" in statement:
            raise _Captured(statement, parameters)

    sa.event.listen(sql_store.engine, "before_cursor_execute", listener)
    try:
        sql_store.claim_due("bench-explain", at, LEASE.total_seconds(), CLAIM_LIMIT)
    except _Captured as captured:
        return captured.statement, captured.parameters
    finally:
        sa.event.remove(sql_store.engine, "before_cursor_execute", listener)
    raise RuntimeError("claim_due ran no UPDATE statement")


def generation_times(sql_store: store.SqlStore, dsn: str, now: dt.datetime) -> None:
    """Time the learn job's ``SqlStore.generation_times`` and EXPLAIN its statement (index 0007)."""
    captured: list[tuple[str, Any]] = []

    def listener(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, _many: bool
    ) -> None:
        if "row_number" in statement:
            captured.append((statement, parameters))

    since = now - dt.timedelta(days=1)
    sa.event.listen(sql_store.engine, "before_cursor_execute", listener)
    times = []
    try:
        for _ in range(REPEATS):
            started = time.perf_counter()
            found = sql_store.generation_times(since, 500)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        sa.event.remove(sql_store.engine, "before_cursor_execute", listener)
    print()
    print(f"## SqlStore.generation_times(since=now - 1 day, per_model=500): {REPEATS} calls")
    print("ms per call:", ", ".join(f"{t:.0f}" for t in times))
    print("samples per model:", {model: len(v) for model, v in found.items()})
    statement, parameters = captured[0]
    print("```")
    print(explain(dsn, statement, parameters, generic=False))
    print("```")


def explain(dsn: str, statement: str, parameters: dict[str, Any], generic: bool) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of ``statement`` in a transaction that is rolled back.

    Custom: the statement as psycopg sends it, values bound, so PostgreSQL plans for these values.
    Generic: PREPAREd with ``$n`` parameters under ``plan_cache_mode = force_generic_plan``, the plan
    a prepared statement may settle on (psycopg prepares a statement after its fifth execution).
    """
    with psycopg.connect(dsn) as conn:
        try:
            if not generic:
                rows = conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters
                ).fetchall()
            else:
                text, values = _numbered(statement, parameters)
                conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                conn.execute(f"PREPARE bench_claim AS {text}")
                cursor = psycopg.ClientCursor(conn)
                placeholders = ", ".join(["%s"] * len(values))
                cursor.execute(
                    f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_claim ({placeholders})", values
                )
                rows = cursor.fetchall()
        finally:
            conn.rollback()
    return "\n".join(str(row[0]) for row in rows)


def _numbered(statement: str, parameters: dict[str, Any]) -> tuple[str, list[Any]]:
    """``%(name)s`` placeholders as ``$1, $2, ...`` and the values in that order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    text = re.sub(r"%\((\w+)\)s", number, statement)
    return text, [parameters[name] for name in names]


def run_claims(sql_store: store.SqlStore, at: dt.datetime, calls: int) -> None:
    """Call the real ``claim_due`` ``calls`` times (it commits: rows really get leased) and report
    each call's time and which plans PostgreSQL used for the statement psycopg prepared."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        claimed = sql_store.claim_due("bench-explain", at, LEASE.total_seconds(), CLAIM_LIMIT)
        times.append((time.perf_counter() - started) * 1000)
        if not claimed:
            break
    with sql_store.engine.connect() as conn:
        prepared = conn.exec_driver_sql(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE 'UPDATE video_tasks SET lease_owner%%'"
        ).all()
    print()
    print(f"## {len(times)} calls of SqlStore.claim_due as the daemon makes them")
    print("ms per call, in order:", ", ".join(f"{t:.0f}" for t in times))
    if prepared:
        generic, custom = prepared[0]
        print(f"prepared by psycopg; PostgreSQL used {generic} generic and {custom} custom plans")
    else:
        print("not prepared by psycopg (or not on the connection checked)")


def execution_ms(plan: str) -> float:
    match = re.search(r"Execution Time: ([0-9.]+) ms", plan)
    return float(match.group(1)) if match else float("nan")


def verdict(plan: str) -> str:
    """Which access path the plan takes to video_tasks for the due rows, and how long it ran."""
    uses_due = re.search(
        r"(Index Scan|Index Only Scan|Bitmap Index Scan) (using|on) ix_video_tasks_due", plan
    )
    seq = "Seq Scan on video_tasks" in plan
    time_match = re.search(r"Execution Time: ([0-9.]+) ms", plan)
    exec_ms = time_match.group(1) if time_match else "?"
    if uses_due and not seq:
        kind = uses_due.group(1)
        return f"{kind} on ix_video_tasks_due, no sequential scan; execution {exec_ms} ms"
    # The scan that finds the due rows: the sub-select's, on the alias video_tasks_1.
    found = re.search(
        r"(Seq Scan|Index Scan|Index Only Scan|Bitmap Heap Scan).*? video_tasks_1", plan
    )
    index = re.search(r"(Index Scan using|Bitmap Index Scan on) (\w+)", plan)
    via = found.group(1) if found else "?"
    if found and found.group(1) != "Seq Scan" and index:
        via = f"{index.group(1)} {index.group(2)}"
    return (
        f"NOT an index scan on ix_video_tasks_due (due rows via {via}; seq scan: {seq});"
        f" execution {exec_ms} ms"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finished", type=int, default=1_000_000, help="terminal rows to load")
    parser.add_argument("--active", type=int, default=100_000, help="polling rows to load")
    parser.add_argument(
        "--at",
        type=float,
        nargs="+",
        default=[0.3, 1.0, 30.0],
        help="explain the claim as of these seconds after the active rows were loaded; they fall"
        " due evenly over 60 s, so 0.3 s is about one tick's worth (500 rows per 100,000)",
    )
    parser.add_argument(
        "--claims",
        type=int,
        default=CLAIM_CALLS,
        help="then call claim_due this often as of the last --at (psycopg prepares after 5)",
    )
    parser.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        nargs="+",
        default=["baseline"],
        help="apply this candidate change after loading (baseline: the migrated schema as is)",
    )
    parser.add_argument(
        "--generation-times",
        action="store_true",
        help="instead of the claim: time and explain the learn job's query (SqlStore.generation_times)",
    )
    args = parser.parse_args(argv)

    with common.database("bench_explain") as (name, url):
        dsn = common.pg_dsn(name)
        schema.upgrade(url)
        started = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            parked = "park-finished" in args.variant
            finished_next = (
                "'9999-12-31 00:00+00'" if parked else "c.created + interval '10 minutes'"
            )
            load_finished = LOAD_FINISHED.replace("{finished_next_attempt}", finished_next)
            conn.execute(load_finished, {"n": args.finished})
            conn.execute(LOAD_ACTIVE, {"n": args.active})
            loaded = time.perf_counter() - started
            for variant in args.variant:
                for ddl in VARIANTS[variant]:
                    conn.execute(ddl)
            conn.execute("VACUUM ANALYZE video_tasks")
            counts = conn.execute(
                "SELECT state, count(*) FROM video_tasks GROUP BY state ORDER BY state"
            ).fetchall()
            loaded_at = conn.execute(
                "SELECT min(updated_at) FROM video_tasks WHERE state = 'polling'"
            ).fetchone()
            size = conn.execute(
                "SELECT pg_size_pretty(pg_total_relation_size('video_tasks')),"
                " pg_size_pretty(pg_relation_size('ix_video_tasks_due'))"
            ).fetchone()
        print(
            f"# loaded {args.finished:,} finished + {args.active:,} active rows in {loaded:.1f} s"
        )
        print(f"# variant: {' + '.join(args.variant)}")
        print(f"# rows by state: {dict(counts)}")
        assert size is not None and loaded_at is not None
        print(f"# table with indexes: {size[0]}; ix_video_tasks_due: {size[1]}")

        sql_store = store.SqlStore.from_url(url)
        if args.generation_times:
            try:
                generation_times(sql_store, dsn, loaded_at[0])
            finally:
                sql_store.close()
            return
        try:
            for offset in args.at:
                at = loaded_at[0] + dt.timedelta(seconds=offset)
                statement, parameters = capture_claim(sql_store, at)
                with psycopg.connect(dsn) as conn:
                    due = conn.execute(
                        "SELECT count(*) FROM video_tasks WHERE state IN"
                        " ('pending', 'polling', 'downloading') AND next_attempt_at <= %s",
                        (at,),
                    ).fetchone()
                assert due is not None
                print()
                print(
                    f"## claim as of load + {offset:g} s ({due[0]:,} due rows, limit {CLAIM_LIMIT})"
                )
                if offset == args.at[0]:
                    print("statement:")
                    print(statement)
                    print("parameters:", parameters)
                for generic in (False, True):
                    plans = [explain(dsn, statement, parameters, generic) for _ in range(REPEATS)]
                    times = sorted(execution_ms(p) for p in plans)
                    plan = plans[0]
                    label = "generic plan" if generic else "custom plan (as first sent)"
                    print(f"\n### {label}: {verdict(plan)}")
                    print(
                        f"execution ms over {REPEATS} runs: median {times[len(times) // 2]:.1f},"
                        f" min {times[0]:.1f}, max {times[-1]:.1f} (first run shown)"
                    )
                    print("```")
                    print(plan)
                    print("```")
            run_claims(sql_store, loaded_at[0] + dt.timedelta(seconds=args.at[-1]), args.claims)
        finally:
            sql_store.close()


if __name__ == "__main__":
    main()
