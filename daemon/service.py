"""One cycle of the daemon: claim due rows, poll them, decide, archive, write the outcomes back.

The service holds no schedule of its own: ``scheduler.py`` calls :meth:`Service.tick` a few times a
second and :meth:`Service.renew_leases` now and then. Each claimed row becomes one asyncio task; its
outcome is queued and written back in a batch at the next tick.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import math
import random
import time
from collections.abc import Callable

import structlog

from daemon import archive, errors, metrics, models, policy, provider, ratelimit, store, utils
from daemon.models import State

log = structlog.get_logger(__name__)


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
    # How late each poll started against its row's next_attempt_at, in seconds (the latest ones).
    lateness: collections.deque[float] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=100_000)
    )


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
    AUTH_PROBE_SECONDS = 180.0
    STORE_RETRY_MAX_SECONDS = 30.0  # while the database is down, try again at most this far apart

    def __init__(
        self,
        store: store.Store,
        provider: provider.Provider,
        archive: archive.Archive,
        rules: policy.Rules,
        limiter: ratelimit.RateLimiter,
        *,
        owner: str,
        clock: Callable[[], dt.datetime] = utils.utcnow,
        draw: policy.Draw = random.uniform,
        max_downloads: int = MAX_DOWNLOADS,
        lease_seconds: float = LEASE_SECONDS,
        metrics: metrics.Metrics | None = None,
    ) -> None:
        self.store = store
        self.provider = provider
        self.archive = archive
        self.rules = rules
        self.limiter = limiter
        self.owner = owner
        self.clock = clock
        self.draw = draw
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.stats = Stats()
        self.metrics = metrics or _new_metrics()
        self.metrics.rate_limit.set(limiter.rate)
        self.last_tick_at: dt.datetime | None = None
        self.auth_blocked_until: dt.datetime | None = None
        self._download_slots = asyncio.Semaphore(max_downloads)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._done: list[models.Task] = []
        self._to_release: set[str] = set()
        self._unstarted_polls = 0  # claimed rows whose poll has not gone out yet
        self._poll_slots = asyncio.Semaphore(self.MAX_CONCURRENT_POLLS)
        self._probe_id: str | None = None  # the one row polled to test a rejected key
        # The claim running in a thread, if any: stop() waits for it so no lease outlives us.
        self._claiming: asyncio.Future[list[models.Task]] | None = None
        self._store_failures = 0
        self._store_retry_at = 0.0  # time.monotonic() before which the tick leaves the database be
        self._stopping = False

    # --- the scheduled jobs -------------------------------------------------------------------------

    async def tick(self) -> int:
        """Write finished work back, then claim due rows and start on them. Returns rows claimed."""
        now = self.clock()
        self.last_tick_at = now
        self.stats.ticks += 1
        if time.monotonic() < self._store_retry_at:
            return 0
        try:
            await self.flush()
            limit = 0 if self._stopping else self._claim_limit(now)
            rows = []
            if limit > 0:
                claim = asyncio.ensure_future(
                    asyncio.to_thread(
                        self.store.claim_due, self.owner, now, now + self.lease, limit
                    )
                )
                self._claiming = claim
                try:
                    rows = await asyncio.shield(claim)
                finally:
                    self._claiming = None
        except errors.StoreError as exc:
            self._store_unavailable(exc)
            return 0
        if self._store_failures:
            log.warning("database_available_again", after_failures=self._store_failures)
            self._store_failures = 0
        self.metrics.last_tick.set(now.timestamp())
        self.metrics.rate_limit.set(self.limiter.rate)
        if self._stopping:
            # SIGTERM came while the claim ran: give the rows straight back.
            self._to_release.update(row.task_id for row in rows)
            return 0
        if self.auth_blocked_until is not None and rows:
            self._probe_id = rows[0].task_id
        started = 0
        for row in rows:
            if row.task_id in self._running:
                continue  # our own lease ran out and we re-claimed it: one worker is enough
            self._running[row.task_id] = asyncio.create_task(
                self._work(row), name=f"task:{row.task_id}"
            )
            started += 1
        return started

    def wake(self) -> None:
        """New rows arrived (NOTIFY): the database is evidently back, so stop backing off from it."""
        self._store_retry_at = 0.0

    def _store_unavailable(self, exc: errors.StoreError) -> None:
        """Back off from a database that does not answer; queued outcomes wait in memory."""
        self._store_failures += 1
        delay = min(self.STORE_RETRY_MAX_SECONDS, 2.0 ** (self._store_failures - 1))
        self._store_retry_at = time.monotonic() + delay
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
        busy = await asyncio.to_thread(self.store.leased, candidates, checked_at)
        removed = 0
        for task_id in sorted(candidates - busy - set(self._running)):
            removed += await self.archive.discard_incomplete(task_id, started_before=checked_at)
        if removed:
            log.info("stale_uploads_removed", count=removed)
        return removed

    async def refresh_gauges(self) -> store.Summary:
        """Recount tasks by state and at risk for the gauges (a housekeeping job)."""
        summary = await asyncio.to_thread(self.store.summary, self.clock())
        for state, count in summary.counts.items():
            self.metrics.tasks.labels(state=state).set(count)
        self.metrics.tasks_at_risk.set(summary.at_risk)
        return summary

    async def renew_leases(self) -> int:
        """Keep the leases of rows still being worked on (long downloads) from running out."""
        ids = list(self._running)
        if not ids:
            return 0
        return await asyncio.to_thread(self.store.renew, self.owner, ids, self.clock() + self.lease)

    async def flush(self) -> None:
        """Write queued outcomes and releases; on a database error keep them for the next try."""
        if self._done:
            done, self._done = self._done, []
            try:
                await asyncio.to_thread(self.store.save, done, self.owner)
            except BaseException:
                # Also on cancellation: writing an outcome twice is harmless (the second finds the
                # lease released and changes nothing); dropping it is not.
                self._done[:0] = done
                raise
        if self._to_release:
            ids, self._to_release = self._to_release, set()
            try:
                await asyncio.to_thread(self.store.release, self.owner, ids)
            except BaseException:
                self._to_release |= ids
                raise

    def stop_claiming(self) -> None:
        """From now on no tick claims, and rows a claim in flight returns are given straight back."""
        self._stopping = True

    async def stop(self, grace_seconds: float) -> None:
        """Stop claiming; give in-flight work ``grace_seconds`` to finish, cancel the rest, write back."""
        self._stopping = True
        claim = self._claiming
        if claim is not None:
            try:
                claimed = await claim
            except errors.StoreError:
                claimed = []
            self._to_release.update(r.task_id for r in claimed if r.task_id not in self._running)
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
    def auth_blocked(self) -> bool:
        return self.auth_blocked_until is not None

    # --- one row ----------------------------------------------------------------------------------

    def _claim_limit(self, now: dt.datetime) -> int:
        if self.auth_blocked_until is not None:
            if now < self.auth_blocked_until or self._probe_id is not None:
                return 0
            return 1  # one probe with a real task: does the provider take the key again?
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
            outcome = policy.on_poll_error(row, reason, self.clock(), self.rules, self.draw)
        finally:
            self._running.pop(row.task_id, None)
            if self._probe_id == row.task_id:
                self._probe_id = None
            if outcome is None:
                self._to_release.add(row.task_id)
            else:
                self._done.append(outcome)
        if outcome is not None and outcome.state != row.state:
            level = "warning" if outcome.state in (State.EXPIRED, State.REJECTED) else "info"
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
            return decided
        if row.state == State.DOWNLOADING and row.video_url:
            return await self._archive(row, task_log)
        polled = await self._poll(row, task_log)
        if polled is None or polled.state != State.DOWNLOADING:
            return polled
        return await self._archive(polled, task_log)

    async def _poll(
        self, row: models.Task, task_log: structlog.typing.FilteringBoundLogger
    ) -> models.Task | None:
        """Poll the provider once; None means: give the row back untouched (key rejected)."""
        probe = self._probe_id == row.task_id
        self._unstarted_polls += 1
        try:
            await self.limiter.acquire()
            await self._poll_slots.acquire()
        finally:
            self._unstarted_polls -= 1
        now = self.clock()
        try:
            if self.auth_blocked_until is not None and not probe:
                return None
            if row.next_attempt_at is not None:
                # Measured when the request really starts: time queued for a slot counts as late.
                lateness = (now - row.next_attempt_at).total_seconds()
                self.stats.lateness.append(lateness)
                self.metrics.poll_lateness.observe(max(0.0, lateness))
            self.stats.polls += 1
            answer = await self.provider.fetch(row.task_id)
        except errors.ProviderError as exc:
            self._count_poll(row, exc)
            return self._poll_failed(row, exc, now, task_log)
        finally:
            self._poll_slots.release()
        self._count_poll(row, None)
        if self.auth_blocked_until is not None:
            log.warning("api_key_accepted_again")
            self.auth_blocked_until = None
            self.metrics.api_key_rejected.set(0)
        task_log.debug("task_polled", status=answer.status.value)
        return policy.on_answer(row, answer, now, self.rules, self.draw)

    def _count_poll(self, row: models.Task, exc: errors.ProviderError | None) -> None:
        code = 200 if exc is None else exc.status_code
        self.metrics.provider_responses.labels(
            code_class="none" if code is None else f"{code // 100}xx"
        ).inc()
        outcome = "ok" if exc is None else _POLL_OUTCOMES.get(type(exc), "error")
        self.metrics.polls.labels(mode=row.mode, outcome=outcome).inc()

    def _poll_failed(
        self,
        row: models.Task,
        exc: errors.ProviderError,
        now: dt.datetime,
        task_log: structlog.typing.FilteringBoundLogger,
    ) -> models.Task | None:
        """The task after a failed poll; None gives the row back untouched (key rejected)."""
        if isinstance(exc, errors.AuthRejected):
            self._block_auth(now, str(exc))
            return None
        if isinstance(exc, errors.TaskNotFound):
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

    def _block_auth(self, now: dt.datetime, reason: str) -> None:
        self.auth_blocked_until = now + dt.timedelta(seconds=self.AUTH_PROBE_SECONDS)
        self.metrics.api_key_rejected.set(1)
        log.error(
            "api_key_rejected",
            error=reason,
            action="polling paused; check SEEDANCE_API_KEY",
            next_probe_at=self.auth_blocked_until.isoformat(),
        )

    async def _archive(
        self, row: models.Task, task_log: structlog.typing.FilteringBoundLogger
    ) -> models.Task:
        assert row.video_url is not None
        async with self._download_slots:
            started = time.monotonic()
            try:
                stored = await self.archive.find(row.task_id)
                if stored is not None:
                    task_log.info("video_already_archived", uri=stored.uri, bytes=stored.size)
                else:
                    # We hold the lease: any unfinished upload of this task is a dead one's leftover.
                    await self.archive.discard_incomplete(row.task_id)
                    async with self.provider.open_video(row.video_url) as video:
                        stored = await self.archive.put(row.task_id, video.chunks, video.length)
            except errors.LinkExpired as exc:
                self._download_failed("link_expired")
                task_log.warning("video_link_expired", error=str(exc))
                return policy.on_link_expired(row, str(exc), self.clock(), self.rules)
            except (errors.VideoTooLarge, errors.UnsafeVideoUrl) as exc:
                self._download_failed(
                    "too_large" if isinstance(exc, errors.VideoTooLarge) else "unsafe_url"
                )
                return policy.on_refused(row, str(exc), self.clock())
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
        self.metrics.archive_seconds.observe(time.monotonic() - started)
        if row.completed_at is not None:
            delay = (now - row.completed_at).total_seconds()
            self.metrics.completion_to_archive.observe(max(0.0, delay))
        task_log.info(
            "video_archived",
            uri=stored.uri,
            bytes=stored.size,
            sha256=stored.sha256,
            seconds=round(time.monotonic() - started, 3),
        )
        return policy.on_archived(row, stored.uri, stored.size, stored.sha256, now)

    def _download_failed(self, reason: str) -> None:
        self.stats.download_failures += 1
        self.metrics.download_failures.labels(reason=reason).inc()


_POLL_OUTCOMES: dict[type[errors.ProviderError], str] = {
    errors.AuthRejected: "auth_rejected",
    errors.RateLimited: "rate_limited",
    errors.TaskNotFound: "not_found",
    errors.MalformedAnswer: "malformed",
    errors.ProviderUnavailable: "unavailable",
}


def _new_metrics() -> metrics.Metrics:
    return metrics.Metrics()
