"""The simulator's answers, encoded once per status: the same answer each time, a new status when the
task moves on, and a completed task's link signed anew."""

from __future__ import annotations

import httpx
from seedance_archiver import simulator

from tests.helpers import SIM_KEY


def test_answers_follow_the_status_and_links_stay_fresh() -> None:
    sim = simulator.Simulator(api_key=SIM_KEY)
    # Queued until the test moves it on: no phase of it ends by the clock, however slow the machine.
    sim.add_task("video_moving", queued_seconds=1e9, ready_seconds=2e9)
    sim.add_task("video_refused", outcome="failed", queued_seconds=0, ready_seconds=0)
    with simulator.SimulatorThread(sim) as server:

        def poll(task_id: str) -> httpx.Response:
            return httpx.get(
                f"{server.url}/v1/result/{task_id}",
                headers={"Authorization": f"Bearer {SIM_KEY}"},
                timeout=10,
            )

        first, second = poll("video_moving"), poll("video_moving")
        sim.tasks["video_moving"].queued_seconds = 0  # processing from now on
        processing = poll("video_moving")
        sim.tasks["video_moving"].ready_seconds = 0  # and now complete
        done = poll("video_moving")
        refused = poll("video_refused")

    assert first.headers["Content-Type"] == "application/json; charset=utf-8"
    assert first.json() == second.json()
    assert first.json()["status"] == "queued" and first.json()["video_url"] is None
    assert processing.json()["status"] == "processing"
    assert done.json()["status"] == "completed"
    assert done.json()["video_url"].startswith(f"{server.url}/files/video_moving.mp4?expires=")
    assert done.json()["actualDuration"] == 5.0
    assert refused.json()["status"] == "failed"
    assert refused.json()["error"] == "content policy violation"


def test_videos_are_mp4_shaped_and_each_task_its_own() -> None:
    """Made of one shared random block (made per task, it cost more CPU than a bare downloader
    spends on the video), yet no two tasks' videos, nor two blocks of one, are alike."""
    size = 2 * simulator.VIDEO_BLOCK_BYTES + 10
    one = b"".join(simulator.video_chunks("video_one", size))
    again = b"".join(simulator.video_chunks("video_one", size))
    other = b"".join(simulator.video_chunks("video_two", size))
    assert len(one) == len(other) == size
    assert one == again
    assert one != other
    assert one[4:8] == b"ftyp"
    blocks = [
        one[i : i + simulator.VIDEO_BLOCK_BYTES]
        for i in range(0, size, simulator.VIDEO_BLOCK_BYTES)
    ]
    assert len(set(blocks)) == len(blocks)
