"""The global request pacer, driven by a hand-moved monotonic clock."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any

import pytest
from seedance_archiver import ratelimit

# Float slack for comparing fake times built by repeated addition.
EPSILON = 1e-9


class FakeMonotonic:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTimeline(FakeMonotonic):
    """A moved clock with a fake ``sleep``: sleepers wake in time order as :meth:`run` moves the clock."""

    def __init__(self) -> None:
        super().__init__()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), future))
        await future

    async def settle(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Let every task run until it is done or asleep on this timeline (no real time passes)."""
        for _ in range(10_000):
            if sum(task.done() for task in tasks) + len(self._sleepers) == len(tasks):
                return
            await asyncio.sleep(0)
        raise AssertionError("a task neither finished nor slept on the fake timeline")

    async def run(self, tasks: list[asyncio.Task[Any]], until: float | None = None) -> None:
        """Wake sleepers in time order until every task is done (or the clock would pass ``until``)."""
        await self.settle(tasks)
        while self._sleepers:
            when = self._sleepers[0][0]
            if until is not None and when > until:
                self.now = max(self.now, until)
                return
            _, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, when)
            future.set_result(None)
            await self.settle(tasks)


async def start_acquires(
    limiter: ratelimit.RateLimiter, timeline: FakeTimeline, n: int
) -> tuple[list[asyncio.Task[None]], list[float]]:
    """``n`` concurrent acquires, each holding its slot; the list gets the time each one returned."""
    started: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        started.append(timeline.now)

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await timeline.settle(tasks)
    return tasks, started


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 9) for a, b in itertools.pairwise(times)]


def waits(limiter: ratelimit.RateLimiter, n: int) -> list[float]:
    return [round(limiter.reserve(), 9) for _ in range(n)]


class TestPacing:
    """Without a burst, slots are 1/rate apart."""

    def test_slots_are_one_interval_apart(self) -> None:
        limiter = ratelimit.RateLimiter(10, clock=FakeMonotonic())
        assert waits(limiter, 4) == [0.0, 0.1, 0.2, 0.3]

    def test_a_slot_in_the_past_is_free_now(self) -> None:
        clock = FakeMonotonic()
        limiter = ratelimit.RateLimiter(10, clock=clock)
        limiter.reserve()
        clock.now += 0.25
        assert waits(limiter, 2) == [0.0, 0.1]

    def test_idle_time_is_not_saved_up_without_a_burst(self) -> None:
        clock = FakeMonotonic()
        limiter = ratelimit.RateLimiter(5, clock=clock)
        clock.now += 60
        assert waits(limiter, 3) == [0.0, 0.2, 0.4]

    def test_waiting_callers_see_the_rate(self) -> None:
        clock = FakeMonotonic()
        limiter = ratelimit.RateLimiter(20, clock=clock)
        starts = []
        for _ in range(100):
            starts.append(clock.now + limiter.reserve())
        span = starts[-1] - starts[0]
        assert span == pytest.approx(99 / 20)

    @pytest.mark.parametrize("rate", [0, -1])
    def test_rate_must_be_positive(self, rate: float) -> None:
        with pytest.raises(ValueError, match="positive"):
            ratelimit.RateLimiter(rate, clock=FakeMonotonic())


class TestBurst:
    """After an idle spell, ``burst`` requests may start at once, then pacing resumes."""

    @pytest.mark.parametrize("burst", [1, 2, 5, 20])
    def test_burst_slots_are_immediate(self, burst: int) -> None:
        clock = FakeMonotonic()
        limiter = ratelimit.RateLimiter(10, burst=burst, clock=clock)
        clock.now += 60
        got = waits(limiter, burst + 2)
        assert got[:burst] == [0.0] * burst
        assert got[burst:] == [0.1, 0.2]

    def test_burst_refills_only_with_time(self) -> None:
        clock = FakeMonotonic()
        limiter = ratelimit.RateLimiter(10, burst=5, clock=clock)
        clock.now += 60
        waits(limiter, 5)
        clock.now += 0.2  # two intervals of credit
        assert waits(limiter, 3) == [0.0, 0.0, 0.1]


class TestPause:
    """A 429's pause pushes every following slot past it."""

    def test_every_following_slot_is_after_the_pause(self) -> None:
        clock = FakeMonotonic()
        limiter = ratelimit.RateLimiter(10, clock=clock)
        limiter.pause(5)
        assert waits(limiter, 3) == [5.0, 5.1, 5.2]

    def test_a_burst_does_not_skip_the_pause(self) -> None:
        clock = FakeMonotonic()
        limiter = ratelimit.RateLimiter(10, burst=50, clock=clock)
        clock.now += 60
        limiter.pause(30)
        assert min(waits(limiter, 10)) == 30.0

    def test_paused_for_counts_down(self) -> None:
        clock = FakeMonotonic()
        limiter = ratelimit.RateLimiter(10, clock=clock)
        assert limiter.paused_for == 0.0
        limiter.pause(5)
        assert limiter.paused_for == 5.0
        clock.now += 2
        assert limiter.paused_for == pytest.approx(3.0)
        clock.now += 10
        assert limiter.paused_for == 0.0
        assert limiter.reserve() == 0.0

    def test_a_shorter_pause_does_not_shorten_a_longer_one(self) -> None:
        limiter = ratelimit.RateLimiter(10, clock=FakeMonotonic())
        limiter.pause(30)
        limiter.pause(2)
        assert limiter.paused_for == 30.0

    def test_a_longer_pause_extends(self) -> None:
        limiter = ratelimit.RateLimiter(10, clock=FakeMonotonic())
        limiter.pause(2)
        limiter.pause(30)
        assert limiter.reserve() == 30.0


class TestPauseHoldsWaitingRequests:
    """Requests that took a slot before a pause began do not start inside it either."""

    async def test_no_waiting_request_starts_inside_the_pause(self) -> None:
        timeline = FakeTimeline()
        limiter = ratelimit.RateLimiter(10, clock=timeline, sleep=timeline.sleep)
        limiter.reserve()  # a request that has just started
        tasks, started = await start_acquires(limiter, timeline, 40)
        await timeline.run(tasks, until=1000.05)
        assert started == []  # all 40 hold slots 1000.1 .. 1004.0
        limiter.pause(30)
        pause_end = timeline.now + 30
        await timeline.run(tasks)
        assert len(started) == 40
        assert min(started) >= pause_end
        assert started[0] == pytest.approx(pause_end)
        assert min(gaps(started)) >= 0.1 - EPSILON
        assert started[-1] - started[0] == pytest.approx(39 * 0.1)

    async def test_requests_before_the_pause_are_not_held(self) -> None:
        timeline = FakeTimeline()
        limiter = ratelimit.RateLimiter(10, clock=timeline, sleep=timeline.sleep)
        tasks, started = await start_acquires(limiter, timeline, 40)
        await timeline.run(tasks, until=1000.25)
        assert started == pytest.approx([1000.0, 1000.1, 1000.2])
        limiter.pause(30)
        await timeline.run(tasks)
        assert min(started[3:]) >= 1030.25
        assert min(gaps(started[3:])) >= 0.1 - EPSILON

    async def test_slots_after_a_short_pause_keep_their_place_and_spacing(self) -> None:
        timeline = FakeTimeline()
        limiter = ratelimit.RateLimiter(1, clock=timeline, sleep=timeline.sleep)
        limiter.reserve()
        tasks, started = await start_acquires(limiter, timeline, 40)  # slots 1001 .. 1040
        limiter.pause(10)  # covers 1001 .. 1009; 1010 onwards may start as planned
        await timeline.run(tasks)
        assert len(started) == 40
        assert min(started) >= 1010.0
        assert started[:31] == pytest.approx([1010.0 + i for i in range(31)])
        assert gaps(sorted(started)) == [1.0] * 39

    async def test_a_pause_during_the_pause_holds_them_again(self) -> None:
        timeline = FakeTimeline()
        limiter = ratelimit.RateLimiter(10, clock=timeline, sleep=timeline.sleep)
        limiter.reserve()
        tasks, started = await start_acquires(limiter, timeline, 20)
        limiter.pause(5)
        await timeline.run(tasks, until=1003.0)
        limiter.pause(30)
        await timeline.run(tasks)
        assert len(started) == 20
        assert min(started) >= 1033.0
        assert min(gaps(started)) >= 0.1 - EPSILON

    async def test_the_halved_rate_spaces_them_after_the_pause(self) -> None:
        timeline = FakeTimeline()
        limiter = ratelimit.RateLimiter(10, clock=timeline, sleep=timeline.sleep)
        limiter.reserve()
        tasks, started = await start_acquires(limiter, timeline, 10)
        limiter.pause(30)
        limiter.slow_down()
        await timeline.run(tasks)
        assert min(started) >= 1030.0
        # Rate 5/s, climbing back towards 10/s: never closer than the cap allows.
        assert min(gaps(started)) >= 0.1 - EPSILON
        assert started[1] - started[0] == pytest.approx(0.2, abs=0.01)

    async def test_acquire_without_a_pause_keeps_the_pace(self) -> None:
        timeline = FakeTimeline()
        limiter = ratelimit.RateLimiter(20, burst=3, clock=timeline, sleep=timeline.sleep)
        timeline.now += 60
        tasks, started = await start_acquires(limiter, timeline, 10)
        await timeline.run(tasks)
        assert gaps(started) == [0.0, 0.0] + [0.05] * 7
