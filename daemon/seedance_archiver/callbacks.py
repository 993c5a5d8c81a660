"""Provider callbacks: a hint that a task changed, turned into a sooner poll, at a bounded cost.

A provider that sends callbacks (Ark) POSTs a task's state to ``/callbacks/{provider}/{token}``
(``web.py`` checks the token). Callbacks are not signed by the provider, so a callback only makes
the task's row due sooner; the poll that follows is the truth. Whoever can send them must not be
able to steer the daemon, so:

- a row is made due no sooner than its mode's shortest interval after its last poll
  (:func:`models.hastened_poll_at`): a flood polls no faster than the cadence allows;
- callbacks are answered at once and written in batches, by a database thread of their own
  (:class:`Hastener`): claims, write-backs and lease renewals never wait behind them;
- the batch waiting to be written is bounded (:data:`QUEUE_LIMIT` task ids): when it is full the
  answer is 503 with ``Retry-After``, and the provider retries (polling is the fallback anyway).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import enum
from collections.abc import Callable, Mapping

import structlog

from seedance_archiver import errors, metrics, models, store

log = structlog.get_logger(__name__)

# Distinct task ids waiting to be written; a callback beyond them is answered 503.
QUEUE_LIMIT = 1000
# Callbacks are gathered this long before one transaction writes them: under a flood, a handful
# of transactions a second instead of one per callback.
BATCH_SECONDS = 0.2
# What a 503 asks the provider to wait before it retries.
RETRY_AFTER_SECONDS = 5


class Offer(enum.Enum):
    """What became of one callback when it arrived."""

    QUEUED = "queued"  # waiting to be written with the next batch: answered 204
    BUSY = "busy"  # the queue is full: answered 503 with Retry-After


class Hastener:
    """Gathers the task ids of callbacks and makes their rows due sooner, in batches.

    :meth:`offer` runs on the event loop and never touches the database; :meth:`run` writes each
    batch on a thread of its own.
    """

    def __init__(
        self,
        task_store: store.CallbackStore,
        provider_name: str,
        cadences: Mapping[str, models.Cadence],
        clock: Callable[[], dt.datetime],
        meters: metrics.Metrics,
        *,
        queue_limit: int = QUEUE_LIMIT,
        batch_seconds: float = BATCH_SECONDS,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.store = task_store
        self.provider_name = provider_name
        self.cadences = dict(cadences)
        self.clock = clock
        self.metrics = meters
        self.queue_limit = queue_limit
        self.batch_seconds = batch_seconds
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="callbacks-db"
        )
        self._pending: dict[str, int] = {}  # task id -> callbacks received for it
        self._arrived = asyncio.Event()

    def offer(self, task_id: str) -> Offer:
        """Queue ``task_id`` for the next batch; a task already queued takes no more room."""
        if task_id in self._pending:
            self._pending[task_id] += 1
            return Offer.QUEUED
        if len(self._pending) >= self.queue_limit:
            self.metrics.callbacks.labels(outcome="busy").inc()
            return Offer.BUSY
        self._pending[task_id] = 1
        self._arrived.set()
        return Offer.QUEUED

    @property
    def queued(self) -> int:
        """Distinct task ids waiting for the next batch."""
        return len(self._pending)

    async def run(self) -> None:
        """Write batches until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            await asyncio.sleep(self.batch_seconds)
            self._arrived.clear()
            batch, self._pending = self._pending, {}
            try:
                moved = await loop.run_in_executor(
                    self._executor,
                    self.store.hasten,
                    list(batch),
                    self.clock(),
                    self.provider_name,
                    self.cadences,
                )
            except errors.StoreError as exc:
                # The rows' own cadence still finds them; the provider need not retry.
                log.warning("callbacks_not_applied", tasks=len(batch), error=str(exc))
                moved = 0
            received = sum(batch.values())
            self.metrics.callbacks.labels(outcome="hastened").inc(moved)
            self.metrics.callbacks.labels(outcome="ignored").inc(received - moved)
            log.debug("callbacks_applied", tasks=len(batch), callbacks=received, hastened=moved)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
