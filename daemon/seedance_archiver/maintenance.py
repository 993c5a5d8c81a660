"""The daemon's housekeeping jobs, beside the tick: each a periodic job of ``scheduler.py``.

- :meth:`Maintenance.wake_waiting_on_settings`, at start: rows waiting on a setting are due now.
- :meth:`Maintenance.learn`: each model's generation time, re-read from the table.
- :meth:`Maintenance.housekeeping`: unfinished uploads that nobody works on are removed.
- :meth:`Maintenance.refresh_gauges`: tasks by state and at risk, counted for the gauges.
- :meth:`Maintenance.prune`: finished rows deleted after SEEDANCE_PRUNE_AFTER_DAYS.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

import structlog

from seedance_archiver import archive, metrics, policy, provider, ratelimit, store, utils, worker

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_P = ParamSpec("_P")


class Parts(Protocol):
    """What the jobs read from the service that holds them, each time they run (``learn`` writes
    the rules back there, where the tick and the worker read them)."""

    store: store.TaskStore
    provider: provider.Provider
    archive: archive.Archive
    rules: policy.Rules
    limiter: ratelimit.RateLimiter
    clock: utils.Clock
    metrics: metrics.Metrics
    worker: worker.Worker

    @property
    def working(self) -> set[str]: ...

    async def db(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T: ...


class Maintenance:
    """The housekeeping jobs of one service."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    async def learn(self) -> dict[str, policy.Learned]:
        """Re-read the recent generation times per model from the table and learn each model's
        skip from them (a periodic job: replicas and restarts share what every daemon saw)."""
        now = self.parts.clock()
        since = now - self.parts.rules.retention
        times = await self.parts.db(self.parts.store.generation_times, since, policy.LEARN_WINDOW)
        learned = policy.learn(times, self.parts.rules)
        if learned != self.parts.rules.learned:
            log.info(
                "generation_times_learned",
                skips={m: round(v.skip_seconds, 1) for m, v in sorted(learned.items())},
            )
        self.parts.rules = dataclasses.replace(self.parts.rules, learned=learned)
        return learned

    async def wake_waiting_on_settings(self) -> int:
        """At start: rows waiting on one of our settings are due now, since it may have changed
        (raise SEEDANCE_MAX_VIDEO_BYTES, restart, and they are archived with no row touched)."""
        woken = await self.parts.db(
            self.parts.store.wake_waiting_on_settings, self.parts.clock(), self.parts.provider.name
        )
        if woken:
            log.info("waiting_on_settings_woken", rows=woken)
        return woken

    async def housekeeping(self) -> int:
        """Remove unfinished uploads nobody is working on (a killed process left them behind).

        An upload is abandoned when no daemon holds a live lease on its task: only the lease holder
        uploads. Only uploads begun before this check are touched, so a new one is never cut off.
        """
        checked_at = self.parts.clock()
        candidates = await self.parts.archive.incomplete()
        if not candidates:
            return 0
        busy = await self.parts.db(self.parts.store.leased, candidates, checked_at)
        removed = 0
        for task_id in sorted(candidates - busy - self.parts.working):
            removed += await self.parts.archive.discard_incomplete(
                task_id, started_before=checked_at
            )
        if removed:
            log.info("stale_uploads_removed", count=removed)
        return removed

    async def refresh_gauges(self) -> store.Summary:
        """Recount tasks by state and at risk for the gauges (a housekeeping job)."""
        # An outage ends when its polls leave the window, polled or not.
        self.parts.worker.provider_trouble()
        summary = await self.parts.db(
            self.parts.store.summary, self.parts.clock(), self.parts.rules.at_risk
        )
        for state, count in summary.counts.items():
            self.parts.metrics.tasks.labels(state=state).set(count)
        self.parts.metrics.tasks_at_risk.set(summary.at_risk)
        self.parts.metrics.tasks_waiting_on_setting.set(summary.waiting_on_setting)
        self.parts.metrics.polling_load.set(
            policy.polling_load(
                summary.due_soon, store.LOAD_WINDOW.total_seconds(), self.parts.limiter.max_rate
            )
        )
        return summary

    async def prune(self, after_days: float, *, keep_undelivered: bool) -> int:
        """Delete rows that finished more than ``after_days`` ago. With ``keep_undelivered`` (webhooks
        on), a row waits until its events are delivered: none is deleted unsent."""
        cutoff = self.parts.clock() - dt.timedelta(days=after_days)
        deleted = await self.parts.db(
            self.parts.store.prune, cutoff, keep_undelivered=keep_undelivered
        )
        if deleted:
            log.info("finished_rows_pruned", rows=deleted, finished_before=cutoff.isoformat())
        return deleted
