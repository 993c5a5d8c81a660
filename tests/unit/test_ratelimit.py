"""The global request pacer, driven by a hand-moved monotonic clock."""

from __future__ import annotations

import pytest

from daemon import ratelimit


class FakeMonotonic:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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
