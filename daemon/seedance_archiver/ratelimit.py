"""One global cap on provider requests per second, shared by every poll of this daemon.

A pacing limiter: each request is given the next free slot ``1 / rate`` after the previous one. A 429's
Retry-After pushes every slot past the pause, so the whole daemon waits, not just one task; that holds
for requests already waiting for a slot too, which take a new one after the pause. The rate also adapts
(AIMD): each 429 halves it, and it climbs back linearly to the configured cap.

Above 1,000 requests/s, slots less than a millisecond apart share one timer (:data:`GROUP_SECONDS`):
a claim of hundreds of polls at once waited on one timer per poll, which at 10,000/s was a timer, a
future and an extra turn of the event loop for every poll (bench/README.md, the scale run). Each
request still starts at or after its own slot, at most GROUP_SECONDS after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# After a 429, the rate returns from its floor to the cap over this long (if no other 429 comes).
RECOVERY_SECONDS = 60.0
# The rate never adapts below this fraction of the cap.
MIN_RATE_FRACTION = 0.05
# Requests whose slots fall within this long after the first one's are woken together, once the
# last of them is due; only while slots are closer together than this (above 1,000/s).
GROUP_SECONDS = 0.001


class _Group:
    """Requests woken together: the first one sleeps until ``wake_at``, the others wait on it."""

    __slots__ = ("followers", "wake_at")

    def __init__(self, wake_at: float) -> None:
        self.wake_at = wake_at
        self.followers: list[asyncio.Future[None]] = []


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
        self._group: _Group | None = None  # the latest requests woken together, while open

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
                await self._until(start, now)
            # Nothing can change the pause between this check and our return: no await in between.
            if self._paused_until <= start:
                return

    async def _until(self, start: float, now: float) -> None:
        """Wait until the slot ``start``: alone, or in a group woken together (GROUP_SECONDS)."""
        group = self._group
        if group is not None and start <= group.wake_at:
            follower: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            group.followers.append(follower)
            await follower
            now = self._clock()
            if now < start:  # the one that slept for the group was cancelled: on our own
                await self._sleep(start - now)
            return
        if 1.0 / self.rate >= GROUP_SECONDS:
            await self._sleep(start - now)
            return
        group = self._group = _Group(start + GROUP_SECONDS)
        try:
            await self._sleep(group.wake_at - now)
        finally:
            if self._group is group:
                self._group = None
            for follower in group.followers:
                if not follower.done():
                    follower.set_result(None)

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
