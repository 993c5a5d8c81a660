"""Faults and bad input: nothing lost, nothing corrupt, nothing let in.

Every test makes something really misbehave while the real daemon runs in-process on loopback: the
provider simulator answers with errors, garbage or nothing; moto's S3 or PostgreSQL sits behind a fault
proxy that refuses, stalls or cuts; or the feeding application inserts hostile rows. The outcome is read
from the rows, the archive, the simulator's counters and the daemon's log events.

The PostgreSQL outage lasts ``PG_OUTAGE_SECONDS`` (10 s by default, to keep ``make test`` short); a
minute-long outage is the same test run with ``SEEDANCE_TEST_PG_OUTAGE_SECONDS=60``.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import itertools
import json
import math
import os
import pathlib
import random
import time
import urllib.parse
from typing import Any

import botocore.exceptions
import pytest
import sqlalchemy as sa
from seedance_archiver import (
    keygate,
    models,
    policy,
    scheduler,
    simulator,
    store,
)
from seedance_archiver.archive import folder, s3
from seedance_archiver.providers import reseller

from tests.conftest import SIM_KEY, free_port
from tests.helpers import (
    CADENCE_HIGH,
    CADENCE_LOW,
    DOWNLOAD_RETRY_SECONDS,
    FOREVER,
    MIB,
    S3_PREFIX,
    Launcher,
    assert_archived_intact,
    insert,
    readyz,
    s3_key,
    s3_sha256,
    s3_uploads,
    via_proxy,
)
from tests.integration.faultproxy import FaultProxy

# A due row waits for the next tick, and a busy two-core machine adds a little more.
LATE = 0.35
# A request already on its way when the daemon learns something (a 429) may still arrive this late.
IN_FLIGHT = 0.15
SMALL = 64 * 1024
PG_OUTAGE_SECONDS = float(os.environ.get("SEEDANCE_TEST_PG_OUTAGE_SECONDS", "10"))

t = models.video_tasks


# --- rows, as a feeding application writes them ---------------------------------------------------


def feed(url: str, *rows: dict[str, Any]) -> None:
    """Insert rows in one transaction before the daemon starts (or all at once while it runs)."""
    feeder = store.SqlStore.from_url(url)
    try:
        with feeder.engine.begin() as conn:
            for row in rows:
                conn.execute(sa.insert(t).values(**row))
    finally:
        feeder.close()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def no_op() -> dict[str, Any]:
    """A fault that changes nothing: it lets one poll through before the faults queued behind it."""
    return {"delay": 0}


def leftovers(archive_dir: pathlib.Path) -> list[str]:
    incoming = archive_dir / folder.INCOMING_DIR
    return sorted(p.name for p in incoming.iterdir()) if incoming.is_dir() else []


# --- 1. 5xx, dropped connections, timeouts, slow answers ------------------------------------------


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
        # The wait after the last failure is longer than the mode's cadence: the backoff grew.
        assert floor > CADENCE_HIGH + LATE
        if not dropped:  # with drops the simulator also sees the client's one resend
            assert gaps(d.polls(tid))[self.FAILURES] >= floor - 0.05
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


# --- 2. 429 ---------------------------------------------------------------------------------------


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
            resume_at = resume_at if pause is None else hit + pause
            await d.until(
                lambda: any(x > resume_at + 0.5 for x in d.all_polls()), "polling to resume"
            )
            # The pace climbs back to the configured cap.
            await d.until(lambda: limiter.rate >= limiter.max_rate, "the rate to recover", 10)
        during = [x for x in d.all_polls() if hit + IN_FLIGHT < x < resume_at - 0.1]
        assert during == [], f"{len(during)} polls during the pause"
        assert row.state == "polling" and row.attempts == 1
        assert "HTTP 429" in (row.error or "")
        assert row.next_attempt_at is not None and row.last_polled_at is not None
        # That task itself comes back no sooner than the pause allows.
        wait = (row.next_attempt_at - row.last_polled_at).total_seconds()
        assert wait >= resume_at - hit - 0.2
        assert d.svc.stats.rate_limited == 1


# --- 3. 401/403 -----------------------------------------------------------------------------------


class TestKeyRejected:
    """A rejected key pauses polling to one key check at a time, gives no task up, and resumes."""

    IDS = ("video_k1", "video_k2", "video_k3")
    PROBE_SECONDS = 1.0
    BLOCKED_SECONDS = 3.5

    @pytest.mark.parametrize("code", [401, 403])
    async def test_polling_pauses_to_key_checks_and_resumes_when_the_key_works(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        monkeypatch: pytest.MonkeyPatch,
        code: int,
    ) -> None:
        """One key check per AUTH_PROBE_SECONDS, each logged loudly; rows untouched; then resume."""
        monkeypatch.setattr(keygate.KeyGate, "AUTH_PROBE_SECONDS", self.PROBE_SECONDS)
        for tid in self.IDS:
            sim.simulator.add_task(tid, ready_seconds=3600, size=SMALL)
        port = free_port()
        probe = reseller.KEY_CHECK_TASK_ID

        def task_polls() -> int:
            return sum(sim.simulator.stats.polls[tid] for tid in self.IDS)

        async with launch(http_port=port) as d:
            for tid in self.IDS:
                insert(d.rows, tid)
            await d.until(
                lambda: all(d.state(tid) == "polling" for tid in self.IDS), "the intake polls"
            )
            assert (await readyz(port))[0] == 200
            if code == 401:
                sim.simulator.api_key = "a-rotated-key"  # the daemon's key no longer works
            else:
                sim.simulator.add_fault("*", status=403, times=FOREVER)
            await d.until(lambda: d.svc.keygate.blocked, "the block")
            blocked_at = time.time()
            # Outcomes of polls answered just before the key broke are written by the next ticks.
            await d.until(lambda: time.time() >= blocked_at + 0.5, "pending writes")
            before = {tid: d.row(tid) for tid in self.IDS}
            polls, checks, since = task_polls(), sim.simulator.stats.polls[probe], time.time()
            await d.until(lambda: time.time() - since >= self.BLOCKED_SECONDS, "the blocked window")
            assert d.svc.keygate.blocked
            assert task_polls() == polls  # no task was polled while the key is rejected
            key_checks = sim.simulator.stats.polls[probe] - checks
            after = {tid: d.row(tid) for tid in self.IDS}
            status, body = await readyz(port)
            assert status == 503 and body["checks"]["api_key"] != "ok", body

            # The key works again: the next key check lifts the block and every task is archived.
            for tid in self.IDS:
                sim.simulator.tasks[tid].ready_seconds = 0
            if code == 401:
                sim.simulator.api_key = SIM_KEY
            else:
                sim.simulator.faults["*"].clear()
            await d.until(
                lambda: not d.svc.keygate.blocked, "the block to lift", self.PROBE_SECONDS + 12
            )
            for tid in self.IDS:
                await d.until_state(tid, "archived")
            assert d.events("api_key_accepted_again")
            assert (await readyz(port))[0] == 200
        rejections = d.events("api_key_rejected")
        assert len(rejections) >= 2
        assert all(e["log_level"] == "error" for e in rejections)
        assert all("SEEDANCE_API_KEY" in e["action"] for e in rejections)
        # Three tasks at a 0.3-0.6 s cadence would make ~20 polls in the window: only key checks
        # came, spaced by the probe interval.
        assert 1 <= key_checks <= self.BLOCKED_SECONDS / self.PROBE_SECONDS + 1.5, key_checks
        checks_at = [x for x in d.polls(probe) if since <= x <= since + self.BLOCKED_SECONDS]
        assert all(g >= self.PROBE_SECONDS - 0.1 for g in gaps(checks_at)), checks_at
        # No task changed while blocked, and none was given up.
        for tid in self.IDS:
            fields = ("state", "attempts", "polls", "error", "next_attempt_at")
            assert [getattr(after[tid], f) for f in fields] == [
                getattr(before[tid], f) for f in fields
            ]
            assert before[tid].state == "polling" and before[tid].attempts == 0
            assert_archived_intact(d, tid, SMALL)


# --- 4. malformed answers -------------------------------------------------------------------------

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
            bad_polls = {tid: d.polls(tid) for tid in MALFORMED}
            for tid in MALFORMED:
                sim.simulator.faults[tid].clear()
            for tid in MALFORMED:
                await d.until_state(tid, "archived")
            counted = d.svc.stats.malformed
        for tid, (_, what) in MALFORMED.items():
            row = rows[tid]
            assert row.state == "polling", (tid, row.state)
            assert what in (row.error or ""), (tid, row.error)
            waits = gaps(bad_polls[tid])
            # Never faster than the mode allows, and scheduled within its cadence: no backoff
            # growth. Arrivals are the simulator's: one poll sent late on a busy machine shortens
            # the gap after it as much as it lengthens the one before, so their mean holds where
            # a single gap may not (one of 0.08 s was seen under the whole suite's load).
            assert sum(waits) / len(waits) >= CADENCE_LOW - 0.05, (tid, waits)
            assert row.next_attempt_at is not None and row.last_polled_at is not None
            scheduled = (row.next_attempt_at - row.last_polled_at).total_seconds()
            assert CADENCE_LOW - 0.01 <= scheduled <= CADENCE_HIGH + 0.01, (tid, scheduled)
            logged = d.events("malformed_answer", tid)
            assert len(logged) >= self.MIN_BAD_POLLS and all(what in e["error"] for e in logged)
            assert_archived_intact(d, tid, SMALL)
        assert counted == len(d.events("malformed_answer"))
        assert counted >= self.MIN_BAD_POLLS * len(MALFORMED)


# --- 5. 404 and deadlines -------------------------------------------------------------------------


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
        polls = d.polls(tid)
        assert polls[-1] - polls[0] < 5.0  # brief
        assert all(g >= CADENCE_LOW - 0.05 for g in gaps(polls))

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

    async def test_past_its_deadline_a_served_video_is_archived(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """A row whose deadline is behind it is polled; the provider still has the video: archived."""
        tid = "video_too_late"
        sim.simulator.add_task(tid, queued_seconds=0, ready_seconds=0, size=SMALL)
        past = utcnow() - dt.timedelta(minutes=5)
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


# --- 6. completed without video_url ---------------------------------------------------------------


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
            linkless = d.polls(tid)
            assert sim.simulator.stats.downloads_started[tid] == 0
            sim.simulator.faults[tid].clear()
            await d.until_state(tid, "archived")
        assert row.state == "polling" and row.provider_status == "completed"
        assert "no video_url" in (row.error or "")
        assert all(g >= CADENCE_LOW - 0.05 for g in gaps(linkless))
        assert row.next_attempt_at is not None and row.last_polled_at is not None
        assert (row.next_attempt_at - row.last_polled_at).total_seconds() <= CADENCE_HIGH + 0.01
        assert_archived_intact(d, tid, SMALL)


# --- 7. downloads ---------------------------------------------------------------------------------


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
        assert (row.next_attempt_at - utcnow()).total_seconds() > 0  # a slow schedule
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
        # Each refused link cost one more poll, never sooner than the cadence allows.
        polls = d.polls(tid)
        assert len(polls) == refused + 1
        assert all(g >= CADENCE_LOW - 0.05 for g in gaps(polls))
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


# --- 8. S3 errors ---------------------------------------------------------------------------------

SERVICE_UNAVAILABLE = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@pytest.fixture
def s3_proxy(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fault proxy in front of moto; the daemon's boto3 client is pointed at it."""
    port = int(urllib.parse.urlsplit(s3_endpoint).port or 0)
    with FaultProxy(port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        yield proxy


def s3_missing(client: Any, bucket: str, task_id: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=s3_key(task_id))
    except botocore.exceptions.ClientError as exc:
        return exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound")
    return False


class TestS3Faults:
    """S3 failing, refusing or crawling costs time, never the video or a partial object."""

    @pytest.mark.parametrize("failure", ["refused", "503"])
    async def test_failing_s3_keeps_the_task_downloading_until_it_recovers(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        s3_proxy: FaultProxy,
        s3_client: Any,
        s3_bucket: str,
        failure: str,
    ) -> None:
        """The row waits in `downloading` with backoff and the cause; S3 back: archived once."""
        tid = "video_s3_down"
        sim.simulator.add_task(tid, ready_seconds=1.0, size=SMALL)
        async with launch(archive_url=f"s3://{s3_bucket}/{S3_PREFIX}") as d:
            if failure == "refused":
                s3_proxy.refuse()
            else:
                s3_proxy.answer(503, "Service Unavailable", SERVICE_UNAVAILABLE)
            insert(d.rows, tid)
            await d.until(lambda: d.row(tid).attempts >= 1, "a failed upload", 40)
            row = d.row(tid)
            assert s3_missing(s3_client, s3_bucket, tid)
            s3_proxy.forward()
            final = await d.until_state(tid, "archived", 40)
        assert row.state == "downloading"
        assert "S3" in (row.error or ""), row.error
        assert row.next_attempt_at is not None and row.updated_at is not None
        wait = (row.next_attempt_at - row.updated_at).total_seconds()
        assert wait >= DOWNLOAD_RETRY_SECONDS - 0.01
        expected = simulator.video_sha256(tid, SMALL)
        assert final.archive_uri == f"s3://{s3_bucket}/{s3_key(tid)}"
        assert final.archive_sha256 == expected == s3_sha256(s3_client, s3_bucket, tid)
        assert sim.simulator.stats.downloads_completed[tid] >= 1
        assert s3_uploads(s3_client, s3_bucket) == []

    async def test_slow_s3_only_delays_the_archive(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        s3_proxy: FaultProxy,
        s3_client: Any,
        s3_bucket: str,
    ) -> None:
        """S3 holding every byte for seconds: the task waits, is not failed, and is archived after."""
        tid = "video_s3_slow"
        stall = 3.0
        sim.simulator.add_task(tid, created=time.time() - 60, ready_seconds=1, size=SMALL)
        async with launch(archive_url=f"s3://{s3_bucket}/{S3_PREFIX}") as d:
            stalled_at = time.time()
            s3_proxy.stall(stall)
            insert(d.rows, tid)
            final = await d.until_state(tid, "archived", 30)
        assert final.polls == 1  # one poll, then it simply waited for S3
        assert final.archived_at is not None
        assert final.archived_at.timestamp() >= stalled_at + stall - 0.2
        assert final.archive_sha256 == s3_sha256(s3_client, s3_bucket, tid)
        assert final.archive_sha256 == simulator.video_sha256(tid, SMALL)
        assert d.svc.stats.download_failures == 0

    async def test_upload_cut_mid_multipart_leaves_nothing_behind(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        s3_proxy: FaultProxy,
        s3_client: Any,
        s3_bucket: str,
    ) -> None:
        """S3 gone in the middle of part 2: no object appears; the open upload is cleared, then
        the video is archived whole."""
        tid = "video_multipart"
        size = s3.PART_BYTES + 2 * MIB
        sim.simulator.add_task(tid, created=time.time() - 60, ready_seconds=1, size=size)
        async with launch(archive_url=f"s3://{s3_bucket}/{S3_PREFIX}") as d:
            s3_proxy.cut_after(s3.PART_BYTES + MIB)  # part 1 went through; part 2 breaks
            insert(d.rows, tid)
            await d.until(lambda: s3_proxy.cut_fired, "the cut", 30)
            await d.until(lambda: d.row(tid).attempts >= 1, "the failed upload", 40)
            row = d.row(tid)
            # The abort could not reach S3 either: the interrupted upload is still open, yet no
            # partial object is visible under the final key.
            open_uploads = s3_uploads(s3_client, s3_bucket, S3_PREFIX)
            assert s3_missing(s3_client, s3_bucket, tid)
            s3_proxy.forward()
            final = await d.until_state(tid, "archived", 40)
        assert row.state == "downloading" and "S3" in (row.error or "")
        assert open_uploads == [s3_key(tid)]
        assert s3_uploads(s3_client, s3_bucket) == []
        head = s3_client.head_object(Bucket=s3_bucket, Key=s3_key(tid))
        assert head["ContentLength"] == size
        expected = simulator.video_sha256(tid, size)
        assert final.archive_sha256 == expected == s3_sha256(s3_client, s3_bucket, tid)
        assert final.archive_bytes == size

    async def test_stale_uploads_are_aborted_at_start(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        s3_client: Any,
        s3_bucket: str,
    ) -> None:
        """Housekeeping at start aborts our prefix's uploads nobody leases, and nothing else."""
        created = {
            name: s3_client.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
            for name, key in {
                "stale": s3_key("video_stale"),  # a row nobody leases
                "orphan": s3_key("video_orphan"),  # no row at all
                "leased": s3_key("video_leased"),  # another replica is uploading it now
                "foreign": "elsewhere/video_stale.mp4",  # not under our prefix
            }.items()
        }
        assert len(created) == 4
        later = utcnow() + dt.timedelta(hours=1)
        feed(
            launch.db_url,
            {"task_id": "video_stale", "state": "downloading", "next_attempt_at": later},
            {
                "task_id": "video_leased",
                "state": "downloading",
                "next_attempt_at": later,
                "lease_owner": "replica-b",
                "lease_expires_at": later,
            },
        )
        async with launch(archive_url=f"s3://{s3_bucket}/{S3_PREFIX}") as d:
            await d.until(lambda: d.events("stale_uploads_removed"), "housekeeping")
            removed = d.events("stale_uploads_removed")[0]["count"]
        assert removed == 2
        assert sorted(s3_uploads(s3_client, s3_bucket)) == [
            "elsewhere/video_stale.mp4",
            s3_key("video_leased"),
        ]
        assert s3_missing(s3_client, s3_bucket, "video_stale")


# --- 9. deadline order ----------------------------------------------------------------------------


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
        now = utcnow()
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
        assert sorted(ids, key=first.__getitem__) == by_deadline
        starts = sorted(first.values())
        assert all(g >= 0.5 - 0.1 for g in gaps(starts)), gaps(starts)  # the cap held

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


# --- 10. database unreachable, leases -------------------------------------------------------------


class TestDatabaseUnreachable:
    """The daemon outlives its database: it waits, reconnects, keeps its leases, loses nothing."""

    @pytest.mark.postgres
    async def test_outage_loses_no_update(
        self,
        pg_url: str,
        sim: simulator.SimulatorThread,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Tasks finish at the provider and in flight while PostgreSQL is cut; all are archived."""
        inflight, during, later = "video_inflight", "video_during", "video_inserted_meanwhile"
        size = 256 * 1024
        sim.simulator.add_task(inflight, ready_seconds=0.5, size=size)
        # A download slow enough to be running when the database goes, and to end during the outage.
        sim.simulator.add_fault(inflight, on="download", throttle=size / 3)
        sim.simulator.add_task(during, ready_seconds=4, size=size)
        with FaultProxy(5432) as proxy:
            launch = Launcher(sim, via_proxy(pg_url, proxy), tmp_path, monkeypatch, pg_url)
            async with launch() as d:
                insert(d.rows, inflight)
                insert(d.rows, during)
                await d.until(
                    lambda: sim.simulator.stats.downloads_started[inflight] >= 1, "the download"
                )
                try:
                    proxy.refuse()
                    cut_at = time.time()
                    sim.simulator.add_task(later, ready_seconds=1, size=size)
                    insert(d.rows, later)  # the feeding application still reaches the database
                    await d.until(
                        lambda: sim.simulator.stats.downloads_completed[inflight] == 1,
                        "the download to end during the outage",
                    )
                    await d.until(lambda: d.events("database_unavailable"), "the daemon to notice")
                    await d.until(
                        lambda: time.time() - cut_at >= PG_OUTAGE_SECONDS,
                        "the outage",
                        PG_OUTAGE_SECONDS + 5,
                    )
                    assert not d.task.done(), "the daemon died with its database"
                    held = d.row(inflight)
                    assert d.svc.in_flight == 0
                finally:
                    proxy.forward()
                restored_at = time.time()
                for tid in (inflight, during, later):
                    await d.until_state(tid, "archived", 60)
                assert d.events("database_available_again")
        # The archive happened during the outage; its outcome waited in memory and was written after.
        assert held.state != "archived"
        first = d.row(inflight)
        assert first.archived_at is not None and first.archived_at.timestamp() < restored_at
        assert sim.simulator.stats.downloads_completed[inflight] == 1  # not fetched twice
        for tid in (inflight, during, later):
            assert_archived_intact(d, tid, size)
            # Every poll the provider answered is counted in the row: no outcome was lost.
            assert d.row(tid).polls == sim.simulator.stats.polls[tid], tid

    @pytest.mark.postgres
    async def test_renewal_failing_in_an_outage_loses_nothing(
        self,
        pg_url: str,
        sim: simulator.SimulatorThread,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A long download renews its lease; renewals failing while PostgreSQL is cut lose nothing."""
        tid = "video_long_download"
        size = 256 * 1024
        sim.simulator.add_task(tid, ready_seconds=0.5, size=size)
        sim.simulator.add_fault(tid, on="download", throttle=size / 4)  # 4 s, twice the lease
        with FaultProxy(5432) as proxy:
            launch = Launcher(sim, via_proxy(pg_url, proxy), tmp_path, monkeypatch, pg_url)
            async with launch(lease_seconds=2) as d:
                insert(d.rows, tid)
                await d.until(
                    lambda: sim.simulator.stats.downloads_started[tid] >= 1, "the download"
                )
                claimed = d.row(tid).lease_expires_at
                assert claimed is not None
                # Past the first lease, the row is still ours, on a renewed lease, downloaded once.
                await d.until(lambda: utcnow() >= claimed + dt.timedelta(seconds=0.5), "a lease")
                renewed = d.row(tid).lease_expires_at
                assert renewed is not None and renewed > utcnow(), "the lease ran out"
                assert sim.simulator.stats.downloads_started[tid] == 1
                try:
                    proxy.refuse()
                    cut_at = time.time()
                    await d.until(
                        lambda: any(e.get("job") == "renew_leases" for e in d.events("job_failed")),
                        "a renewal to fail",
                    )
                    await d.until(
                        lambda: (
                            sim.simulator.stats.downloads_completed[tid] == 1
                            and time.time() >= cut_at + 3
                        ),
                        "the download to end during the outage",
                    )
                finally:
                    proxy.forward()
                restored_at = time.time()
                final = await d.until_state(tid, "archived", 30)
        assert final.archived_at is not None and final.archived_at.timestamp() < restored_at
        assert sim.simulator.stats.downloads_started[tid] == 1
        assert final.polls == sim.simulator.stats.polls[tid]
        assert_archived_intact(d, tid, size)

    async def test_download_longer_than_the_lease_is_not_started_twice(
        self, launch: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        """While a download outlasts the lease, renewal keeps the row ours: no second download."""
        tid = "video_outlasts_lease"
        size = 192 * 1024
        sim.simulator.add_task(tid, ready_seconds=0.5, size=size)
        sim.simulator.add_fault(tid, on="download", throttle=size / 3)  # 3 s, three leases
        async with launch(lease_seconds=1) as d:
            insert(d.rows, tid)
            await d.until_state(tid, "archived")
        assert sim.simulator.stats.downloads_started[tid] == 1
        assert_archived_intact(d, tid, size)


# --- 13. hostile task ids -------------------------------------------------------------------------

HOSTILE_IDS = (
    "../../etc/passwd",
    "",
    "x" * 5000,
    "vidéo_ü",
    "a b",
    "a\nb",
    "x'; DROP TABLE video_tasks;--",
    "a?b#c",
    "a%2Fb",
    "a/b",
    ".hidden",
)


def _tree(root: pathlib.Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


class TestHostileTaskIds:
    """Ids that cannot be a provider's are refused before any request or file."""

    @pytest.mark.parametrize(
        "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
    )
    async def test_each_is_rejected_and_the_daemon_keeps_working(
        self,
        request: pytest.FixtureRequest,
        sim: simulator.SimulatorThread,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
        backend: str,
    ) -> None:
        """Rejected with a reason, never sent to the provider, never a path; the valid one archived."""
        db_url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
        sim.simulator.add_task("video_fine", ready_seconds=0.5, size=SMALL)
        launch = Launcher(sim, db_url, tmp_path, monkeypatch)
        before = _tree(tmp_path)
        async with launch() as d:
            with d.rows.engine.begin() as conn:
                for tid in (*HOSTILE_IDS, "video_fine"):
                    conn.execute(
                        sa.text("INSERT INTO video_tasks (task_id) VALUES (:id)"), {"id": tid}
                    )
            for tid in HOSTILE_IDS:
                row = await d.until_state(tid, "rejected", 10)
                assert row.error is not None and row.error.startswith("invalid task id"), row.error
            await d.until_state("video_fine", "archived")
        assert set(sim.simulator.stats.polls) - {reseller.KEY_CHECK_TASK_ID} == {"video_fine"}
        assert set(sim.simulator.stats.downloads_started) == {"video_fine"}
        assert_archived_intact(d, "video_fine", SMALL)
        # Nothing written outside the archive folder but the database's own files, and nothing in
        # the folder but the valid video and its sidecar.
        new = _tree(tmp_path) - before
        outside = {p for p in new if not p.startswith("archive")}
        assert outside <= {"tasks.db", "tasks.db-wal", "tasks.db-shm", "tasks.db.lock"}
        assert _tree(d.archive_dir) <= {"video_fine.mp4", "video_fine.json", folder.INCOMING_DIR}
        assert not (d.archive_dir / "../../etc/passwd.mp4").exists()
        assert d.rows.counts()["rejected"] == len(HOSTILE_IDS)  # and the table is still there


# --- 14. video_url safety -------------------------------------------------------------------------


class TestVideoUrlSafety:
    """Links to private hosts, other schemes, or redirects to them are refused, never fetched."""

    @pytest.mark.parametrize(
        ("settings", "redirect", "names"),
        [
            (
                {"allowed_video_url_schemes": "http,https", "allow_private_video_hosts": False},
                None,
                "SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS",
            ),
            ({"allowed_video_url_schemes": "https"}, None, "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES"),
            ({}, "ftp://127.0.0.1/x", "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES"),
            ({}, "file:///etc/passwd", "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES"),
        ],
        ids=["private-host", "http-not-allowed", "redirect-to-ftp", "redirect-to-file"],
    )
    async def test_unsafe_link_waits_on_the_setting_and_nothing_is_downloaded(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        settings: dict[str, Any],
        redirect: str | None,
        names: str,
    ) -> None:
        """The task waits, `downloading`, naming the setting; no byte of any video is fetched or
        stored. With the setting changed and a restart, it is archived."""
        tid = "video_unsafe"
        sim.simulator.add_task(tid, created=time.time() - 60, ready_seconds=1, size=SMALL)
        if redirect is not None:
            sim.simulator.add_fault(tid, on="download", redirect=redirect, times=FOREVER)
        async with launch(**settings) as d:
            insert(d.rows, tid)
            await d.until(lambda: d.row(tid).attempts >= 2, "two refusals")
            row = d.row(tid)
        assert row.state == "downloading"
        assert row.error is not None and row.error.startswith(policy.WAITING_ON_SETTING)
        assert names in row.error, row.error
        if redirect is not None:
            scheme = redirect.split(":", 1)[0]
            assert repr(scheme) in row.error
            # The redirect was served on each try and never followed.
            assert sim.simulator.faults[tid][0]["times"] <= FOREVER - 2
        assert sim.simulator.stats.downloads_started[tid] == 0
        assert not (d.archive_dir / f"{tid}.mp4").exists()
        assert leftovers(d.archive_dir) == []
        if redirect is None:
            async with launch() as d:  # the settings these tests otherwise run with
                await d.until_state(tid, "archived")
            assert_archived_intact(d, tid, SMALL)
