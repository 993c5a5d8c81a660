"""What more than one test module needs: ports, waits, settings, the daemon in-process and as a
command, feeders, videos.

Test modules import shared pieces from here and get fixtures from a conftest.py; they never import a
conftest.py, nor each other (tests/unit/test_style.py checks both).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import inspect
import itertools
import os
import pathlib
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    MutableMapping,
)
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import psycopg
import pytest
import sqlalchemy as sa
import structlog.testing
from seedance_archiver import (
    config,
    models,
    policy,
    ratelimit,
    scheduler,
    service,
    simulator,
    store,
    testing,
)
from seedance_archiver.archive import folder, s3

if TYPE_CHECKING:
    from tests.integration.faultproxy import FaultProxy

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_DSN = os.environ.get("SEEDANCE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
SIM_KEY = "sim-test-key"  # the API key every test's simulator accepts

T = TypeVar("T")

MIB = 1024 * 1024
SMALL = 64 * 1024  # a video small enough to archive in one go
FOREVER = 10_000  # a fault repeated until the test clears it
S3_PREFIX = "videos"  # where the in-process daemon archives in S3
STALL_SECONDS = 120.0  # a proxy stall outlasting every test step; the test resumes it earlier


# --- ports and tools ------------------------------------------------------------------------------

# Below Linux's ephemeral range (32768-60999 by default): no port the kernel hands out, for a
# client connection or a bind to port 0, ever lands here, so a port found free stays free until
# the process it is meant for binds it, seconds later.
FIXED_PORTS = range(20_000, 32_000)


def free_port() -> int:
    """A loopback port nothing listens on now, outside the ephemeral range (FIXED_PORTS)."""
    return free_ports(1)


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports nothing listens on right now: for
    ``run --processes N``, whose process ``i`` serves ``SEEDANCE_HTTP_PORT + i``. Picked outside
    the ephemeral range: another test's connections cannot take one before that process starts."""
    chooser = random.Random()
    for _ in range(100):
        first = chooser.randrange(FIXED_PORTS.start, FIXED_PORTS.stop - count)
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except (OSError, OverflowError):
                continue  # one of them is taken, or past 65535: try elsewhere
        return first
    raise RuntimeError(f"no {count} consecutive free loopback ports")


def need_tool(tool: pathlib.Path | str | None, name: str, hint: str) -> str:
    """The tool's path, or skip naming it (fail under CI=true, where every check must run)."""
    if tool is not None and os.access(tool, os.X_OK):
        return str(tool)
    message = f"{name} is not installed ({hint})"
    if IN_CI:
        pytest.fail(f"{message}; CI=true: the deployment checks must run")
    pytest.skip(message)


# --- waiting, and the scheduler as a task ---------------------------------------------------------


def wait_for(
    condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that; fail after
    ``timeout`` seconds. (In a coroutine, :func:`wait_until` yields to the loop instead.)"""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


async def wait_until(
    condition: Callable[[], object] | Callable[[], Awaitable[object]], seconds: float, what: str
) -> None:
    """Yield to the loop until ``condition`` (a function or a coroutine function) returns something
    truthy; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.05)


def daemon_values(
    sim_url: str, database_url: str, archive_url: str, **overrides: Any
) -> dict[str, Any]:
    """The settings of a daemon aimed at the simulator, polling fast so tests end quickly
    (``overrides`` win). In-process as :func:`daemon_settings`, as a command as :func:`base_env`."""
    values: dict[str, Any] = {
        "api_key": SIM_KEY,
        "api_base_url": sim_url,
        "database_url": database_url,
        "archive_url": archive_url,
        "poll_draft": "0.3-0.6",
        "poll_standard": "0.5-1",
        "poll_flex": "0.8-1.5",
        "allowed_video_url_schemes": "http",
        "allow_private_video_hosts": True,
        "http_port": 0,
        "max_requests_per_second": 200,
        "shutdown_grace_seconds": 5,
        # The simulator's tasks take seconds, not the seed's minutes: no skip unless a test sets one.
        **config.SKIP_OFF,
    }
    values.update(overrides)
    return values


def daemon_settings(
    sim_url: str, database_url: str, archive_url: str, **overrides: Any
) -> config.Settings:
    """:func:`daemon_values` as the daemon reads them."""
    return config.load(**daemon_values(sim_url, database_url, archive_url, **overrides))


@contextlib.asynccontextmanager
async def running_daemon(
    settings: config.Settings, tick_seconds: float = scheduler.TICK_SECONDS
) -> AsyncIterator[asyncio.Task[int]]:
    """``scheduler.run`` in this event loop until the block ends; it must then stop cleanly."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        scheduler.run(settings, stop=stop, handle_signals=False, tick_seconds=tick_seconds)
    )
    try:
        yield task
    finally:
        stop.set()
        assert await asyncio.wait_for(task, timeout=30) == 0


@contextlib.contextmanager
def serving(dialect: str = "reseller") -> Iterator[simulator.SimulatorThread]:
    """A fresh simulator of ``dialect`` serving on 127.0.0.1, stopped after."""
    server = simulator.SimulatorThread(simulator.Simulator(api_key=SIM_KEY, dialect=dialect))
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()


# --- the service on in-memory fakes, with a moved clock --------------------------------------------


TASK_ID = "video_abc123def456"  # the one row most unit tests use
RULES = policy.Rules(cadences=config.Settings().cadences(), retention=dt.timedelta(days=1))
OWNER = "unit-test-daemon"


class LimiterClock:
    """Monotonic seconds that follow the MovableClock, creeping 1 ms per read.

    The creep keeps a limiter of a million requests per second from ever making a poll wait, while a
    pause (a 429) still ends only when the test moves the MovableClock past it.
    """

    def __init__(self, clock: testing.MovableClock) -> None:
        self.clock = clock
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return (self.clock.now - testing.EPOCH).total_seconds() + self.reads * 1e-3


@dataclasses.dataclass
class Rig:
    """A service wired to fakes, with the fakes at hand for setting up and checking."""

    svc: service.Service
    store: testing.FakeStore
    provider: testing.FakeProvider
    archive: testing.FakeArchive
    clock: testing.MovableClock

    def row(self, task_id: str = TASK_ID) -> models.Task:
        return self.store.rows[task_id]

    async def settle(self, rounds: int = 200) -> None:
        """Let the per-row asyncio tasks run to completion (no time passes)."""
        for _ in range(rounds):
            if not self.svc.in_flight:
                return
            await asyncio.sleep(0)
        pytest.fail(f"{self.svc.in_flight} row(s) still in flight after {rounds} loop turns")

    async def cycle(self) -> int:
        """One tick, its work, and the write-back; returns the rows claimed."""
        claimed = await self.svc.tick()
        await self.settle()
        await self.svc.flush()
        return claimed

    async def at(self, after_seconds: float) -> int:
        """Move the clock by ``after_seconds`` and run a cycle."""
        self.clock.advance(after_seconds)
        return await self.cycle()


def make_rig(
    draw: policy.Draw = testing.low_draw,
    fake_provider: testing.FakeProvider | None = None,
    fake_store: testing.FakeStore | None = None,
) -> Rig:
    clock = testing.MovableClock()
    store = fake_store or testing.FakeStore()
    fake = fake_provider or testing.FakeProvider()
    archive = testing.FakeArchive()
    limiter = ratelimit.RateLimiter(1e6, burst=1000, clock=LimiterClock(clock))
    svc = service.Service(
        store,
        fake,
        archive,
        RULES,
        limiter,
        owner=OWNER,
        clock=clock,
        draw=draw,
        db_executor=testing.InlineExecutor(),
    )
    return Rig(svc, store, fake, archive, clock)


# --- the daemon in-process, with fast cadences ---------------------------------------------------


TICK_SECONDS = 0.1
CADENCE = "0.3-0.6"
CADENCE_LOW, CADENCE_HIGH = 0.3, 0.6  # CADENCE as numbers
DOWNLOAD_RETRY_SECONDS = 0.3  # the daemon's 5 s floor, shortened so download retries fit a test


@dataclasses.dataclass
class Running:
    """A daemon running in this event loop, and what a test needs to look at it."""

    svc: service.Service
    rows: store.SqlStore  # the feeding application's own connection (never through a proxy)
    sim: simulator.Simulator
    logs: list[MutableMapping[str, Any]]  # structlog's captured events
    archive_dir: pathlib.Path
    task: asyncio.Task[int]

    def row(self, task_id: str) -> models.Task:
        row = self.rows.get(task_id)
        assert row is not None, f"no row for {task_id!r}"
        return row

    def state(self, task_id: str) -> str:
        return self.row(task_id).state

    def events(self, name: str, task_id: str | None = None) -> list[MutableMapping[str, Any]]:
        return [
            e
            for e in list(self.logs)
            if e.get("event") == name and (task_id is None or e.get("task_id") == task_id)
        ]

    def polls(self, task_id: str) -> list[float]:
        """When the simulator received each poll of ``task_id`` (Unix seconds)."""
        return list(self.sim.stats.poll_times.get(task_id, []))

    def all_polls(self) -> list[float]:
        return sorted(x for times in list(self.sim.stats.poll_times.values()) for x in times)

    async def until(
        self,
        condition: Callable[[], object] | Callable[[], Awaitable[object]],
        what: str,
        seconds: float = 20,
    ) -> None:
        await wait_until(condition, seconds, what)

    async def until_state(self, task_id: str, state: str, seconds: float = 20) -> models.Task:
        def reached() -> bool:
            row = self.rows.get(task_id)
            return row is not None and row.state == state

        try:
            await wait_until(reached, seconds, f"{task_id} to be {state}")
        except AssertionError:
            row = self.rows.get(task_id)
            raise AssertionError(
                f"{task_id} did not become {state} in {seconds}s: "
                f"{row and (row.state, row.attempts, row.error)}"
            ) from None
        return self.row(task_id)


class Launcher:
    """Starts the daemon with fast cadences against the simulator; hands back a :class:`Running`."""

    def __init__(
        self,
        sim: simulator.SimulatorThread,
        db_url: str,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
        rows_url: str | None = None,
    ) -> None:
        self.sim = sim
        self.db_url = db_url
        self.rows_url = rows_url or db_url
        self.archive_dir = tmp_path / "archive"
        self.monkeypatch = monkeypatch

    @contextlib.asynccontextmanager
    async def __call__(
        self,
        *,
        download_retry_seconds: float = DOWNLOAD_RETRY_SECONDS,
        recovery_seconds: float | None = None,
        on_build: Callable[[service.Service], None] | None = None,
        **overrides: Any,
    ) -> AsyncIterator[Running]:
        """Run ``scheduler.run`` with these settings (``overrides`` win) until the block ends.

        Two knobs that are not settings are shortened on the built service: the download retry floor
        (5 s in the daemon) and, when given, the limiter's recovery time after a 429 (60 s).
        """
        values: dict[str, Any] = {
            "poll_draft": CADENCE,
            "poll_standard": CADENCE,
            "poll_flex": CADENCE,
            "max_requests_per_second": 50,
            "request_timeout_seconds": 5,
            "shutdown_grace_seconds": 2,
            **overrides,
        }
        settings = daemon_settings(
            values.pop("api_base_url", self.sim.url),
            values.pop("database_url", self.db_url),
            values.pop("archive_url", f"file://{self.archive_dir}"),
            **values,
        )
        built: list[service.Service] = []
        build = scheduler.build_service

        def capture(settings: config.Settings, api_key: str) -> tuple[service.Service, store.Store]:
            svc, sql_store = build(settings, api_key)
            svc.rules = dataclasses.replace(
                svc.rules, download_retry_seconds=download_retry_seconds
            )
            if recovery_seconds is not None:
                svc.limiter = ratelimit.RateLimiter(
                    settings.max_requests_per_second,
                    burst=scheduler.RATE_BURST,
                    recovery_seconds=recovery_seconds,
                )
            if on_build is not None:
                on_build(svc)
            built.append(svc)
            return svc, sql_store

        self.monkeypatch.setattr(scheduler, "build_service", capture)
        rows = store.SqlStore.from_url(self.rows_url)
        try:
            with structlog.testing.capture_logs() as logs:
                async with running_daemon(settings, tick_seconds=TICK_SECONDS) as task:
                    await wait_until(
                        lambda: task.done() or bool(built and built[0].stats.ticks >= 1),
                        20,
                        "the daemon to start",
                    )
                    if task.done():
                        task.result()  # raises what stopped it
                    yield Running(built[0], rows, self.sim.simulator, logs, self.archive_dir, task)
        finally:
            rows.close()


def insert(rows: store.SqlStore, task_id: str, **columns: Any) -> None:
    """Insert a row as a feeder would: the id, optionally more columns."""
    with rows.engine.begin() as conn:
        conn.execute(sa.insert(models.video_tasks).values(task_id=task_id, **columns))


def assert_archived_intact(running: Running, task_id: str, size: int) -> None:
    """Archived once, with the simulator's exact bytes under the final name."""
    row = running.row(task_id)
    assert row.state == "archived", (row.state, row.error)
    assert row.error is None
    assert row.archive_bytes == size
    assert row.archive_sha256 == simulator.video_sha256(task_id, size)
    path = running.archive_dir / f"{task_id}.mp4"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == row.archive_sha256
    assert row.archive_uri == path.resolve().as_uri()


async def http_get(port: int, path: str) -> tuple[int, Any]:
    """The daemon's answer on its HTTP port: status code and JSON body."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{port}{path}")
    return response.status_code, response.json()


async def readyz(port: int) -> tuple[int, Any]:
    """The daemon's /readyz answer: status code and JSON body."""
    return await http_get(port, "/readyz")


def no_crashes(running: Running) -> None:
    """Nothing reached the catch-alls: every fault was handled where it happened."""
    assert running.events("task_work_crashed") == []
    assert running.events("tick_crashed") == []
    assert running.events("job_crashed") == []


def feed(url: str, *rows: dict[str, Any]) -> None:
    """Insert whole rows in one transaction, as a feeding application may (state, deadline...)."""
    feeder = store.SqlStore.from_url(url)
    try:
        with feeder.engine.begin() as conn:
            for row in rows:
                conn.execute(sa.insert(models.video_tasks).values(**row))
    finally:
        feeder.close()


def gaps(times: list[float]) -> list[float]:
    """The time between each two consecutive instants."""
    return [b - a for a, b in itertools.pairwise(times)]


def leftovers(archive_dir: pathlib.Path) -> list[str]:
    """What a broken or refused download left in the archive folder's incoming area."""
    incoming = archive_dir / folder.INCOMING_DIR
    return sorted(p.name for p in incoming.iterdir()) if incoming.is_dir() else []


def s3_key(task_id: str) -> str:
    return f"{S3_PREFIX}/{task_id}.mp4"


def s3_uploads(client: Any, bucket: str, prefix: str = "") -> list[str]:
    return [
        u["Key"]
        for u in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    ]


def s3_sha256(client: Any, bucket: str, task_id: str) -> str:
    """The SHA-256 of the object's bytes as they are in S3."""
    body = client.get_object(Bucket=bucket, Key=s3_key(task_id))["Body"].read()
    return hashlib.sha256(body).hexdigest()


def via_proxy(pg_url: str, proxy: FaultProxy) -> str:
    """The same database, reached through the fault proxy."""
    return f"postgresql://postgres@127.0.0.1:{proxy.port}{urllib.parse.urlsplit(pg_url).path}"


# --- videos as the simulator serves them ---------------------------------------------------------


async def stream(
    chunks: Iterable[bytes], fail_with: BaseException | None = None
) -> AsyncIterator[bytes]:
    """The chunks as an async stream (as a download delivers them), optionally breaking at the end."""
    for chunk in chunks:
        yield chunk
    if fail_with is not None:
        raise fail_with


def video(task_id: str, size: int) -> AsyncIterator[bytes]:
    return stream(simulator.video_chunks(task_id, size))


def expected_sha(task_id: str, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in simulator.video_chunks(task_id, size):
        digest.update(chunk)
    return digest.hexdigest()


def new_id() -> str:
    return f"video_{uuid.uuid4().hex[:10]}"


# --- feeding applications, in plain SQL -----------------------------------------------------------


class SqliteFeeder:
    """A feeding application on SQLite: plain SQL through the standard library."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def insert(self, task_id: str, mode: str | None = None) -> None:
        with sqlite3.connect(self.path, timeout=10) as conn:
            if mode is None:
                conn.execute("INSERT INTO video_tasks (task_id) VALUES (?)", (task_id,))
            else:
                conn.execute(
                    "INSERT INTO video_tasks (task_id, mode) VALUES (?, ?)", (task_id, mode)
                )

    def rows(self) -> dict[str, dict[str, Any]]:
        with sqlite3.connect(self.path, timeout=10) as conn:
            conn.row_factory = sqlite3.Row
            return {r["task_id"]: dict(r) for r in conn.execute("SELECT * FROM video_tasks")}


class PostgresFeeder:
    """A feeding application on PostgreSQL: plain SQL through psycopg."""

    def __init__(self, url: str) -> None:
        self.url = url

    def insert(self, task_id: str, mode: str | None = None) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            if mode is None:
                conn.execute("INSERT INTO video_tasks (task_id) VALUES (%s)", (task_id,))
            else:
                conn.execute(
                    "INSERT INTO video_tasks (task_id, mode) VALUES (%s, %s)", (task_id, mode)
                )

    def insert_for(self, task_id: str, provider: str) -> None:
        """Insert a row routed to ``provider``'s daemon (when daemons of two share the table)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO video_tasks (task_id, provider) VALUES (%s, %s)", (task_id, provider)
            )

    def rows(self) -> dict[str, dict[str, Any]]:
        with psycopg.connect(self.url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT * FROM video_tasks")
            names = [d.name for d in cur.description or []]
            return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


# --- S3 ---------------------------------------------------------------------------------------------


OPTIONAL_CALLS = (
    s3.LIST_UPLOADS,
    s3.PUT_TAGS,
    s3.GET_TAGS,
    s3.HEAD_BUCKET,
    s3.CHECKSUM,
)


# --- the installed command, run as a user would run it -------------------------------------------

CLI = pathlib.Path(sys.executable).parent / "seedance-archiver"


def _env_text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def base_env(sim_url: str, database_url: str, archive_url: str) -> dict[str, str]:
    """The environment of a daemon aimed at the simulator (:func:`daemon_values`), logging JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    values = daemon_values(sim_url, database_url, archive_url, log_format="json")
    env.update({config.ENV_PREFIX + k.upper(): _env_text(v) for k, v in values.items()})
    return env


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command of the installed CLI to completion."""
    result = subprocess.run(
        [str(CLI), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}: {result.stderr[-2000:]}")
    return result


@dataclasses.dataclass
class Daemon:
    """A long-running subprocess (``seedance-archiver run`` unless told otherwise) whose output goes
    to a file."""

    process: subprocess.Popen[bytes]
    log_path: pathlib.Path

    @classmethod
    def start(
        cls,
        env: dict[str, str] | None,
        log_path: pathlib.Path,
        argv: Iterable[str] = (str(CLI), "run"),
        **popen: Any,
    ) -> Daemon:
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                list(argv), env=env, stdout=log_file, stderr=subprocess.STDOUT, **popen
            )
        return cls(process, log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class NotifySocket:
    """A stand-in for systemd's notify socket ($NOTIFY_SOCKET): the datagrams a daemon sends it."""

    def __init__(self, path: pathlib.Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.address = str(path)
        self.received: list[str] = []  # every datagram read so far, in order

    def drain(self) -> list[str]:
        """The datagrams that arrived since the last read, without waiting."""
        self.sock.setblocking(False)
        new = []
        try:
            while True:
                new.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            self.received += new
            return new

    def until(self, line: str, timeout: float) -> list[str]:
        """The datagrams received up to and including the first that holds ``line``."""
        deadline = time.monotonic() + timeout
        new: list[str] = []
        while not new or line not in new[-1].splitlines():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {line}: {new}")
            self.sock.settimeout(left)
            try:
                new.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        self.received += new
        return new

    def close(self) -> None:
        self.sock.close()
