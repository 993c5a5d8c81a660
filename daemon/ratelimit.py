"""One global cap on provider requests per second, shared by every poll of this daemon.

A pacing limiter: each request is given the next free slot ``1 / rate`` after the previous one. A 429's
Retry-After pushes every slot past the pause, so the whole daemon waits, not just one task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class RateLimiter:
    """Paces callers of :meth:`acquire` to at most ``rate`` per second (a burst of ``burst``)."""

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._interval = 1.0 / rate
        self._burst_seconds = max(0, burst - 1) * self._interval
        self._clock = clock
        self._next = clock()
        self._paused_until = 0.0

    def reserve(self) -> float:
        """Take the next slot; return how many seconds to wait until it (0 if it is now)."""
        now = self._clock()
        start = max(self._next, now - self._burst_seconds, self._paused_until)
        self._next = start + self._interval
        return max(0.0, start - now)

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)

    def pause(self, seconds: float) -> None:
        """No request starts for ``seconds`` from now (a 429's Retry-After)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - self._clock())
