"""Polls per archived video: plain cadence against the skip, seed numbers and learned.

A mix of tasks after the seed's page: 480p drafts (30 s-2 min), 720p (2-5 min) and 1080p (3-8 min)
standard tasks, and flex tasks of both (the seed gives flex no time of its own, so they take the
720p/1080p times); ``--fail`` of them fail instead, at a time drawn the same way. Generation times
are drawn uniformly in the seed's ranges. Time is compressed by ``--speedup`` for everything at once
(cadences, generation times, expected times, rates); every number reported is scaled back to real
seconds and real requests per second, and ratios are what count.

Each policy gets its own fresh set of ``--tasks`` tasks (same draws: one seed), fed as SQL inserts
into one PostgreSQL database (dropped at the end), against the simulator in its own process on
loopback, the daemon in-process (``scheduler.run``), one after the other in the same run:

- ``plain``: the mode's cadence only (``SEEDANCE_EXPECTED_SECONDS_*=off``);
- ``skip-seed``: no poll of a queued or processing task before created + the seed's shortest time;
- ``skip-seed-patient``: the same, and after the skip each wait is drawn from the top of the
  cadence range (``SEEDANCE_PATIENT_POLLING``, the default);
- ``skip-learned-patient``: the defaults: as above, with each model's skip learned (p5) from what
  the earlier runs recorded in the table (``completed_at - created`` of their rows), as a
  restarted daemon would.

Tasks are created at whole seconds (scaled), since the provider's ``created`` is whole seconds.
Measured from the table once every task is finished: polls per archived video (the ``polls`` column
of every row, failed ones included, over the archived rows); completion-to-archive delay
(``archived_at`` - the simulated completion), p50/p99; the simulator's 429s. Then the same again
under a tight limit: the simulator answers 429 beyond ``--tight`` requests per second (real), with
the daemon's own limit left at 20.

Largest number of active tasks 20 requests/s serves: each policy's polls per active task-second
(total polls over the summed lifetime, created to finished, of all tasks), so the limit keeps up
with ``20 / that`` tasks in steady state; above it due polls pile up without bound. The measured
p99 delay holds at and below that load (the runs are well below the limit), and it is under 5 min.

Run from the repository root: ``.venv/bin/python -m bench.polls [--tasks 300] [--speedup 20]``
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import pathlib
import random
import shutil
import tempfile
import time
import urllib.request
from typing import Any

import psycopg
from seedance_archiver import config, logs, scheduler, schema

from bench import common

# (mode, model, seed range in seconds, share of the mix)
MIX = (
    ("draft", "seedance_1_5_pro_480p", (30, 120), 0.30),
    ("standard", "seedance_1_5_pro_720p", (120, 300), 0.30),
    ("standard", "seedance_1_5_pro_1080p", (180, 480), 0.20),
    ("flex", "seedance_1_5_pro_720p", (120, 300), 0.10),
    ("flex", "seedance_1_5_pro_1080p", (180, 480), 0.10),
)
SEED_EXPECTED = {"480p": (30, 120), "720p": (120, 300), "1080p": (180, 480)}
CADENCES = {"draft": (10, 20), "standard": (30, 60), "flex": (60, 120)}
DEFAULT_LIMIT = 20.0  # requests per second: the daemon's default
TARGET_DELAY_SECONDS = 300.0
RUN_TIMEOUT_SECONDS = 180.0  # real seconds of wall time per policy, at most
POLICIES = ("plain", "skip-seed", "skip-seed-patient", "skip-learned-patient")


@dataclasses.dataclass(frozen=True)
class Spec:
    task_id: str
    mode: str
    model: str
    created_offset: int  # whole scaled seconds after the run's start
    ready_seconds: float  # scaled
    outcome: str


@dataclasses.dataclass
class Result:
    policy: str
    tasks: int
    archived: int
    polls: int
    delays: list[float]  # real seconds
    by_mode: dict[str, list[float]]
    rate_limited: int
    task_seconds: float  # real seconds of task lifetime, summed

    @property
    def polls_per_video(self) -> float:
        return self.polls / self.archived if self.archived else float("nan")

    @property
    def max_tasks(self) -> float:
        per_task_second = self.polls / self.task_seconds if self.task_seconds else float("nan")
        return DEFAULT_LIMIT / per_task_second


def draw_specs(
    prefix: str, count: int, fail: float, spread: int, speedup: float, rng: random.Random
) -> list[Spec]:
    specs = []
    weights = [share for *_, share in MIX]
    for i in range(count):
        mode, model, (low, high), _ = rng.choices(MIX, weights)[0]
        outcome = "failed" if rng.random() < fail else "completed"
        specs.append(
            Spec(
                task_id=f"video_{prefix}_{i:05d}",
                mode=mode,
                model=model,
                created_offset=rng.randrange(spread),
                ready_seconds=rng.uniform(low, high) / speedup,
                outcome=outcome,
            )
        )
    return specs


def scaled_settings(base: str, url: str, archive: str, policy: str, speedup: float) -> Any:
    def rng(pair: tuple[float, float]) -> str:
        return f"{pair[0] / speedup:g}-{pair[1] / speedup:g}"

    expected = {
        f"expected_seconds_{res}": ("off" if policy == "plain" else rng(pair))
        for res, pair in SEED_EXPECTED.items()
    }
    return config.load(
        api_base_url=base,
        api_key=common.API_KEY,
        database_url=url,
        archive_url=archive,
        max_requests_per_second=DEFAULT_LIMIT * speedup,
        http_port=0,
        allowed_video_url_schemes="http",
        allow_private_video_hosts=True,
        log_format="json",
        shutdown_grace_seconds=5,
        poll_draft=rng(CADENCES["draft"]),
        poll_standard=rng(CADENCES["standard"]),
        poll_flex=rng(CADENCES["flex"]),
        learn_min_samples=50 if "learned" in policy else 0,
        patient_polling="patient" in policy,
        **expected,
    )


def sim_stats(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/_sim/stats", timeout=10) as reply:
        return dict(json.load(reply))


def post_tasks(base: str, specs: list[Spec], start: float) -> None:
    payload = [
        {
            "id": s.task_id,
            "created": start + s.created_offset,
            "queued_seconds": s.ready_seconds * 0.2,
            "ready_seconds": s.ready_seconds,
            "model": s.model,
            "outcome": s.outcome,
            "size": 16 * 1024,
        }
        for s in specs
    ]
    request = urllib.request.Request(
        f"{base}/_sim/tasks",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


async def run_policy(
    policy: str, specs: list[Spec], base: str, name: str, url: str, speedup: float
) -> Result:
    dsn = common.pg_dsn(name)
    archive_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench-polls-"))
    settings = scaled_settings(base, url, archive_dir.as_uri(), policy, speedup)
    limited_before = int(sim_stats(base).get("rate_limited", 0))
    start = float(int(time.time()) + 1)  # whole seconds, as the provider's ``created``
    post_tasks(base, specs, start)
    stop = asyncio.Event()
    daemon = asyncio.create_task(
        scheduler.run(settings, stop=stop, handle_signals=False, tick_seconds=0.05)
    )
    ids = [s.task_id for s in specs]
    by_id = {s.task_id: s for s in specs}
    fed: set[str] = set()
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            # The feeder inserts each row when its task is created, as the app would.
            while time.monotonic() < deadline:
                now = time.time()
                new = [i for i in ids if i not in fed and start + by_id[i].created_offset <= now]
                if new:
                    async with conn.cursor() as cur:
                        await cur.executemany(
                            "INSERT INTO video_tasks (task_id, mode) VALUES (%s, %s)",
                            [(i, by_id[i].mode) for i in new],
                        )
                    fed.update(new)
                if len(fed) == len(ids):
                    row = await (
                        await conn.execute(
                            "SELECT count(*) FROM video_tasks WHERE task_id = ANY(%s) AND state IN "
                            "('pending', 'polling', 'downloading')",
                            (ids,),
                        )
                    ).fetchone()
                    if row is not None and row[0] == 0:
                        break
                if daemon.done():
                    await daemon
                    raise RuntimeError("the daemon stopped")
                await asyncio.sleep(0.1)
            else:
                stuck = await (
                    await conn.execute(
                        "SELECT task_id, state, polls, error FROM video_tasks WHERE task_id = "
                        "ANY(%s) AND state IN ('pending', 'polling', 'downloading') LIMIT 5",
                        (ids,),
                    )
                ).fetchall()
                raise TimeoutError(
                    f"{policy}: tasks still active after {RUN_TIMEOUT_SECONDS}s, e.g. {stuck}"
                )
            rows = await (
                await conn.execute(
                    "SELECT task_id, state, polls, archived_at, updated_at FROM video_tasks "
                    "WHERE task_id = ANY(%s)",
                    (ids,),
                )
            ).fetchall()
    finally:
        stop.set()
        await asyncio.wait_for(daemon, 60)
        shutil.rmtree(archive_dir, ignore_errors=True)
    delays = []
    by_mode: dict[str, list[float]] = {}
    polls = 0
    archived = 0
    lifetime = 0.0
    for task_id, state, row_polls, archived_at, updated_at in rows:
        spec = by_id[task_id]
        created = start + spec.created_offset
        polls += row_polls
        lifetime += (updated_at.timestamp() - created) * speedup
        if state == "archived":
            archived += 1
            done = created + spec.ready_seconds
            delay = max(0.0, archived_at.timestamp() - done) * speedup
            delays.append(delay)
            by_mode.setdefault(spec.mode, []).append(delay)
    limited = int(sim_stats(base).get("rate_limited", 0)) - limited_before
    return Result(policy, len(rows), archived, polls, delays, by_mode, limited, lifetime)


async def run_all(args: argparse.Namespace, base: str, tag: str) -> list[Result]:
    results = []
    with common.database(f"bench_polls_{tag}") as (name, url):
        schema.upgrade(url)
        for index, policy in enumerate(POLICIES):
            rng = random.Random(args.seed)  # the same draws for every policy
            specs = draw_specs(
                f"{tag}{index}", args.tasks, args.fail, args.spread, args.speedup, rng
            )
            result = await run_policy(policy, specs, base, name, url, args.speedup)
            print(f"# {tag} {policy}: {result.polls_per_video:.2f} polls/video", flush=True)
            results.append(result)
    return results


def report(results: list[Result], tight: list[Result], args: argparse.Namespace) -> str:
    plain = results[0].polls_per_video
    rows = []
    for result, squeezed in zip(results, tight, strict=True):
        p50 = common.percentile(result.delays, 50)
        p99 = common.percentile(result.delays, 99)
        rows.append(
            (
                result.policy,
                f"{result.archived}/{result.tasks}",
                result.polls,
                f"{result.polls_per_video:.2f}",
                f"{(1 - result.polls_per_video / plain) * 100:.0f}%",
                f"{p50:.1f} / {p99:.1f}",
                ", ".join(
                    f"{mode} {common.percentile(result.by_mode.get(mode, []), 99):.0f}"
                    f"/{CADENCES[mode][1] * 1.1:.0f}"
                    for mode in CADENCES
                ),
                f"{result.rate_limited}",
                f"{squeezed.rate_limited} ({squeezed.polls_per_video:.2f} polls/video, p99 "
                f"{common.percentile(squeezed.delays, 99):.1f} s)",
                f"{result.max_tasks:,.0f}",
            )
        )
    headers = (
        "policy",
        "archived/tasks",
        "polls",
        "polls per archived video",
        "fewer than plain",
        "completion-to-archive p50 / p99 s",
        "p99 by mode / target (longest interval + 10%) s",
        "429s (no provider limit)",
        f"429s under a {args.tight:g} req/s provider limit",
        "max active tasks at 20 req/s",
    )
    return common.markdown_table(headers, rows)


async def main_async(args: argparse.Namespace) -> None:
    logs.configure(log_format="json", level=logging.WARNING)
    with common.simulator(auto='{"ready_seconds": 1e9}') as (base, _):
        results = await run_all(args, base, "free")
    with common.simulator(auto='{"ready_seconds": 1e9}', rate_limit=args.tight * args.speedup) as (
        base,
        _,
    ):
        tight = await run_all(args, base, "tight")
    print(report(results, tight, args))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300, help="tasks per policy")
    parser.add_argument("--speedup", type=float, default=20.0, help="time runs this much faster")
    parser.add_argument("--fail", type=float, default=0.1, help="share of tasks that fail")
    parser.add_argument(
        "--spread", type=int, default=10, help="tasks are created over this many scaled seconds"
    )
    parser.add_argument("--tight", type=float, default=5.0, help="the tight provider limit, req/s")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args(argv)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
