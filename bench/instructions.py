"""Instructions per poll, the daemon's and a bare client's, counted by valgrind: a change of a few
percent shows here, where CPU seconds on a shared machine move by a third between runs.

CPU-s per 1,000 polls (bench/scale.py) read 0.224-0.259 for the same daemon within 20 minutes on
the 2-core machine, and its floor 0.087-0.128 (bench/README.md). A count of instructions does not
move with the machine. Each side runs as a child process under
``valgrind --tool=cachegrind --cache-sim=no``, twice: for ``--polls`` polls, and for twice as many.
The difference of the two counts, divided by ``--polls``, is what one poll costs, with start-up
and imports cancelled out:

- the daemon: ``scheduler.run`` as bench/scale.py runs it (PostgreSQL, settings from
  ``config.load``, logging at WARNING), over standard tasks all due at start (the simulator
  never finishes one), stopped once it has polled as many as asked;
- the floor: bench/transport.py's bare aiohttp client, as many GETs of the same simulator,
  ``--concurrency`` at once, each body parsed as JSON.

Instructions are not seconds, and valgrind runs one thread at a time, ~50x slower: the daemon's
timers (the claim tick, the heartbeat) fire more often per poll than at full speed, and its rate
limiter never waits. Read the ratio beside bench/scale.py's, as a repeatable view of the same
code: it is for before-and-after comparisons, run from each side's checkout.

Run from the repository root: ``.venv/bin/python -m bench.instructions [--polls 1000]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

from seedance_archiver import logs, scheduler, schema, service

from bench import common, scale, transport

VALGRIND = ("valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null")
CHILD_TIMEOUT_SECONDS = 900.0  # a child under valgrind: start-up alone takes ~15 s
POLL_WAIT_SECONDS = 600.0
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


async def _daemon(base: str, url: str, polls: int) -> None:
    """Run the daemon until it has polled ``polls`` times, then stop it."""
    logs.configure(log_format="json", level=logging.WARNING)
    archive_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench-archive-"))
    settings = scale.daemon_settings(base, url, archive_dir, 10_000.0)
    captured: list[service.Service] = []
    restore_build = scale.capture_services(captured)
    stop = asyncio.Event()
    scheduler.tune_gc()
    daemon = asyncio.create_task(scheduler.run(settings, stop=stop, handle_signals=False))
    deadline = time.monotonic() + POLL_WAIT_SECONDS
    try:
        while not captured or captured[0].stats.polls < polls:
            if daemon.done():
                await daemon
                raise RuntimeError("the daemon stopped before it polled enough")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not poll {polls} times in time")
            await asyncio.sleep(0.05)
        stop.set()
        await daemon
    finally:
        restore_build()
        shutil.rmtree(archive_dir, ignore_errors=True)


async def _floor(base: str, polls: int, concurrency: int) -> None:
    async with transport.aiohttp_bare(base, concurrency) as fetch:
        await transport.drive(fetch, 0, polls, concurrency)


def _count(argv: list[str]) -> int:
    """The instructions a child run of this module takes, all its threads together."""
    done = subprocess.run(
        [*VALGRIND, sys.executable, "-m", "bench.instructions", *argv],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_SECONDS,
        check=False,
    )
    found = _REFS.findall(done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"{argv[:2]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(found[-1].replace(",", ""))


def _daemon_count(base: str, polls: int) -> int:
    with common.database("bench_instructions") as (name, url):
        schema.upgrade(url)
        # Every row due at start: the next poll falls somewhere in the last 60 s.
        scale.load_rows(common.pg_dsn(name), polls, -scale.CADENCE_HIGH_SECONDS)
        return _count(["--child", "daemon", "--sim", base, "--db", url, "--polls", str(polls)])


def _floor_count(base: str, polls: int, concurrency: int) -> int:
    argv = ["--child", "floor", "--sim", base, "--polls", str(polls)]
    return _count([*argv, "--concurrency", str(concurrency)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=1000, help="the smaller run's polls")
    parser.add_argument("--concurrency", type=int, default=32, help="the floor's GETs at once")
    parser.add_argument(
        "--rounds", type=int, default=1, help="each side's pair of runs, this often"
    )
    parser.add_argument("--child", choices=("daemon", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--sim", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "daemon":
        asyncio.run(_daemon(args.sim, args.db, args.polls))
        return
    if args.child == "floor":
        asyncio.run(_floor(args.sim, args.polls, args.concurrency))
        return
    if shutil.which("valgrind") is None:
        parser.error("needs valgrind (Debian's package valgrind)")
    n, c = args.polls, args.concurrency
    daemon: list[float] = []
    floor: list[float] = []
    with common.simulator() as (base, _):
        for _ in range(args.rounds):
            daemon.append((_daemon_count(base, 2 * n) - _daemon_count(base, n)) / n)
            floor.append((_floor_count(base, 2 * n, c) - _floor_count(base, n, c)) / n)
    ratios = sorted(d / f for d, f in zip(daemon, floor, strict=True))
    daemon.sort()
    floor.sort()

    def spread(values: list[float], fmt: str) -> str:
        middle = format(values[len(values) // 2], fmt)
        if len(values) == 1:
            return middle
        return f"{middle} ({format(values[0], fmt)}-{format(values[-1], fmt)})"

    print(
        common.markdown_table(
            ("polls", "rounds", "daemon per poll", "floor per poll", "ratio"),
            [
                (
                    f"{n:,} and {2 * n:,}",
                    args.rounds,
                    spread(daemon, ",.0f"),
                    spread(floor, ",.0f"),
                    spread(ratios, ".2f"),
                )
            ],
        )
    )
    print("(instructions; the median, then the lowest and highest of the rounds)")
    middle = len(ratios) // 2
    print(
        f'RESULT {{"polls": {n}, "rounds": {args.rounds}, "daemon": {daemon[middle]:.0f}, '
        f'"floor": {floor[middle]:.0f}, "ratio": {ratios[middle]:.3f}}}'
    )


if __name__ == "__main__":
    main()
