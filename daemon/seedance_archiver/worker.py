"""The work on one claimed row: poll the provider, decide with the policy, archive the video, and
look in the archive before any negative verdict.

The service claims rows and files their outcomes; :meth:`Worker.handle` turns one row into its
outcome. The worker holds what the rows share while they are worked on: the download slots and
their queue, the polls on the wire, and the provider's health as the polls see it (``outage.py``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Protocol

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
    utils,
)

log = structlog.get_logger(__name__)


class Parts(Protocol):
    """What the work reads from the service that runs it, each time it needs it: ``learn``
    replaces the rules, and a test or benchmark may swap the provider, limiter or clock."""

    provider: provider.Provider
    archive: archive.Archive
    rules: policy.Rules
    limiter: ratelimit.RateLimiter
    clock: utils.Clock
    draw: policy.Draw
    stats: metrics.Stats
    metrics: metrics.Metrics
    keygate: keygate.KeyGate


class Worker:
    """Works claimed rows, one asyncio task each, within the daemon's shared limits."""

    MAX_CONCURRENT_POLLS = 100  # requests on the wire at once (the client pool holds 200)
    IGNORED_FIELD_LOG_SECONDS = 600.0  # an answer field ignored is logged this often at most
    # A video found finished waits in this daemon for a download slot (rather than being handed
    # back) if the slots should reach it within this long, at the pace recent downloads took;
    # never fewer than twice the slots wait, nor more than MAX_QUEUE_PER_SLOT times.
    QUEUE_SECONDS = 2.0
    MAX_QUEUE_PER_SLOT = 64
    DOWNLOAD_SECONDS_WEIGHT = 0.2  # of each new download, in the running mean of their length

    def __init__(self, parts: Parts, max_downloads: int, max_download_seconds: float) -> None:
        self.parts = parts
        self.max_downloads = max_downloads
        # Downloads claimed beyond the free slots: at most this many wait for one (they hold no
        # socket or file, only their lease, which is renewed). More are claimed once half of
        # them are left, so each claim (and the write-back that goes with it) serves a quarter of
        # the queue: twice the slots made a burst's transactions per video 0.75 -> 0.48 and its
        # CPU 8% lower than as many as the slots (bench/burst.py). Once downloads are seen to be
        # quick, the queue grows to what the slots start within QUEUE_SECONDS (:meth:`_learn`):
        # a burst's polled videos then wait here instead of being written back and claimed again
        # (3,000 x 0.5 MB: statements per video 0.45 -> 0.08, the daemon's CPU 21% lower), and a
        # replica with room waits for ours no longer than that.
        self.min_download_queue = 2 * max_downloads
        self.download_queue = self.min_download_queue
        self._download_seconds: float | None = None  # a download's length, a running mean
        # Rows whose poll found the video and whose download was cancelled (a stop, a lost lease)
        # before it ended: what the poll learned, for the service to write back (Service._work).
        self.cancelled_answers: dict[str, models.Task] = {}
        self.max_download_seconds = max_download_seconds
        self._download_slots = asyncio.Semaphore(max_downloads)
        self.downloading: set[str] = set()  # rows downloading, waiting for a slot, or about to
        self.unstarted_polls = 0  # claimed rows whose poll has not gone out yet
        self._poll_slots = asyncio.Semaphore(self.MAX_CONCURRENT_POLLS)
        self._ignored_logged: dict[str, float] = {}  # answer field -> when it was last logged
        # The provider's health over the longest a poll may wait (the longest cadence, or the
        # backoff cap in an outage): every task is polled at least once in such a window.
        rules = parts.rules
        self.health = outage.Health(
            max(rules.backoff_cap_seconds, *(c.high for c in rules.cadences.values()))
        )
        self._trouble: str | None = None

    def download_room(self) -> int:
        """How many more downloads this daemon can start soon: its free slots plus a short queue."""
        return self.max_downloads + self.download_queue - len(self.downloading)

    def queue_running_low(self) -> bool:
        """At most half the download queue is left waiting for a slot: time to claim more."""
        return len(self.downloading) - self.max_downloads <= self.download_queue // 2

    def _learn(self, seconds: float) -> None:
        """A download (and its archiving) took ``seconds``: the queue is sized to what the slots
        start within QUEUE_SECONDS at the running mean of that length."""
        mean = self._download_seconds
        mean = seconds if mean is None else mean + self.DOWNLOAD_SECONDS_WEIGHT * (seconds - mean)
        self._download_seconds = mean
        fits = self.QUEUE_SECONDS * self.max_downloads / max(mean, 1e-6)
        most = self.MAX_QUEUE_PER_SLOT * self.max_downloads
        self.download_queue = max(self.min_download_queue, min(most, int(fits)))

    async def handle(
        self, row: models.Task, task_log: structlog.typing.FilteringBoundLogger
    ) -> models.Task | None:
        decided = policy.before_work(row, self.parts.clock(), self.parts.provider.task_id_problem)
        if decided is not None:
            if policy.task_id_problem(row.task_id) is not None:
                return decided  # an id that can never be valid: no key in the archive either
            # Not this provider's kind of id, but a valid key: another provider's daemon may
            # have archived it, so the archive is looked at first, as for every verdict.
            return await self._looked_up(row, decided, task_log)
        if row.state == models.State.DOWNLOADING and row.video_url:
            # Written back downloading after a failed download (attempts): the failure may have
            # come after the video was stored whole (an answer lost). Handed back unstarted (no
            # slot, a stop), attempts is 0 and nothing archived it.
            outcome = await self._archive(
                row, task_log, look_first=row.taken_over or row.attempts > 0
            )
        else:
            polled = await self._poll(row, task_log)
            if polled is None:
                return None
            if polled.state != models.State.DOWNLOADING:
                outcome = polled
            elif self.download_room() <= 0:
                # No slot soon: written back due now, for whichever daemon has one first.
                task_log.debug("download_handed_back", downloads=len(self.downloading))
                return polled
            else:
                self.downloading.add(row.task_id)
                try:
                    # Found finished now: only a holder whose lease ran out may have archived it.
                    outcome = await self._archive(polled, task_log, look_first=row.taken_over)
                except asyncio.CancelledError:
                    # Kept, so whoever works on the row next downloads it without a poll: with
                    # the queue (_learn), a stop may cancel hundreds waiting for a slot.
                    self.cancelled_answers[row.task_id] = polled
                    raise
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
        now = self.parts.clock()
        try:
            stored = await self.parts.archive.find(row.task_id, read_back=True)
        except errors.ArchiveError as exc:
            task_log.warning("verdict_deferred", verdict=verdict.state, error=str(exc))
            reason = f"the archive could not be checked ({exc})"
            return policy.on_verdict_deferred(
                row, verdict, reason, now, self.parts.rules, self.parts.draw
            )
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
        self.unstarted_polls += 1
        try:
            await self.parts.limiter.acquire()
            await self._poll_slots.acquire()
        finally:
            self.unstarted_polls -= 1
        started = self.parts.clock()
        try:
            if self.parts.keygate.blocked:
                return None  # the key broke while this poll waited for its turn
            if row.next_attempt_at is not None:
                # Measured when the request really starts: time queued for a slot counts as late.
                lateness = (started - row.next_attempt_at).total_seconds()
                self.parts.metrics.poll_lateness.observe(max(0.0, lateness))
            self.parts.stats.polls += 1
            answer = await self.parts.provider.fetch(row.task_id)
        except errors.AuthRejected as exc:
            self._count_poll(row, exc)
            return await self._auth_rejected(row, exc, self.parts.clock(), task_log)
        except errors.ProviderError as exc:
            now = self.parts.clock()
            self._count_poll(row, exc)
            self._observe(row, exc, now)
            return self._poll_failed(row, exc, now, task_log)
        finally:
            self._poll_slots.release()
        # The next poll is timed from the answer, not from when this one was started: a request
        # held up on its way (a busy event loop, a slow connection) then never makes the
        # provider see two polls closer than the cadence (tests/acceptance/test_replicas.py).
        now = self.parts.clock()
        self._count_poll(row, None)
        self._observe(row, None, now)
        self.parts.keygate.answered(now)
        task_log.debug("task_polled", status=answer.status.value)
        if answer.ignored:
            self._ignored_fields(answer, task_log)
        polled = policy.on_answer(row, answer, now, self.parts.rules, self.parts.draw)
        if row.provider is None:
            # The first answer: from now on only daemons of this provider claim the row.
            polled = polled.replace(provider=self.parts.provider.name)
        return polled

    def _observe(
        self, row: models.Task, exc: errors.ProviderError | None, now: dt.datetime
    ) -> None:
        """Count a poll's outcome towards the provider's health (outage.py)."""
        stamp = now.timestamp()
        if exc is None or isinstance(exc, errors.MalformedAnswer | errors.TaskNotFound):
            gone = isinstance(exc, errors.TaskNotFound)
            known = policy.well_inside(row, now, self.parts.rules)
            self.health.answered(stamp, row.task_id, gone=gone, known=known)
        elif isinstance(exc, errors.ProviderUnavailable):
            self.health.failed(stamp, row.task_id)
        else:
            return  # a 429 or a rejected key says nothing of the provider's health
        self.provider_trouble(now)

    def provider_trouble(self, now: dt.datetime | None = None) -> str | None:
        """Why the provider looks out of order now (outage.py), or None; said once when it starts
        and when it ends, and kept in the gauge ``seedance_provider_outage``."""
        reason = self.health.outage((now or self.parts.clock()).timestamp())
        if (reason is None) != (self._trouble is None):
            if reason is not None:
                log.error(
                    "provider_outage",
                    reason=reason,
                    effect="polls back off; no task is given up on a 404 while it lasts",
                )
            else:
                log.warning("provider_outage_over")
            self.parts.metrics.provider_outage.set(0 if reason is None else 1)
        self._trouble = reason
        return reason

    def _ignored_fields(
        self, answer: models.Answer, task_log: structlog.typing.FilteringBoundLogger
    ) -> None:
        """Count the side fields an answer had that could not be read; say so once per field per
        IGNORED_FIELD_LOG_SECONDS (a drifted provider would otherwise log on every poll)."""
        moment = self.parts.clock.monotonic()
        for name, why in answer.ignored:
            self.parts.metrics.answer_fields_ignored.labels(field=name).inc()
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
            self.parts.metrics.count_poll(row.mode, "ok", "2xx")
            return
        code = exc.status_code
        self.parts.metrics.count_poll(
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
                self.parts.stats.poll_errors += 1
                return policy.on_poll_error(
                    row, policy.STORM_REASON, now, self.parts.rules, self.parts.draw
                )
            return policy.on_not_found(row, now, self.parts.rules, self.parts.draw)
        if isinstance(exc, errors.MalformedAnswer):
            self.parts.stats.malformed += 1
            self.parts.metrics.malformed_answers.inc()
            task_log.warning("malformed_answer", error=str(exc))
            return policy.on_malformed(row, str(exc), now, self.parts.rules, self.parts.draw)
        if isinstance(exc, errors.RateLimited):
            self.parts.stats.rate_limited += 1
            wait = exc.retry_after
            if wait is None:
                wait = policy.backoff_seconds(
                    row.attempts + 1, 1.0, self.parts.rules.backoff_cap_seconds, self.parts.draw
                )
            # Every request of this daemon waits, and the pace itself drops until it recovers.
            self.parts.limiter.pause(wait)
            self.parts.limiter.slow_down()
            task_log.warning("provider_rate_limited", retry_after_s=exc.retry_after, pause_s=wait)
            return policy.on_poll_error(row, str(exc), now, self.parts.rules, self.parts.draw, wait)
        self.parts.stats.poll_errors += 1
        task_log.warning("poll_failed", error=str(exc), attempts=row.attempts + 1)
        return policy.on_poll_error(row, str(exc), now, self.parts.rules, self.parts.draw)

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
        verdict = await self.parts.keygate.check()
        if verdict is True:
            task_log.warning("task_refused_by_provider", error=str(exc))
            return policy.on_task_forbidden(row, str(exc), now, self.parts.rules, self.parts.draw)
        if verdict is None and not self.parts.keygate.blocked:
            self.parts.keygate.block(now, f"{exc} and the key check could not tell")
        return None

    async def _archive(
        self,
        row: models.Task,
        task_log: structlog.typing.FilteringBoundLogger,
        *,
        look_first: bool,
    ) -> models.Task:
        """Download the video into the archive; with ``look_first``, unless the archive has it.

        The look is asked for only where an earlier holder may have archived the video and not
        said so: its lease ran out (it died, or lost the row), or its download failed. Elsewhere
        it would cost every video a request (into S3 a HEAD: with it, a burst's daemon took a
        third more CPU and a quarter more time on moto and radosgw, bench/README.md) to spare a
        download that is, at worst, done twice: a row fed again for a video already archived is
        downloaded once more, while the provider still has it. No verdict is given without a
        look (:meth:`_looked_up`).
        """
        assert row.video_url is not None
        async with self._download_slots:
            started = self.parts.clock.monotonic()
            try:
                stored = await self.parts.archive.find(row.task_id) if look_first else None
                if stored is not None:
                    task_log.info("video_already_archived", uri=stored.uri, bytes=stored.size)
                else:
                    stored = await self._copy(row, leftovers=look_first)
            except errors.LinkExpired as exc:
                self._download_failed("link_expired")
                task_log.warning("video_link_expired", error=str(exc))
                return policy.on_link_refused(row, str(exc), self.parts.clock(), self.parts.rules)
            except errors.NotAVideo as exc:
                self._download_failed("not_a_video")
                task_log.warning("video_not_a_video", error=str(exc))
                return policy.on_not_a_video(
                    row, str(exc), self.parts.clock(), self.parts.rules, self.parts.draw
                )
            except errors.RefusedBySetting as exc:
                self._download_failed(
                    "too_large" if isinstance(exc, errors.VideoTooLarge) else "unsafe_url"
                )
                stored = await self._stored_whole(row, exc, task_log)
                if stored is None:
                    task_log.warning("video_waits_on_setting", error=str(exc))
                    return policy.on_waiting_on_setting(
                        row, str(exc), self.parts.clock(), self.parts.rules, self.parts.draw
                    )
            except (errors.DownloadError, errors.ArchiveError) as exc:
                self._download_failed(
                    "storage" if isinstance(exc, errors.ArchiveError) else "download"
                )
                task_log.warning("video_download_failed", error=str(exc))
                return policy.on_download_error(
                    row, str(exc), self.parts.clock(), self.parts.rules, self.parts.draw
                )
        self.parts.stats.archived += 1
        self.parts.stats.archived_bytes += stored.size
        now = self.parts.clock()
        self.parts.metrics.archived_bytes.inc(stored.size)
        took = self.parts.clock.monotonic() - started
        self.parts.metrics.archive_seconds.observe(took)
        self._learn(took)
        if row.completed_at is not None:
            delay = (now - row.completed_at).total_seconds()
            self.parts.metrics.completion_to_archive.observe(max(0.0, delay))
        task_log.info(
            "video_archived",
            uri=stored.uri,
            bytes=stored.size,
            sha256=stored.sha256,
            seconds=round(took, 3),
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
            stored = await self.parts.archive.find(row.task_id, read_back=True)
        except errors.ArchiveError as exc:
            task_log.warning("archive_not_checked", error=str(exc))
            return None
        return stored if stored is not None and stored.size == length else None

    async def _copy(self, row: models.Task, *, leftovers: bool) -> archive.Stored:
        """Stream the video into the archive, as a whole within MAX_DOWNLOAD_SECONDS: a trickling
        host (or store) cannot hold a download slot for hours. The task's deadline never cuts a
        download: the provider may well serve the video past it. With ``leftovers``, where an
        earlier holder may have archived the video unsaid, it may as well have left an unfinished
        upload: the store removes it first (Archive.put)."""
        limit = self.max_download_seconds
        try:
            async with asyncio.timeout(limit):
                async with self.parts.provider.open_video(row) as video:
                    return await self.parts.archive.put(
                        row.task_id,
                        video.chunks,
                        video.length,
                        archive.describe(row),
                        leftovers=leftovers,
                    )
        except TimeoutError:
            raise errors.DownloadError(
                f"the download did not finish within {limit:.0f}s "
                "(SEEDANCE_MAX_DOWNLOAD_SECONDS); it will be retried"
            ) from None

    def _download_failed(self, reason: str) -> None:
        self.parts.stats.download_failures += 1
        self.parts.metrics.download_failures.labels(reason=reason).inc()


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
