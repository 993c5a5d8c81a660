"""The API key's gate: whether the provider accepts our key, and when to ask it again.

A 401/403 for every task means the key is wrong: polling pauses (downloads go on, their links need
no key), the daemon says so loudly (the log, ``seedance_api_key_rejected``, ``/readyz``) and gives
no task up. The key is asked about with one request that costs nothing: at start, every
AUTH_PROBE_SECONDS while it is rejected, and whenever no poll has been answered for
KEY_CHECK_IDLE_SECONDS, so a wrong key is reported before a task needs it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Protocol

import structlog

from seedance_archiver import metrics, provider, ratelimit, utils

log = structlog.get_logger(__name__)


class Parts(Protocol):
    """What the gate reads from the service that holds it, each time it needs it (a benchmark may
    swap the provider after the service is built)."""

    provider: provider.Provider
    limiter: ratelimit.RateLimiter
    clock: utils.Clock
    metrics: metrics.Metrics


class KeyGate:
    """Whether polling is paused for a rejected key; one key check in flight at a time."""

    # While the key is rejected, check it again this often.
    AUTH_PROBE_SECONDS = 180.0
    # While no poll has been answered for this long (no task active), check the key anyway, so a
    # wrong key is reported before a task needs it.
    KEY_CHECK_IDLE_SECONDS = 300.0

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.last_answer_at: dt.datetime | None = None  # the provider last answered a poll
        self.checked_at: dt.datetime | None = None
        self.accepted_at: dt.datetime | None = None  # a key check last said it is accepted
        self.blocked_until: dt.datetime | None = None  # when the rejected key is checked next
        self._check: asyncio.Future[bool | None] | None = None  # one check at a time

    @property
    def blocked(self) -> bool:
        return self.blocked_until is not None

    @property
    def state(self) -> str:
        """Whether the key works, in a person's words (the page's overview)."""
        if self.blocked:
            return "rejected by the provider"
        if self.last_answer_at is not None or self.accepted_at is not None:
            return "accepted"
        return "not known yet (no answer from the provider so far)"

    async def check(self) -> bool | None:
        """Ask the provider whether it accepts the API key (one request that costs nothing).

        Concurrent callers share one request. A rejection blocks polling, an acceptance lifts
        the block; when the answer cannot tell, nothing changes.
        """
        if self._check is None:
            self._check = asyncio.ensure_future(self._ask())
        check = self._check
        try:
            return await asyncio.shield(check)
        finally:
            if check.done():
                self._check = None

    async def _ask(self) -> bool | None:
        await self.parts.limiter.acquire()
        verdict = await self.parts.provider.check_key()
        now = self.parts.clock()
        self.checked_at = now
        if verdict is False:
            self.block(now, "the provider rejected the API key (HTTP 401/403)")
        elif verdict is True:
            self.accepted_at = now
            self._unblock()
        return verdict

    async def check_if_due(self) -> bool | None:
        """The key-check job: at start, while the key is rejected, and while no task is active."""
        now = self.parts.clock()
        if self.blocked_until is not None:
            due = now >= self.blocked_until
        else:
            latest = max(
                (t for t in (self.last_answer_at, self.checked_at) if t is not None),
                default=None,
            )
            due = latest is None or (now - latest).total_seconds() >= self.KEY_CHECK_IDLE_SECONDS
        if not due:
            return None
        return await self.check()

    def answered(self, now: dt.datetime) -> None:
        """A poll was answered: the key works."""
        self.last_answer_at = now
        self._unblock()

    def block(self, now: dt.datetime, reason: str) -> None:
        self.blocked_until = now + dt.timedelta(seconds=self.AUTH_PROBE_SECONDS)
        self.parts.metrics.api_key_rejected.set(1)
        log.error(
            "api_key_rejected",
            error=reason,
            action="polling paused (downloads go on); check SEEDANCE_API_KEY",
            next_check_at=self.blocked_until.isoformat(),
        )

    def _unblock(self) -> None:
        if self.blocked_until is None:
            return
        log.warning("api_key_accepted_again")
        self.blocked_until = None
        self.parts.metrics.api_key_rejected.set(0)
