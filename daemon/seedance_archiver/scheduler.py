"""APScheduler wiring: the static jobs, signals, NOTIFY wake-ups and the graceful stop.

APScheduler drives three static jobs (the due-row tick, lease renewal, and a heartbeat through the
tick itself); it never holds one job per task and never uses a persistent job store: the database row
is the only source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import ParamSpec

import apscheduler.schedulers.asyncio
import apscheduler.schedulers.base
import structlog

import seedance_archiver
from seedance_archiver import (
    archive,
    callbacks,
    config,
    db,
    errors,
    listener,
    metrics,
    policy,
    providers,
    ratelimit,
    service,
    store,
    systemd,
    ui,
    web,
    webhooks,
)

log = structlog.get_logger(__name__)
_P = ParamSpec("_P")

TICK_SECONDS = 0.25
HOUSEKEEPING_SECONDS = 600.0
GAUGES_SECONDS = 30.0
LEARN_SECONDS = 300.0  # how often the observed generation times are re-read from the table
HEARTBEAT_SECONDS = 10.0
PRUNE_SECONDS = 3600.0
WATCHDOG_STALE_SECONDS = 30.0
KEY_CHECK_SECONDS = 1.0  # how often the key-check job asks whether a check is due (cheap)
RATE_BURST = 10
WEBHOOK_POLL_SECONDS = 0.5  # how often the outbox is asked for due events
AT_RISK_SECONDS = 60.0


def _guarded(name: str, job: Callable[_P, Awaitable[object]]) -> Callable[_P, Awaitable[None]]:
    """Wrap a job so an exception is logged and the schedule carries on: loops never die quietly.

    A job the scheduler's shutdown cancels (the key check a stop meets at start, a heartbeat)
    ends quietly: passed on, APScheduler would log the cancellation as a crash, traceback and all.
    """

    async def run(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            await job(*args, **kwargs)
        except errors.StoreError as exc:
            log.warning("job_failed", job=name, error=str(exc))
        except Exception:
            log.exception("job_crashed", job=name)
        except asyncio.CancelledError:
            log.debug("job_cancelled", job=name)

    run.__name__ = name
    return run


class _Ticker:
    """Runs the tick without overlap; a wake-up during a tick makes it run once more right after.

    APScheduler drives the regular interval; NOTIFY wake-ups come through :meth:`run_soon`. Without
    this, a wake-up arriving mid-tick would be skipped and wait for the next interval. A tick asked
    for with ``polls=False`` (a download ended) only refills the downloads; if any asked for
    meanwhile wanted polls, the next one claims them.
    """

    def __init__(self, tick: Callable[[bool], Awaitable[None]]) -> None:
        self._tick = tick
        self._running = False
        self._again: bool | None = None  # None: no tick asked for; else whether it claims polls
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, polls: bool = True) -> None:
        if self._running:
            self._again = polls or bool(self._again)
            return
        self._running = True
        self._idle.clear()
        try:
            while True:
                self._again = None
                await self._tick(polls)
                if self._again is None:
                    break
                polls = self._again
        finally:
            self._running = False
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no tick is running (the current one, if any, has finished)."""
        await self._idle.wait()

    def run_soon(self, polls: bool = True) -> None:
        task = asyncio.get_running_loop().create_task(self.run(polls))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def owner_name() -> str:
    """This daemon's lease owner: host, pid and a random suffix, unique across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def build_service(settings: config.Settings, api_key: str) -> tuple[service.Service, store.Store]:
    """The service with its real store, provider and archive, as the settings describe them."""
    sql_store = store.SqlStore.from_url(
        settings.resolve_database_url(), settings.database_statement_timeout_seconds
    )
    svc_metrics = metrics.Metrics()
    sql_store.db.count(svc_metrics.database_statements.inc, svc_metrics.database_transactions.inc)
    client = providers.from_settings(settings, api_key)
    svc = service.Service(
        sql_store,
        client,
        archive.from_url(settings.archive_url, meters=svc_metrics),
        policy.Rules.from_settings(settings),
        ratelimit.RateLimiter(settings.max_requests_per_second, burst=RATE_BURST),
        owner=owner_name(),
        lease_seconds=settings.lease_seconds,
        max_download_seconds=settings.max_download_seconds,
        meters=svc_metrics,
    )
    return svc, sql_store


def build_deliverer(
    settings: config.Settings, svc: service.Service, task_store: store.Store
) -> webhooks.Deliverer | None:
    """The webhook deliverer the settings ask for; None while SEEDANCE_WEBHOOK_URL is unset."""
    if settings.webhook_url is None:
        return None
    webhooks.check_url(settings.webhook_url, settings.allow_private_webhook_hosts)
    sender = webhooks.HttpSender(
        timeout_seconds=settings.webhook_timeout_seconds,
        concurrency=settings.webhook_concurrency,
        allow_private_hosts=settings.allow_private_webhook_hosts,
    )
    return webhooks.Deliverer(
        task_store,
        settings.webhook_url,
        webhooks.Signer(settings.resolve_webhook_secrets()),
        sender,
        owner=svc.owner,
        meters=svc.metrics,
        concurrency=settings.webhook_concurrency,
        # Longer than a batch can take, so a live daemon never loses an event it is sending.
        lease_seconds=max(
            settings.lease_seconds,
            (webhooks.BATCH_ROUNDS + 1) * settings.webhook_timeout_seconds,
        ),
        clock=svc.clock,
        at_risk=svc.rules.at_risk,
    )


# The garbage collector's youngest generation is collected every this many allocations (Python's
# default: 700). A poll allocates a few hundred objects (httpx's and aiohttp's request and response,
# the answer, the task's copy), so at the default the collector ran several times per tick, each time
# walking every object younger than its last full pass: 22% of the daemon's CPU at 100,000 tasks
# (bench/README.md, the scale benchmark). Cycles are still collected, a little later.
GC_YOUNGEST_THRESHOLD = 10_000


def tune_gc() -> None:
    """For a daemon's own process (``run``): collect garbage less often, and never walk again what
    start-up built (modules, settings: ``gc.freeze``)."""
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNGEST_THRESHOLD, middle, oldest)


async def run(
    settings: config.Settings,
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    tick_seconds: float = TICK_SECONDS,
) -> int:
    """Run the daemon until ``stop`` is set or SIGTERM/SIGINT arrives; return the exit code."""
    daemon = Daemon(settings, stop=stop, tick_seconds=tick_seconds)
    if handle_signals:
        # Before anything starts: a SIGTERM in the first moments (PID 1 in a container) still
        # ends in a clean stop, never in Python's default of dying mid-step.
        _install_signals(asyncio.get_running_loop(), daemon.stop_requested)
    log.info("daemon_starting", **settings.public_summary())
    try:
        return await daemon.run()
    finally:
        if handle_signals:
            _remove_signals(asyncio.get_running_loop())


class Daemon:
    """One daemon's life: start its parts in order, run until asked to stop, drain, close.

    Each start step checks for a stop request first, so a stop during start-up skips the rest.
    :meth:`close` undoes exactly what was started, in reverse order, whatever failed.
    """

    def __init__(
        self,
        settings: config.Settings,
        *,
        stop: asyncio.Event | None = None,
        tick_seconds: float = TICK_SECONDS,
    ) -> None:
        self.settings = settings
        self.stop_requested = stop or asyncio.Event()
        self.tick_seconds = tick_seconds
        self._lock: db.SqliteLock | None = None
        self.svc: service.Service | None = None
        self.store: store.Store | None = None
        self._scheduler = apscheduler.schedulers.asyncio.AsyncIOScheduler(timezone=dt.UTC)
        self._ticker: _Ticker | None = None
        self._listener: listener.Listener | None = None
        self._server: web.WebServer | None = None
        self.deliverer: webhooks.Deliverer | None = None
        self._delivery: asyncio.Task[None] | None = None
        self._started_at = dt.datetime.now(dt.UTC)
        # The heartbeats asked for and not yet written. Two can be asked for at once (the heartbeat
        # job and the first tick's). The scheduler's shutdown cancels a job in flight, but not its
        # write in a thread: close() waits for every one before removing the heartbeat, so the row
        # is never written back after it is gone. The lock writes them one at a time, in order.
        self._beats: set[asyncio.Task[None]] = set()
        self._beat_lock = asyncio.Lock()
        self._tick_beat: asyncio.Task[None] | None = None  # the first tick's heartbeat, in flight
        self._closing = False
        self._beaten = False  # a heartbeat row was written (close removes it, if so)
        self._beaten_a_tick = False  # one that says the daemon has ticked

    async def run(self) -> int:
        try:
            for step in (self._open, self._check, self._schedule, self._listen, self._serve):
                if self.stop_requested.is_set():
                    log.info("daemon_stopped_while_starting", before=step.__name__.lstrip("_"))
                    return 0
                await step()
            log.info(
                "daemon_started",
                owner=self.svc.owner if self.svc else None,
                tick_s=self.tick_seconds,
                listen=self._listener is not None,
            )
            systemd.notify("READY=1\nSTATUS=archiving")
            await self.stop_requested.wait()
            await self._drain()
            return 0
        finally:
            await self.close()

    # --- start, in order ----------------------------------------------------------------------

    async def _open(self) -> None:
        """Take the SQLite file's lock (one daemon per file), then build the service."""
        self._lock = db.SqliteLock(self.settings.resolve_database_url())
        self._lock.acquire()
        # Looked up at call time: tests and benchmarks wrap build_service.
        self.svc, self.store = build_service(self.settings, self.settings.resolve_api_key())
        self._started_at = self.svc.clock()
        self.deliverer = build_deliverer(self.settings, self.svc, self.store)

    async def _check(self) -> None:
        """The schema must be there (fatal); the archive should answer (logged, retried by work)."""
        svc, task_store = self._parts()
        await svc.db(task_store.check_schema)
        try:
            await svc.archive.check()
        except errors.ArchiveError as exc:
            log.error("archive_unreachable", error=str(exc))
        try:
            await svc.maintenance.wake_waiting_on_settings()
        except errors.StoreError as exc:
            log.warning("waiting_on_settings_not_woken", error=str(exc))

    async def _schedule(self) -> None:
        svc, _ = self._parts()
        ticker = self._ticker = _Ticker(_guarded("tick", self._tick))
        svc.on_download_room = lambda: ticker.run_soon(polls=False)
        self._every("tick", self._ticker.run, self.tick_seconds, now=True)
        self._every("renew_leases", svc.renew_leases, svc.lease.total_seconds() / 3, now=False)
        self._every("housekeeping", svc.maintenance.housekeeping, HOUSEKEEPING_SECONDS, now=True)
        self._every("refresh_gauges", svc.maintenance.refresh_gauges, GAUGES_SECONDS, now=True)
        self._every("learn", svc.maintenance.learn, LEARN_SECONDS, now=True)
        self._every("check_key", svc.keygate.check_if_due, KEY_CHECK_SECONDS, now=True)
        self._every("heartbeat", self._heartbeat, HEARTBEAT_SECONDS, now=True)
        if self.settings.prune_after_days > 0:
            self._every("prune", self._prune, PRUNE_SECONDS, now=True)
        if self.deliverer is not None:
            # Its own task, not a scheduler job: a receiver that hangs holds up only its batch,
            # never the tick, and never piles up "job skipped" warnings.
            self._delivery = asyncio.get_running_loop().create_task(self._deliver_forever())
            self._every("at_risk_events", self.deliverer.warn_at_risk, AT_RISK_SECONDS, now=True)
            self._every("webhook_gauges", self.deliverer.refresh_gauges, GAUGES_SECONDS, now=True)
        watchdog_seconds = systemd.watchdog_interval()
        if watchdog_seconds is not None:
            self._every("watchdog", self._watchdog, watchdog_seconds, now=True)
        self._scheduler.start()

    async def _listen(self) -> None:
        """Wake the tick when a feeder inserts rows, where the database can say so."""
        _, task_store = self._parts()
        loop = asyncio.get_running_loop()

        def wake_from_thread() -> None:
            loop.call_soon_threadsafe(self._wake)

        self._listener = task_store.listener(wake_from_thread)
        if self._listener is not None:
            self._listener.start()

    async def _serve(self) -> None:
        if self.settings.http_port:
            svc, task_store = self._parts()
            endpoint = None
            if self.settings.callbacks:
                hastener = callbacks.Hastener(
                    task_store, svc.provider.name, self.settings.cadences(), svc.clock, svc.metrics
                )
                endpoint = web.Callbacks(
                    providers.CALLBACKS[self.settings.provider],
                    self.settings.resolve_callback_secret(),
                    hastener,
                )
            self._server = web.WebServer(
                svc,
                task_store,
                self.settings.http_host,
                self.settings.http_port,
                endpoint,
                max_connections=self.settings.http_max_connections,
                pages=ui.Pages(
                    svc,
                    task_store,
                    token=self.settings.resolve_ui_token(),
                    archive_root=archive.local_folder(self.settings.archive_url),
                    clock=svc.clock,
                ),
            )
            await self._server.start()

    # --- stop ---------------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Claim nothing more, let a tick in progress end (never cancel it half-way), then give
        in-flight work the grace period."""
        svc, _ = self._parts()
        systemd.notify("STOPPING=1")
        log.info("daemon_stopping", in_flight=svc.in_flight)
        svc.stop_claiming()
        self._scheduler.pause_job("tick")
        assert self._ticker is not None
        await self._ticker.wait_idle()
        await svc.stop(self.settings.shutdown_grace_seconds)
        log.info("daemon_stopped", polls=svc.stats.polls, archived=svc.stats.archived)

    async def close(self) -> None:
        """Undo what was started, last first."""
        if self._scheduler.state != apscheduler.schedulers.base.STATE_STOPPED:
            # AsyncIOScheduler defers shutdown to the loop; this is the one and only call.
            self._scheduler.shutdown(wait=False)
        if self._server is not None:
            await self._server.stop()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)
        if self._delivery is not None:
            # An attempt cut short is released by aclose and sent again by the next claim.
            self._delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._delivery
        if self.deliverer is not None:
            await self.deliverer.aclose()
        if self.svc is not None and self.store is not None:
            await self.svc.provider.aclose()
            self._closing = True
            if self._beats:
                done, _ = await asyncio.wait(self._beats)
                for beat in done:
                    if not beat.cancelled():
                        beat.exception()  # its job logged it, or was cancelled: seen here
            if self._beaten:  # a start that failed before its first beat has no row to remove
                try:
                    await self.svc.db(self.store.forget_daemon, self.svc.owner)
                except errors.StoreError as exc:
                    log.warning("heartbeat_not_removed", error=str(exc))
            self.store.close()
            self.svc.db_executor.shutdown(wait=False)
        if self._lock is not None:
            self._lock.release()

    # --- the jobs that live here ----------------------------------------------------------------

    async def _tick(self, polls: bool = True) -> None:
        svc, _ = self._parts()
        await svc.tick(polls)
        if not self._beaten_a_tick and svc.last_tick_at is not None and self._tick_beat is None:
            # The first tick done: say so at once, not at the next heartbeat (`check` asks). The
            # tick does not wait for the write: a slow database holds the heartbeat, not the tick.
            self._tick_beat = self._start_beat()
            self._tick_beat.add_done_callback(self._tick_beaten)

    def _tick_beaten(self, beat: asyncio.Task[None]) -> None:
        self._tick_beat = None  # written, or failed (logged): the next tick asks again if need be
        if not beat.cancelled() and beat.exception() is not None:
            log.warning("heartbeat_failed", error=str(beat.exception()))

    async def _heartbeat(self) -> None:
        if not self._closing:
            await asyncio.shield(self._start_beat())

    def _start_beat(self) -> asyncio.Task[None]:
        beat = asyncio.ensure_future(self._beat())
        self._beats.add(beat)
        beat.add_done_callback(self._beats.discard)
        return beat

    async def _beat(self) -> None:
        async with self._beat_lock:
            if not self._closing:  # close() removes the row once this is done: nothing to write
                await self._write_beat()

    async def _write_beat(self) -> None:
        svc, task_store = self._parts()
        beat = store.DaemonBeat(
            owner=svc.owner,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            version=seedance_archiver.__version__,
            started_at=self._started_at,
            last_tick_at=svc.last_tick_at,
            api_key_ok=not svc.keygate.blocked,
        )
        await svc.db(task_store.beat, beat)
        self._beaten = True
        self._beaten_a_tick = beat.last_tick_at is not None

    async def _deliver_forever(self) -> None:
        assert self.deliverer is not None
        run = _guarded("deliver_webhooks", self.deliverer.deliver_due)
        while not self.stop_requested.is_set():
            await run()
            await asyncio.sleep(WEBHOOK_POLL_SECONDS)

    async def _prune(self) -> None:
        svc, _ = self._parts()
        keep = self.deliverer is not None
        await svc.maintenance.prune(self.settings.prune_after_days, keep_undelivered=keep)

    async def _watchdog(self) -> None:
        # Only vouch for the daemon while its ticks complete: a stuck or crashing tick gets us
        # restarted.
        svc, _ = self._parts()
        last = svc.last_tick_at
        fresh = last is not None and (svc.clock() - last).total_seconds() < WATCHDOG_STALE_SECONDS
        if fresh and svc.healthy:
            systemd.notify("WATCHDOG=1")

    def _wake(self) -> None:
        if not self.stop_requested.is_set() and self.svc is not None and self._ticker is not None:
            self.svc.wake()
            self._ticker.run_soon()

    # --- plumbing -------------------------------------------------------------------------------

    def _every(
        self, name: str, job: Callable[[], Awaitable[object]], seconds: float, now: bool
    ) -> None:
        # APScheduler 3 reads next_run_time=None as "add paused": pass it only to run at once.
        first: dict[str, dt.datetime] = {"next_run_time": dt.datetime.now(dt.UTC)} if now else {}
        self._scheduler.add_job(
            _guarded(name, job),
            "interval",
            seconds=seconds,
            id=name,
            max_instances=1,
            coalesce=True,
            **first,
        )

    def _parts(self) -> tuple[service.Service, store.Store]:
        assert self.svc is not None and self.store is not None, "the service is built by _open"
        return self.svc, self.store


SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _install_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second_signal_exiting_now", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    for signum in SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)


def _remove_signals(loop: asyncio.AbstractEventLoop) -> None:
    for signum in SIGNALS:
        loop.remove_signal_handler(signum)
