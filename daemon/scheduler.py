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

from daemon import archive, config, errors, policy, provider, ratelimit, service, store

log = structlog.get_logger(__name__)

TICK_SECONDS = 0.25
HOUSEKEEPING_SECONDS = 600.0
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


def owner_name() -> str:
    """This daemon's lease owner: host, pid and a random suffix, unique across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def build_service(
    settings: config.Settings, api_key: str
) -> tuple[service.Service, store.SqlStore]:
    """The service with its real store, provider and archive, as the settings describe them."""
    sql_store = store.SqlStore.from_url(settings.database_url)
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
        archive.from_url(settings.archive_url),
        policy.Rules.from_settings(settings),
        ratelimit.RateLimiter(settings.max_requests_per_second, burst=RATE_BURST),
        owner=owner_name(),
        lease_seconds=settings.lease_seconds,
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
    lock = store.SqliteLock(settings.database_url)
    lock.acquire()
    svc, sql_store = build_service(settings, api_key)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    listener: store.Listener | None = None
    scheduler = AsyncIOScheduler(timezone=dt.UTC)
    try:
        await asyncio.to_thread(sql_store.check_schema)
        try:
            await svc.archive.check()
        except errors.ArchiveError as exc:
            log.error("archive_unreachable", error=str(exc))
        log.info("daemon_starting", owner=svc.owner, **settings.public_summary())

        scheduler.add_job(
            _guarded("tick", svc.tick),
            "interval",
            seconds=tick_seconds,
            id="tick",
            max_instances=1,
            coalesce=True,
            next_run_time=dt.datetime.now(dt.UTC),
        )
        scheduler.add_job(
            _guarded("renew_leases", svc.renew_leases),
            "interval",
            seconds=svc.lease.total_seconds() / 3,
            id="renew_leases",
            max_instances=1,
            coalesce=True,
        )
        scheduler.add_job(
            _guarded("housekeeping", svc.housekeeping),
            "interval",
            seconds=HOUSEKEEPING_SECONDS,
            id="housekeeping",
            max_instances=1,
            coalesce=True,
            next_run_time=dt.datetime.now(dt.UTC),  # also once at start
        )
        scheduler.start()

        def wake() -> None:
            if scheduler.running and not stop.is_set():
                scheduler.modify_job("tick", next_run_time=dt.datetime.now(dt.UTC))

        if sql_store.dialect == "postgresql":

            def wake_from_thread() -> None:
                loop.call_soon_threadsafe(wake)

            listener = store.Listener(settings.database_url, wake_from_thread)
            listener.start()
        if handle_signals:
            _install_signals(loop, stop)
        log.info("daemon_started", tick_s=tick_seconds, listen=listener is not None)
        await stop.wait()
        log.info("daemon_stopping", in_flight=svc.in_flight)
        await svc.stop(settings.shutdown_grace_seconds)
        log.info("daemon_stopped", **{"polls": svc.stats.polls, "archived": svc.stats.archived})
        return 0
    finally:
        if scheduler.state != apscheduler.schedulers.base.STATE_STOPPED:
            # AsyncIOScheduler defers shutdown to the loop; this is the one and only call.
            scheduler.shutdown(wait=False)
        if listener is not None:
            await asyncio.to_thread(listener.stop)
        await svc.provider.aclose()
        sql_store.close()
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
