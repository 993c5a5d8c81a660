"""A download that breaks or is refused is never archived half: it is retried, then archived.

The real daemon runs in-process against the provider simulator, whose video host truncates, lies about
lengths, answers 5xx or refuses links. (A download cut at SEEDANCE_MAX_DOWNLOAD_SECONDS is proven on
the fakes: ``tests/unit/test_service.py``, ``TestDownloadDeadline``.)
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from seedance_archiver import policy, simulator, utils

from tests.helpers import (
    FOREVER,
    SMALL,
    Launcher,
    assert_archived_intact,
    insert,
    leftovers,
)


class TestBrokenDownloads:
    """A download that breaks is never archived; it is retried and archived intact later."""

    @pytest.mark.parametrize(
        ("fault", "cause"),
        [
            ({"truncate_at": 40_000}, "broke off"),
            ({"claim_length": SMALL + 4096}, "broke off"),
            ({"status": 503}, "the video host answered HTTP 503"),
        ],
        ids=["truncated", "content-length-too-big", "5xx"],
    )
    async def test_retried_and_archived_intact(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        fault: dict[str, Any],
        cause: str,
    ) -> None:
        """While it breaks the row stays downloading with the cause; no bad byte is ever committed."""
        tid = "video_bad_download"
        sim.simulator.add_task(tid, ready_seconds=0.5, size=SMALL)
        sim.simulator.add_fault(tid, on="download", **fault, times=FOREVER)
        async with launch() as d:
            insert(d.rows, tid)
            await d.until(lambda: d.row(tid).attempts >= 2, "two failed downloads")
            row = d.row(tid)
            assert not (d.archive_dir / f"{tid}.mp4").exists()
            sim.simulator.faults[tid].clear()
            await d.until_state(tid, "archived")
        assert row.state == "downloading", (row.state, row.error)
        assert cause in (row.error or "")
        assert row.video_url is not None  # the link is kept for the retry
        assert_archived_intact(d, tid, SMALL)
        assert sim.simulator.stats.downloads_completed[tid] == 1
        assert leftovers(d.archive_dir) == []
        failures = d.events("video_download_failed", tid)
        assert len(failures) >= 2 and all(cause in e["error"] for e in failures)

    async def test_larger_than_the_limit_waits_until_the_setting_is_raised(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """A video above SEEDANCE_MAX_VIDEO_BYTES waits, downloading, with the reason; raised and
        restarted, the daemon archives it with no row touched."""
        tid = "video_huge"
        sim.simulator.add_task(tid, ready_seconds=0, size=256 * 1024)
        async with launch(max_video_bytes=100_000) as d:
            insert(d.rows, tid)
            await d.until(
                lambda: (d.row(tid).error or "").startswith(policy.WAITING_ON_SETTING),
                "the row to wait on the setting",
            )
            row = d.row(tid)
            await d.svc.maintenance.refresh_gauges()
            waiting = d.svc.metrics.registry.get_sample_value("seedance_tasks_waiting_on_setting")
        assert row.state == "downloading" and row.video_url is not None
        assert row.error is not None and "SEEDANCE_MAX_VIDEO_BYTES" in row.error
        assert row.next_attempt_at is not None and row.last_polled_at is not None
        assert (row.next_attempt_at - utils.utcnow()).total_seconds() > 0  # a slow schedule
        assert waiting == 1
        assert not (d.archive_dir / f"{tid}.mp4").exists()
        assert leftovers(d.archive_dir) == []
        polls = sim.simulator.stats.polls[tid]
        async with launch(max_video_bytes=1_000_000) as d:
            await d.until_state(tid, "archived")
        assert_archived_intact(d, tid, 256 * 1024)
        assert sim.simulator.stats.polls[tid] == polls  # the same link, no poll needed

    @pytest.mark.parametrize("refusal", ["403-expired-signature", "404"])
    async def test_expired_link_polls_for_a_fresh_one(
        self, launch: Launcher, sim: simulator.SimulatorThread, refusal: str
    ) -> None:
        """A refused link sends the task back to polling; the next poll's fresh link is archived."""
        tid = "video_stale_link"
        refused = policy.LINK_REFUSALS - 1  # the most that are not the provider's word
        if refusal == "404":
            sim.simulator.add_task(tid, created=time.time() - 60, ready_seconds=1, size=SMALL)
            sim.simulator.add_fault(tid, on="download", status=404, times=refused)
        else:
            sim.simulator.add_task(
                tid, created=time.time() - 60, ready_seconds=1, size=SMALL, stale_links=refused
            )
        async with launch() as d:
            insert(d.rows, tid)
            await d.until_state(tid, "archived")
        failures = d.events("video_link_expired", tid)
        code = "404" if refusal == "404" else "403"
        assert len(failures) == refused
        assert all(f"HTTP {code}" in e["error"] for e in failures)
        # Each refused link cost one more poll (no sooner than the cadence allows: proven on a
        # moved clock, tests/unit/test_service.py test_expired_link_polls_again_for_a_fresh_one).
        assert len(d.polls(tid)) == refused + 1
        assert_archived_intact(d, tid, SMALL)
        assert sim.simulator.stats.downloads_completed[tid] == 1

    async def test_fresh_links_refused_again_and_again_end_it_expired(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """The provider hands out links its host refuses every time: its word that the video is
        gone. `expired` after LINK_REFUSALS fresh links, with nothing stored."""
        tid = "video_link_never_works"
        sim.simulator.add_task(tid, created=time.time() - 60, ready_seconds=1, size=SMALL)
        sim.simulator.add_fault(tid, on="download", status=410, times=FOREVER)
        async with launch() as d:
            insert(d.rows, tid)
            row = await d.until_state(tid, "expired")
        assert row.error is not None and row.error.startswith(policy.LINK_GONE_REASON)
        assert len(d.events("video_link_expired", tid)) == policy.LINK_REFUSALS
        assert len(d.polls(tid)) == policy.LINK_REFUSALS
        assert not (d.archive_dir / f"{tid}.mp4").exists()
