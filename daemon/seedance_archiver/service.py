"""One cycle of the daemon: claim due rows, work each (``worker.py``), write the outcomes back.

The service holds no schedule of its own: ``scheduler.py`` calls :meth:`Service.tick` a few times a
second, :meth:`Service.renew_leases` now and then, and the jobs of :attr:`Service.keygate`
(``keygate.py``) and :attr:`Service.maintenance` (``maintenance.py``). Each claimed row becomes one
asyncio task; its outcome is queued and written back in a batch at the next tick.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import math
import random
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import structlog

from seedance_archiver import (
    archive,
    config,
    errors,
    keygate,
    maintenance,
    metrics,
    models,
    policy,
    provider,
    ratelimit,
    store,
    utils,
    worker,
)

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_P = ParamSpec("_P")

# Database calls run in their own small pool, apart from archive I/O (archive/ has its own), so
# slow storage never starves a claim or a write-back. Each call holds a thread for at most the
# statement timeout (the store's watchdog cuts a silent connection).
DB_THREADS = 4


class Service:
    """Works due rows of ``video_tasks`` through the provider and into the archive."""

    CLAIM_BATCH = 1000
    MAX_IN_FLIGHT = 5000
    MAX_DOWNLOADS = 4
    CLAIM_AHEAD_SECONDS = 2.0  # claim no more polls than the rate limit lets start in this long
    MAX_UNSTARTED_POLLS = 1000  # nor more claimed-but-unstarted polls than this, whatever the rate
    STORE_RETRY_MAX_SECONDS = 30.0  # while the database is down, try again at most this far apart
    MAX_TICK_FAILURES = 3  # crashed ticks in a row after which the daemon reports itself unhealthy
    STARVING_SHARE = 0.25  # while claims come back full, this share goes to starving rows first
    DOWNLOAD_CLAIM_IDLE_SECONDS = 1.0  # after an empty claim of downloads, none for this long

    def __init__(
        self,
        task_store: store.TaskStore,
        client: provider.Provider,
        storage: archive.Archive,
        rules: policy.Rules,
        limiter: ratelimit.RateLimiter,
        *,
        owner: str,
        clock: utils.Clock = utils.CLOCK,
        draw: policy.Draw = random.uniform,
        max_downloads: int = MAX_DOWNLOADS,
        lease_seconds: float = config.LEASE_SECONDS,
        max_download_seconds: float = config.MAX_DOWNLOAD_SECONDS,
        meters: metrics.Metrics | None = None,
        db_executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.store = task_store
        self.provider = client
        self.archive = storage
        self.rules = rules
        self.limiter = limiter
        self.owner = owner
        self.clock = clock
        self.draw = draw
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.db_executor = db_executor or concurrent.futures.ThreadPoolExecutor(
            DB_THREADS, thread_name_prefix="db"
        )
        self.stats = metrics.Stats()
        self.metrics = meters or metrics.Metrics()
        self.metrics.rate_limit.set(limiter.rate)
        self.last_tick_at: dt.datetime | None = None  # when a tick last completed
        self.tick_failures = 0  # crashed ticks in a row
        self.keygate = keygate.KeyGate(self)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._done: list[models.Task] = []
        self._to_release: set[str] = set()
        self._lost: set[str] = set()  # rows whose lease another daemon took: drop their work
        self._store_failures = 0
        self._store_retry_at = 0.0  # clock.monotonic() before which the tick leaves the database be
        self._stopping = False
        self._claims_full = False  # the last claim returned all it asked for: the budget is tight
        # clock.monotonic() before which no claim of rows waiting to download is made: the last
        # found none.
        self._downloads_idle_until = 0.0
        # Why the database refuses our writes (a missing grant), while it does.
        self.writes_refused: str | None = None
        self.worker = worker.Worker(self, max_downloads, max_download_seconds)
        # Called when a download ends and the rows queued for a slot run low: the scheduler runs a
        # tick at once, so the next finished videos are queued now rather than at the next
        # interval (bench/burst.py). While the queue holds more, a freed slot takes the next in
        # it, and the tick waits to claim several at once.
        self.on_download_room: Callable[[], None] | None = None
        self.maintenance = maintenance.Maintenance(self)

    # --- the scheduled jobs -------------------------------------------------------------------------

    async def db(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run a blocking store call in the database's own thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.db_executor, functools.partial(call, *args, **kwargs)
        )

    async def tick(self, polls: bool = True) -> int:
        """Write finished work back, then claim due rows and start on them. Returns rows started.

        With ``polls=False`` (a download ended: :attr:`on_download_room`), only rows waiting to
        download are claimed: in a burst the claim of polls came back empty for every few downloads
        (statements per video 1.32 -> 0.92 in bench/burst.py). The regular ticks claim the polls.

        A tick that crashes is logged and counted; the daemon counts as alive only while ticks
        complete (see :attr:`healthy`).
        """
        now = self.clock()
        self.stats.ticks += 1
        try:
            started = await self._tick(now, polls)
        except Exception:
            self.tick_failures += 1
            self.metrics.tick_failures.inc()
            log.exception("tick_crashed", failures_in_a_row=self.tick_failures)
            return 0
        self.tick_failures = 0
        self.last_tick_at = now
        self.metrics.last_tick.set(now.timestamp())
        return started

    @property
    def healthy(self) -> bool:
        """Ticks complete: fewer than MAX_TICK_FAILURES crashed in a row."""
        return self.tick_failures < self.MAX_TICK_FAILURES

    async def _tick(self, now: dt.datetime, polls: bool) -> int:
        if self.clock.monotonic() < self._store_retry_at:
            return 0
        try:
            await self.flush()
            limit = self._claim_limit() if polls else 0
            rows = [] if self._stopping else await self._claim(now, limit)
        except errors.StoreError as exc:
            self._store_unavailable(exc)
            return 0
        if self._store_failures:
            log.warning("database_available_again", after_failures=self._store_failures)
            self._store_failures = 0
        if self.writes_refused is not None:
            log.warning("database_writes_accepted_again")
            self.writes_refused = None
            self.metrics.database_writes_refused.set(0)
        self.metrics.rate_limit.set(self.limiter.rate)
        if self._stopping:
            # SIGTERM came while the claim ran: give the rows straight back.
            self._to_release.update(row.task_id for row in rows)
            return 0
        started = 0
        if self._claims_full:
            # The budget is tight: the polls take the limiter's slots in the order that saves a
            # video or a wait first.
            rows = policy.budget_order(rows, now, self.rules)
        for row in rows:
            if row.task_id in self._running:
                continue  # our own lease ran out and we re-claimed it: one worker is enough
            if row.state == models.State.DOWNLOADING and row.video_url:
                if self.worker.download_room() <= 0:
                    # More downloads than this daemon can start soon: another replica takes it.
                    self._to_release.add(row.task_id)
                    continue
                self.worker.downloading.add(row.task_id)
            self._lost.discard(row.task_id)
            self._running[row.task_id] = asyncio.create_task(
                self._work(row), name=f"task:{row.task_id}"
            )
            started += 1
        return started

    async def _claim(self, now: dt.datetime, limit: int) -> list[models.Task]:
        """Claim as many rows waiting to download as there is room for, and up to ``limit`` due
        rows to poll, nearest deadline first.

        While claims come back full (more is due than the rate limit lets start), a share of each
        claim goes to rows starving (overdue by more than their mode's longest interval), longest
        overdue first, so no row waits behind ever-due rows closer to their deadline.
        """
        lease = self.lease.total_seconds()
        room = self.worker.download_room()
        if self.keygate.blocked:
            # While the key is rejected, only rows already downloading are worked on: their link
            # needs no key.
            return await self._claim_downloads(now, room)
        # Rows waiting to download are claimed only as many as this daemon can start soon: the rest
        # wait for a replica with room, or for ours. (Claimed with the polls, a burst's finished
        # rows came back a thousand at a time and were given straight back: one claim and one
        # release of every waiting row for each download that ended. bench/burst.py.)
        rows = await self._claim_downloads(now, room)
        if limit <= 0:
            return rows  # the polls' budget is spent (claimed ahead, or in flight)
        polls: list[models.Task] = []
        if self._claims_full:
            share = max(1, math.floor(limit * self.STARVING_SHARE))
            due_before = {
                mode: now - dt.timedelta(seconds=cadence.high)
                for mode, cadence in self.rules.cadences.items()
            }
            polls = await self.db(
                self.store.claim_overdue,
                self.owner,
                now,
                lease,
                share,
                due_before,
                self.provider.name,
            )
        rest = await self.db(
            self.store.claim_due,
            self.owner,
            now,
            lease,
            limit - len(polls),
            POLL_STATES,
            self.provider.name,
        )
        self._claims_full = len(polls) + len(rest) >= limit
        return rows + polls + rest

    async def _claim_downloads(self, now: dt.datetime, room: int) -> list[models.Task]:
        """Rows waiting to download, as many as there is room for. A claim that found none is not
        asked again for DOWNLOAD_CLAIM_IDLE_SECONDS, unless our own polls handed some back: four
        empty claims a second were 1% of the CPU of 100,000 tasks polled (bench/scale.py)."""
        if room <= 0 or self.clock.monotonic() < self._downloads_idle_until:
            return []
        rows = await self.db(
            self.store.claim_due,
            self.owner,
            now,
            self.lease.total_seconds(),
            room,
            DOWNLOAD_STATES,
            self.provider.name,
        )
        if not rows:
            self._downloads_idle_until = self.clock.monotonic() + self.DOWNLOAD_CLAIM_IDLE_SECONDS
        return rows

    def wake(self) -> None:
        """New rows arrived (NOTIFY): the database is evidently back, so stop backing off from it."""
        self._store_retry_at = 0.0

    def _store_unavailable(self, exc: errors.StoreError) -> None:
        """Back off from a database that does not answer, or refuses our writes for a missing
        grant; queued outcomes wait in memory."""
        self._store_failures += 1
        delay = min(self.STORE_RETRY_MAX_SECONDS, 2.0 ** (self._store_failures - 1))
        self._store_retry_at = self.clock.monotonic() + delay
        if isinstance(exc, errors.PermissionMissing):
            # Not "the database is down": it answers, and refuses. Said as such, in /readyz too.
            self.writes_refused = str(exc)
            self.metrics.database_writes_refused.set(1)
            log.error(
                "database_writes_refused",
                error=str(exc),
                failures=self._store_failures,
                retry_in_s=delay,
                unsaved_outcomes=len(self._done),
            )
            return
        log.warning(
            "database_unavailable",
            error=str(exc),
            failures=self._store_failures,
            retry_in_s=delay,
            unsaved_outcomes=len(self._done),
        )

    async def renew_leases(self) -> int:
        """Keep the leases of rows still being worked on (long downloads) from running out.

        A row whose lease another daemon has taken (ours ran out, say during a database outage)
        is being worked on twice: our work on it is cancelled without writing back, and its
        unfinished upload is aborted by the cancellation.
        """
        ids = list(self._running)
        if not ids:
            return 0
        held = await self.db(
            self.store.renew, self.owner, ids, self.clock(), self.lease.total_seconds()
        )
        for task_id in set(ids) - held:
            work = self._running.get(task_id)
            if work is None:
                continue  # it finished meanwhile; its outcome is saved only if the lease is ours
            self._lost.add(task_id)
            work.cancel()
            log.warning(
                "lease_lost",
                task_id=task_id,
                action="work cancelled without writing back; the new holder carries on",
            )
        return len(held)

    async def flush(self) -> None:
        """Write queued outcomes and releases; on a database error keep them for the next try."""
        if self._done:
            done, self._done = self._done, []
            if any(task.state == models.State.DOWNLOADING for task in done):
                self._downloads_idle_until = 0.0  # handed back for want of room: claim them soon
            try:
                await self.db(self.store.save, done, self.owner)
            except BaseException:
                # Also on cancellation: writing an outcome twice is harmless (the second finds the
                # lease released and changes nothing); dropping it is not.
                self._done[:0] = done
                raise
        if self._to_release:
            ids, self._to_release = self._to_release, set()
            try:
                await self.db(self.store.release, self.owner, ids)
            except BaseException:
                self._to_release |= ids
                raise

    def stop_claiming(self) -> None:
        """From now on no tick claims, and rows a claim in flight returns are given straight back."""
        self._stopping = True

    async def stop(self, grace_seconds: float) -> None:
        """Give in-flight work ``grace_seconds`` to finish, cancel the rest, write everything back.

        Call it once no tick is running (after :meth:`stop_claiming` and the tick's end): rows a
        last claim returned are then already queued for release.
        """
        self._stopping = True
        pending = set(self._running.values())
        if pending:
            log.info("draining", in_flight=len(pending), grace_s=grace_seconds)
            _, pending = await asyncio.wait(pending, timeout=grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("abandoned_in_flight_work", tasks=len(pending))
        try:
            await self.flush()
        except errors.StoreError as exc:
            # Nothing is lost: leases run out, and an archived video is found in storage next time.
            log.warning(
                "database_unavailable_at_stop",
                error=str(exc),
                unsaved_outcomes=len(self._done),
                unreleased_leases=len(self._to_release),
            )

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def working(self) -> set[str]:
        """The task ids this daemon works on now (their uploads are not abandoned)."""
        return set(self._running)

    # --- the rows in flight -------------------------------------------------------------------------

    def _claim_limit(self) -> int:
        # Claim only what can start soon: a claimed row waiting long in a queue holds its lease idle
        # and its lateness grows unseen.
        ahead = min(
            math.ceil(self.limiter.rate * self.CLAIM_AHEAD_SECONDS), self.MAX_UNSTARTED_POLLS
        )
        return min(
            self.CLAIM_BATCH,
            self.MAX_IN_FLIGHT - len(self._running),
            ahead - self.worker.unstarted_polls,
        )

    async def _work(self, row: models.Task) -> None:
        task_log = log.bind(task_id=row.task_id)
        outcome: models.Task | None = None
        try:
            outcome = await self.worker.handle(row, task_log)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug must not stop the daemon or spin on one row: back off and say so.
            task_log.exception("task_work_crashed")
            reason = f"internal error: {type(exc).__name__}"
            outcome = policy.on_poll_error(
                row, reason, self.clock(), self.rules, self.draw, give_up=False
            )
        finally:
            self._running.pop(row.task_id, None)
            answered = self.worker.cancelled_answers.pop(row.task_id, None)
            downloaded = row.task_id in self.worker.downloading
            self.worker.downloading.discard(row.task_id)
            if (
                downloaded
                and self.on_download_room is not None
                and not self._stopping
                and self.worker.queue_running_low()
            ):
                self.on_download_room()
            if row.task_id in self._lost:
                # Another daemon holds the row now: write nothing back, release nothing.
                self._lost.discard(row.task_id)
                outcome = None
            elif answered is not None:
                # Cancelled (a stop) after its poll found the video: written back as downloading,
                # with its link, for the next download rather than a poll.
                self._done.append(answered)
            elif outcome is None:
                self._to_release.add(row.task_id)
            else:
                self._done.append(outcome)
        if outcome is not None and outcome.state != row.state:
            if outcome.state == models.State.EXPIRED:
                self.metrics.tasks_expired.inc()  # counted once: the row is terminal now
            level = (
                "warning"
                if outcome.state in (models.State.EXPIRED, models.State.REJECTED)
                else "info"
            )
            getattr(task_log, level)(
                "task_state_changed",
                from_state=row.state,
                to_state=outcome.state,
                reason=outcome.error,
            )


POLL_STATES = (models.State.PENDING.value, models.State.POLLING.value)
DOWNLOAD_STATES = (models.State.DOWNLOADING.value,)
