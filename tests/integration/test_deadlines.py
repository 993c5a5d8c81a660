"""Rows nearest their deadline go first, and a deadline passing ends nothing on our clock."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from seedance_archiver import scheduler, simulator, utils

from tests.helpers import (
    SMALL,
    Launcher,
    assert_archived_intact,
    feed,
    insert,
)


class TestDeadlineOrder:
    """Rows closest to their deadline go first; a deadline that passes ends the row `expired`."""

    async def test_due_rows_are_polled_nearest_deadline_first(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Under a tight rate limit, polls start in deadline order, not insert or due order."""
        monkeypatch.setattr(scheduler, "RATE_BURST", 1)  # one request per slot, no catch-up burst
        count = 8
        ids = [f"video_order{i}" for i in range(count)]
        hours = list(range(1, count + 1))
        random.Random(4).shuffle(hours)
        now = utils.utcnow()
        for tid in ids:
            sim.simulator.add_task(tid, ready_seconds=3600)
        feed(
            launch.db_url,
            *(
                {
                    "task_id": tid,
                    "state": "polling",
                    "provider_status": "processing",
                    "expires_at": now + dt.timedelta(hours=h),
                    # Due in the opposite order: the nearest deadline has waited the least.
                    "next_attempt_at": now - dt.timedelta(seconds=h),
                }
                for tid, h in zip(ids, hours, strict=True)
            ),
        )
        # The mode's longest interval (60 s) is far above how overdue any row gets here: no row
        # counts as starving, which the budget would serve first (longest overdue first).
        async with launch(max_requests_per_second=2, poll_standard="30-60") as d:
            await d.until(lambda: all(d.polls(tid) for tid in ids), "every row polled", 20)
        first = {tid: d.polls(tid)[0] for tid in ids}
        by_deadline = [tid for _, tid in sorted(zip(hours, ids, strict=True))]
        # The cap spaces the polls half a second apart (tests/unit/test_ratelimit.py proves its
        # spacing), so the simulator sees them in the order the daemon started them.
        assert sorted(ids, key=first.__getitem__) == by_deadline

    async def test_past_its_deadline_a_served_video_is_archived(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """A row whose deadline is behind it is polled; the provider still has the video: archived."""
        tid = "video_too_late"
        sim.simulator.add_task(tid, queued_seconds=0, ready_seconds=0, size=SMALL)
        past = utils.utcnow() - dt.timedelta(minutes=5)
        feed(
            launch.db_url,
            {
                "task_id": tid,
                "state": "polling",
                "provider_status": "processing",
                "provider_created_at": past - dt.timedelta(days=1),
                "expires_at": past,
            },
        )
        async with launch() as d:
            await d.until_state(tid, "archived")
        assert sim.simulator.stats.polls[tid] == 1
        assert_archived_intact(d, tid, SMALL)

    async def test_a_deadline_passing_ends_nothing(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """A task still processing at its deadline is polled on, and archived when it is done."""
        tid = "video_slowpoke"
        sim.simulator.add_task(tid, ready_seconds=4, size=SMALL)
        async with launch(retention_seconds=2) as d:
            insert(d.rows, tid)
            row = await d.until_state(tid, "archived", 30)
        assert row.expires_at is not None and row.completed_at is not None
        assert row.completed_at > row.expires_at
        assert any(x > row.expires_at.timestamp() for x in d.polls(tid))
        assert_archived_intact(d, tid, SMALL)
