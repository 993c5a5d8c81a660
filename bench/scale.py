"""The scale run of DESIGN.md: N active standard-mode tasks polled on time by one daemon on 2 cores.

Loads ``--tasks`` rows (mode ``standard``, state ``polling``) into a fresh PostgreSQL database (dropped at
the end), with ``next_attempt_at`` drawn from the steady-state distribution of a 30-60 s cadence (the
time left until the next poll of a task polled every U(30, 60) s: an interval drawn length-biased, times
U(0, 1)), so polls fall due at a constant N / 45 per second from the start. The provider simulator runs
in its own process (auto mode, tasks never finish), so its CPU is not counted.

The daemon runs in this process, as ``scheduler.run`` with settings from ``config.load``
(rate limit raised to ``--rate``) and logging at WARNING, for ``--seconds`` of wall time. The first
``--warmup`` seconds are not measured. ``scheduler.build_service`` is wrapped to get at the Service, its
stats and its metrics. Measured over the window: polls per second, CPU-seconds of this process
(``time.process_time()``: event loop and the store's worker threads) per 1,000 polls, and how late each
poll started after its row's ``next_attempt_at``: p50/p99 interpolated within the buckets of the
daemon's own ``seedance_poll_lateness_seconds`` histogram (as Prometheus would), and the max as the
upper bound of the highest bucket reached. Every 10 s it also counts rows that are
more than 1 s overdue and not yet written back (a growing count means the daemon is falling behind).

Then the floor, in the same run: a bare ``aiohttp.ClientSession`` makes as many requests as the daemon
polled in its window, to the same simulator, at the daemon's mean number of in-flight polls, its CPU
measured the same way. Targets (DESIGN.md): p99 lateness <= 1 s; CPU per 1,000 polls <= 2x the floor.

``--profile`` keeps the daemon running ``--profile-seconds`` longer after the window, under cProfile (the
event-loop thread by its CPU time, ``time.thread_time``; the store's calls in worker threads by wall
time, as they mostly wait for PostgreSQL), and prints the top functions. Profiling slows the daemon,
so nothing measured comes from that stretch. Every run also reports the store's calls in the window:
count, CPU and wall time per call.

What-if knobs, all off by default (then the daemon runs exactly as built by ``scheduler.build_service``):
``--transport aiohttp`` swaps the service's provider for an ``HttpProvider`` on
``httpx_aiohttp.AiohttpTransport``; ``--tick-seconds`` and ``--claim-batch`` change the claim tick and
batch. They measure proposed changes to ``daemon/`` without editing it.

Run from the repository root: ``.venv/bin/python -m bench.scale [--tasks 100000] [--seconds 120] [--profile]``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import dataclasses
import functools
import gc
import io
import json
import logging
import os
import pathlib
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx_aiohttp
import prometheus_client.parser
import psycopg
from seedance_archiver import config, logs, providers, scheduler, schema, service, store

from bench import common, transport

CADENCE_LOW_SECONDS = 30.0
CADENCE_HIGH_SECONDS = 60.0
TIMELINE_SECONDS = 10.0
SAMPLE_SECONDS = 0.2
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 60.0
FLOOR_MAX_CONCURRENCY = 200
ACTIVE = "state IN ('downloading', 'pending', 'polling')"

# The time until the next poll in steady state: interval X drawn length-biased from U(low, high)
# (density proportional to x: x = sqrt(low^2 + u (high^2 - low^2))), times U(0, 1).
LOAD_ROWS = """
INSERT INTO video_tasks (
    task_id, mode, state, provider_status, model, provider_created_at, expires_at, inserted_at,
    updated_at, next_attempt_at, last_polled_at, polls, attempts)
SELECT
    'video_' || r.g,
    'standard',
    'polling',
    'processing',
    'seedance_1_5_pro_720p',
    r.created,
    r.created + interval '1 day',
    r.created,
    now(),
    now() + (%(delay)s + r.wait) * interval '1 second',
    now() - interval '30 seconds',
    1,
    0
FROM (
    SELECT
        g,
        now() - random() * interval '20 hours' AS created,
        random() * sqrt(%(low)s ^ 2 + random() * (%(high)s ^ 2 - %(low)s ^ 2)) AS wait
    FROM generate_series(0, %(n)s - 1) AS g
) AS r
"""
OVERDUE = f"""
SELECT count(*) FILTER (WHERE next_attempt_at < now() - interval '1 second'), count(*)
FROM video_tasks WHERE {ACTIVE}
"""

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass
class Snapshot:
    """Counters read at one moment."""

    wall: float
    cpu: float
    main_thread_cpu: float
    simulator_cpu: float
    postgres_cpu: float
    polls: int
    poll_errors: int

    @classmethod
    def take(cls, svc: service.Service, sim_pid: int) -> Snapshot:
        return cls(
            wall=time.perf_counter(),
            cpu=time.process_time(),
            main_thread_cpu=time.thread_time(),
            simulator_cpu=common.process_cpu_seconds(sim_pid),
            postgres_cpu=common.postgres_cpu_seconds(),
            polls=svc.stats.polls,
            poll_errors=svc.stats.poll_errors,
        )


class StoreCalls:
    """Wraps the store's methods (run in worker threads by asyncio.to_thread) to count their calls,
    CPU (``time.thread_time``) and wall time, and, while ``profiling``, to profile them."""

    METHODS = ("claim_due", "save", "renew", "release")

    def __init__(self) -> None:
        self.profiling = False
        self.profiles: dict[int, cProfile.Profile] = {}
        self.totals: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.totals = {name: [0, 0.0, 0.0] for name in self.METHODS}

    def install(self) -> None:
        for name in self.METHODS:
            setattr(store.SqlStore, name, self._wrap(name, getattr(store.SqlStore, name)))

    def _wrap(self, name: str, method: F) -> F:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            profile = None
            if self.profiling:
                with self._lock:
                    profile = self.profiles.get(threading.get_ident())
                    if profile is None:
                        # Wall time: inside a store call a thread mostly waits for PostgreSQL.
                        profile = cProfile.Profile()
                        self.profiles[threading.get_ident()] = profile
            cpu0 = time.thread_time()
            wall0 = time.perf_counter()
            if profile is not None:
                profile.enable()
            try:
                return method(*args, **kwargs)
            finally:
                if profile is not None:
                    profile.disable()
                cpu = time.thread_time() - cpu0
                wall = time.perf_counter() - wall0
                with self._lock:
                    total = self.totals[name]
                    total[0] += 1
                    total[1] += cpu
                    total[2] += wall

        return wrapper  # type: ignore[return-value]

    def table(self) -> str:
        rows = [
            (
                name,
                int(calls),
                f"{cpu:.2f}",
                f"{1000 * cpu / calls:.1f}" if calls else "-",
                f"{1000 * wall / calls:.1f}" if calls else "-",
            )
            for name, (calls, cpu, wall) in self.totals.items()
        ]
        return common.markdown_table(
            ("store call", "calls", "CPU s", "CPU ms per call", "wall ms per call"), rows
        )

    def stats(self) -> pstats.Stats | None:
        profiles = list(self.profiles.values())
        if not profiles:
            return None
        merged = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            merged.add(profile)
        return merged


# Python's own, read before anything could change it.
DEFAULT_GC_THRESHOLD = gc.get_threshold()


def _top(stats: pstats.Stats, sort: str, count: int) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(count)
    text = out.getvalue()
    # Drop pstats' preamble up to the column header; keep the table.
    start = text.find("   ncalls")
    return (text[start:] if start >= 0 else text).rstrip()


def load_rows(dsn: str, tasks: int, delay_seconds: float) -> float:
    """Insert the active rows and VACUUM ANALYZE; return the seconds it took."""
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            LOAD_ROWS,
            {
                "n": tasks,
                "delay": delay_seconds,
                "low": CADENCE_LOW_SECONDS,
                "high": CADENCE_HIGH_SECONDS,
            },
        )
        conn.execute("VACUUM ANALYZE video_tasks")
    return time.perf_counter() - started


FLOOR_ROUNDS = 3


async def floor_run(base: str, tasks: int, requests: int, concurrency: int) -> tuple[float, float]:
    """A bare aiohttp client polling the same tasks: (wall seconds, CPU seconds) for ``requests``.

    It runs with Python's default garbage collection, as a bare client would: the daemon's own
    tuning (``scheduler.tune_gc``) is undone first, and what the daemon left on the heap is
    collected before, so no full collection of the daemon's objects lands inside the floor.
    The requests go in FLOOR_ROUNDS rounds and the round of median CPU per request stands for
    all: a 10,000-task floor is a few seconds of requests, and single runs of it read 0.19 to 0.46
    CPU-s per 1,000 on one machine in one hour (bench/README.md).
    """
    gc.unfreeze()
    gc.set_threshold(*DEFAULT_GC_THRESHOLD)
    gc.collect()
    rounds = [
        await _floor_round(base, tasks, max(1, requests // FLOOR_ROUNDS), concurrency)
        for _ in range(FLOOR_ROUNDS)
    ]
    wall, cpu, done = sorted(rounds, key=lambda r: r[1] / r[2])[FLOOR_ROUNDS // 2]
    return wall * requests / done, cpu * requests / done


async def _floor_round(
    base: str, tasks: int, requests: int, concurrency: int
) -> tuple[float, float, int]:
    """One round of :func:`floor_run`: (wall seconds, CPU seconds, requests)."""
    async with transport.aiohttp_bare(base, concurrency) as fetch:
        next_index = 0

        async def worker(end: int) -> None:
            nonlocal next_index
            while next_index < end:
                i = next_index
                next_index += 1
                await fetch(i % tasks)

        async with asyncio.timeout(transport.RUN_TIMEOUT_SECONDS):
            await asyncio.gather(*(worker(min(500, requests)) for _ in range(concurrency)))
            next_index = 0
            cpu0 = time.process_time()
            wall0 = time.perf_counter()
            await asyncio.gather(*(worker(requests) for _ in range(concurrency)))
            return time.perf_counter() - wall0, time.process_time() - cpu0, requests


def daemon_settings(base: str, url: str, archive_dir: pathlib.Path, rate: float) -> config.Settings:
    """The settings the daemon polls with here: the simulator at ``base``, the database ``url``,
    the request cap ``rate``, logging at WARNING and no skip of polls before a video can be ready."""
    return config.load(
        api_base_url=base,
        api_key=common.API_KEY,
        database_url=url,
        archive_url=archive_dir.as_uri(),
        max_requests_per_second=rate,
        http_port=0,
        allowed_video_url_schemes="http",
        allow_private_video_hosts=True,
        log_format="json",
        shutdown_grace_seconds=5,
        **config.SKIP_OFF,  # the steady cadence load this benchmark is about
    )


def capture_services(
    captured: list[service.Service],
    adjust: Callable[[service.Service, config.Settings, str], None] | None = None,
) -> Callable[[], None]:
    """Wrap ``scheduler.build_service`` so that each service it builds is changed by ``adjust``
    and added to ``captured``; the function that puts the original back."""
    original_build = scheduler.build_service

    def capturing_build(
        settings: config.Settings, api_key: str
    ) -> tuple[service.Service, store.Store]:
        svc, sql_store = original_build(settings, api_key)
        if adjust is not None:
            adjust(svc, settings, api_key)
        captured.append(svc)
        return svc, sql_store

    scheduler.build_service = capturing_build

    def restore() -> None:
        scheduler.build_service = original_build

    return restore


async def run_scale(args: argparse.Namespace, base: str, sim_pid: int, name: str, url: str) -> None:
    dsn = common.pg_dsn(name)
    loaded = load_rows(dsn, args.tasks, args.start_delay)
    print(f"# loaded {args.tasks:,} rows in {loaded:.1f} s", flush=True)

    logs.configure(log_format="json", level=logging.WARNING)
    # Nothing is archived (the simulator never finishes a task), but the folder must exist somewhere.
    archive_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench-archive-"))
    settings = daemon_settings(base, url, archive_dir, args.rate)
    captured: list[service.Service] = []

    def what_if(svc: service.Service, settings: config.Settings, api_key: str) -> None:
        if args.transport == "aiohttp":
            # What-if: the daemon's own client on aiohttp (the unused httpx client is never opened).
            svc.provider = providers.from_settings(
                settings, api_key, transport=httpx_aiohttp.AiohttpTransport()
            )
        if args.claim_batch:
            svc.CLAIM_BATCH = args.claim_batch

    restore_build = capture_services(captured, what_if)
    store_calls = StoreCalls()
    store_calls.install()

    stop = asyncio.Event()
    scheduler.tune_gc()  # as `seedance-archiver run` does before scheduler.run
    daemon = asyncio.create_task(
        scheduler.run(settings, stop=stop, handle_signals=False, tick_seconds=args.tick_seconds)
    )
    started = time.perf_counter()
    while not captured:
        if daemon.done():
            await daemon  # raises what stopped it
            raise RuntimeError("the daemon stopped before it built its service")
        if time.perf_counter() - started > START_TIMEOUT_SECONDS:
            raise TimeoutError("the daemon did not start")
        await asyncio.sleep(0.05)
    svc = captured[0]
    overdue_conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

    async def overdue() -> tuple[int, int]:
        row = await (await overdue_conn.execute(OVERDUE)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    try:
        await asyncio.sleep(max(0.0, args.warmup - (time.perf_counter() - started)))
        first = Snapshot.take(svc, sim_pid)
        lateness_at_start = common.histogram_buckets(svc.metrics.poll_lateness)
        store_calls.reset()
        in_flight: list[int] = []
        timeline: list[tuple[float, int, float, float, int]] = []
        mark_polls, mark_late, mark_wall = first.polls, lateness_at_start, first.wall
        end = first.wall + args.seconds - args.warmup
        while (now := time.perf_counter()) < end:
            if daemon.done():
                await daemon
                raise RuntimeError("the daemon stopped during the run")
            in_flight.append(svc.in_flight)
            if now - mark_wall >= TIMELINE_SECONDS:
                late = common.histogram_buckets(svc.metrics.poll_lateness)
                behind, _ = await overdue()
                timeline.append(
                    (
                        now - first.wall,
                        svc.stats.polls - mark_polls,
                        (svc.stats.polls - mark_polls) / (now - mark_wall),
                        common.histogram_quantile(mark_late, late, 99),
                        behind,
                    )
                )
                mark_polls, mark_late, mark_wall = svc.stats.polls, late, now
            await asyncio.sleep(SAMPLE_SECONDS)
        last = Snapshot.take(svc, sim_pid)
        lateness_at_end = common.histogram_buckets(svc.metrics.poll_lateness)
        behind, active = await overdue()
        store_table = store_calls.table()

        profile_text = ""
        if args.profile:
            main_profile = cProfile.Profile(time.thread_time)
            store_calls.profiling = True
            main_profile.enable()
            await asyncio.sleep(args.profile_seconds)
            main_profile.disable()
            store_calls.profiling = False
            profile_text = profile_report(main_profile, store_calls, args.profile_top)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(daemon, STOP_TIMEOUT_SECONDS)
        finally:
            await overdue_conn.close()
            restore_build()
            shutil.rmtree(archive_dir, ignore_errors=True)

    window = last.wall - first.wall
    polls = last.polls - first.polls
    cpu = last.cpu - first.cpu
    main_cpu = last.main_thread_cpu - first.main_thread_cpu
    mean_in_flight = sum(in_flight) / len(in_flight) if in_flight else 0.0
    concurrency = args.floor_concurrency or max(
        1, min(FLOOR_MAX_CONCURRENCY, round(mean_in_flight))
    )
    floor_wall, floor_cpu = await floor_run(base, args.tasks, polls, concurrency)

    per_k = cpu / polls * 1000 if polls else float("nan")
    floor_per_k = floor_cpu / polls * 1000 if polls else float("nan")
    p50 = common.histogram_quantile(lateness_at_start, lateness_at_end, 50)
    p99 = common.histogram_quantile(lateness_at_start, lateness_at_end, 99)
    worst = common.histogram_max_bound(lateness_at_start, lateness_at_end)
    ratio = per_k / floor_per_k
    lateness_ok = p99 <= 1.0
    cpu_ok = ratio <= 2.0

    print()
    print(
        f"Daemon: transport {args.transport}, tick {args.tick_seconds:g} s, claim batch "
        f"{svc.CLAIM_BATCH}, rate cap {args.rate:g}/s."
    )
    print("Timeline of the measured window (every ~10 s):")
    print(
        common.markdown_table(
            ("t s", "polls", "polls/s", "lateness p99 s", "rows >1 s overdue"),
            [(f"{t:.0f}", n, f"{r:,.0f}", f"{p:.3f}", b) for t, n, r, p, b in timeline],
        )
    )
    print()
    print(
        common.markdown_table(
            (
                "tasks",
                "window s",
                "polls/s",
                "needed/s",
                "CPU-s per 1,000 polls",
                "floor CPU-s per 1,000",
                "ratio",
                "lateness p50 / p99 / max s",
                "rows >1 s overdue at end",
                "daemon CPU (loop / threads)",
                "simulator CPU",
                "PostgreSQL CPU",
                "in-flight mean / max",
                "p99 <= 1 s",
                "CPU <= 2x floor",
            ),
            [
                (
                    f"{args.tasks:,}",
                    f"{window:.0f}",
                    f"{polls / window:,.0f}",
                    f"{args.tasks / ((CADENCE_LOW_SECONDS + CADENCE_HIGH_SECONDS) / 2):,.0f}",
                    f"{per_k:.3f}",
                    f"{floor_per_k:.3f}",
                    f"{ratio:.2f}x",
                    f"{p50:.3f} / {p99:.3f} / {worst:.3f}",
                    f"{behind:,} of {active:,}",
                    f"{100 * cpu / window:.0f}% ({100 * main_cpu / window:.0f}% / "
                    f"{100 * (cpu - main_cpu) / window:.0f}%)",
                    f"{100 * (last.simulator_cpu - first.simulator_cpu) / window:.0f}%",
                    f"{100 * (last.postgres_cpu - first.postgres_cpu) / window:.0f}%",
                    f"{mean_in_flight:.0f} / {max(in_flight, default=0)}",
                    "yes" if lateness_ok else "NO",
                    "yes" if cpu_ok else "NO",
                )
            ],
        )
    )
    print()
    print(
        f"Floor: aiohttp.ClientSession, {polls:,} requests at concurrency {concurrency} "
        f"(the median of {FLOOR_ROUNDS} rounds): "
        f"{floor_wall:.1f} s wall, {floor_cpu:.2f} CPU-s. Poll errors in the window: "
        f"{last.poll_errors - first.poll_errors}. CPU percentages are of one core."
    )
    print(
        "RESULT "
        + json.dumps(
            {
                "tasks": args.tasks,
                "transport": args.transport,
                "tick_s": args.tick_seconds,
                "claim_batch": svc.CLAIM_BATCH,
                "window_s": round(window, 1),
                "polls": polls,
                "polls_per_s": round(polls / window, 1),
                "cpu_s": round(cpu, 2),
                "main_thread_cpu_s": round(main_cpu, 2),
                "cpu_per_1000": round(per_k, 4),
                "floor_cpu_per_1000": round(floor_per_k, 4),
                "floor_concurrency": concurrency,
                "lateness_p50_s": round(p50, 4),
                "lateness_p99_s": round(p99, 4),
                "lateness_max_s": round(worst, 4),
                "overdue_at_end": behind,
                "lateness_ok": lateness_ok,
                "cpu_ok": cpu_ok,
            }
        )
    )
    print()
    print("Store calls in the measured window (worker threads):")
    print(store_table)
    if profile_text:
        print()
        print(profile_text)


@dataclasses.dataclass
class ProcessesSnapshot:
    """The daemon processes' counters at one moment, read from /proc and their own /metrics."""

    wall: float
    cpu: float  # the supervisor and every child
    simulator_cpu: float
    postgres_cpu: float
    polls: float
    poll_errors: float
    lateness: common.Buckets

    @classmethod
    def take(cls, supervisor_pid: int, ports: list[int], sim_pid: int) -> ProcessesSnapshot:
        families: dict[str, list[Any]] = collections.defaultdict(list)
        for port in ports:
            for family in prometheus_client.parser.text_string_to_metric_families(
                common.http_get_text(port, "/metrics")
            ):
                families[family.name].extend(family.samples)
        polls = [s for s in families["seedance_polls"] if s.name.endswith("_total")]
        buckets: dict[float, float] = collections.defaultdict(float)
        for sample in families["seedance_poll_lateness_seconds"]:
            if sample.name.endswith("_bucket"):
                buckets[float(sample.labels["le"])] += sample.value
        pids = [supervisor_pid, *common.descendant_pids(supervisor_pid)]
        return cls(
            wall=time.perf_counter(),
            cpu=sum(common.process_cpu_seconds(pid) for pid in pids),
            simulator_cpu=common.process_cpu_seconds(sim_pid),
            postgres_cpu=common.postgres_cpu_seconds(),
            polls=sum(s.value for s in polls),
            poll_errors=sum(s.value for s in polls if s.labels.get("outcome") != "ok"),
            lateness=sorted(buckets.items()),
        )


async def run_processes(
    args: argparse.Namespace, base: str, sim_pid: int, name: str, url: str
) -> None:
    """The same measurement with ``run --processes N``: real processes, as an operator runs them."""
    dsn = common.pg_dsn(name)
    base_port = common.free_port_range(args.processes)
    ports = [base_port + i for i in range(args.processes)]
    archive_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench-archive-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE_")}
    env.update(
        {
            "SEEDANCE_API_BASE_URL": base,
            "SEEDANCE_API_KEY": common.API_KEY,
            "SEEDANCE_DATABASE_URL": url,
            "SEEDANCE_ARCHIVE_URL": archive_dir.as_uri(),
            # The cap is per daemon: the same total as one process would get.
            "SEEDANCE_MAX_REQUESTS_PER_SECOND": str(args.rate / args.processes),
            "SEEDANCE_HTTP_PORT": str(base_port),
            "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES": "http",
            "SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS": "true",
            "SEEDANCE_LOG_FORMAT": "json",
            "SEEDANCE_SHUTDOWN_GRACE_SECONDS": "5",
            # The steady cadence load this benchmark is about, as in the in-process run.
            **{f"SEEDANCE_{setting.upper()}": value for setting, value in config.SKIP_OFF.items()},
        }
    )
    log_path = archive_dir.parent / f"{archive_dir.name}.log"
    with log_path.open("wb") as log_file:
        # Popen returns at once; started before the measured window.
        supervisor = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "seedance_archiver", "run", "--processes", str(args.processes)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    overdue_conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not all(common.http_ok(port, "/metrics") for port in ports):
            if supervisor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemons did not start; see {log_path}")
            await asyncio.sleep(SAMPLE_SECONDS)
        # The rows go in once every daemon serves, as in the in-process run, where the daemon is up
        # before its first row falls due: loaded before, they fell due while N processes imported
        # and migrated (several seconds here), and the window measured the catch-up, not the load.
        started = time.perf_counter()
        loaded = load_rows(dsn, args.tasks, args.start_delay)
        print(f"# loaded {args.tasks:,} rows in {loaded:.1f} s, the daemons running", flush=True)
        await asyncio.sleep(max(0.0, args.warmup - (time.perf_counter() - started)))
        first = ProcessesSnapshot.take(supervisor.pid, ports, sim_pid)
        timeline: list[tuple[float, float, float, float, int]] = []
        mark = first
        end = first.wall + args.seconds - args.warmup
        while (now := time.perf_counter()) < end:
            if supervisor.poll() is not None:
                raise RuntimeError(f"the supervisor stopped during the run; see {log_path}")
            if now - mark.wall >= TIMELINE_SECONDS:
                snap = ProcessesSnapshot.take(supervisor.pid, ports, sim_pid)
                row = await (await overdue_conn.execute(OVERDUE)).fetchone()
                assert row is not None
                timeline.append(
                    (
                        now - first.wall,
                        snap.polls - mark.polls,
                        (snap.polls - mark.polls) / (snap.wall - mark.wall),
                        common.histogram_quantile(mark.lateness, snap.lateness, 99),
                        int(row[0]),
                    )
                )
                mark = snap
            await asyncio.sleep(SAMPLE_SECONDS)
        last = ProcessesSnapshot.take(supervisor.pid, ports, sim_pid)
        row = await (await overdue_conn.execute(OVERDUE)).fetchone()
        assert row is not None
        behind, active = int(row[0]), int(row[1])
    finally:
        await overdue_conn.close()
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            supervisor.kill()
        shutil.rmtree(archive_dir, ignore_errors=True)

    window = last.wall - first.wall
    polls = int(last.polls - first.polls)
    cpu = last.cpu - first.cpu
    concurrency = args.floor_concurrency or 32
    floor_wall, floor_cpu = await floor_run(base, args.tasks, polls, concurrency)
    per_k = cpu / polls * 1000 if polls else float("nan")
    floor_per_k = floor_cpu / polls * 1000 if polls else float("nan")
    p50 = common.histogram_quantile(first.lateness, last.lateness, 50)
    p99 = common.histogram_quantile(first.lateness, last.lateness, 99)
    worst = common.histogram_max_bound(first.lateness, last.lateness)
    print()
    print(f"Daemon: run --processes {args.processes}, rate cap {args.rate:g}/s in all.")
    print("Timeline of the measured window (every ~10 s):")
    print(
        common.markdown_table(
            ("t s", "polls", "polls/s", "lateness p99 s", "rows >1 s overdue"),
            [(f"{t:.0f}", f"{n:.0f}", f"{r:,.0f}", f"{p:.3f}", b) for t, n, r, p, b in timeline],
        )
    )
    print()
    print(
        common.markdown_table(
            (
                "processes",
                "tasks",
                "window s",
                "polls/s",
                "needed/s",
                "CPU-s per 1,000 polls",
                "floor CPU-s per 1,000",
                "ratio",
                "lateness p50 / p99 / max s",
                "rows >1 s overdue at end",
                "daemons' CPU",
                "simulator CPU",
                "PostgreSQL CPU",
                "p99 <= 1 s",
            ),
            [
                (
                    args.processes,
                    f"{args.tasks:,}",
                    f"{window:.0f}",
                    f"{polls / window:,.0f}",
                    f"{args.tasks / ((CADENCE_LOW_SECONDS + CADENCE_HIGH_SECONDS) / 2):,.0f}",
                    f"{per_k:.3f}",
                    f"{floor_per_k:.3f}",
                    f"{per_k / floor_per_k:.2f}x",
                    f"{p50:.3f} / {p99:.3f} / {worst:.3f}",
                    f"{behind:,} of {active:,}",
                    f"{100 * cpu / window:.0f}%",
                    f"{100 * (last.simulator_cpu - first.simulator_cpu) / window:.0f}%",
                    f"{100 * (last.postgres_cpu - first.postgres_cpu) / window:.0f}%",
                    "yes" if p99 <= 1.0 else "NO",
                )
            ],
        )
    )
    print()
    print(
        f"Floor: aiohttp.ClientSession, {polls:,} requests at concurrency {concurrency} "
        f"(the median of {FLOOR_ROUNDS} rounds): "
        f"{floor_wall:.1f} s wall, {floor_cpu:.2f} CPU-s. Poll errors in the window: "
        f"{last.poll_errors - first.poll_errors:.0f}. CPU percentages are of one core."
    )
    result = {
        "processes": args.processes,
        "tasks": args.tasks,
        "window_s": round(window, 1),
        "polls": polls,
        "polls_per_s": round(polls / window, 1),
        "cpu_per_1000": round(per_k, 4),
        "floor_cpu_per_1000": round(floor_per_k, 4),
        "lateness_p50_s": round(p50, 4),
        "lateness_p99_s": round(p99, 4),
        "overdue_at_end": behind,
    }
    print("RESULT " + json.dumps(result))


def profile_report(main: cProfile.Profile, threads: StoreCalls, top: int) -> str:
    main_stats = pstats.Stats(main)
    parts = [
        f"## Event-loop thread, top {top} by cumulative time",
        "```",
        _top(main_stats, "cumulative", top),
        "```",
        f"## Event-loop thread, top {top} by own time",
        "```",
        _top(main_stats, "tottime", top),
        "```",
    ]
    thread_stats = threads.stats()
    if thread_stats is not None:
        parts += [
            f"## Store calls in worker threads, top {top} by own wall time",
            "```",
            _top(thread_stats, "tottime", top),
            "```",
        ]
    return "\n".join(parts)


async def main_async(args: argparse.Namespace) -> None:
    with common.simulator() as (base, sim_pid), common.database("bench_scale") as (name, url):
        schema.upgrade(url)
        if args.processes > 1:
            await run_processes(args, base, sim_pid, name, url)
        else:
            await run_scale(args, base, sim_pid, name, url)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="active standard-mode rows")
    parser.add_argument("--seconds", type=float, default=120.0, help="wall time of the daemon run")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds not measured")
    parser.add_argument("--rate", type=float, default=10_000.0, help="the daemon's request cap /s")
    parser.add_argument(
        "--start-delay", type=float, default=3.0, help="seconds before the first row falls due"
    )
    parser.add_argument(
        "--floor-concurrency",
        type=int,
        default=0,
        help="the floor client's concurrency (0: the daemon's mean in-flight polls)",
    )
    what_if = parser.add_argument_group(
        "what-if knobs (the defaults run the daemon as it is)",
    )
    what_if.add_argument(
        "--transport",
        choices=("httpx", "aiohttp"),
        default="httpx",
        help="aiohttp: give the daemon's HttpProvider an httpx_aiohttp.AiohttpTransport",
    )
    what_if.add_argument(
        "--tick-seconds", type=float, default=scheduler.TICK_SECONDS, help="the claim tick"
    )
    what_if.add_argument(
        "--claim-batch", type=int, default=0, help="rows claimed per tick (0: Service.CLAIM_BATCH)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="N > 1: run the daemon as `seedance-archiver run --processes N`, real processes "
        "(the what-if knobs and --profile then do not apply)",
    )
    parser.add_argument("--profile", action="store_true", help="profile the daemon afterwards")
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument("--profile-top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.seconds <= args.warmup:
        parser.error("--seconds must be longer than --warmup")
    try:
        asyncio.run(main_async(args))
    finally:
        # Daemons before db.SqliteLock checked the backend left a `{database}.lock` file here.
        pathlib.Path(f"{common.database_name('bench_scale')}.lock").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
