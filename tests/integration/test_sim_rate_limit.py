"""The simulator's provider-side rate limit, over real HTTP: beyond it a poll gets 429."""

from __future__ import annotations

import httpx
from seedance_archiver import simulator

from tests.helpers import SIM_KEY


def test_polls_beyond_the_limit_get_429_with_retry_after() -> None:
    # One token, refilled every 100 s: the first poll passes, the next ones cannot.
    sim = simulator.Simulator(api_key=SIM_KEY, rate_limit=0.01)
    sim.add_task("video_limited", ready_seconds=1e9)
    with simulator.SimulatorThread(sim) as server:
        headers = {"Authorization": f"Bearer {SIM_KEY}"}
        replies = [
            httpx.get(f"{server.url}/v1/result/video_limited", headers=headers, timeout=10)
            for _ in range(3)
        ]
        stats = httpx.get(f"{server.url}/_sim/stats", timeout=10).json()
    assert [r.status_code for r in replies] == [200, 429, 429]
    assert replies[1].headers["Retry-After"] == "1"
    assert stats["rate_limited"] == 2


def test_no_limit_by_default() -> None:
    sim = simulator.Simulator(api_key=SIM_KEY)
    sim.add_task("video_free", ready_seconds=1e9)
    with simulator.SimulatorThread(sim) as server:
        headers = {"Authorization": f"Bearer {SIM_KEY}"}
        codes = [
            httpx.get(f"{server.url}/v1/result/video_free", headers=headers, timeout=10).status_code
            for _ in range(5)
        ]
    assert codes == [200] * 5
