"""A provider that fails, dawdles, throttles or answers off its contract costs time, never a video.

The real daemon runs in-process on loopback against the provider simulator, which answers with errors,
garbage, 404s or nothing at all. The outcome is read from the rows, the archive, the simulator's
counters and the daemon's log events.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from typing import Any

import pytest
from seedance_archiver import policy, simulator

from tests.helpers import (
    CADENCE_HIGH,
    CADENCE_LOW,
    FOREVER,
    SMALL,
    Launcher,
    assert_archived_intact,
    gaps,
    insert,
    no_crashes,
)

# A request already on its way when the daemon learns something (a 429) may still arrive this late.
IN_FLIGHT = 0.15


def no_op() -> dict[str, Any]:
    """A fault that changes nothing: it lets one poll through before the faults queued behind it."""
    return {"delay": 0}


class TestProviderUnavailable:
    """A provider that fails or dawdles costs the task time, never its place or its video."""

    FAILURES = 4

    @pytest.mark.parametrize(
        ("fault", "cause"),
        [
            ({"status": 503}, "the provider answered HTTP 503"),
            ({"drop": True}, "cannot reach the provider"),
            ({"delay": 2.0}, "the provider timed out"),
        ],
        ids=["5xx", "dropped", "timeout"],
    )
    async def test_failures_back_off_then_the_task_is_archived(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        fault: dict[str, Any],
        cause: str,
    ) -> None:
        """Each failure backs this task off further; it stays polling and is archived after."""
        tid = "video_flaky"
        # aiohttp resends an idempotent request once when a reused keep-alive connection drops
        # (a sound guard against keep-alive races), so one failed poll can use two drop faults:
        # queue enough, count failures on the daemon's side, and clear the rest after the last.
        dropped = bool(fault.get("drop"))
        sim.simulator.add_task(tid, ready_seconds=1.5, size=SMALL)
        sim.simulator.add_fault(tid, **no_op())  # the intake poll learns the deadline
        sim.simulator.add_fault(tid, **fault, times=self.FAILURES * (2 if dropped else 1))
        async with launch(request_timeout_seconds=0.5) as d:
            insert(d.rows, tid)
            await d.until(lambda: len(d.polls(tid)) >= 1, "the intake poll")
            await d.until(lambda: d.row(tid).expires_at is not None, "the intake outcome")
            deadline = d.row(tid).expires_at
            await d.until(lambda: len(d.polls(tid)) >= 1 + self.FAILURES, "the failing polls")
            # The outcome of the last failure is written while the task waits out its backoff.
            await d.until(lambda: d.row(tid).attempts == self.FAILURES, "the last failure")
            sim.simulator.faults[tid].clear()
            row = d.row(tid)
            assert row.state == "polling"
            assert cause in (row.error or "")
            assert f"attempt {self.FAILURES}" in (row.error or "")
            assert row.expires_at == deadline  # it keeps its place in the deadline order
            assert row.next_attempt_at is not None and row.last_polled_at is not None
            wait = (row.next_attempt_at - row.last_polled_at).total_seconds()
            floor = CADENCE_LOW * 2 ** (self.FAILURES - 1) / 2  # doubled three times, jittered
            assert wait >= floor - 0.01, wait
            await d.until_state(tid, "archived")
            assert d.svc.stats.poll_errors == self.FAILURES
        # The wait the daemon set after the last failure is longer than the mode's cadence: the
        # backoff grew (how it doubles is proven on a moved clock, in tests/unit/test_service.py).
        assert floor > CADENCE_HIGH
        assert_archived_intact(d, tid, SMALL)
        assert d.row(tid).attempts == 0

    async def test_slow_answers_are_no_failure_and_hold_up_no_other_task(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """An answer slower than usual but inside the timeout is an answer; others go on meanwhile."""
        slow, brisk = "video_slow", "video_brisk"
        # Ready only well after its slow answers: a busy machine that spaces the polls out can
        # still not find it finished before its third poll.
        sim.simulator.add_task(slow, ready_seconds=4.0, size=SMALL)
        sim.simulator.add_task(brisk, ready_seconds=3.0, size=SMALL)
        sim.simulator.add_fault(slow, **no_op())
        sim.simulator.add_fault(slow, delay=1.5, times=2)
        async with launch(request_timeout_seconds=5) as d:
            insert(d.rows, slow)
            insert(d.rows, brisk)
            await d.until_state(slow, "archived")
            await d.until_state(brisk, "archived")
            assert d.svc.stats.poll_errors == 0
        assert_archived_intact(d, slow, SMALL)
        assert_archived_intact(d, brisk, SMALL)
        slow_polls = d.polls(slow)
        assert len(slow_polls) >= 3
        # The slow answer took its 1.5 s; the task's next poll waited for it (no overlap).
        assert gaps(slow_polls)[1] >= 1.5
        # While the slow answer was on its way (until the slow task's next poll), brisk was polled.
        start, end = slow_polls[1], slow_polls[2]
        assert any(start < x < end for x in d.polls(brisk)), "brisk waited for slow"


class TestRateLimited:
    """A 429 pauses every request of the daemon, lowers its pace, and the pace comes back."""

    BUSY = tuple(f"video_busy{i}" for i in range(4))

    @pytest.mark.parametrize("retry_after", ["seconds", "http-date", "absent"])
    async def test_429_pauses_every_request_and_slows_the_pace(
        self, launch: Launcher, sim: simulator.SimulatorThread, retry_after: str
    ) -> None:
        """No task at all is polled until the pause is over; the rate halves, then recovers."""
        for tid in self.BUSY:
            sim.simulator.add_task(tid, ready_seconds=3600)
        sim.simulator.add_task("video_429", ready_seconds=3600)
        async with launch(recovery_seconds=3.0) as d:
            for tid in self.BUSY:
                insert(d.rows, tid)
            await d.until(
                lambda: all(len(d.polls(tid)) >= 2 for tid in self.BUSY), "steady polling"
            )
            resume_at: float | None = None
            if retry_after == "seconds":
                sim.simulator.add_fault("video_429", status=429, retry_after=2)
            elif retry_after == "http-date":
                resume_at = math.ceil(time.time()) + 3.0
                when = email.utils.formatdate(resume_at, usegmt=True)
                sim.simulator.add_fault("video_429", status=429, retry_after=when)
            else:
                sim.simulator.add_fault("video_429", status=429)
            insert(d.rows, "video_429")
            await d.until(lambda: d.svc.stats.rate_limited == 1, "the 429")
            limiter = d.svc.limiter
            assert limiter.rate <= limiter.max_rate * 0.6, "the pace did not drop"
            hit = d.polls("video_429")[0]
            # Its outcome is written at the next tick, well inside the pause.
            await d.until(lambda: d.row("video_429").attempts == 1, "the 429 outcome")
            row = d.row("video_429")
            pause = {"seconds": 2.0, "absent": 1.0}.get(retry_after)
            resume = resume_at if pause is None else hit + pause
            assert resume is not None  # the http-date case set it above
            await d.until(lambda: any(x > resume + 0.5 for x in d.all_polls()), "polling to resume")
            # The pace climbs back to the configured cap.
            await d.until(lambda: limiter.rate >= limiter.max_rate, "the rate to recover", 10)
        during = [x for x in d.all_polls() if hit + IN_FLIGHT < x < resume - 0.1]
        assert during == [], f"{len(during)} polls during the pause"
        assert row.state == "polling" and row.attempts == 1
        assert "HTTP 429" in (row.error or "")
        assert row.next_attempt_at is not None and row.last_polled_at is not None
        # That task itself comes back no sooner than the pause allows.
        wait = (row.next_attempt_at - row.last_polled_at).total_seconds()
        assert wait >= resume - hit - 0.2
        assert d.svc.stats.rate_limited == 1


MALFORMED = {
    "video_notjson": ("{not json", "the body is not JSON"),
    "video_noid": ('{"status": "queued"}', "field 'id' is missing"),
    "video_badtype": (
        '{"id": "video_badtype", "status": 7}',
        "'status' is missing or not a string",
    ),
    "video_badlink": (
        '{"id": "video_badlink", "status": "completed", "video_url": "not a link"}',
        "video_url is not a valid URL",
    ),
    "video_otherid": ('{"id": "video_someone_else", "status": "queued"}', "not the one asked for"),
    "video_unknown": ('{"id": "video_unknown", "status": "exploded"}', "unknown status"),
}


class TestMalformedAnswers:
    """An answer off the contract is named in `error`; the task keeps its cadence, no backoff."""

    MIN_BAD_POLLS = 5

    async def test_each_kind_is_named_and_polled_at_the_cadence(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """Not JSON, missing field, wrong type, another id, unknown status: all retried at cadence."""
        for tid, (body, _) in MALFORMED.items():
            sim.simulator.add_task(tid, ready_seconds=0, size=SMALL)
            sim.simulator.add_fault(tid, body=body, times=FOREVER)
        async with launch() as d:
            for tid in MALFORMED:
                insert(d.rows, tid)
            await d.until(
                lambda: all(len(d.polls(tid)) >= self.MIN_BAD_POLLS for tid in MALFORMED),
                "repeated malformed answers",
            )
            await d.until(
                lambda: all(d.row(tid).attempts >= self.MIN_BAD_POLLS - 1 for tid in MALFORMED),
                "their outcomes",
            )
            rows = {tid: d.row(tid) for tid in MALFORMED}
            for tid in MALFORMED:
                sim.simulator.faults[tid].clear()
            for tid in MALFORMED:
                await d.until_state(tid, "archived")
            counted = d.svc.stats.malformed
        for tid, (_, what) in MALFORMED.items():
            row = rows[tid]
            assert row.state == "polling", (tid, row.state)
            assert what in (row.error or ""), (tid, row.error)
            # The daemon scheduled the next poll within the mode's cadence: no backoff growth.
            # (That no poll comes sooner than the cadence is proven on a moved clock.)
            assert row.next_attempt_at is not None and row.last_polled_at is not None
            scheduled = (row.next_attempt_at - row.last_polled_at).total_seconds()
            assert CADENCE_LOW - 0.01 <= scheduled <= CADENCE_HIGH + 0.01, (tid, scheduled)
            logged = d.events("malformed_answer", tid)
            assert len(logged) >= self.MIN_BAD_POLLS and all(what in e["error"] for e in logged)
            assert_archived_intact(d, tid, SMALL)
        assert counted == len(d.events("malformed_answer"))
        assert counted >= self.MIN_BAD_POLLS * len(MALFORMED)

    @pytest.mark.parametrize(
        "bad_url",
        ["https://xn--a.com/v.mp4", "https://exa mple.com/v.mp4", "https://[::1/v.mp4"],
    )
    async def test_an_invalid_video_url_is_a_malformed_answer(
        self, launch: Launcher, sim: simulator.SimulatorThread, bad_url: str
    ) -> None:
        tid = "video_bad_url"
        sim.simulator.add_task(tid, ready_seconds=0, size=SMALL)
        body = json.dumps({"id": tid, "status": "completed", "video_url": bad_url})
        sim.simulator.add_fault(tid, body=body, times=2)
        async with launch() as d:
            insert(d.rows, tid)
            await d.until_state(tid, "archived")
            assert len(d.events("malformed_answer", tid)) == 2
            no_crashes(d)
        assert_archived_intact(d, tid, SMALL)


class TestNotFound:
    """A 404 rejects an id never seen, after brief retries; after it was seen it expires the task."""

    async def test_never_seen_is_rejected_after_brief_retries(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """A task the provider never knew gets NOT_FOUND_POLLS polls, then `rejected`."""
        tid = "video_never_created"
        async with launch() as d:
            insert(d.rows, tid)
            row = await d.until_state(tid, "rejected")
            assert d.svc.stats.polls == policy.NOT_FOUND_POLLS
        assert sim.simulator.stats.polls[tid] == policy.NOT_FOUND_POLLS
        assert row.polls == policy.NOT_FOUND_POLLS
        assert row.error is not None and policy.NOT_FOUND_REASON in row.error
        assert f"404 on {policy.NOT_FOUND_POLLS} polls" in row.error
        # That the retries come at the cadence, with no back-off, is proven on a moved clock
        # (tests/unit/test_service.py, test_unknown_id_is_rejected_after_a_few_polls).

    async def test_seen_then_gone_is_expired_after_several_of_its_own_404s(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """A task the provider knew and then deleted answers its own JSON 404: `expired` after
        NOT_FOUND_POLLS of them in a row, spread over the mode's longest interval, never at one."""
        tid = "video_deleted_early"
        sim.simulator.add_task(tid, ready_seconds=3600)
        async with launch() as d:
            insert(d.rows, tid)
            await d.until(lambda: d.row(tid).provider_status is not None, "a first answer")
            seen = len(d.polls(tid))
            del sim.simulator.tasks[tid]
            await d.until(lambda: len(d.polls(tid)) > seen, "a first 404")
            await d.until(lambda: d.row(tid).polls > seen, "its outcome")
            after_one = d.row(tid)
            row = await d.until_state(tid, "expired")
        assert after_one.state == "polling"
        assert (after_one.error or "").startswith(policy.GONE_REASON)
        gone = d.polls(tid)[seen:]
        assert len(gone) == policy.NOT_FOUND_POLLS
        assert gone[-1] - gone[0] >= CADENCE_HIGH - 0.05
        assert row.error is not None and row.error.startswith(policy.GONE_REASON)
        assert f"its own 404 on {policy.NOT_FOUND_POLLS} polls in a row" in row.error
        assert row.polls == len(d.polls(tid))


class TestCompletedWithoutVideo:
    """`completed` without a video_url is polled again at the cadence and archived later."""

    async def test_polled_again_then_archived(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """The row says what is missing and stays polling; the link arrives; the video is archived."""
        tid = "video_no_link_yet"
        created = time.time() - 60
        sim.simulator.add_task(tid, created=created, ready_seconds=1, size=SMALL)
        body = {
            "id": tid,
            "object": "video",
            "created": int(created),
            "model": "seedance_1_5_pro_720p",
            "status": "completed",
            "video_url": None,
            "actualDuration": 5.0,
            "error": None,
        }
        sim.simulator.add_fault(tid, body=json.dumps(body), times=FOREVER)
        async with launch() as d:
            insert(d.rows, tid)
            await d.until(lambda: len(d.polls(tid)) >= 4, "repeated polls")
            await d.until(lambda: d.row(tid).polls >= 3, "their outcomes")
            row = d.row(tid)
            assert sim.simulator.stats.downloads_started[tid] == 0
            sim.simulator.faults[tid].clear()
            await d.until_state(tid, "archived")
        assert row.state == "polling" and row.provider_status == "completed"
        assert "no video_url" in (row.error or "")
        # Polled again within the mode's cadence (tests/unit/test_policy.py proves it on any draw).
        assert row.next_attempt_at is not None and row.last_polled_at is not None
        assert (row.next_attempt_at - row.last_polled_at).total_seconds() <= CADENCE_HIGH + 0.01
        assert_archived_intact(d, tid, SMALL)
