"""Helpers shared by the benchmarks: the simulator as a child process, throwaway databases, CPU readings.

Not a benchmark itself. Everything here talks to 127.0.0.1 only and every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

HOST = "127.0.0.1"
PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URL_TEMPLATE = "postgresql://postgres@127.0.0.1:5432/{name}"
API_KEY = "bench-key"
# Tasks the simulator creates on first sight and that never finish (the steady polling load).
NEVER_READY = '{"ready_seconds": 1e9}'
PORT_WAIT_SECONDS = 20.0
PROCESS_STOP_SECONDS = 10.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_seconds: float = PORT_WAIT_SECONDS) -> None:
    """Return once ``port`` on loopback accepts a connection; raise after ``timeout_seconds``."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing accepted connections on {HOST}:{port} in {timeout_seconds}s")


@contextlib.contextmanager
def simulator(
    auto: str = NEVER_READY, api_key: str = API_KEY, rate_limit: float | None = None
) -> Iterator[tuple[str, int]]:
    """Run ``python -m seedance_archiver.simulator`` in its own process (its CPU is not ours);
    ``rate_limit`` makes it answer 429 beyond that many polls per second."""
    limit = [] if rate_limit is None else ["--rate-limit", str(rate_limit)]
    port = free_port()
    log_path = pathlib.Path(tempfile.gettempdir()) / f"bench-simulator-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "seedance_archiver.simulator",
                "--host",
                HOST,
                "--port",
                str(port),
                "--api-key",
                api_key,
                "--auto",
                auto,
                "--no-poll-times",
                *limit,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        wait_for_port(port)
        if proc.poll() is not None:
            raise RuntimeError(f"the simulator exited with {proc.returncode}; see {log_path}")
        yield f"http://{HOST}:{port}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=PROCESS_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=PROCESS_STOP_SECONDS)
        log_path.unlink(missing_ok=True)


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that nothing listens on right now."""
    for _ in range(100):
        first = free_port()
        if first + count > 65536:
            continue
        socks = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((HOST, port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


def http_get_text(port: int, path: str) -> str:
    """GET http://127.0.0.1:port/path (never through a proxy) and return its body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def http_ok(port: int, path: str) -> bool:
    try:
        http_get_text(port, path)
    except OSError:
        return False
    return True


def child_pids(pid: int) -> list[int]:
    """The children of a process (of any of its threads), from /proc (Linux)."""
    found = []
    for children in pathlib.Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in children.read_text().split()]
        except OSError:
            continue
    return found


def descendant_pids(pid: int) -> list[int]:
    """Every process below ``pid``: its children, theirs (a ``run --processes`` worker's folder
    writers), and so on."""
    found = []
    below = child_pids(pid)
    while below:
        found += below
        below = [grandchild for child in below for grandchild in child_pids(child)]
    return found


def process_cpu_seconds(pid: int, *, user_only: bool = False) -> float:
    """User + system CPU seconds of another process (its user seconds only, with ``user_only``),
    from /proc (0.0 if it is gone)."""
    return _stat_cpu_seconds(f"/proc/{pid}/stat", user_only)


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process's main thread alone (an asyncio daemon's event
    loop); the process's other threads are the rest of :func:`process_cpu_seconds`."""
    return _stat_cpu_seconds(f"/proc/{pid}/task/{pid}/stat", False)


def _stat_cpu_seconds(path: str, user_only: bool) -> float:
    try:
        text = pathlib.Path(path).read_text()
    except OSError:
        return 0.0
    # Fields after the command name, which is in parentheses and may contain spaces.
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + (0 if user_only else int(fields[12]))) / _CLOCK_TICKS


def context_switches(pid: int) -> int:
    """Context switches of a process so far, its threads' together (voluntary: a wait, such as a
    thread waiting for the GIL or for work; involuntary: the kernel's choice), from /proc (0 if
    it is gone). A thread that ended takes its own with it."""
    try:
        threads = list(pathlib.Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    return sum(_status_switches(thread / "status") for thread in threads)


def main_thread_context_switches(pid: int) -> int:
    """Context switches of a process's main thread alone (an asyncio daemon's event loop)."""
    return _status_switches(pathlib.Path(f"/proc/{pid}/task/{pid}/status"))


def _status_switches(path: pathlib.Path) -> int:
    try:
        text = path.read_text()
    except OSError:
        return 0
    return sum(int(line.split()[-1]) for line in text.splitlines() if "ctxt_switches:" in line)


def postgres_cpu_seconds() -> float:
    """User + system CPU seconds of every running ``postgres`` process (server and backends)."""
    total = 0.0
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        total += process_cpu_seconds(int(entry.name))
    return total


def database_name(prefix: str) -> str:
    """The name :func:`database` gives this process's database."""
    return f"{prefix}_{os.getpid()}"


@contextlib.contextmanager
def database(prefix: str) -> Iterator[tuple[str, str]]:
    """A fresh, empty PostgreSQL database, dropped on the way out; yield (name, SQLAlchemy URL)."""
    name = database_name(prefix)
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name, PG_URL_TEMPLATE.format(name=name)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_dsn(name: str) -> str:
    """A libpq connection string for database ``name`` on the local server."""
    return f"host=127.0.0.1 port=5432 user=postgres dbname={name}"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by nearest rank; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


Buckets = list[tuple[float, float]]  # (upper bound "le", cumulative count), ascending


def histogram_buckets(histogram: Any) -> Buckets:
    """The cumulative bucket counts of an unlabelled prometheus_client Histogram, now."""
    return [
        (float(sample.labels["le"]), sample.value)
        for metric in histogram.collect()
        for sample in metric.samples
        if sample.name.endswith("_bucket")
    ]


def histogram_quantile(before: Buckets, after: Buckets, q: float) -> float:
    """The ``q``-th percentile (0-100) of what was observed between two snapshots, interpolated
    linearly within its bucket as Prometheus's ``histogram_quantile`` does; NaN when nothing was."""
    counts = [(le, b - a) for (le, b), (_, a) in zip(after, before, strict=True)]
    total = counts[-1][1]
    if total <= 0:
        return float("nan")
    rank = q / 100 * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in counts:
        if count >= rank:
            if le == float("inf"):
                return lower_le  # beyond the last finite bound: all a histogram can say
            inside = count - lower_count
            return lower_le + (le - lower_le) * ((rank - lower_count) / inside if inside else 1.0)
        lower_le, lower_count = le, count
    return lower_le


def histogram_max_bound(before: Buckets, after: Buckets) -> float:
    """The upper bound of the highest bucket that got an observation between two snapshots."""
    previous = 0.0
    worst = float("nan")
    for (le, b), (_, a) in zip(after, before, strict=True):
        if b - a > previous:
            worst = le
        previous = b - a
    return worst


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines)
