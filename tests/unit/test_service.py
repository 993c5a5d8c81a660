"""One cycle of the daemon (claim, poll, decide, archive, write back) on in-memory fakes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
from collections.abc import AsyncIterator, Sequence

import pytest
import structlog.testing
from seedance_archiver import config, errors, models, policy, provider, ratelimit, service, testing
from seedance_archiver.models import State

EPOCH = testing.EPOCH
answer = testing.answer

TASK_ID = "video_abc123def456"
URL = "https://cdn.example.com/videos/video_abc123def456.mp4?sig=1"
VIDEO = bytes(range(256)) * 1000  # 256 KB: several chunks
RULES = policy.Rules(cadences=config.Settings().cadences(), retention=dt.timedelta(days=1))
OWNER = "unit-test-daemon"


def seconds(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


class LimiterClock:
    """Monotonic seconds that follow the MovableClock, creeping 1 ms per read.

    The creep keeps a limiter of a million requests per second from ever making a poll wait, while a
    pause (a 429) still ends only when the test moves the MovableClock past it.
    """

    def __init__(self, clock: testing.MovableClock) -> None:
        self.clock = clock
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return (self.clock.now - EPOCH).total_seconds() + self.reads * 1e-3


@dataclasses.dataclass
class Rig:
    """A service wired to fakes, with the fakes at hand for setting up and checking."""

    svc: service.Service
    store: testing.FakeStore
    provider: testing.FakeProvider
    archive: testing.FakeArchive
    clock: testing.MovableClock

    def row(self, task_id: str = TASK_ID) -> models.Task:
        return self.store.rows[task_id]

    async def settle(self, rounds: int = 200) -> None:
        """Let the per-row asyncio tasks run to completion (no time passes)."""
        for _ in range(rounds):
            if not self.svc.in_flight:
                return
            await asyncio.sleep(0)
        pytest.fail(f"{self.svc.in_flight} row(s) still in flight after {rounds} loop turns")

    async def cycle(self) -> int:
        """One tick, its work, and the write-back; returns the rows claimed."""
        claimed = await self.svc.tick()
        await self.settle()
        await self.svc.flush()
        return claimed

    async def at(self, after_seconds: float) -> int:
        """Move the clock by ``after_seconds`` and run a cycle."""
        self.clock.advance(after_seconds)
        return await self.cycle()


def make_rig(
    draw: policy.Draw = testing.low_draw,
    fake_provider: testing.FakeProvider | None = None,
    fake_store: testing.FakeStore | None = None,
) -> Rig:
    clock = testing.MovableClock()
    store = fake_store or testing.FakeStore()
    fake = fake_provider or testing.FakeProvider()
    archive = testing.FakeArchive()
    limiter = ratelimit.RateLimiter(1e6, burst=1000, clock=LimiterClock(clock))
    svc = service.Service(
        store,
        fake,
        archive,
        RULES,
        limiter,
        owner=OWNER,
        clock=clock,
        draw=draw,
        db_executor=testing.InlineExecutor(),
    )
    return Rig(svc, store, fake, archive, clock)


@pytest.fixture
def rig() -> Rig:
    return make_rig()


def completed(task_id: str = TASK_ID, url: str = URL) -> models.Answer:
    return answer(task_id, "completed", video_url=url, duration=5.0)


class TestPolling:
    """Rows are polled when due, and never faster than their mode's cadence."""

    async def test_pending_row_is_polled_once_and_keeps_polling(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, "processing"))
        assert await rig.cycle() == 1
        assert rig.provider.fetches == [TASK_ID]
        row = rig.row()
        assert row.state == State.POLLING
        assert row.provider_status == "processing"
        assert row.polls == 1
        assert row.last_polled_at == EPOCH
        assert row.expires_at == EPOCH + dt.timedelta(days=1)
        assert row.lease_owner is None

    @pytest.mark.parametrize("draw", [testing.low_draw, testing.high_draw])
    @pytest.mark.parametrize("mode", [m.value for m in models.Mode])
    async def test_next_poll_is_within_the_mode_cadence(self, mode: str, draw: policy.Draw) -> None:
        rig = make_rig(draw)
        rig.store.add(TASK_ID, mode=mode)
        rig.provider.script(TASK_ID, answer(TASK_ID, "queued"))
        await rig.cycle()
        cadence = RULES.cadence(mode)
        next_at = rig.row().next_attempt_at
        assert next_at is not None
        assert EPOCH + seconds(cadence.low) <= next_at <= EPOCH + seconds(cadence.high)
        assert next_at == EPOCH + seconds(draw(cadence.low, cadence.high))

    @pytest.mark.parametrize("mode", [m.value for m in models.Mode])
    async def test_not_polled_before_its_time(self, mode: str) -> None:
        rig = make_rig(testing.low_draw)
        rig.store.add(TASK_ID, mode=mode)
        rig.provider.script(TASK_ID, answer(TASK_ID, "processing"))
        await rig.cycle()
        low = RULES.cadence(mode).low
        assert await rig.at(low - 0.5) == 0
        assert await rig.cycle() == 0
        assert rig.provider.fetches == [TASK_ID]
        assert await rig.at(0.5) == 1
        assert rig.provider.fetches == [TASK_ID, TASK_ID]
        assert rig.row().polls == 2

    async def test_a_row_in_flight_is_not_claimed_again(self) -> None:
        blocking = BlockingProvider()
        rig = make_rig(fake_provider=blocking)
        rig.store.add(TASK_ID)
        assert await rig.svc.tick() == 1
        await blocking.entered.wait()
        rig.clock.advance(1)
        assert await rig.svc.tick() == 0
        assert rig.provider.fetches == [TASK_ID]
        await rig.svc.stop(0)


class TestArchiving:
    """A finished video is streamed into the archive and recorded, once."""

    async def test_completed_is_archived_in_the_same_cycle(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = VIDEO
        await rig.cycle()
        row = rig.row()
        assert row.state == State.ARCHIVED
        assert rig.archive.objects[TASK_ID] == VIDEO
        assert row.archive_sha256 == hashlib.sha256(VIDEO).hexdigest()
        assert row.archive_bytes == len(VIDEO)
        assert row.archive_uri == f"mem://{TASK_ID}.mp4"
        assert row.actual_duration == 5.0
        assert row.archived_at == EPOCH
        assert rig.provider.downloads == [URL]
        assert rig.svc.stats.archived == 1

    async def test_video_already_in_the_archive_is_not_downloaded(self, rig: Rig) -> None:
        stored = b"committed before a crash"
        rig.archive.objects[TASK_ID] = stored
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = VIDEO
        await rig.cycle()
        row = rig.row()
        assert row.state == State.ARCHIVED
        assert rig.provider.downloads == []
        assert rig.archive.puts == []
        assert row.archive_sha256 == hashlib.sha256(stored).hexdigest()
        assert row.archive_bytes == len(stored)

    async def test_failed_put_keeps_downloading_then_retries(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = VIDEO
        rig.archive.fail_next = errors.DownloadError("truncated download: 1000 of 256000 bytes")
        await rig.cycle()
        row = rig.row()
        assert row.state == State.DOWNLOADING
        assert row.attempts == 1
        assert row.error is not None and "truncated" in row.error
        assert row.video_url == URL
        assert TASK_ID not in rig.archive.objects
        retry_at = row.next_attempt_at
        assert retry_at is not None and retry_at > EPOCH

        assert await rig.cycle() == 0  # not due yet
        assert rig.provider.downloads == [URL]
        rig.clock.now = retry_at
        await rig.cycle()
        row = rig.row()
        assert row.state == State.ARCHIVED
        assert (row.attempts, row.error) == (0, None)
        assert rig.archive.objects[TASK_ID] == VIDEO
        assert rig.provider.fetches == [TASK_ID]  # the retry downloads, it does not poll

    async def test_archive_error_also_retries(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = VIDEO
        rig.archive.fail_next = errors.ArchiveError("S3 answered 503")
        await rig.cycle()
        assert rig.row().state == State.DOWNLOADING
        assert rig.row().attempts == 1

    async def test_expired_link_polls_again_for_a_fresh_one(self, rig: Rig) -> None:
        fresh = "https://cdn.example.com/videos/fresh.mp4?sig=2"
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed(url=URL), completed(url=fresh))
        rig.provider.videos[URL] = errors.LinkExpired("the video link was refused (HTTP 403)")
        rig.provider.videos[fresh] = VIDEO
        await rig.cycle()
        row = rig.row()
        assert row.state == State.POLLING
        assert row.video_url is None
        assert row.next_attempt_at is not None
        assert row.next_attempt_at >= EPOCH + seconds(RULES.cadence("standard").low)

        await rig.at(RULES.cadence("standard").low)
        row = rig.row()
        assert row.state == State.ARCHIVED
        assert rig.provider.downloads == [URL, fresh]
        assert rig.archive.objects[TASK_ID] == VIDEO

    @pytest.mark.parametrize(
        "refusal",
        [
            errors.VideoTooLarge("video is 3 GiB, more than SEEDANCE_MAX_VIDEO_BYTES"),
            errors.UnsafeVideoUrl("unsafe video_url: scheme 'ftp' is not allowed"),
        ],
    )
    async def test_refused_video_is_rejected(self, rig: Rig, refusal: Exception) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = refusal
        await rig.cycle()
        assert rig.row().state == State.REJECTED
        assert rig.row().error == str(refusal)


class TestDriftedAnswers:
    """A field the video does not depend on never stops it: ignored, counted, logged sparingly."""

    async def test_archived_counted_and_logged_once_per_field(self, rig: Rig) -> None:
        drifted = dataclasses.replace(
            completed(), ignored=(("actualDuration", "not a finite number ('5s')"),)
        )
        for task_id in (TASK_ID, "video_second"):
            rig.store.add(task_id)
            rig.provider.script(task_id, dataclasses.replace(drifted, id=task_id))
        rig.provider.videos[URL] = VIDEO
        with structlog.testing.capture_logs() as logs:
            await rig.cycle()
        assert rig.row().state == rig.row("video_second").state == State.ARCHIVED
        sample = rig.svc.metrics.registry.get_sample_value(
            "seedance_answer_fields_ignored_total", {"field": "actualDuration"}
        )
        assert sample == 2
        warned = [e for e in logs if e["event"] == "answer_field_ignored"]
        assert len(warned) == 1
        assert warned[0]["field"] == "actualDuration" and "5s" in warned[0]["why"]


def past_deadline(task_id: str = TASK_ID) -> models.Task:
    """A row still polling whose provider deadline passed a second ago."""
    return models.Task(
        task_id=task_id,
        state=State.POLLING.value,
        provider_status="processing",
        expires_at=EPOCH - seconds(1),
        next_attempt_at=EPOCH,
    )


class TestTerminal:
    """A terminal provider status ends the row, and a terminal row is never polled again."""

    @pytest.mark.parametrize(
        ("status", "state"), [("failed", State.FAILED), ("cancelled", State.CANCELLED)]
    )
    async def test_terminal_status_ends_the_row(self, rig: Rig, status: str, state: State) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, status, error=f"the task was {status}"))
        await rig.cycle()
        assert rig.row().state == state
        assert rig.row().error == f"the task was {status}"

    @pytest.mark.parametrize("status", ["failed", "cancelled", "completed"])
    async def test_terminal_row_is_never_polled_again(self, rig: Rig, status: str) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, status, video_url=URL))
        rig.provider.videos[URL] = VIDEO
        await rig.cycle()
        assert rig.row().is_terminal
        for _ in range(3):
            assert await rig.at(3600) == 0
        assert rig.provider.fetches == [TASK_ID]

    async def test_row_past_its_deadline_expires_without_a_poll(self, rig: Rig) -> None:
        rig.store.rows[TASK_ID] = past_deadline()
        await rig.cycle()
        assert rig.row().state == State.EXPIRED
        assert rig.row().error is not None and "deadline" in rig.row().error
        assert rig.provider.fetches == []

    async def test_expired_tasks_are_counted_once_each_way_they_expire(self, rig: Rig) -> None:
        """Past the deadline and gone from the provider (404 once seen) both count; failed does not."""
        rig.store.rows[TASK_ID] = past_deadline()
        rig.store.add("video_gone")
        rig.provider.script("video_gone", answer("video_gone", "processing"), errors.TaskNotFound())
        rig.store.add("video_failed")
        rig.provider.script("video_failed", answer("video_failed", "failed", error="no"))

        def expired() -> float | None:
            return rig.svc.metrics.registry.get_sample_value("seedance_tasks_expired_total")

        assert expired() == 0
        await rig.cycle()
        assert expired() == 1
        await rig.at(3600)
        assert rig.row("video_gone").state == State.EXPIRED
        assert rig.row("video_failed").state == State.FAILED
        assert expired() == 2
        await rig.at(3600)
        assert expired() == 2

    async def test_invalid_task_id_is_rejected_without_a_poll(self, rig: Rig) -> None:
        rig.store.add("../etc/passwd")
        await rig.cycle()
        assert rig.row("../etc/passwd").state == State.REJECTED
        assert rig.provider.fetches == []

    async def test_unknown_id_is_rejected_after_a_few_polls(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)  # no script: the fake answers 404
        await rig.cycle()
        for _ in range(RULES.not_found_polls - 1):
            assert rig.row().state == State.POLLING
            await rig.at(600)
        assert rig.row().state == State.REJECTED
        assert len(rig.provider.fetches) == RULES.not_found_polls


class TestProviderTrouble:
    """Rate limits, a rejected key, outages and crashes never lose a task."""

    async def test_rate_limit_pauses_every_request_and_the_row(self) -> None:
        rig = make_rig(testing.low_draw)
        rig.store.add(TASK_ID, mode="draft")
        rig.provider.script(
            TASK_ID, errors.RateLimited("HTTP 429", retry_after=30), answer(TASK_ID, "queued")
        )
        await rig.cycle()
        assert rig.svc.limiter.paused_for > 0
        assert rig.svc.limiter.paused_for == pytest.approx(30, abs=1)
        row = rig.row()
        assert row.state == State.POLLING
        assert row.attempts == 1
        assert row.next_attempt_at is not None
        assert row.next_attempt_at >= EPOCH + seconds(30)

        assert await rig.at(29) == 0
        assert await rig.at(1) == 1
        assert rig.svc.limiter.paused_for == 0
        assert rig.row().attempts == 0
        assert len(rig.provider.fetches) == 2

    async def test_rate_limit_without_retry_after_still_pauses(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, errors.RateLimited("HTTP 429", retry_after=None))
        await rig.cycle()
        assert rig.svc.limiter.paused_for > 0
        assert rig.row().attempts == 1

    async def test_rejected_key_releases_rows_and_blocks_polling(self, rig: Rig) -> None:
        other = "video_other000001"
        rig.store.add(TASK_ID)
        rig.store.add(other)
        rig.provider.script(TASK_ID, errors.AuthRejected("HTTP 401"), answer(TASK_ID, "processing"))
        rig.provider.script(other, errors.AuthRejected("HTTP 401"), answer(other, "processing"))
        rig.provider.key_ok = False
        before = {tid: rig.row(tid) for tid in (TASK_ID, other)}
        await rig.cycle()

        assert rig.svc.auth_blocked
        assert rig.provider.key_checks == 1  # both 401s shared one check of the key
        assert len(rig.provider.fetches) == 2
        assert sorted(rig.store.released) == sorted([TASK_ID, other])
        for tid, row in before.items():
            after = rig.row(tid)
            assert (after.state, after.attempts, after.polls) == (row.state, 0, 0)
            assert after.next_attempt_at == row.next_attempt_at
            assert after.lease_owner is None
        assert rig.store.saved == []

        # Blocked: nothing is polled, and the key is checked again only when its time comes.
        for _ in range(3):
            await rig.at((rig.svc.AUTH_PROBE_SECONDS - 1) / 3)
            assert await rig.svc.check_key_if_due() is None
        assert len(rig.provider.fetches) == 2 and rig.provider.key_checks == 1

        rig.provider.key_ok = True
        rig.clock.advance(1)
        assert await rig.svc.check_key_if_due() is True  # the probe: no task needed
        assert rig.provider.key_checks == 2
        assert not rig.svc.auth_blocked

        await rig.cycle()
        assert len(rig.provider.fetches) == 4
        assert {rig.row(tid).state for tid in (TASK_ID, other)} == {"polling"}

    async def test_downloads_go_on_while_the_key_is_rejected(self, rig: Rig) -> None:
        """A row already downloading needs no key: it is archived during the block."""
        waiting = "video_waiting00001"
        rig.store.add(TASK_ID)
        rig.store.add(waiting)
        rig.store.rows[TASK_ID] = rig.row().replace(state="downloading", video_url=URL)
        rig.provider.videos[URL] = VIDEO
        rig.provider.key_ok = False
        assert await rig.svc.check_key_if_due() is False
        assert rig.svc.auth_blocked

        await rig.cycle()
        assert rig.row().state == "archived"
        assert rig.provider.fetches == []
        assert rig.row(waiting).state == "pending" and rig.row(waiting).lease_owner is None

    async def test_a_403_for_one_task_only_rejects_that_task(self, rig: Rig) -> None:
        """The key check says the key is fine: the refusal is the task's own."""
        other = "video_other000001"
        rig.store.add(TASK_ID)
        rig.store.add(other)
        rig.provider.script(TASK_ID, errors.AuthRejected("HTTP 403", status_code=403))
        rig.provider.script(other, answer(other, "processing"))
        await rig.cycle()
        assert not rig.svc.auth_blocked
        assert rig.row().state == "polling" and rig.row().attempts == 1
        assert rig.row(other).state == "polling"
        for _ in range(policy.FORBIDDEN_POLLS - 1):
            await rig.at(3600)
        assert not rig.svc.auth_blocked
        row = rig.row()
        assert row.state == "rejected"
        assert row.error is not None and "refuses this task" in row.error
        assert f"on {policy.FORBIDDEN_POLLS} polls in a row" in row.error
        assert rig.row(other).state == "polling"

    async def test_a_key_check_that_cannot_tell_pauses_without_giving_up(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, errors.AuthRejected("HTTP 401"))
        rig.provider.key_ok = None
        await rig.cycle()
        assert rig.svc.auth_blocked
        assert (rig.row().state, rig.row().attempts) == ("pending", 0)

    async def test_the_key_is_checked_at_start_and_while_idle(self, rig: Rig) -> None:
        """A wrong key is found before any task needs it; an active daemon spends no checks."""
        rig.provider.key_ok = False
        assert await rig.svc.check_key_if_due() is False  # at start: never checked
        assert rig.svc.auth_blocked
        rig.provider.key_ok = True
        rig.clock.advance(rig.svc.AUTH_PROBE_SECONDS)
        assert await rig.svc.check_key_if_due() is True
        assert not rig.svc.auth_blocked

        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, "processing"))
        for _ in range(10):  # polls answered every 60 s: no check needed
            await rig.at(60)
            assert await rig.svc.check_key_if_due() is None
        checks = rig.provider.key_checks
        rig.store.rows[TASK_ID] = rig.row().replace(state="archived")
        rig.clock.advance(rig.svc.KEY_CHECK_IDLE_SECONDS)  # idle: nothing answered for a while
        assert await rig.svc.check_key_if_due() is True
        assert rig.provider.key_checks == checks + 1

    async def test_a_failed_probe_keeps_the_block(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, errors.AuthRejected("HTTP 403"))
        rig.provider.key_ok = False
        await rig.cycle()
        rig.clock.advance(rig.svc.AUTH_PROBE_SECONDS)
        assert await rig.svc.check_key_if_due() is False
        assert rig.provider.key_checks == 2
        assert rig.svc.auth_blocked
        await rig.at(rig.svc.AUTH_PROBE_SECONDS - 1)
        assert await rig.svc.check_key_if_due() is None
        assert len(rig.provider.fetches) == 1 and rig.provider.key_checks == 2
        assert rig.row().state == State.PENDING
        assert rig.row().attempts == 0

    async def test_outage_backs_off_with_doubling_waits(self) -> None:
        rig = make_rig(testing.high_draw)
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, errors.ProviderUnavailable("the provider answered HTTP 502"))
        await rig.cycle()
        waits = []
        for attempt in (1, 2, 3):
            row = rig.row()
            assert row.state == State.POLLING
            assert row.attempts == attempt
            assert row.error is not None and "HTTP 502" in row.error
            assert row.next_attempt_at is not None
            wait = (row.next_attempt_at - rig.clock.now).total_seconds()
            waits.append(wait)
            await rig.at(wait)
        assert waits == [30, 60, 120]

    @pytest.mark.parametrize(
        "failure",
        [
            errors.ProviderUnavailable("the provider timed out"),
            errors.MalformedAnswer("malformed answer: the body is not JSON"),
        ],
    )
    async def test_retryable_errors_never_drop_the_task(self, rig: Rig, failure: Exception) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, failure)
        await rig.cycle()
        for _ in range(20):
            await rig.at(RULES.backoff_cap_seconds)
        row = rig.row()
        assert row.state == State.POLLING
        assert row.attempts == 21
        assert row.next_attempt_at is not None
        assert row.next_attempt_at - rig.clock.now <= seconds(RULES.backoff_cap_seconds)

    async def test_a_crash_in_the_provider_is_contained(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, RuntimeError("bug in a client"), answer(TASK_ID, "queued"))
        await rig.cycle()
        row = rig.row()
        assert row.state == State.POLLING
        assert row.error is not None and row.error.startswith("internal error")
        assert row.attempts == 1
        assert row.next_attempt_at is not None and row.next_attempt_at > EPOCH
        await rig.at(RULES.backoff_cap_seconds)
        assert rig.row().error is None
        assert len(rig.provider.fetches) == 2


class TestClaimOrder:
    """When only a few rows can be claimed, unknown deadlines, then the nearest, go first."""

    async def test_nearest_deadline_first(self, rig: Rig) -> None:
        deadlines = {
            "video_late": EPOCH + dt.timedelta(hours=20),
            "video_soon": EPOCH + dt.timedelta(hours=1),
            "video_unknown": None,
            "video_sooner": EPOCH + dt.timedelta(minutes=10),
        }
        for task_id, expires in deadlines.items():
            rig.store.rows[task_id] = models.Task(
                task_id=task_id, state="polling", expires_at=expires, next_attempt_at=EPOCH
            )
            rig.provider.script(task_id, answer(task_id, "processing", created=EPOCH))
        rig.svc.CLAIM_BATCH = 1
        for _ in deadlines:
            assert await rig.cycle() == 1
        # A row never polled has no known deadline: it goes first, so the intake poll learns it.
        assert rig.provider.fetches == ["video_unknown", "video_sooner", "video_soon", "video_late"]


class BlockingProvider(testing.FakeProvider):
    """A provider whose polls never return (a hung connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = 0

    async def fetch(self, task_id: str) -> models.Answer:
        self.fetches.append(task_id)
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return answer(task_id, "processing")

    @contextlib.asynccontextmanager
    async def open_video(self, url: str) -> AsyncIterator[provider.Video]:
        raise AssertionError("not expected")
        yield  # pragma: no cover


class TestStop:
    """Stopping drains in-flight work within the grace period and releases what is left."""

    async def test_hung_work_is_cancelled_and_its_row_released(self) -> None:
        blocking = BlockingProvider()
        rig = make_rig(fake_provider=blocking)
        rig.store.add(TASK_ID)
        await rig.svc.tick()
        await blocking.entered.wait()
        await rig.svc.stop(0)
        assert blocking.cancelled == 1
        assert rig.svc.in_flight == 0
        assert rig.store.released == [TASK_ID]
        row = rig.row()
        assert row.lease_owner is None and row.lease_expires_at is None
        assert (row.state, row.attempts, row.polls) == ("pending", 0, 0)

    async def test_no_claims_after_stop(self, rig: Rig) -> None:
        await rig.svc.stop(0)
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, "processing"))
        assert await rig.svc.tick() == 0
        assert rig.provider.fetches == []

    async def test_work_finishing_within_the_grace_is_written(self) -> None:
        blocking = BlockingProvider()
        rig = make_rig(fake_provider=blocking)
        rig.store.add(TASK_ID)
        await rig.svc.tick()
        await blocking.entered.wait()
        asyncio.get_running_loop().call_soon(blocking.release.set)
        await rig.svc.stop(5)
        assert blocking.cancelled == 0
        assert rig.store.released == []
        assert rig.row().state == State.POLLING
        assert rig.row().polls == 1


class FlakyStore(testing.FakeStore):
    """A store whose next ``failures`` saves fail as a lost database connection would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def save(self, tasks: Sequence[models.Task], owner: str) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise errors.StoreError("the database is unreachable")
        return super().save(tasks, owner)


class TestWriteBack:
    """Outcomes are written back in a batch, and a database error does not lose them."""

    async def test_outcomes_wait_for_the_write_back(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, "processing"))
        await rig.svc.tick()
        await rig.settle()
        assert rig.row().state == State.PENDING
        assert rig.row().lease_owner == OWNER
        await rig.svc.flush()
        assert rig.row().state == State.POLLING
        assert rig.row().lease_owner is None

    async def test_outcomes_survive_a_database_error(self) -> None:
        rig = make_rig(fake_store=FlakyStore(failures=1))
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, "processing"))
        await rig.svc.tick()
        await rig.settle()
        with pytest.raises(errors.StoreError):
            await rig.svc.flush()
        assert rig.row().state == State.PENDING
        await rig.cycle()
        assert rig.row().state == State.POLLING
        assert rig.provider.fetches == [TASK_ID]


class TestStopWithTheDatabaseDown:
    """A database outage at shutdown is logged, not raised: the process still exits cleanly."""

    async def test_stop_returns_and_keeps_the_outcome_in_memory(self) -> None:
        rig = make_rig(fake_store=FlakyStore(failures=10))
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, "processing"))
        await rig.svc.tick()
        await rig.settle()
        await rig.svc.stop(0)  # must not raise
        assert rig.row().state == State.PENDING  # nothing written...
        assert rig.row().lease_owner == OWNER  # ...and the lease simply runs out later


class BuggyStore(testing.FakeStore):
    """A store whose claim raises a bug (not a database error) while ``broken``."""

    broken = True

    def claim_due(self, *args: object, **kwargs: object) -> list[models.Task]:
        if self.broken:
            raise RuntimeError("a bug")
        return super().claim_due(*args, **kwargs)  # type: ignore[arg-type]


class FailingStore(testing.FakeStore):
    def claim_due(self, *args: object, **kwargs: object) -> list[models.Task]:
        raise errors.StoreError("database unreachable: connection refused")


class TestTickHealth:
    """A tick counts as alive only when it completes; crashed ticks in a row make it unhealthy."""

    async def test_crashed_ticks_turn_unhealthy_and_recover(self) -> None:
        buggy = BuggyStore()
        rig = make_rig(fake_store=buggy)
        buggy.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, "processing"))
        for n in range(1, rig.svc.MAX_TICK_FAILURES + 1):
            assert rig.svc.healthy
            await rig.at(1)
            assert rig.svc.tick_failures == n
        assert not rig.svc.healthy
        assert rig.svc.last_tick_at is None  # no tick ever completed
        sample = rig.svc.metrics.registry.get_sample_value("seedance_tick_failures_total")
        assert sample == rig.svc.MAX_TICK_FAILURES

        buggy.broken = False
        await rig.at(1)
        assert rig.svc.healthy and rig.svc.tick_failures == 0
        assert rig.svc.last_tick_at == rig.clock.now
        assert rig.row().state == "polling"

    async def test_a_database_outage_is_handled_not_a_crash(self) -> None:
        rig = make_rig(fake_store=FailingStore())
        for _ in range(5):
            await rig.at(60)
        assert rig.svc.healthy and rig.svc.tick_failures == 0
        assert rig.svc.last_tick_at == rig.clock.now


class SlowVideoProvider(testing.FakeProvider):
    """Serves one chunk, then waits until ``release`` is set (a trickling host)."""

    def __init__(self) -> None:
        super().__init__()
        self.streaming = asyncio.Event()
        self.release = asyncio.Event()

    @contextlib.asynccontextmanager
    async def open_video(self, url: str) -> AsyncIterator[provider.Video]:
        self.downloads.append(url)

        async def chunks() -> AsyncIterator[bytes]:
            yield VIDEO[:1000]
            self.streaming.set()
            await self.release.wait()
            yield VIDEO[1000:]

        yield provider.Video(length=len(VIDEO), chunks=chunks())


async def downloading_slowly() -> tuple[Rig, SlowVideoProvider]:
    """A rig whose one row is downloading, part-way through a slow video."""
    slow = SlowVideoProvider()
    rig = make_rig(fake_provider=slow)
    rig.store.add(TASK_ID)
    rig.store.rows[TASK_ID] = rig.row().replace(state="downloading", video_url=URL)
    assert await rig.svc.tick() == 1
    await asyncio.wait_for(slow.streaming.wait(), 5)
    return rig, slow


class TestLeaseLost:
    """Work whose lease another daemon took is cancelled and writes nothing back."""

    async def test_renewal_cancels_work_on_a_lost_lease(self) -> None:
        rig, _ = await downloading_slowly()
        # Another daemon took the row (our lease ran out unseen, say in a database outage).
        rig.store.rows[TASK_ID] = rig.row().replace(lease_owner="other-daemon")
        assert await rig.svc.renew_leases() == 0
        await rig.settle()
        await rig.svc.flush()
        assert rig.store.saved == [] and rig.store.released == []
        assert TASK_ID not in rig.archive.objects  # the upload was abandoned, not committed
        assert rig.row().lease_owner == "other-daemon"

    async def test_renewal_keeps_work_whose_lease_is_held(self) -> None:
        rig, slow = await downloading_slowly()
        assert await rig.svc.renew_leases() == 1
        slow.release.set()
        await rig.settle()
        await rig.svc.flush()
        assert rig.row().state == "archived"


class TestDownloadDeadline:
    """A download ends by the earlier of MAX_DOWNLOAD_SECONDS and the row's deadline."""

    async def test_a_trickling_download_is_cut_and_retried(self) -> None:
        slow = SlowVideoProvider()
        rig = make_rig(fake_provider=slow)
        rig.svc.max_download_seconds = 0.05  # a real (short) timer: the one thing not faked here
        rig.store.add(TASK_ID)
        rig.store.rows[TASK_ID] = rig.row().replace(state="downloading", video_url=URL)
        await rig.svc.tick()
        for _ in range(500):
            if not rig.svc.in_flight:
                break
            await asyncio.sleep(0.01)
        await rig.svc.flush()
        row = rig.row()
        assert row.state == "downloading" and row.attempts == 1
        assert row.error is not None and "did not finish within" in row.error
        assert TASK_ID not in rig.archive.objects
        assert (
            rig.svc.metrics.registry.get_sample_value(
                "seedance_download_failures_total", {"reason": "download"}
            )
            == 1
        )


class TestProviderStamp:
    """A row remembers the provider that first answered for it; other providers leave it alone."""

    async def test_the_first_answer_stamps_the_row(self) -> None:
        rig = make_rig(fake_provider=testing.FakeProvider("ark"))
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, "processing"))
        await rig.cycle()
        assert rig.row().provider == "ark"

    async def test_an_unanswered_poll_leaves_it_unstamped(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, errors.ProviderUnavailable("the provider answered HTTP 503"))
        await rig.cycle()
        assert rig.row().provider is None and rig.row().polls == 1

    async def test_a_row_stamped_for_another_provider_is_never_claimed(self) -> None:
        """The setting changed from reseller to ark: the reseller's rows never reach Ark's API."""
        rig = make_rig(fake_provider=testing.FakeProvider("ark"))
        rig.store.add(TASK_ID)
        rig.store.rows[TASK_ID] = rig.row().replace(provider="reseller")
        rig.provider.script(TASK_ID, completed())
        assert await rig.at(3600) == 0
        assert rig.provider.fetches == []
        assert rig.row().state == State.PENDING and rig.row().lease_owner is None

    async def test_its_own_and_unstamped_rows_are_claimed(self) -> None:
        rig = make_rig(fake_provider=testing.FakeProvider("ark"))
        for task_id, stamp in (("cgt-1", "ark"), ("cgt-2", None), ("video_3", "reseller")):
            rig.store.add(task_id)
            rig.store.rows[task_id] = rig.row(task_id).replace(provider=stamp)
            rig.provider.script(task_id, answer(task_id, "queued"))
        assert await rig.cycle() == 2
        assert sorted(rig.provider.fetches) == ["cgt-1", "cgt-2"]
        assert rig.row("cgt-2").provider == "ark"
        assert rig.row("video_3").provider == "reseller" and rig.row("video_3").polls == 0


class TestHasten:
    """A callback makes an active row of this provider due now, and nothing else."""

    def test_a_waiting_row_becomes_due(self) -> None:
        store = testing.FakeStore(
            [models.Task("cgt-1", state="polling", next_attempt_at=EPOCH + seconds(60))]
        )
        assert store.hasten("cgt-1", EPOCH, "ark") is True
        assert store.rows["cgt-1"].next_attempt_at == EPOCH

    @pytest.mark.parametrize(
        "task",
        [
            models.Task("cgt-1", state="archived", next_attempt_at=EPOCH + seconds(60)),
            models.Task(
                "cgt-1", state="polling", next_attempt_at=EPOCH + seconds(60), provider="reseller"
            ),
            models.Task("cgt-1", state="polling", next_attempt_at=EPOCH),
            models.Task(
                "cgt-1",
                state="polling",
                next_attempt_at=EPOCH + seconds(60),
                lease_owner="other",
                lease_expires_at=EPOCH + seconds(30),
            ),
        ],
        ids=["finished", "another provider's", "due already", "leased"],
    )
    def test_other_rows_are_left_alone(self, task: models.Task) -> None:
        store = testing.FakeStore([task])
        assert store.hasten("cgt-1", EPOCH, "ark") is False
        assert store.rows["cgt-1"] == task

    def test_an_unknown_row(self) -> None:
        assert testing.FakeStore().hasten("cgt-1", EPOCH, "ark") is False
