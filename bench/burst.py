"""A burst of finished videos: how long the daemon takes to archive N at once, against a bare
downloader doing the same work in the same run.

Each round, N rows are inserted at once (one INSERT of them all) into a fresh database: SQLite and a
folder, or PostgreSQL (the benchmark's own database, dropped at the end) with a folder or S3
(``--s3`` an endpoint: moto's server, or radosgw from ``bench/rgw.sh``; the bucket is made). The
simulator (a process of its own) knows every id as finished at once, its video ``--size`` bytes. The
installed ``seedance-archiver run`` (``--processes`` of them, started once) archives them; the clock
runs from the insert until every row is ``archived``. CPU-s is the daemon's processes' own (from
/proc).

The floor, in each round before the daemon's turn, is a bare aiohttp loop doing the same work at the
daemon's download concurrency (``Service.MAX_DOWNLOADS`` per process): poll each id, stream its video
to a temporary file while hashing it with SHA-256, fsync, rename; with ``--s3``, read it into memory
with SHA-256 and PUT it with boto3. Its CPU-s is this process's own. With ``--kept-floor`` (a folder),
a second floor each round also does the file work the daemon keeps (each video's sidecar, fsynced,
and each rename fsynced in its folder, as ``archive/writer.py``), and the daemon's ratios against
it are reported too: what is left between them is the daemon's database, outbox and logs.
``--rounds`` of each (3 by default) and their medians: on a 2-core VM one round can differ from the
next by 15%. Per video, the run also reports the polls the simulator answered, the statements and
transactions the daemons counted (their /metrics), on PostgreSQL the commits the server counted, the
files the archive holds, the webhook-outbox rows written, the context switches of the daemon's
threads and of the floor's (each a thread waiting: for the GIL, for work, for the disk), and with
``--fsyncs`` the daemon's fsyncs (it runs under ``strace -c``, which stops it at those calls only).
With ``--instructions`` (one process), the daemon runs under valgrind's callgrind, and each round
counts the instructions its process ran from the insert until the last row was archived: its event
loop's and its threads', in user space (its writers run natively, and the kernel is not counted).
Under valgrind the daemon runs ~50x slower, so its seconds and CPU mean nothing then; the count is
for comparing two commits, since it moves by a percent or two where CPU-s move by a fifth.
Its CPU per video, and its context switches, are split by where they happen: each daemon process's
event loop (its main thread), its other threads (the database's pools, the resolver's) and the
folder's writer processes, beside the floor's whole. Before its rounds it waits (at most
``--settle`` seconds, 420 by default) for a quiet file system (:func:`_quiet_file_system`);
``tests/integration/test_bench_burst.py`` runs it small with ``--settle 0``.

    .venv/bin/python -m bench.burst --videos 1000 --size 2000000
    .venv/bin/python -m bench.burst --videos 3000 --size 500000 [--kept-floor]
    .venv/bin/python -m bench.burst --videos 1000 --size 2000000 --db postgresql --processes 2
    .venv/bin/python -m bench.burst --videos 1000 --size 2000000 --db postgresql --s3 URL
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import psycopg
from seedance_archiver import service
from seedance_archiver.archive import folder, writer

from bench import common

CLI = pathlib.Path(sys.executable).parent / "seedance-archiver"
DOWNLOADS_PER_PROCESS = service.Service.MAX_DOWNLOADS
POLL_PATH = "/v1/result/"
START_SECONDS = 60.0
SIM_BATCH = 1000  # tasks per request to the simulator (its requests stop at 1 MiB)


def main(argv: list[str] | None = None) -> None:
    # A SIGTERM (a pkill, a timeout) ends the run through its clean-up, as Ctrl-C does: the
    # daemon, the simulator, the database and the files go with it. Without it the daemon was left
    # running, beside the next runs' measurements.
    signal.signal(signal.SIGTERM, _stopped)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--videos", type=int, default=1000, help="per round")
    parser.add_argument("--size", type=int, default=2_000_000, help="bytes per video")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--s3", help="an S3 endpoint URL (moto, radosgw); else a folder")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="floor and daemon, each this often")
    parser.add_argument(
        "--fsyncs", action="store_true", help="count the daemon's fsyncs (runs it under strace)"
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count the daemon's instructions per video (runs it under valgrind: slow)",
    )
    parser.add_argument(
        "--kept-floor",
        action="store_true",
        help="a second floor each round that also writes what the daemon keeps (a folder only): "
        "each video's sidecar, fsynced, and each rename fsynced in its folder",
    )
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds per round")
    parser.add_argument(
        "--settle",
        type=float,
        default=QUIET_SECONDS,
        help="seconds to wait at most for a quiet file system before the rounds (0: measure at "
        "once, as the benchmark's own test does); see bench/README.md on ext4",
    )
    parser.add_argument(
        "--dir",
        help="where the archive, the floor's files and SQLite go (default: the temporary folder); "
        "see bench/README.md on this machine's ext4 without a journal",
    )
    args = parser.parse_args(argv)
    if args.instructions and (args.processes != 1 or args.fsyncs):
        parser.error("--instructions counts one process, and not beside --fsyncs")
    if args.kept_floor and args.s3:
        parser.error("--kept-floor is the folder's: S3 has no sidecar file or folder to fsync")
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind (Debian's package valgrind)")
    auto = json.dumps({"queued_seconds": 0, "ready_seconds": 0, "size": args.size})
    rounds = [[f"video_burst_{r}_{n:07d}" for n in range(args.videos)] for r in range(args.rounds)]
    slots = DOWNLOADS_PER_PROCESS * args.processes
    with (
        tempfile.TemporaryDirectory(prefix="bench-burst-", dir=args.dir) as tmp,
        common.simulator(auto=auto) as (sim_url, _),
        _database(args.db, pathlib.Path(tmp)) as (db_url, pg_name),
    ):
        for ids in rounds:
            _finished(sim_url, ids, args.size)
        archive = _archive(args.s3, pathlib.Path(tmp))
        floors = [pathlib.Path(tmp) / f"floor-{number}" for number in range(args.rounds)]
        kept_floors = [pathlib.Path(tmp) / f"kept-floor-{number}" for number in range(args.rounds)]
        for floor in [*floors, *(kept_floors if args.kept_floor else [])]:
            floor.mkdir()
        # Probed where the files will be made: the floor's folders and the daemon's .incoming
        # (its temporary files are its videos' and sidecars' inodes); with S3, the run's folder.
        # Each probe's files are kept (see _quiet_file_system), but not in .incoming: a writer
        # lists it before a dead attempt's video, so they go up to the archive's own folder.
        probed = {pathlib.Path(tmp): pathlib.Path(tmp)}
        if archive.startswith("file://"):
            root = pathlib.Path(archive.removeprefix("file://"))
            incoming = root / folder.INCOMING_DIR
            incoming.mkdir(parents=True)
            probed = {floor: floor for floor in floors} | {incoming: root}
            probed |= {floor: floor for floor in kept_floors if args.kept_floor}
        create_us = _quiet_file_system(probed, args.settle)
        port = common.free_port()
        env = _env(sim_url, db_url, archive, args.s3, port)
        subprocess.run([str(CLI), "migrate"], env=env, check=True, capture_output=True)
        ports = [port + i for i in range(args.processes)]
        fsyncs_file = pathlib.Path(tmp) / "fsyncs.txt"
        argv = [str(CLI), "run", *(["--processes", str(args.processes)] * (args.processes > 1))]
        if args.fsyncs:
            argv = [*STRACE, "-o", str(fsyncs_file), "--", *argv]
        if args.instructions:
            argv = [*CALLGRIND, "--", *argv]
        log = pathlib.Path(tmp) / "daemon.log"
        with log.open("wb") as out:
            daemon = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        results: list[Round] = []
        try:
            # Started and idle (every process has ticked): its start-up is not the burst's.
            start = START_SECONDS * (VALGRIND_SLOWER if args.instructions else 1)
            _wait_ticked(args.db, db_url, args.processes, daemon, time.monotonic() + start)
            before = _readings(sim_url, pg_name, ports)
            for number, ids in enumerate(rounds):
                floor = floors[number]
                os.sync()  # each side starts with nothing of the other's left to write back
                if args.s3:
                    floor_run = asyncio.run(_bare_s3(sim_url, ids, args.s3, slots))
                else:
                    floor_run = asyncio.run(_bare(sim_url, ids, floor, slots))
                kept_run, written = None, floor  # the folder the daemon's turn writes after
                if args.kept_floor:
                    # Into the bare floor's freed page cache, as the daemon's turn (below).
                    _evict(floor)
                    os.sync()
                    kept = kept_floors[number]
                    kept_run = asyncio.run(_bare(sim_url, ids, kept, slots, kept_work=True))
                    written = kept
                # Freed, the floor's page cache is what the daemon's files are written into: on
                # a fresh VM, pages never touched before cost the first writer several times the
                # kernel CPU. Its files are kept: deleted, they made every file the daemon then
                # created cost more (ext4 without a journal skips inodes freed in the last 30 s,
                # reading each one's table on every allocation).
                _evict(written)
                os.sync()
                cpu_before = _tree_cpu(daemon.pid)
                switches_before = _tree_switches(daemon.pid)
                user_before = _tree_cpu(daemon.pid, user_only=True)
                parts_before = _tree_parts(daemon.pid)
                counted_before = _instructions(daemon.pid) if args.instructions else None
                started = time.monotonic()
                done_before = _archived(args.db, db_url)
                _insert(args.db, db_url, ids)
                done = _wait_archived(
                    args.db, db_url, done_before + len(ids), started + args.deadline
                )
                wall = time.monotonic() - started
                cpu = _tree_cpu(daemon.pid) - cpu_before
                user = _tree_cpu(daemon.pid, user_only=True) - user_before
                switches = _tree_switches(daemon.pid) - switches_before
                parts = _tree_parts(daemon.pid) - parts_before
                counted = None
                if counted_before is not None:
                    counted = _instructions(daemon.pid) - counted_before
                results.append(
                    Round(
                        done - done_before,
                        wall,
                        cpu,
                        user,
                        switches,
                        parts,
                        counted,
                        *floor_run,
                        kept=kept_run,
                    )
                )
            # The floor's polls were answered by the same simulator: one per id.
            floor_polls = sum(map(len, rounds)) * (2 if args.kept_floor else 1)
            after = _readings(sim_url, pg_name, ports, floor_polls=floor_polls)
        finally:
            for pid in [daemon.pid, *common.child_pids(daemon.pid)] if args.fsyncs else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)  # strace passes no signal on: the daemon's own
            daemon.terminate()
            daemon.wait(timeout=60)
        outbox = _count(args.db, db_url, "webhook_outbox")
        files = _files(archive)
        fsyncs = _strace_calls(fsyncs_file) if args.fsyncs else None
    _report(args, results, after - before, files, outbox, fsyncs)
    print(
        f"a file's creation before the rounds: {create_us:.0f} us of CPU (see _quiet_file_system)"
    )


# In a folder writer's command line (archive/folder.py's _writer_command), and in no other.
WRITER_SCRIPT = os.fsencode(writer.__file__)
# _quiet_file_system: a file made in a quiet folder costs ~20 us of CPU here, one made after a
# mass deletion 300-800 us.
QUIET_CREATE_US = 60.0
# In each folder probed: so few that their names fit a folder's first block (4 KiB), which a
# folder keeps once it has grown (a listing of it reads every block it ever had).
CREATE_PROBE_FILES = 100
PROBE_PREFIX = "create-probe-"
QUIET_PROBE_SECONDS = 5.0
QUIET_SECONDS = 420.0
STRACE = ["strace", "-f", "-c", "--seccomp-bpf", "-e", "trace=fsync,fdatasync"]
# The daemon's process only (its writers are exec'd, and run natively); the counts are read with
# callgrind_control while it runs, so the file written at its exit is not wanted.
CALLGRIND = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
CALLGRIND_CONTROL_SECONDS = 120.0  # it waits for the daemon's next basic block
VALGRIND_SLOWER = 10  # start-up under valgrind: this many times START_SECONDS at most
_THREAD_COUNT = re.compile(r"^\s*Th\s+(\d+)\s+([\d,]+)\s*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Round:
    archived: int
    wall: float
    cpu: float
    user: float  # of cpu, the CPU-s in user space (the rest is the kernel's, on our behalf)
    switches: Parts  # the daemon's context switches, by where they happen
    parts: Parts  # cpu, by where it was spent
    # With --instructions: the event loop's and its threads' instructions (no writers'), or None.
    instructions: Parts | None
    floor_wall: float
    floor_cpu: float
    floor_user: float
    floor_switches: int
    # With --kept-floor: the floor that writes what the daemon keeps, as the floor's four above.
    kept: tuple[float, float, float, int] | None = None


@dataclasses.dataclass(frozen=True)
class Parts:
    """The daemon's CPU-s (or its context switches, or instructions) by where they are spent: its
    event loops (each daemon process's main thread), their other threads (the database's pools,
    the resolver's), and the folder's writer processes. A thread or writer that ends mid-round
    takes its own with it (few do)."""

    loops: float = 0.0
    threads: float = 0.0
    writers: float = 0.0

    @property
    def total(self) -> float:
        return self.loops + self.threads + self.writers

    def __sub__(self, other: Parts) -> Parts:
        return Parts(
            self.loops - other.loops, self.threads - other.threads, self.writers - other.writers
        )


@dataclasses.dataclass(frozen=True)
class Readings:
    """Counters read before and after the rounds: the simulator's polls, the daemons' own count
    of statements and transactions (/metrics), and PostgreSQL's commits in the database."""

    polls: int = 0
    statements: float = 0.0
    transactions: float = 0.0
    commits: int = 0

    def __sub__(self, other: Readings) -> Readings:
        return Readings(
            self.polls - other.polls,
            self.statements - other.statements,
            self.transactions - other.transactions,
            self.commits - other.commits,
        )


def _stopped(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _readings(
    sim_url: str, pg_name: str | None, ports: list[int], floor_polls: int = 0
) -> Readings:
    scraped = [_metrics(port) for port in ports]
    return Readings(
        polls=_polls(sim_url) - floor_polls,
        statements=sum(m.get("seedance_database_statements_total", 0.0) for m in scraped),
        transactions=sum(m.get("seedance_database_transactions_total", 0.0) for m in scraped),
        commits=_commits(pg_name),
    )


def _metrics(port: int) -> dict[str, float]:
    """A daemon's unlabelled samples from its /metrics."""
    with urllib.request.urlopen(f"http://{common.HOST}:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


def _report(
    args: argparse.Namespace,
    results: list[Round],
    counts: Readings,
    files: int,
    outbox: int,
    fsyncs: int | None,
) -> None:
    where = f"{args.db} + {'S3' if args.s3 else 'folder'}, {args.processes} process(es)"
    total = sum(r.archived for r in results)
    print(
        f"{total} of {args.videos * args.rounds} archived; {where}; "
        f"{args.rounds} round(s) of {args.videos} x {args.size:,} bytes"
    )
    rows = []
    for n, r in enumerate(results, 1):
        rows.append(
            [
                str(n),
                f"{r.wall:.1f}",
                f"{r.archived / r.wall:.1f}",
                f"{r.cpu:.1f} ({r.user:.1f})",
                f"{r.floor_wall:.1f}",
                f"{args.videos / r.floor_wall:.1f}",
                f"{r.floor_cpu:.1f} ({r.floor_user:.1f})",
                f"{r.wall / r.floor_wall:.2f}",
                f"{r.cpu / r.floor_cpu:.2f} ({r.user / r.floor_user:.2f})",
            ]
        )
    wall = statistics.median(r.wall for r in results)
    cpu = statistics.median(r.cpu for r in results)
    floor_wall = statistics.median(r.floor_wall for r in results)
    floor_cpu = statistics.median(r.floor_cpu for r in results)
    user = statistics.median(r.user for r in results)
    floor_user = statistics.median(r.floor_user for r in results)
    rows.append(
        [
            "median",
            f"{wall:.1f}",
            f"{args.videos / wall:.1f}",
            f"{cpu:.1f} ({user:.1f})",
            f"{floor_wall:.1f}",
            f"{args.videos / floor_wall:.1f}",
            f"{floor_cpu:.1f} ({floor_user:.1f})",
            f"{wall / floor_wall:.2f}",
            f"{cpu / floor_cpu:.2f} ({user / floor_user:.2f})",
        ]
    )
    headers = ["round", "daemon s", "videos/s", "CPU-s (user)", "floor s", "videos/s"]
    headers += ["CPU-s (user)", "wall ratio", "CPU ratio (user)"]
    print(common.markdown_table(headers, rows))
    per = max(total, 1)
    parts = [
        f"{counts.polls / per:.2f} polls",
        f"{counts.statements / per:.2f} database statements",
        f"{counts.transactions / per:.2f} transactions",
    ]
    if args.db == "postgresql":
        parts.append(f"{counts.commits / per:.2f} PostgreSQL commits (all clients)")
    if fsyncs is not None:
        parts.append(f"{fsyncs / per:.2f} fsyncs (the daemon's own, start-up included)")
    if not args.s3:
        parts.append(f"{files / per:.2f} files in the archive")
    switches = statistics.median(r.switches.total / max(r.archived, 1) for r in results)
    floor_switches = statistics.median(r.floor_switches / args.videos for r in results)
    parts.append(f"{switches:.1f} context switches (the floor's: {floor_switches:.1f})")
    parts.append(f"{outbox / per:.2f} outbox rows")
    print("per video: " + ", ".join(parts))
    # Where the daemon's CPU goes, in ms per video (medians over the rounds), beside the floor's.
    spent = _per_video_parts(results, lambda r: r.parts, 1000)
    floor_ms = statistics.median(1000 * r.floor_cpu / args.videos for r in results)
    print(
        "CPU ms per video: "
        f"event loop {spent.loops:.2f}, its threads (database, resolver) {spent.threads:.2f}, "
        f"writer processes {spent.writers:.2f}; the floor's {floor_ms:.2f}"
    )
    switched = _per_video_parts(results, lambda r: r.switches)
    print(
        "context switches per video: "
        f"event loop {switched.loops:.1f}, its threads {switched.threads:.1f}, "
        f"writer processes {switched.writers:.1f}; the floor's {floor_switches:.1f}"
    )
    _report_kept(args, results, wall, cpu, user)
    counts_per_video = [
        (r.instructions.loops / max(r.archived, 1), r.instructions.threads / max(r.archived, 1))
        for r in results
        if r.instructions is not None
    ]
    if counts_per_video:
        loops = sorted(loop for loop, _ in counts_per_video)
        threads = sorted(thread for _, thread in counts_per_video)
        print(
            "instructions per video (under valgrind, so the seconds and CPU above are not the "
            f"daemon's own): event loop {_spread(loops)}, its threads {_spread(threads)}"
        )
        print(
            f'RESULT {{"instructions_loop": {statistics.median(loops):.0f}, '
            f'"instructions_threads": {statistics.median(threads):.0f}}}'
        )


def _per_video_parts(results: list[Round], of: Callable[[Round], Parts], scale: float = 1) -> Parts:
    """The medians over the rounds of ``of(round)`` per archived video, part by part, times
    ``scale`` (1000: CPU-s as ms)."""

    def median(part: str) -> float:
        return statistics.median(scale * getattr(of(r), part) / max(r.archived, 1) for r in results)

    return Parts(median("loops"), median("threads"), median("writers"))


def _report_kept(
    args: argparse.Namespace, results: list[Round], wall: float, cpu: float, user: float
) -> None:
    """With --kept-floor: that floor's medians, what its file work adds to the floor's, and the
    daemon's ratios against it (the daemon's medians ``wall``, ``cpu``, ``user``)."""
    kept = [r.kept for r in results if r.kept is not None]
    if not kept:
        return
    kept_wall = statistics.median(k[0] for k in kept)
    kept_cpu = statistics.median(k[1] for k in kept)
    kept_user = statistics.median(k[2] for k in kept)
    floor_ms = statistics.median(1000 * r.floor_cpu / args.videos for r in results)
    kept_ms = statistics.median(1000 * k[1] / args.videos for k in kept)
    print(
        f"the floor with the daemon's kept file work (sidecar, 4 fsyncs): {kept_wall:.1f} s "
        f"({args.videos / kept_wall:.1f} videos/s), {kept_cpu:.1f} CPU-s ({kept_user:.1f}), "
        f"{kept_ms:.2f} CPU ms per video against the floor's {floor_ms:.2f}; "
        f"the daemon against it: wall {wall / kept_wall:.2f}, CPU {cpu / kept_cpu:.2f} "
        f"({user / kept_user:.2f})"
    )


def _spread(values: list[float]) -> str:
    """The median of sorted ``values``, then their lowest and highest."""
    middle = f"{statistics.median(values):,.0f}"
    return middle if len(values) == 1 else f"{middle} ({values[0]:,.0f}-{values[-1]:,.0f})"


def _instructions(pid: int) -> Parts:
    """The instructions callgrind has counted in the daemon's process so far: its main thread's
    (the event loop) and the sum of its other threads' (a thread ended takes its count along)."""
    shown = subprocess.run(
        ["callgrind_control", "-e", "Ir", str(pid)],
        capture_output=True,
        text=True,
        check=True,
        timeout=CALLGRIND_CONTROL_SECONDS,
    ).stdout
    counts = {int(n): int(ir.replace(",", "")) for n, ir in _THREAD_COUNT.findall(shown)}
    if 1 not in counts:
        raise RuntimeError(f"callgrind_control showed no count for the main thread: {shown!r}")
    return Parts(loops=counts.pop(1), threads=sum(counts.values()))


def _strace_calls(path: pathlib.Path) -> int:
    """The calls strace -c counted (its summary's total line)."""
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] == "total":
            return int(fields[3])
    return 0


Store = Callable[[str, aiohttp.ClientResponse], Awaitable[None]]


async def _floor(
    sim_url: str, ids: list[str], slots: int, store: Store
) -> tuple[float, float, float, int]:
    """Poll each id and hand its video's answer to ``store``, ``slots`` at once: (wall, CPU-s, of
    which user CPU-s, context switches)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for task_id in ids:
        queue.put_nowait(task_id)
    headers = {"Authorization": f"Bearer {common.API_KEY}"}

    async def one(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            task_id = queue.get_nowait()
            async with session.get(sim_url + POLL_PATH + task_id, headers=headers) as answer:
                link = (await answer.json())["video_url"]
            async with session.get(link) as video:
                await store(task_id, video)

    cpu, user, started = time.process_time(), os.times().user, time.monotonic()
    switches = common.context_switches(os.getpid())
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session) for _ in range(slots)))
    wall = time.monotonic() - started
    switches = common.context_switches(os.getpid()) - switches
    return wall, time.process_time() - cpu, os.times().user - user, switches


async def _bare(
    sim_url: str, ids: list[str], folder: pathlib.Path, slots: int, *, kept_work: bool = False
) -> tuple[float, float, float, int]:
    """The floor: poll, stream to a temporary file with SHA-256, fsync, rename; ``slots`` at once
    (``folder`` exists). The file work blocks the loop, as a bare downloader's does.

    With ``kept_work``, the file work the issue keeps, as archive/writer.py does it: the video's
    sidecar (``{id}.json``, its hash and size among the task's fields) written and fsynced before
    the video's rename; each rename made durable by an fsync of the folder, the sidecar's after
    the video's. What the floor then leaves out of the daemon's work is the database, the outbox,
    the logs and the page cache's eviction."""

    async def to_file(task_id: str, video: aiohttp.ClientResponse) -> None:
        digest = hashlib.sha256()
        temp = folder / f"{task_id}.part"
        size = 0
        with temp.open("wb") as out:
            async for chunk in video.content.iter_chunked(1024 * 1024):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if not kept_work:
            temp.rename(folder / f"{task_id}.mp4")
            return
        described = folder / f"{task_id}-json.part"
        sidecar = {"task-id": task_id, "sha256": digest.hexdigest(), "bytes": str(size)}
        with described.open("wb") as out:
            out.write(json.dumps(sidecar, indent=2, sort_keys=True).encode())
            out.flush()
            os.fsync(out.fileno())
        temp.rename(folder / f"{task_id}.mp4")
        writer.sync_dir(str(folder))
        described.rename(folder / f"{task_id}.json")
        writer.sync_dir(str(folder))

    return await _floor(sim_url, ids, slots, to_file)


async def _bare_s3(
    sim_url: str, ids: list[str], endpoint: str, slots: int
) -> tuple[float, float, float, int]:
    """The floor to S3: poll, read the video into memory with SHA-256, one PUT with boto3 (in a
    thread, as boto3 blocks) carrying the hash; ``slots`` at once, into a bucket of its own."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"bench-burst-floor-{os.getpid()}"
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)

    async def to_s3(task_id: str, video: aiohttp.ClientResponse) -> None:
        body = await video.read()
        await asyncio.to_thread(
            client.put_object,
            Bucket=bucket,
            Key=f"floor/{task_id}.mp4",
            Body=body,
            Metadata={"sha256": hashlib.sha256(body).hexdigest()},
        )

    return await _floor(sim_url, ids, slots, to_s3)


@contextlib.contextmanager
def _database(kind: str, tmp: pathlib.Path) -> Iterator[tuple[str, str | None]]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp}/tasks.db", None
        return
    with common.database("bench_burst") as (name, url):
        yield url, name


def _archive(s3: str | None, tmp: pathlib.Path) -> str:
    if s3 is None:
        return f"file://{tmp}/archive"
    import boto3

    bucket = f"bench-burst-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/videos"


def _env(sim_url: str, db_url: str, archive: str, s3: str | None, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE_")}
    env.update(
        {
            "SEEDANCE_API_KEY": common.API_KEY,
            "SEEDANCE_API_BASE_URL": sim_url,
            "SEEDANCE_DATABASE_URL": db_url,
            "SEEDANCE_ARCHIVE_URL": archive,
            "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES": "http",
            "SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS": "true",
            "SEEDANCE_HTTP_PORT": str(port),  # and one up per process of --processes
            "SEEDANCE_LOG_FORMAT": "json",
            "SEEDANCE_MAX_REQUESTS_PER_SECOND": "1000",
        }
    )
    if s3 is not None:
        env["AWS_ENDPOINT_URL"] = s3
    return env


def _insert(kind: str, url: str, ids: list[str]) -> None:
    rows = [(task_id,) for task_id in ids]
    if kind == "sqlite":
        with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30) as conn:
            conn.executemany("INSERT INTO video_tasks (task_id) VALUES (?)", rows)
        return
    with psycopg.connect(url.replace("postgresql://", "postgresql://", 1)) as conn:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO video_tasks (task_id) VALUES (%s)", rows)


def _scalar(kind: str, url: str, sql: str) -> int:
    if kind == "sqlite":
        with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30) as conn:
            return int(conn.execute(sql).fetchone()[0])
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
        return int(row[0]) if row else 0


def _count(kind: str, url: str, table: str) -> int:
    return _scalar(kind, url, f"SELECT count(*) FROM {table}")


def _archived(kind: str, url: str) -> int:
    return _scalar(kind, url, "SELECT count(*) FROM video_tasks WHERE state = 'archived'")


def _wait_archived(kind: str, url: str, total: int, until: float) -> int:
    while True:
        done = _archived(kind, url)
        if done >= total or time.monotonic() > until:
            return done
        time.sleep(0.2)


def _wait_ticked(
    kind: str, url: str, processes: int, daemon: subprocess.Popen[bytes], until: float
) -> None:
    """Return once ``processes`` daemons have written a heartbeat after their first tick."""
    sql = "SELECT count(*) FROM archiver_heartbeats WHERE last_tick_at IS NOT NULL"
    while _scalar(kind, url, sql) < processes:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode} before its first tick")
        if time.monotonic() > until:
            raise SystemExit(f"the daemon did not tick within {START_SECONDS:.0f} s")
        time.sleep(0.1)


def _finished(sim_url: str, ids: list[str], size: int) -> None:
    """Every id finished at the simulator before anyone asks (created a minute ago)."""
    created = time.time() - 60
    for start in range(0, len(ids), SIM_BATCH):
        tasks = [
            {
                "id": task_id,
                "created": created,
                "queued_seconds": 0,
                "ready_seconds": 0,
                "size": size,
            }
            for task_id in ids[start : start + SIM_BATCH]
        ]
        request = urllib.request.Request(
            sim_url + "/_sim/tasks",
            data=json.dumps(tasks).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()


def _quiet_file_system(folders: dict[pathlib.Path, pathlib.Path], settle: float) -> float:
    """Wait (at most ``settle`` seconds: QUIET_SECONDS unless --settle says) until making a file
    in each of ``folders`` (the keys) costs what it costs on a quiet file system, and return what
    one cost at most (CPU us), for the report. Each probe's files are then moved to the folder
    ``folders`` gives for it.

    On ext4 without a journal (this machine's, see bench/README.md), a new file's inode is found by
    skipping each one freed in the last 60 s (360 s while its table is unsynced). After a mass
    deletion (the previous run's clean-up, a test suite's) every file made costs 0.3-0.8 ms of
    CPU instead of 0.02: that moved the writers' CPU per 0.5 MB video 1.1 -> 2.3 ms in a run
    straight after another, and the daemon makes two files per video to the floor's one. A file's
    inode is looked for in its folder's block group first, and ext4 spreads new folders over the
    groups, so each folder the run writes in is probed itself: a probe in a folder of its own
    passed in a clean group while perf put 40% of the writers' CPU in ``recently_deleted`` and
    ``find_get_block_common``. The probes' files stay until the end (removed, they would be freed
    inodes too), named so that the count of the archive's files leaves them out; moved (a rename
    frees no inode) out of the daemon's ``.incoming``, which its writers list: left there, 200 of
    them per attempt of the probe took the writers' CPU per 0.5 MB video from 2.9 to 4.1 ms, in
    ``getdents64`` (perf), the more the longer the probe had waited (2026-12-07 20:10-20:15).
    """
    os.sync()  # an unsynced freed inode is skipped for 360 s, a synced one for 60
    deadline = time.monotonic() + settle
    attempt = 0
    while True:
        costs = []
        for where, kept in folders.items():
            names = [f"{PROBE_PREFIX}{attempt}-{n}" for n in range(CREATE_PROBE_FILES)]
            started = time.process_time()
            for name in names:
                os.close(os.open(where / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            costs.append((time.process_time() - started) / CREATE_PROBE_FILES * 1e6)
            if kept != where:
                for name in names:
                    os.rename(where / name, kept / name)
        each_us = max(costs)
        if each_us <= QUIET_CREATE_US:
            return each_us
        if time.monotonic() >= deadline:
            print(f"warning: a file's creation still costs {each_us:.0f} us; measuring anyway")
            return each_us
        if attempt == 0:
            print(
                f"a file's creation costs {each_us:.0f} us: waiting for the file system to settle"
            )
        attempt += 1
        time.sleep(QUIET_PROBE_SECONDS)


def _evict(folder: pathlib.Path) -> None:
    """The folder's files out of the page cache (they are on disk: the floor fsynced each)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _tree_cpu(pid: int, *, user_only: bool = False) -> float:
    """CPU-s of a process and every process below it (``run --processes`` workers, the folder's
    writers); in user space only with ``user_only``."""
    return sum(
        common.process_cpu_seconds(each, user_only=user_only)
        for each in [pid, *common.descendant_pids(pid)]
    )


def _tree_parts(pid: int) -> Parts:
    """:class:`Parts` of a process and every process below it, as they stand (CPU-s)."""
    return _by_part(pid, common.process_cpu_seconds, common.main_thread_cpu_seconds)


def _tree_switches(pid: int) -> Parts:
    """The context switches of a process and every process below it, as :class:`Parts`."""
    return _by_part(pid, common.context_switches, common.main_thread_context_switches)


def _by_part(pid: int, whole: Callable[[int], float], main_thread: Callable[[int], float]) -> Parts:
    """``whole`` (of a process) and ``main_thread`` (of its main thread alone) summed by part over
    a process and every process below it."""
    loops = threads = writers = 0.0
    for each in [pid, *common.descendant_pids(pid)]:
        total = whole(each)
        try:
            command = pathlib.Path(f"/proc/{each}/cmdline").read_bytes()
        except OSError:
            continue  # gone since it was listed
        if WRITER_SCRIPT in command:
            writers += total
        else:
            loop = main_thread(each)
            loops += loop
            threads += total - loop
    return Parts(loops, threads, writers)


def _polls(sim_url: str) -> int:
    with urllib.request.urlopen(sim_url + "/_sim/stats", timeout=30) as response:
        stats: dict[str, Any] = json.loads(response.read())
    return sum(int(n) for n in stats["polls"].values())


def _commits(name: str | None) -> int:
    if name is None:
        return 0
    with psycopg.connect(common.PG_ADMIN_DSN) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (name,)
        ).fetchone()
    return int(row[0]) if row else 0


def _files(archive: str) -> int:
    if archive.startswith("file://"):
        return sum(
            1
            for path in pathlib.Path(archive.removeprefix("file://")).rglob("*")
            if path.is_file() and not path.name.startswith(PROBE_PREFIX)
        )
    return 0  # S3: the objects are counted by the store, not here


if __name__ == "__main__":
    main()
