"""One global cap on provider requests per second, shared by every poll of this daemon.

A pacing limiter: each request is given the next free slot ``1 / rate`` after the previous one. A 429's
Retry-After pushes every slot past the pause, so the whole daemon waits, not just one task; that holds
for requests already waiting for a slot too, which take a new one after the pause. The rate also adapts
(AIMD): each 429 halves it, and it climbs back linearly to the configured cap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# After a 429, the rate returns from its floor to the cap over this long (if no other 429 comes).
RECOVERY_SECONDS = 60.0
# The rate never adapts below this fraction of the cap.
MIN_RATE_FRACTION = 0.05


class RateLimiter:
    """Paces callers of :meth:`acquire` to at most ``rate`` per second (a burst of ``burst``).

    ``clock`` (monotonic seconds) and ``sleep`` are injectable so tests move time instead of waiting.
    """

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        recovery_seconds: float = RECOVERY_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.max_rate = rate
        self.rate = rate
        self._burst = max(1, burst)
        self._clock = clock
        self._sleep = sleep
        self._recovery_per_second = rate / recovery_seconds
        self._next = clock()
        self._adjusted_at = self._next
        self._paused_until = 0.0

    def reserve(self) -> float:
        """Take the next slot; return how many seconds to wait until it (0 if it is now)."""
        now = self._clock()
        return max(0.0, self._take(now) - now)

    async def acquire(self) -> None:
        """Wait for a slot; return when this request may start.

        A pause that began while we waited and covers our slot sends us to the back of the queue:
        we take a new slot, which is after the pause and after every slot already taken, so no
        request starts inside a Retry-After and the spacing holds after it.
        """
        while True:
            now = self._clock()
            start = self._take(now)
            if start > now:
                await self._sleep(start - now)
            # Nothing can change the pause between this check and our return: no await in between.
            if self._paused_until <= start:
                return

    def _take(self, now: float) -> float:
        """Reserve the next free slot at or after ``now``; its start time."""
        self._recover(now)
        interval = 1.0 / self.rate
        start = max(self._next, now - (self._burst - 1) * interval, self._paused_until)
        self._next = start + interval
        return start

    def pause(self, seconds: float) -> None:
        """No request starts for ``seconds`` from now (a 429's Retry-After)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def slow_down(self) -> None:
        """The provider rate-limited us: halve the rate (not below its floor)."""
        now = self._clock()
        self._recover(now)
        self.rate = max(self.max_rate * MIN_RATE_FRACTION, self.rate / 2)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - self._clock())

    def _recover(self, now: float) -> None:
        elapsed = max(0.0, now - self._adjusted_at)
        self._adjusted_at = now
        if self.rate < self.max_rate:
            self.rate = min(self.max_rate, self.rate + elapsed * self._recovery_per_second)
