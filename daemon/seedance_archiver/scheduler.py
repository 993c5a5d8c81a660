"""APScheduler wiring: the static jobs, signals, NOTIFY wake-ups and the graceful stop.

APScheduler drives three static jobs (the due-row tick, lease renewal, and a heartbeat through the
tick itself); it never holds one job per task and never uses a persistent job store: the database row
is the only source of truth.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable

import apscheduler.schedulers.base
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

import seedance_archiver
from seedance_archiver import (
    archive,
    config,
    errors,
    metrics,
    policy,
    provider,
    ratelimit,
    service,
    store,
    systemd,
    web,
)

log = structlog.get_logger(__name__)

TICK_SECONDS = 0.25
HOUSEKEEPING_SECONDS = 600.0
GAUGES_SECONDS = 30.0
HEARTBEAT_SECONDS = 10.0
PRUNE_SECONDS = 3600.0
WATCHDOG_STALE_SECONDS = 30.0
KEY_CHECK_SECONDS = 1.0  # how often the key-check job asks whether a check is due (cheap)
RATE_BURST = 10


def _guarded(name: str, job: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
    """Wrap a job so an exception is logged and the schedule carries on: loops never die quietly."""

    async def run() -> None:
        try:
            await job()
        except errors.StoreError as exc:
            log.warning("job_failed", job=name, error=str(exc))
        except Exception:
            log.exception("job_crashed", job=name)

    run.__name__ = name
    return run


class _Ticker:
    """Runs the tick without overlap; a wake-up during a tick makes it run once more right after.

    APScheduler drives the regular interval; NOTIFY wake-ups come through :meth:`run_soon`. Without
    this, a wake-up arriving mid-tick would be skipped and wait for the next interval.
    """

    def __init__(self, tick: Callable[[], Awaitable[None]]) -> None:
        self._tick = tick
        self._running = False
        self._again = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        if self._running:
            self._again = True
            return
        self._running = True
        self._idle.clear()
        try:
            while True:
                self._again = False
                await self._tick()
                if not self._again:
                    break
        finally:
            self._running = False
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no tick is running (the current one, if any, has finished)."""
        await self._idle.wait()

    def run_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def owner_name() -> str:
    """This daemon's lease owner: host, pid and a random suffix, unique across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def build_service(
    settings: config.Settings, api_key: str
) -> tuple[service.Service, store.SqlStore]:
    """The service with its real store, provider and archive, as the settings describe them."""
    sql_store = store.SqlStore.from_url(
        settings.resolve_database_url(), settings.database_statement_timeout_seconds
    )
    svc_metrics = metrics.Metrics()
    client = provider.HttpProvider(
        settings.api_base_url,
        api_key,
        timeout_seconds=settings.request_timeout_seconds,
        url_rules=provider.UrlRules(
            schemes=settings.allowed_video_url_schemes,
            allow_private_hosts=settings.allow_private_video_hosts,
        ),
        max_video_bytes=settings.max_video_bytes,
    )
    svc = service.Service(
        sql_store,
        client,
        archive.from_url(settings.archive_url, metrics=svc_metrics),
        policy.Rules.from_settings(settings),
        ratelimit.RateLimiter(settings.max_requests_per_second, burst=RATE_BURST),
        owner=owner_name(),
        lease_seconds=settings.lease_seconds,
        max_download_seconds=settings.max_download_seconds,
        metrics=svc_metrics,
    )
    return svc, sql_store


async def run(
    settings: config.Settings,
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    tick_seconds: float = TICK_SECONDS,
) -> int:
    """Run the daemon until ``stop`` is set or SIGTERM/SIGINT arrives; return the exit code."""
    api_key = settings.resolve_api_key()
    lock = store.SqliteLock(settings.resolve_database_url())
    lock.acquire()
    svc, sql_store = build_service(settings, api_key)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    listener: store.Listener | None = None
    server: web.WebServer | None = None
    scheduler = AsyncIOScheduler(timezone=dt.UTC)
    started_at = svc.clock()

    async def heartbeat() -> None:
        await svc.db(
            sql_store.beat,
            svc.owner,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            version=seedance_archiver.__version__,
            started_at=started_at,
            last_tick_at=svc.last_tick_at,
            api_key_ok=not svc.auth_blocked,
        )

    async def prune() -> None:
        cutoff = svc.clock() - dt.timedelta(days=settings.prune_after_days)
        deleted = await svc.db(sql_store.prune, cutoff)
        if deleted:
            log.info("finished_rows_pruned", rows=deleted, finished_before=cutoff.isoformat())

    async def watchdog() -> None:
        # Only vouch for the daemon while its ticks complete: a stuck or crashing tick gets us
        # restarted.
        last = svc.last_tick_at
        fresh = last is not None and (svc.clock() - last).total_seconds() < WATCHDOG_STALE_SECONDS
        if fresh and svc.healthy:
            systemd.notify("WATCHDOG=1")

    def every(name: str, job: Callable[[], Awaitable[object]], seconds: float, now: bool) -> None:
        # APScheduler 3 reads next_run_time=None as "add paused": pass it only to run at once.
        first: dict[str, dt.datetime] = {"next_run_time": dt.datetime.now(dt.UTC)} if now else {}
        scheduler.add_job(
            _guarded(name, job),
            "interval",
            seconds=seconds,
            id=name,
            max_instances=1,
            coalesce=True,
            **first,
        )

    try:
        await svc.db(sql_store.check_schema)
        try:
            await svc.archive.check()
        except errors.ArchiveError as exc:
            log.error("archive_unreachable", error=str(exc))
        log.info("daemon_starting", owner=svc.owner, **settings.public_summary())

        ticker = _Ticker(_guarded("tick", svc.tick))
        every("tick", ticker.run, tick_seconds, now=True)
        every("renew_leases", svc.renew_leases, svc.lease.total_seconds() / 3, now=False)
        every("housekeeping", svc.housekeeping, HOUSEKEEPING_SECONDS, now=True)
        every("refresh_gauges", svc.refresh_gauges, GAUGES_SECONDS, now=True)
        every("check_key", svc.check_key_if_due, KEY_CHECK_SECONDS, now=True)
        every("heartbeat", heartbeat, HEARTBEAT_SECONDS, now=True)
        if settings.prune_after_days > 0:
            every("prune", prune, PRUNE_SECONDS, now=True)
        watchdog_seconds = systemd.watchdog_interval()
        if watchdog_seconds is not None:
            every("watchdog", watchdog, watchdog_seconds, now=True)
        scheduler.start()

        def wake() -> None:
            if not stop.is_set():
                svc.wake()
                ticker.run_soon()

        if sql_store.dialect == "postgresql":

            def wake_from_thread() -> None:
                loop.call_soon_threadsafe(wake)

            listener = store.Listener(
                settings.resolve_database_url(),
                wake_from_thread,
                settings.database_statement_timeout_seconds,
            )
            listener.start()
        if settings.http_port:
            server = web.WebServer(svc, sql_store, settings.http_host, settings.http_port)
            await server.start()
        if handle_signals:
            _install_signals(loop, stop)
        log.info("daemon_started", tick_s=tick_seconds, listen=listener is not None)
        systemd.notify("READY=1\nSTATUS=archiving")
        await stop.wait()
        systemd.notify("STOPPING=1")
        log.info("daemon_stopping", in_flight=svc.in_flight)
        # Claim nothing more, then let a tick in progress end (not be cancelled half-way).
        svc.stop_claiming()
        scheduler.pause_job("tick")
        await ticker.wait_idle()
        await svc.stop(settings.shutdown_grace_seconds)
        log.info("daemon_stopped", **{"polls": svc.stats.polls, "archived": svc.stats.archived})
        return 0
    finally:
        if scheduler.state != apscheduler.schedulers.base.STATE_STOPPED:
            # AsyncIOScheduler defers shutdown to the loop; this is the one and only call.
            scheduler.shutdown(wait=False)
        if server is not None:
            await server.stop()
        if listener is not None:
            await asyncio.to_thread(listener.stop)
        await svc.provider.aclose()
        try:
            await svc.db(sql_store.forget_daemon, svc.owner)
        except errors.StoreError as exc:
            log.warning("heartbeat_not_removed", error=str(exc))
        sql_store.close()
        svc.db_executor.shutdown(wait=False)
        lock.release()


def _install_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second_signal_exiting_now", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
