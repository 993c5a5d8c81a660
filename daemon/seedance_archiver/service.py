"""One cycle of the daemon: claim due rows, poll them, decide, archive, write the outcomes back.

The service holds no schedule of its own: ``scheduler.py`` calls :meth:`Service.tick` a few times a
second and :meth:`Service.renew_leases` now and then. Each claimed row becomes one asyncio task; its
outcome is queued and written back in a batch at the next tick.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import functools
import math
import random
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import structlog

from seedance_archiver import (
    archive,
    errors,
    keygate,
    metrics,
    models,
    outage,
    policy,
    provider,
    ratelimit,
    store,
    utils,
)

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_P = ParamSpec("_P")

# Database calls run in their own small pool, apart from archive I/O (archive/ has its own), so
# slow storage never starves a claim or a write-back. Each call holds a thread for at most the
# statement timeout (the store's watchdog cuts a silent connection).
DB_THREADS = 4


@dataclasses.dataclass
class Stats:
    """Counters of what this daemon did since it started (for the demo, benchmarks and metrics)."""

    polls: int = 0
    poll_errors: int = 0
    malformed: int = 0
    rate_limited: int = 0
    archived: int = 0
    archived_bytes: int = 0
    download_failures: int = 0
    ticks: int = 0


class Service:
    """Works due rows of ``video_tasks`` through the provider and into the archive."""

    CLAIM_BATCH = 1000
    LEASE_SECONDS = (
        120.0  # at least the longest cadence floor, so a dead replica's row is not re-polled early
    )
    MAX_IN_FLIGHT = 5000
    MAX_DOWNLOADS = 4
    CLAIM_AHEAD_SECONDS = 2.0  # claim no more polls than the rate limit lets start in this long
    MAX_UNSTARTED_POLLS = 1000  # nor more claimed-but-unstarted polls than this, whatever the rate
    MAX_CONCURRENT_POLLS = 100  # requests on the wire at once (the client pool holds 200)
    STORE_RETRY_MAX_SECONDS = 30.0  # while the database is down, try again at most this far apart
    MAX_TICK_FAILURES = 3  # crashed ticks in a row after which the daemon reports itself unhealthy
    MAX_DOWNLOAD_SECONDS = 3600.0  # a whole download ends by then, and is retried
    STARVING_SHARE = 0.25  # while claims come back full, this share goes to starving rows first
    IGNORED_FIELD_LOG_SECONDS = 600.0  # an answer field ignored is logged this often at most

    def __init__(
        self,
        task_store: store.Store,
        client: provider.Provider,
        storage: archive.Archive,
        rules: policy.Rules,
        limiter: ratelimit.RateLimiter,
        *,
        owner: str,
        clock: utils.Clock = utils.CLOCK,
        draw: policy.Draw = random.uniform,
        max_downloads: int = MAX_DOWNLOADS,
        lease_seconds: float = LEASE_SECONDS,
        max_download_seconds: float = MAX_DOWNLOAD_SECONDS,
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
        self.max_download_seconds = max_download_seconds
        self.db_executor = db_executor or concurrent.futures.ThreadPoolExecutor(
            DB_THREADS, thread_name_prefix="db"
        )
        self.stats = Stats()
        self.metrics = meters or metrics.Metrics()
        self.metrics.rate_limit.set(limiter.rate)
        self.last_tick_at: dt.datetime | None = None  # when a tick last completed
        self.tick_failures = 0  # crashed ticks in a row
        self.keygate = keygate.KeyGate(self)
        self.max_downloads = max_downloads
        # Downloads claimed beyond the free slots: at most this many wait for one.
        self.download_queue = max_downloads
        self._download_slots = asyncio.Semaphore(max_downloads)
        self._downloading: set[str] = set()  # rows downloading, waiting for a slot, or about to
        self._running: dict[str, asyncio.Task[None]] = {}
        self._done: list[models.Task] = []
        self._to_release: set[str] = set()
        self._unstarted_polls = 0  # claimed rows whose poll has not gone out yet
        self._poll_slots = asyncio.Semaphore(self.MAX_CONCURRENT_POLLS)
        self._lost: set[str] = set()  # rows whose lease another daemon took: drop their work
        self._store_failures = 0
        self._store_retry_at = 0.0  # clock.monotonic() before which the tick leaves the database be
        self._stopping = False
        self._claims_full = False  # the last claim returned all it asked for: the budget is tight
        self._ignored_logged: dict[str, float] = {}  # answer field -> when it was last logged
        # Why the database refuses our writes (a missing grant), while it does.
        self.writes_refused: str | None = None
        # The provider's health over the longest a poll may wait (the longest cadence, or the
        # backoff cap in an outage): every task is polled at least once in such a window.
        self.health = outage.Health(
            max(rules.backoff_cap_seconds, *(c.high for c in rules.cadences.values()))
        )
        self._trouble: str | None = None

    # --- the scheduled jobs -------------------------------------------------------------------------

    async def db(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run a blocking store call in the database's own thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.db_executor, functools.partial(call, *args, **kwargs)
        )

    async def tick(self) -> int:
        """Write finished work back, then claim due rows and start on them. Returns rows started.

        A tick that crashes is logged and counted; the daemon counts as alive only while ticks
        complete (see :attr:`healthy`).
        """
        now = self.clock()
        self.stats.ticks += 1
        try:
            started = await self._tick(now)
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

    async def _tick(self, now: dt.datetime) -> int:
        if self.clock.monotonic() < self._store_retry_at:
            return 0
        try:
            await self.flush()
            limit = 0 if self._stopping else self._claim_limit()
            rows: list[models.Task] = []
            if limit > 0:
                rows = await self._claim(now, limit)
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
                if self._download_room() <= 0:
                    # More downloads than this daemon can start soon: another replica takes it.
                    self._to_release.add(row.task_id)
                    continue
                self._downloading.add(row.task_id)
            self._lost.discard(row.task_id)
            self._running[row.task_id] = asyncio.create_task(
                self._work(row), name=f"task:{row.task_id}"
            )
            started += 1
        return started

    async def _claim(self, now: dt.datetime, limit: int) -> list[models.Task]:
        """Claim up to ``limit`` due rows, nearest deadline first.

        While claims come back full (more is due than the rate limit lets start), a share of each
        claim goes to rows starving (overdue by more than their mode's longest interval), longest
        overdue first, so no row waits behind ever-due rows closer to their deadline.
        """
        lease = self.lease.total_seconds()
        room = self._download_room()
        if self.keygate.blocked:
            # While the key is rejected, only rows already downloading are worked on: their link
            # needs no key.
            states = [models.State.DOWNLOADING.value]
            return await self.db(
                self.store.claim_due,
                self.owner,
                now,
                lease,
                min(limit, room),
                states,
                self.provider.name,
            )
        # With no download room, rows waiting to download are left to another daemon (or later).
        wanted = None if room > 0 else POLL_STATES
        rows: list[models.Task] = []
        if self._claims_full:
            share = max(1, math.floor(limit * self.STARVING_SHARE))
            due_before = {
                mode: now - dt.timedelta(seconds=cadence.high)
                for mode, cadence in self.rules.cadences.items()
            }
            rows = await self.db(
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
            limit - len(rows),
            wanted,
            self.provider.name,
        )
        self._claims_full = len(rows) + len(rest) >= limit
        return rows + rest

    async def learn(self) -> dict[str, policy.Learned]:
        """Re-read the recent generation times per model from the table and learn each model's
        skip from them (a periodic job: replicas and restarts share what every daemon saw)."""
        now = self.clock()
        since = now - self.rules.retention
        times = await self.db(self.store.generation_times, since, policy.LEARN_WINDOW)
        learned = policy.learn(times, self.rules)
        if learned != self.rules.learned:
            log.info(
                "generation_times_learned",
                skips={m: round(v.skip_seconds, 1) for m, v in sorted(learned.items())},
            )
        self.rules = dataclasses.replace(self.rules, learned=learned)
        return learned

    async def wake_waiting_on_settings(self) -> int:
        """At start: rows waiting on one of our settings are due now, since it may have changed
        (raise SEEDANCE_MAX_VIDEO_BYTES, restart, and they are archived with no row touched)."""
        woken = await self.db(self.store.wake_waiting_on_settings, self.clock(), self.provider.name)
        if woken:
            log.info("waiting_on_settings_woken", rows=woken)
        return woken

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

    async def housekeeping(self) -> int:
        """Remove unfinished uploads nobody is working on (a killed process left them behind).

        An upload is abandoned when no daemon holds a live lease on its task: only the lease holder
        uploads. Only uploads begun before this check are touched, so a new one is never cut off.
        """
        checked_at = self.clock()
        candidates = await self.archive.incomplete()
        if not candidates:
            return 0
        busy = await self.db(self.store.leased, candidates, checked_at)
        removed = 0
        for task_id in sorted(candidates - busy - set(self._running)):
            removed += await self.archive.discard_incomplete(task_id, started_before=checked_at)
        if removed:
            log.info("stale_uploads_removed", count=removed)
        return removed

    async def refresh_gauges(self) -> store.Summary:
        """Recount tasks by state and at risk for the gauges (a housekeeping job)."""
        self.provider_trouble()  # an outage ends when its polls leave the window, polled or not
        summary = await self.db(self.store.summary, self.clock())
        for state, count in summary.counts.items():
            self.metrics.tasks.labels(state=state).set(count)
        self.metrics.tasks_at_risk.set(summary.at_risk)
        self.metrics.tasks_waiting_on_setting.set(summary.waiting_on_setting)
        self.metrics.polling_load.set(
            policy.polling_load(
                summary.due_soon, store.LOAD_WINDOW.total_seconds(), self.limiter.max_rate
            )
        )
        return summary

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

    # --- one row ----------------------------------------------------------------------------------

    def _download_room(self) -> int:
        """How many more downloads this daemon can start soon: its free slots plus a short queue."""
        return self.max_downloads + self.download_queue - len(self._downloading)

    def _claim_limit(self) -> int:
        # Claim only what can start soon: a claimed row waiting long in a queue holds its lease idle
        # and its lateness grows unseen.
        ahead = min(
            math.ceil(self.limiter.rate * self.CLAIM_AHEAD_SECONDS), self.MAX_UNSTARTED_POLLS
        )
        return min(
            self.CLAIM_BATCH, self.MAX_IN_FLIGHT - len(self._running), ahead - self._unstarted_polls
        )

    async def _work(self, row: models.Task) -> None:
        task_log = log.bind(task_id=row.task_id)
        outcome: models.Task | None = None
        try:
            outcome = await self._handle(row, task_log)
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
            self._downloading.discard(row.task_id)
            if row.task_id in self._lost:
                # Another daemon holds the row now: write nothing back, release nothing.
                self._lost.discard(row.task_id)
                outcome = None
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

    async def _handle(
        self, row: models.Task, task_log: structlog.typing.FilteringBoundLogger
    ) -> models.Task | None:
        decided = policy.before_work(row, self.clock())
        if decided is not None:
            return decided  # an id that can never be valid: no key in the archive either
        if row.state == models.State.DOWNLOADING and row.video_url:
            outcome = await self._archive(row, task_log)
        else:
            polled = await self._poll(row, task_log)
            if polled is None:
                return None
            if polled.state != models.State.DOWNLOADING:
                outcome = polled
            elif self._download_room() <= 0:
                # No slot soon: written back due now, for whichever daemon has one first.
                task_log.debug("download_handed_back", downloads=len(self._downloading))
                return polled
            else:
                self._downloading.add(row.task_id)
                outcome = await self._archive(polled, task_log)
        if outcome.state in NEGATIVE_STATES:
            return await self._looked_up(row, outcome, task_log)
        return outcome

    async def _looked_up(
        self,
        row: models.Task,
        verdict: models.Task,
        task_log: structlog.typing.FilteringBoundLogger,
    ) -> models.Task:
        """``verdict`` (failed, cancelled, expired, rejected), unless the video is in the archive
        after all: then ``archived``. A task is never given up before the archive was looked at;
        when the archive cannot say, the verdict waits and the task is tried again."""
        now = self.clock()
        try:
            stored = await self.archive.find(row.task_id, read_back=True)
        except errors.ArchiveError as exc:
            task_log.warning("verdict_deferred", verdict=verdict.state, error=str(exc))
            reason = f"the archive could not be checked ({exc})"
            return policy.on_verdict_deferred(row, verdict, reason, now, self.rules, self.draw)
        if stored is None:
            return verdict
        task_log.info(
            "video_found_in_archive",
            uri=stored.uri,
            bytes=stored.size,
            instead_of=verdict.state,
            reason=verdict.error,
        )
        return policy.on_archived(verdict, stored.uri, stored.size, stored.sha256, now)

    async def _poll(
        self, row: models.Task, task_log: structlog.typing.FilteringBoundLogger
    ) -> models.Task | None:
        """Poll the provider once; None means: give the row back untouched (key rejected)."""
        self._unstarted_polls += 1
        try:
            await self.limiter.acquire()
            await self._poll_slots.acquire()
        finally:
            self._unstarted_polls -= 1
        now = self.clock()
        try:
            if self.keygate.blocked:
                return None  # the key broke while this poll waited for its turn
            if row.next_attempt_at is not None:
                # Measured when the request really starts: time queued for a slot counts as late.
                lateness = (now - row.next_attempt_at).total_seconds()
                self.metrics.poll_lateness.observe(max(0.0, lateness))
            self.stats.polls += 1
            answer = await self.provider.fetch(row.task_id)
        except errors.AuthRejected as exc:
            self._count_poll(row, exc)
            return await self._auth_rejected(row, exc, now, task_log)
        except errors.ProviderError as exc:
            self._count_poll(row, exc)
            self._observe(row, exc, now)
            return self._poll_failed(row, exc, now, task_log)
        finally:
            self._poll_slots.release()
        self._count_poll(row, None)
        self._observe(row, None, now)
        self.keygate.answered(now)
        task_log.debug("task_polled", status=answer.status.value)
        if answer.ignored:
            self._ignored_fields(answer, task_log)
        polled = policy.on_answer(row, answer, now, self.rules, self.draw)
        if row.provider is None:
            # The first answer: from now on only daemons of this provider claim the row.
            polled = polled.replace(provider=self.provider.name)
        return polled

    def _observe(
        self, row: models.Task, exc: errors.ProviderError | None, now: dt.datetime
    ) -> None:
        """Count a poll's outcome towards the provider's health (outage.py)."""
        stamp = now.timestamp()
        if exc is None or isinstance(exc, errors.MalformedAnswer | errors.TaskNotFound):
            gone = isinstance(exc, errors.TaskNotFound)
            known = policy.well_inside(row, now)
            self.health.answered(stamp, row.task_id, gone=gone, known=known)
        elif isinstance(exc, errors.ProviderUnavailable):
            self.health.failed(stamp, row.task_id)
        else:
            return  # a 429 or a rejected key says nothing of the provider's health
        self.provider_trouble(now)

    def provider_trouble(self, now: dt.datetime | None = None) -> str | None:
        """Why the provider looks out of order now (outage.py), or None; said once when it starts
        and when it ends, and kept in the gauge ``seedance_provider_outage``."""
        reason = self.health.outage((now or self.clock()).timestamp())
        if (reason is None) != (self._trouble is None):
            if reason is not None:
                log.error(
                    "provider_outage",
                    reason=reason,
                    effect="polls back off; no task is given up on a 404 while it lasts",
                )
            else:
                log.warning("provider_outage_over")
            self.metrics.provider_outage.set(0 if reason is None else 1)
        self._trouble = reason
        return reason

    def _ignored_fields(
        self, answer: models.Answer, task_log: structlog.typing.FilteringBoundLogger
    ) -> None:
        """Count the side fields an answer had that could not be read; say so once per field per
        IGNORED_FIELD_LOG_SECONDS (a drifted provider would otherwise log on every poll)."""
        moment = self.clock.monotonic()
        for name, why in answer.ignored:
            self.metrics.answer_fields_ignored.labels(field=name).inc()
            last = self._ignored_logged.get(name)
            if last is None or moment - last >= self.IGNORED_FIELD_LOG_SECONDS:
                self._ignored_logged[name] = moment
                task_log.warning(
                    "answer_field_ignored",
                    field=name,
                    why=why,
                    effect="read as absent; the task goes on (only id, status and a finished "
                    "task's link must be right)",
                )

    def _count_poll(self, row: models.Task, exc: errors.ProviderError | None) -> None:
        if exc is None:
            self.metrics.count_poll(row.mode, "ok", "2xx")
            return
        code = exc.status_code
        self.metrics.count_poll(
            row.mode,
            _POLL_OUTCOMES.get(type(exc), "error"),
            "none" if code is None else f"{code // 100}xx",
        )

    def _poll_failed(
        self,
        row: models.Task,
        exc: errors.ProviderError,
        now: dt.datetime,
        task_log: structlog.typing.FilteringBoundLogger,
    ) -> models.Task | None:
        """The task after a failed poll (any error but a rejected key)."""
        if isinstance(exc, errors.TaskNotFound):
            if policy.deadline_ahead(row, now) and self.health.storm(now.timestamp()):
                # Most tasks the provider should still have answer 404: an outage, not evidence.
                # (Past its deadline, a 404 is what the provider promised: evidence even then.)
                self.stats.poll_errors += 1
                return policy.on_poll_error(row, policy.STORM_REASON, now, self.rules, self.draw)
            return policy.on_not_found(row, now, self.rules, self.draw)
        if isinstance(exc, errors.MalformedAnswer):
            self.stats.malformed += 1
            self.metrics.malformed_answers.inc()
            task_log.warning("malformed_answer", error=str(exc))
            return policy.on_malformed(row, str(exc), now, self.rules, self.draw)
        if isinstance(exc, errors.RateLimited):
            self.stats.rate_limited += 1
            wait = exc.retry_after
            if wait is None:
                wait = policy.backoff_seconds(
                    row.attempts + 1, 1.0, self.rules.backoff_cap_seconds, self.draw
                )
            # Every request of this daemon waits, and the pace itself drops until it recovers.
            self.limiter.pause(wait)
            self.limiter.slow_down()
            task_log.warning("provider_rate_limited", retry_after_s=exc.retry_after, pause_s=wait)
            return policy.on_poll_error(row, str(exc), now, self.rules, self.draw, wait)
        self.stats.poll_errors += 1
        task_log.warning("poll_failed", error=str(exc), attempts=row.attempts + 1)
        return policy.on_poll_error(row, str(exc), now, self.rules, self.draw)

    async def _auth_rejected(
        self,
        row: models.Task,
        exc: errors.AuthRejected,
        now: dt.datetime,
        task_log: structlog.typing.FilteringBoundLogger,
    ) -> models.Task | None:
        """A 401/403 for one task: is the key wrong, or is only this task refused?

        One key check (a request for an id that cannot exist) tells them apart. A rejected key
        pauses polling and gives the row back untouched (None); a key the provider accepts makes
        the refusal this task's own, retried a few times and then ``rejected``. When the check
        cannot tell, polling pauses too: no task is given up on a guess.
        """
        verdict = await self.keygate.check()
        if verdict is True:
            task_log.warning("task_refused_by_provider", error=str(exc))
            return policy.on_task_forbidden(row, str(exc), now, self.rules, self.draw)
        if verdict is None and not self.keygate.blocked:
            self.keygate.block(now, f"{exc} and the key check could not tell")
        return None

    async def _archive(
        self, row: models.Task, task_log: structlog.typing.FilteringBoundLogger
    ) -> models.Task:
        assert row.video_url is not None
        async with self._download_slots:
            started = self.clock.monotonic()
            try:
                stored = await self.archive.find(row.task_id)
                if stored is not None:
                    task_log.info("video_already_archived", uri=stored.uri, bytes=stored.size)
                else:
                    # We hold the lease: any unfinished upload of this task is a dead one's leftover.
                    await self.archive.discard_incomplete(row.task_id)
                    stored = await self._copy(row)
            except errors.LinkExpired as exc:
                self._download_failed("link_expired")
                task_log.warning("video_link_expired", error=str(exc))
                return policy.on_link_refused(row, str(exc), self.clock(), self.rules)
            except errors.NotAVideo as exc:
                self._download_failed("not_a_video")
                task_log.warning("video_not_a_video", error=str(exc))
                return policy.on_not_a_video(row, str(exc), self.clock(), self.rules, self.draw)
            except errors.RefusedBySetting as exc:
                self._download_failed(
                    "too_large" if isinstance(exc, errors.VideoTooLarge) else "unsafe_url"
                )
                stored = await self._stored_whole(row, exc, task_log)
                if stored is None:
                    task_log.warning("video_waits_on_setting", error=str(exc))
                    return policy.on_waiting_on_setting(
                        row, str(exc), self.clock(), self.rules, self.draw
                    )
            except (errors.DownloadError, errors.ArchiveError) as exc:
                self._download_failed(
                    "storage" if isinstance(exc, errors.ArchiveError) else "download"
                )
                task_log.warning("video_download_failed", error=str(exc))
                return policy.on_download_error(row, str(exc), self.clock(), self.rules, self.draw)
        self.stats.archived += 1
        self.stats.archived_bytes += stored.size
        now = self.clock()
        self.metrics.archived_bytes.inc(stored.size)
        self.metrics.archive_seconds.observe(self.clock.monotonic() - started)
        if row.completed_at is not None:
            delay = (now - row.completed_at).total_seconds()
            self.metrics.completion_to_archive.observe(max(0.0, delay))
        task_log.info(
            "video_archived",
            uri=stored.uri,
            bytes=stored.size,
            sha256=stored.sha256,
            seconds=round(self.clock.monotonic() - started, 3),
        )
        return policy.on_archived(row, stored.uri, stored.size, stored.sha256, now)

    async def _stored_whole(
        self,
        row: models.Task,
        refusal: errors.RefusedBySetting,
        task_log: structlog.typing.FilteringBoundLogger,
    ) -> archive.Stored | None:
        """The video already in the archive at the size its link announces, if it is: a video
        refused by a setting now may have been archived before the setting changed."""
        length = refusal.length if isinstance(refusal, errors.VideoTooLarge) else None
        if length is None:
            return None
        try:
            stored = await self.archive.find(row.task_id, read_back=True)
        except errors.ArchiveError as exc:
            task_log.warning("archive_not_checked", error=str(exc))
            return None
        return stored if stored is not None and stored.size == length else None

    async def _copy(self, row: models.Task) -> archive.Stored:
        """Stream the video into the archive, as a whole within MAX_DOWNLOAD_SECONDS: a trickling
        host (or store) cannot hold a download slot for hours. The task's deadline never cuts a
        download: the provider may well serve the video past it."""
        limit = self.max_download_seconds
        try:
            async with asyncio.timeout(limit):
                async with self.provider.open_video(row) as video:
                    return await self.archive.put(
                        row.task_id, video.chunks, video.length, archive.describe(row)
                    )
        except TimeoutError:
            raise errors.DownloadError(
                f"the download did not finish within {limit:.0f}s "
                "(SEEDANCE_MAX_DOWNLOAD_SECONDS); it will be retried"
            ) from None

    def _download_failed(self, reason: str) -> None:
        self.stats.download_failures += 1
        self.metrics.download_failures.labels(reason=reason).inc()


POLL_STATES = (models.State.PENDING.value, models.State.POLLING.value)
# The terminal states other than archived: each is given only after a look in the archive.
NEGATIVE_STATES = frozenset(
    {models.State.FAILED, models.State.CANCELLED, models.State.EXPIRED, models.State.REJECTED}
)

_POLL_OUTCOMES: dict[type[errors.ProviderError], str] = {
    errors.AuthRejected: "auth_rejected",
    errors.RateLimited: "rate_limited",
    errors.TaskNotFound: "not_found",
    errors.MalformedAnswer: "malformed",
    errors.ProviderUnavailable: "unavailable",
}
