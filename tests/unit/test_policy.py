"""The pure decisions of daemon.policy: next state, next poll time, backoff, deadline, task ids."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from seedance_archiver import config, models, policy, testing
from seedance_archiver.models import State

NOW = testing.EPOCH
TASK_ID = "video_abc123def456"
URL = "https://files.example.com/video_abc123def456.mp4?sig=abc"
MODES = [m.value for m in models.Mode]
RULES = policy.Rules(cadences=config.Settings().cadences(), retention=dt.timedelta(days=1))
VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def middle_draw(low: float, high: float) -> float:
    return (low + high) / 2


DRAWS = [testing.low_draw, middle_draw, testing.high_draw]


def seconds(delta: dt.timedelta) -> float:
    return delta.total_seconds()


def task(mode: str = "standard", **fields: object) -> models.Task:
    return models.Task(task_id=TASK_ID, mode=mode, next_attempt_at=NOW, **fields)  # type: ignore[arg-type]


def answer(status: str, **fields: object) -> models.Answer:
    return testing.answer(TASK_ID, status, **fields)  # type: ignore[arg-type]


class TestCadenceDefaults:
    """The rules the other tests rely on are the provider's own polling advice."""

    def test_cadences_are_the_seed_page_ranges(self) -> None:
        got = {mode: (c.low, c.high) for mode, c in RULES.cadences.items()}
        assert got == {"draft": (10, 20), "standard": (30, 60), "flex": (60, 120)}

    def test_unknown_mode_falls_back_to_standard(self) -> None:
        assert RULES.cadence("turbo") == RULES.cadence("standard")


class TestOnAnswer:
    """Every provider status in every mode leads to the right next state and time."""

    @pytest.mark.parametrize("draw", DRAWS, ids=lambda d: d.__name__)
    @pytest.mark.parametrize("status", ["queued", "processing"])
    @pytest.mark.parametrize("mode", MODES)
    def test_running_task_keeps_polling_within_its_cadence(
        self, mode: str, status: str, draw: policy.Draw
    ) -> None:
        cadence = RULES.cadence(mode)
        after = policy.on_answer(task(mode), answer(status), NOW, RULES, draw)
        assert after.state == State.POLLING
        assert after.provider_status == status
        assert after.next_attempt_at is not None
        assert cadence.low <= seconds(after.next_attempt_at - NOW) <= cadence.high
        assert after.last_polled_at == NOW
        assert after.polls == 1

    @pytest.mark.parametrize("mode", MODES)
    def test_completed_with_video_url_goes_to_download_at_once(self, mode: str) -> None:
        before = task(mode, state="polling", polls=3, attempts=2, error="timeout")
        reply = answer("completed", video_url=URL, duration=5.0)
        after = policy.on_answer(before, reply, NOW, RULES, testing.high_draw)
        assert after.state == State.DOWNLOADING
        assert after.video_url == URL
        assert after.actual_duration == 5.0
        assert after.completed_at == NOW
        assert after.next_attempt_at == NOW
        assert after.provider_status == "completed"
        assert (after.polls, after.attempts, after.error) == (4, 0, None)

    def test_completed_at_is_kept_from_the_first_completion(self) -> None:
        first = NOW - dt.timedelta(minutes=5)
        before = task(state="polling", completed_at=first)
        after = policy.on_answer(
            before, answer("completed", video_url=URL), NOW, RULES, testing.low_draw
        )
        assert after.completed_at == first

    @pytest.mark.parametrize("draw", DRAWS, ids=lambda d: d.__name__)
    @pytest.mark.parametrize("mode", MODES)
    def test_completed_without_video_url_polls_again_within_cadence(
        self, mode: str, draw: policy.Draw
    ) -> None:
        cadence = RULES.cadence(mode)
        after = policy.on_answer(task(mode), answer("completed"), NOW, RULES, draw)
        assert after.state == State.POLLING
        assert after.video_url is None
        assert after.next_attempt_at is not None
        assert cadence.low <= seconds(after.next_attempt_at - NOW) <= cadence.high
        assert after.error is not None and "video_url" in after.error

    @pytest.mark.parametrize("mode", MODES)
    def test_failed_keeps_the_provider_error_text(self, mode: str) -> None:
        reply = answer("failed", error="content policy violation")
        after = policy.on_answer(task(mode), reply, NOW, RULES, testing.low_draw)
        assert after.state == State.FAILED
        assert after.is_terminal
        assert after.error == "content policy violation"
        assert after.provider_status == "failed"

    @pytest.mark.parametrize("mode", MODES)
    def test_failed_without_error_text_gets_a_readable_reason(self, mode: str) -> None:
        after = policy.on_answer(task(mode), answer("failed"), NOW, RULES, testing.low_draw)
        assert after.state == State.FAILED
        assert after.error is not None and "failed" in after.error

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("error", [None, "cancelled by the user"])
    def test_cancelled_is_terminal_with_a_reason(self, mode: str, error: str | None) -> None:
        reply = answer("cancelled", error=error)
        after = policy.on_answer(task(mode), reply, NOW, RULES, testing.low_draw)
        assert after.state == State.CANCELLED
        assert after.is_terminal
        assert after.error == (error or "cancelled at the provider")

    @pytest.mark.parametrize("status", list(models.Status))
    def test_every_answer_records_the_poll_and_clears_failures(self, status: models.Status) -> None:
        before = task(state="polling", polls=7, attempts=3, error="HTTP 502")
        reply = answer(status.value, video_url=URL)
        after = policy.on_answer(before, reply, NOW, RULES, testing.low_draw)
        assert after.polls == 8
        assert after.attempts == 0
        assert after.last_polled_at == NOW
        assert after.updated_at == NOW
        assert after.model == "seedance_1_5_pro_720p"

    def test_a_missing_model_keeps_the_known_one(self) -> None:
        before = task(model="seedance_1_5_pro_1080p")
        reply = models.Answer(TASK_ID, models.Status.QUEUED, None, None, None, None, None)
        after = policy.on_answer(before, reply, NOW, RULES, testing.low_draw)
        assert after.model == "seedance_1_5_pro_1080p"


class TestDeadline:
    """The deadline is the provider's creation time plus the retention."""

    def test_deadline_adds_the_retention(self) -> None:
        created = NOW - dt.timedelta(hours=3)
        assert policy.deadline(created, RULES) == created + dt.timedelta(days=1)

    def test_answer_sets_created_and_expires_at(self) -> None:
        created = NOW - dt.timedelta(hours=3)
        reply = answer("processing", created=created)
        after = policy.on_answer(task(), reply, NOW, RULES, testing.low_draw)
        assert after.provider_created_at == created
        assert after.expires_at == created + dt.timedelta(days=1)

    def test_answer_without_created_keeps_the_known_deadline(self) -> None:
        created = NOW - dt.timedelta(hours=3)
        before = task(provider_created_at=created, expires_at=created + dt.timedelta(days=1))
        reply = models.Answer(TASK_ID, models.Status.PROCESSING, None, None, None, None, None)
        after = policy.on_answer(before, reply, NOW, RULES, testing.low_draw)
        assert after.provider_created_at == created
        assert after.expires_at == created + dt.timedelta(days=1)

    def test_answer_without_created_on_a_new_task_leaves_no_deadline(self) -> None:
        reply = models.Answer(TASK_ID, models.Status.QUEUED, None, None, None, None, None)
        after = policy.on_answer(task(), reply, NOW, RULES, testing.low_draw)
        assert after.expires_at is None

    def test_retention_comes_from_the_settings(self) -> None:
        rules = policy.Rules.from_settings(config.Settings(retention_seconds=3600))
        reply = answer("queued", created=NOW)
        after = policy.on_answer(task(), reply, NOW, rules, testing.low_draw)
        assert after.expires_at == NOW + dt.timedelta(hours=1)


class TestBackoff:
    """Retry waits double from the floor, are capped, and are jittered within [ceiling/2, ceiling]."""

    @pytest.mark.parametrize(
        ("attempts", "ceiling"), [(0, 30), (1, 30), (2, 60), (3, 120), (4, 240), (5, 480)]
    )
    def test_ceiling_doubles_with_attempts(self, attempts: int, ceiling: float) -> None:
        assert policy.backoff_seconds(attempts, 30.0, 600.0, testing.high_draw) == ceiling

    @pytest.mark.parametrize("attempts", [6, 7, 10, 50, 1000])
    def test_ceiling_is_capped(self, attempts: int) -> None:
        assert policy.backoff_seconds(attempts, 30.0, 600.0, testing.high_draw) == 600.0

    @pytest.mark.parametrize("attempts", [1, 2, 3, 4, 5, 6, 20])
    def test_jitter_range_is_half_ceiling_to_ceiling_never_below_floor(self, attempts: int) -> None:
        asked: list[tuple[float, float]] = []

        def draw(low: float, high: float) -> float:
            asked.append((low, high))
            return low

        floor, cap = 10.0, 600.0
        policy.backoff_seconds(attempts, floor, cap, draw)
        ceiling = min(cap, floor * 2 ** (attempts - 1))
        assert asked == [(max(floor, ceiling / 2), ceiling)]

    def test_never_below_the_floor_even_above_the_cap(self) -> None:
        assert policy.backoff_seconds(1, 900.0, 600.0, testing.low_draw) == 900.0
        assert policy.backoff_seconds(9, 900.0, 600.0, testing.low_draw) == 900.0

    @given(
        attempts=st.integers(min_value=0, max_value=200),
        floor=st.floats(min_value=0.5, max_value=1000),
        cap=st.floats(min_value=1, max_value=10_000),
        fraction=st.floats(min_value=0, max_value=1),
    )
    def test_any_draw_stays_in_bounds(
        self, attempts: int, floor: float, cap: float, fraction: float
    ) -> None:
        wait = policy.backoff_seconds(
            attempts, floor, cap, lambda low, high: low + (high - low) * fraction
        )
        assert wait >= floor
        assert wait <= max(floor, cap)

    def test_very_many_attempts_still_give_the_cap(self) -> None:
        assert policy.backoff_seconds(5000, 30.0, 600.0, testing.high_draw) == 600.0


class TestPollError:
    """A retryable poll failure counts an attempt and backs off from the mode's floor."""

    @pytest.mark.parametrize("mode", MODES)
    def test_backs_off_from_the_cadence_floor(self, mode: str) -> None:
        low = RULES.cadence(mode).low
        after = policy.on_poll_error(
            task(mode, attempts=1), "HTTP 502", NOW, RULES, testing.high_draw
        )
        assert after.state == State.POLLING
        assert after.attempts == 2
        assert after.next_attempt_at == NOW + dt.timedelta(seconds=2 * low)
        assert after.error is not None and "HTTP 502" in after.error
        assert after.last_polled_at == NOW

    def test_honours_a_longer_required_wait(self) -> None:
        after = policy.on_poll_error(task("draft"), "429", NOW, RULES, testing.low_draw, 300.0)
        assert after.next_attempt_at == NOW + dt.timedelta(seconds=300)


class TestBeforeWork:
    """Only an impossible id is decided without asking: the deadline never ends a task."""

    @pytest.mark.parametrize(
        "past", [dt.timedelta(0), dt.timedelta(seconds=1), dt.timedelta(days=2)]
    )
    def test_a_passed_deadline_still_needs_work(self, past: dt.timedelta) -> None:
        expired = task(state="polling", provider_status="processing", expires_at=NOW - past)
        assert policy.before_work(expired, NOW) is None

    def test_no_deadline_yet_needs_work(self) -> None:
        assert policy.before_work(task(), NOW) is None

    def test_invalid_task_id_is_rejected(self) -> None:
        bad = models.Task(task_id="../etc/passwd", next_attempt_at=NOW)
        after = policy.before_work(bad, NOW)
        assert after is not None
        assert after.state == State.REJECTED
        assert after.error is not None and after.error.startswith("invalid task id")


class TestDeadlineOrdersWork:
    """The deadline is what the provider's facts say; past it, work goes on as before."""

    def test_the_providers_own_deadline_is_taken(self) -> None:
        own = NOW + dt.timedelta(hours=70)
        after = policy.on_answer(
            task(), answer("queued", expires_at=own), NOW, RULES, testing.low_draw
        )
        assert after.expires_at == own

    def test_else_created_plus_the_retention(self) -> None:
        after = policy.on_answer(task(), answer("queued"), NOW, RULES, testing.low_draw)
        assert after.expires_at == NOW + RULES.retention  # testing.answer: created = EPOCH

    def test_a_completed_answer_past_the_deadline_is_downloaded(self) -> None:
        late = NOW + RULES.retention + dt.timedelta(seconds=20)
        after = policy.on_answer(
            task(state="polling", provider_status="processing"),
            answer("completed", video_url=URL),
            late,
            RULES,
            testing.low_draw,
        )
        assert after.state == State.DOWNLOADING and after.video_url == URL
        assert after.expires_at is not None and after.expires_at < late

    def test_past_the_deadline_errors_back_off_as_before_it(self) -> None:
        ahead = task(attempts=4, expires_at=NOW + dt.timedelta(days=1))
        past = task(attempts=4, expires_at=NOW - dt.timedelta(minutes=1))
        waits = [
            policy.on_poll_error(t, "HTTP 502", NOW, RULES, testing.high_draw).next_attempt_at
            for t in (ahead, past)
        ]
        assert waits[0] == waits[1] == NOW + dt.timedelta(seconds=min(600, 30 * 2**4))


class TestGiveUp:
    """A task the provider keeps unfinished is not polled forever: expired after the hard limit."""

    CREATED = NOW - policy.GIVE_UP_AFTER

    @pytest.mark.parametrize("status", ["queued", "processing"])
    def test_unfinished_at_the_limit_is_expired_with_the_reason(self, status: str) -> None:
        before = task(state="polling", provider_status=status, provider_created_at=self.CREATED)
        after = policy.on_answer(
            before, answer(status, created=self.CREATED), NOW, RULES, testing.low_draw
        )
        assert after.state == State.EXPIRED
        assert after.error is not None and after.error.startswith(policy.GIVE_UP_REASON)
        assert f"answer was {status}" in after.error and "7.0 days" in after.error

    def test_just_before_the_limit_it_goes_on(self) -> None:
        created = self.CREATED + dt.timedelta(minutes=1)
        before = task(state="polling", provider_status="queued", provider_created_at=created)
        after = policy.on_answer(
            before, answer("queued", created=created), NOW, RULES, testing.low_draw
        )
        assert after.state == State.POLLING

    def test_the_answers_creation_time_counts_though_the_row_had_none(self) -> None:
        """The first answer's created time is the one the limit counts from, not the insert."""
        before = task(state="polling", provider_status="queued", inserted_at=NOW)
        after = policy.on_answer(
            before, answer("queued", created=self.CREATED), NOW, RULES, testing.low_draw
        )
        assert after.state == State.EXPIRED
        assert after.provider_created_at == self.CREATED and after.polls == before.polls + 1

    def test_a_finished_video_is_never_given_up_on_the_clock(self) -> None:
        before = task(state="polling", provider_status="queued", provider_created_at=self.CREATED)
        done = answer("completed", created=self.CREATED, video_url=URL)
        assert (
            policy.on_answer(before, done, NOW, RULES, testing.low_draw).state == State.DOWNLOADING
        )

    def test_without_a_creation_time_it_counts_from_the_insert(self) -> None:
        before = task(state="polling", inserted_at=self.CREATED)
        after = policy.on_malformed(
            before, "malformed answer: unknown status 'x'", NOW, RULES, testing.low_draw
        )
        assert after.state == State.EXPIRED and "malformed" in (after.error or "")

    def test_errors_past_the_limit_end_it_too(self) -> None:
        before = task(state="polling", provider_status="queued", provider_created_at=self.CREATED)
        after = policy.on_poll_error(before, "HTTP 502", NOW, RULES, testing.low_draw)
        assert after.state == State.EXPIRED and "HTTP 502" in (after.error or "")

    def test_the_limit_is_a_rule(self) -> None:
        rules = policy.Rules(
            cadences=RULES.cadences, retention=RULES.retention, give_up_after=dt.timedelta(days=2)
        )
        created = NOW - dt.timedelta(days=2)
        before = task(state="polling", provider_status="queued", provider_created_at=created)
        after = policy.on_answer(
            before, answer("queued", created=created), NOW, rules, testing.low_draw
        )
        assert after.state == State.EXPIRED and "(2 days)" in (after.error or "")


def not_found_in_a_row(
    current: models.Task, count: int, gap: float, rules: policy.Rules = RULES
) -> tuple[models.Task, list[dt.datetime]]:
    """``count`` of the provider's own 404s, ``gap`` seconds apart; the task after, and the times."""
    times = []
    at = NOW
    for _ in range(count):
        times.append(at)
        current = policy.on_not_found(current, at, rules, testing.low_draw)
        at += dt.timedelta(seconds=gap)
    return current, times


class TestNotFound:
    """The provider's own 404 is evidence: several in a row, spread over the mode's longest
    interval, end a task (expired if seen, rejected if never seen); one never does."""

    @pytest.mark.parametrize("mode", MODES)
    def test_never_seen_is_retried_then_rejected(self, mode: str) -> None:
        gap = RULES.cadence(mode).high / (RULES.not_found_polls - 1)
        current = task(mode)
        for poll in range(1, RULES.not_found_polls):
            current, _ = not_found_in_a_row(current, 1, 0)
            assert current.state == State.POLLING
            assert current.attempts == poll
            assert current.next_attempt_at is not None
            assert current.next_attempt_at >= NOW + dt.timedelta(seconds=gap)
            current = current.replace(last_polled_at=NOW - dt.timedelta(seconds=gap))
        current = policy.on_not_found(current, NOW, RULES, testing.low_draw)
        assert current.state == State.REJECTED
        assert current.error is not None and policy.NOT_FOUND_REASON in current.error
        assert "its own 404 on 3 polls in a row" in current.error

    @pytest.mark.parametrize("mode", MODES)
    def test_seen_before_takes_several_spread_404s_to_expire(self, mode: str) -> None:
        high = RULES.cadence(mode).high
        seen = task(mode, state="polling", provider_status="processing", polls=4)
        once, _ = not_found_in_a_row(seen, 1, 0)
        assert once.state == State.POLLING
        assert once.error is not None and once.error.startswith(policy.GONE_REASON)
        after, times = not_found_in_a_row(seen, RULES.not_found_polls, high / 2)
        assert after.state == State.EXPIRED
        assert after.error is not None and after.error.startswith(policy.GONE_REASON)
        assert after.polls == 4 + RULES.not_found_polls
        assert (times[-1] - times[0]).total_seconds() >= high

    def test_404s_sooner_than_the_spread_allows_do_not_count(self) -> None:
        seen = task(state="polling", provider_status="processing")
        hurried, _ = not_found_in_a_row(seen, 10, 1)  # a hastened row, polled every second
        assert hurried.state == State.POLLING
        assert hurried.attempts == 1

    def test_the_number_of_polls_is_a_rule(self) -> None:
        rules = policy.Rules(cadences=RULES.cadences, retention=RULES.retention, not_found_polls=5)
        states = [not_found_in_a_row(task(), n, 15, rules)[0].state for n in range(1, 6)]
        assert states == ["polling"] * 4 + ["rejected"]

    def test_an_answer_in_between_starts_the_count_again(self) -> None:
        seen = task(state="polling", provider_status="processing")
        twice, _ = not_found_in_a_row(seen, 2, 30)
        answered = policy.on_answer(twice, answer("processing"), NOW, RULES, testing.low_draw)
        again, _ = not_found_in_a_row(answered, 2, 30)
        assert again.state == State.POLLING

    def test_earlier_unrelated_failures_do_not_count_as_404s(self) -> None:
        before = task(state="polling", attempts=2, error="the provider answered HTTP 502")
        after = policy.on_not_found(before, NOW, RULES, testing.low_draw)
        assert after.state == State.POLLING and after.attempts == 1


class TestLinkRefused:
    """A refused link means: poll for a fresh one. Only fresh links refused again and again are the
    provider's word that the video is gone."""

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("polled_ago", [0.0, 5.0, 1000.0])
    def test_polls_again_not_sooner_than_the_cadence(self, mode: str, polled_ago: float) -> None:
        low = RULES.cadence(mode).low
        last = NOW - dt.timedelta(seconds=polled_ago)
        before = task(mode, state="downloading", video_url=URL, last_polled_at=last)
        after = policy.on_link_refused(before, "the video link was refused (HTTP 403)", NOW, RULES)
        assert after.state == State.POLLING
        assert after.video_url is None
        assert after.next_attempt_at is not None
        assert after.next_attempt_at >= last + dt.timedelta(seconds=low)
        assert after.next_attempt_at >= NOW
        assert after.error is not None and "HTTP 403" in after.error

    def test_never_polled_is_due_now(self) -> None:
        before = task(state="downloading", video_url=URL)
        after = policy.on_link_refused(before, "the video link was refused (HTTP 403)", NOW, RULES)
        assert after.next_attempt_at == NOW

    def test_fresh_links_refused_again_and_again_expire_it(self) -> None:
        current = task(state="downloading", video_url=URL, provider_status="completed")
        states = []
        for n in range(RULES.link_refusals):
            current = policy.on_link_refused(
                current, f"the video link was refused (HTTP 40{n})", NOW, RULES
            )
            states.append(current.state)
            if current.state == State.POLLING:
                fresh = answer("completed", video_url=f"{URL}&fresh={n}")
                current = policy.on_answer(current, fresh, NOW, RULES, testing.low_draw)
                assert current.state == State.DOWNLOADING
        assert states == ["polling"] * (RULES.link_refusals - 1) + ["expired"]
        assert current.error is not None and current.error.startswith(policy.LINK_GONE_REASON)
        assert "3 links in a row" in current.error and "(HTTP 402)" in current.error

    def test_a_download_that_works_in_between_starts_the_count_again(self) -> None:
        current = task(state="downloading", video_url=URL, provider_status="completed")
        current = policy.on_link_refused(
            current, "the video link was refused (HTTP 403)", NOW, RULES
        )
        current = policy.on_answer(
            current, answer("completed", video_url=URL), NOW, RULES, testing.low_draw
        )
        current = policy.on_download_error(
            current, "the video host answered HTTP 503", NOW, RULES, testing.low_draw
        )
        for _ in range(RULES.link_refusals - 1):
            current = policy.on_link_refused(
                current, "the video link was refused (HTTP 403)", NOW, RULES
            )
            current = policy.on_answer(
                current, answer("completed", video_url=URL), NOW, RULES, testing.low_draw
            )
        assert current.state == State.DOWNLOADING


NOT_A_VIDEO = "the video host answered 200 with a body of type text/html, not a video: ..."


class TestNotAVideo:
    """A 200 that is not a video is retried, then the link is asked for again; never a verdict."""

    def test_retried_then_a_fresh_link_is_asked_for(self) -> None:
        current = task(state="downloading", video_url=URL)
        for n in range(1, RULES.not_a_video_tries):
            current = policy.on_not_a_video(current, NOT_A_VIDEO, NOW, RULES, testing.low_draw)
            assert (current.state, current.video_url, current.attempts) == ("downloading", URL, n)
            assert current.next_attempt_at is not None
            assert current.next_attempt_at >= NOW + dt.timedelta(
                seconds=RULES.download_retry_seconds
            )
        current = policy.on_not_a_video(current, NOT_A_VIDEO, NOW, RULES, testing.low_draw)
        assert (current.state, current.video_url) == ("polling", None)
        assert current.error is not None and "3 times in a row" in current.error
        fresh = policy.on_answer(
            current, answer("completed", video_url=URL), NOW, RULES, testing.low_draw
        )
        assert fresh.state == State.DOWNLOADING and fresh.error is None

    def test_never_terminal(self) -> None:
        current = task(state="downloading", video_url=URL, provider_status="completed")
        for _ in range(50):
            current = policy.on_not_a_video(current, NOT_A_VIDEO, NOW, RULES, testing.low_draw)
            if current.state == State.POLLING:
                current = policy.on_answer(
                    current, answer("completed", video_url=URL), NOW, RULES, testing.low_draw
                )
            assert not current.is_terminal


class TestWaitingOnSetting:
    """A video our own settings refuse waits, downloading, on a slow schedule; never a verdict."""

    @pytest.mark.parametrize("mode", MODES)
    def test_waits_from_the_longest_interval_doubling_to_the_cap(self, mode: str) -> None:
        high = RULES.cadence(mode).high
        current = task(mode, state="downloading", video_url=URL)
        waits = []
        for _ in range(8):
            current = policy.on_waiting_on_setting(
                current,
                "video is 3 GB, more than SEEDANCE_MAX_VIDEO_BYTES",
                NOW,
                RULES,
                testing.high_draw,
            )
            assert current.state == State.DOWNLOADING and current.video_url == URL
            assert current.error is not None
            assert current.error.startswith(f"{policy.WAITING_ON_SETTING}: video is 3 GB")
            assert current.next_attempt_at is not None
            waits.append(seconds(current.next_attempt_at - NOW))
        assert waits[0] == high
        assert waits == sorted(waits) and waits[-1] == policy.SETTING_RETRY_CAP_SECONDS
        assert waits[1] == 2 * high


class TestVerdictDeferred:
    """A verdict that could not be checked against the archive waits; the task stays active."""

    @pytest.mark.parametrize("state", ["polling", "downloading", "pending"])
    def test_the_task_stays_active_with_the_reason(self, state: str) -> None:
        before = task(state=state, video_url=URL)
        verdict = before.replace(
            state="expired", polls=9, attempts=3, error="the provider no longer has this task"
        )
        after = policy.on_verdict_deferred(
            before, verdict, "the archive could not be checked", NOW, RULES, testing.low_draw
        )
        assert after.state == ("downloading" if state == "downloading" else "polling")
        assert after.polls == 9 and after.attempts == 3
        assert after.error is not None
        assert after.error.startswith("the provider no longer has this task; not given up yet")
        assert "the archive could not be checked" in after.error
        assert after.next_attempt_at is not None and after.next_attempt_at > NOW


class TestDownloadOutcomes:
    """Download failures and a successful archive."""

    def test_download_error_keeps_downloading_with_backoff(self) -> None:
        before = task(state="downloading", video_url=URL, attempts=2)
        after = policy.on_download_error(before, "truncated", NOW, RULES, testing.high_draw)
        assert after.state == State.DOWNLOADING
        assert after.video_url == URL
        assert after.attempts == 3
        wait = RULES.download_retry_seconds * 4
        assert after.next_attempt_at == NOW + dt.timedelta(seconds=wait)
        assert after.error is not None and "truncated" in after.error

    def test_download_error_waits_at_least_the_retry_floor(self) -> None:
        before = task(state="downloading", video_url=URL)
        after = policy.on_download_error(before, "reset", NOW, RULES, testing.low_draw)
        assert after.next_attempt_at == NOW + dt.timedelta(seconds=RULES.download_retry_seconds)

    def test_archived_records_where_and_what(self) -> None:
        before = task(state="downloading", video_url=URL, attempts=1, error="truncated")
        after = policy.on_archived(before, "s3://bucket/v/x.mp4", 1234, "ab" * 32, NOW)
        assert after.state == State.ARCHIVED
        assert after.is_terminal
        assert after.archive_uri == "s3://bucket/v/x.mp4"
        assert after.archive_bytes == 1234
        assert after.archive_sha256 == "ab" * 32
        assert after.archived_at == NOW
        assert (after.attempts, after.error) == (0, None)


class TestTaskId:
    """Only ids that are safe in a URL path and an object key are accepted."""

    @pytest.mark.parametrize(
        "task_id",
        ["video_abc123def456", "a", "0", "A.b-c_d", "cgt-20251028-abc.def", "x" * 128],
    )
    def test_accepted(self, task_id: str) -> None:
        assert policy.task_id_problem(task_id) is None

    @pytest.mark.parametrize(
        "task_id",
        [
            "",
            "x" * 129,
            "x" * 5000,
            "../etc/passwd",
            "..",
            ".hidden",
            "_video",
            "-rf",
            "a/b",
            "a\\b",
            "video abc",
            " video",
            "video\n",
            "vid\neo",
            "video\t1",
            "vidéo",
            "\uff11\uff12\uff13",  # full-width digits
            'a"b',
            "a'b",
            "a;b",
            "a%2Fb",
            "a?b",
            "a#b",
            "a\x00b",
        ],
    )
    def test_refused_with_a_reason(self, task_id: str) -> None:
        problem = policy.task_id_problem(task_id)
        assert problem is not None
        assert problem.startswith("invalid task id")

    @given(
        st.one_of(
            st.text(),
            st.text(alphabet="aZ09_.-/ \n%?#;'\"é", max_size=20),
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{100,140}", fullmatch=True),
        )
    )
    def test_accepted_exactly_when_it_matches_the_id_pattern(self, task_id: str) -> None:
        accepted = policy.task_id_problem(task_id) is None
        assert accepted == bool(VALID_ID.fullmatch(task_id))
        if accepted:
            assert "/" not in task_id
            assert not task_id.startswith(".")
            assert not any(ch.isspace() for ch in task_id)


class TestBackoffNearTheDeadline:
    """Near the deadline, backoff shrinks so retries still come before it."""

    def _task(self, state: str, minutes_left: float) -> models.Task:
        return models.Task(
            task_id="video_late",
            state=state,
            attempts=20,
            provider_status="completed",
            video_url="https://cdn.example/v.mp4",
            expires_at=testing.EPOCH + dt.timedelta(minutes=minutes_left),
        )

    def test_download_retry_is_cut_to_half_the_time_left(self) -> None:
        rules = policy.Rules(cadences=config.Settings().cadences(), retention=dt.timedelta(days=1))
        task = policy.on_download_error(
            self._task("downloading", 4), "S3 refused", testing.EPOCH, rules, testing.high_draw
        )
        assert task.next_attempt_at is not None and task.expires_at is not None
        assert task.next_attempt_at < task.expires_at
        assert (task.next_attempt_at - testing.EPOCH).total_seconds() == 120

    def test_far_from_the_deadline_the_full_backoff_applies(self) -> None:
        rules = policy.Rules(cadences=config.Settings().cadences(), retention=dt.timedelta(days=1))
        task = policy.on_download_error(
            self._task("downloading", 600), "S3 refused", testing.EPOCH, rules, testing.high_draw
        )
        assert task.next_attempt_at is not None
        assert (task.next_attempt_at - testing.EPOCH).total_seconds() == rules.backoff_cap_seconds

    def test_poll_retry_never_goes_below_the_cadence_floor(self) -> None:
        rules = policy.Rules(cadences=config.Settings().cadences(), retention=dt.timedelta(days=1))
        task = policy.on_poll_error(
            self._task("polling", 0.5), "HTTP 503", testing.EPOCH, rules, testing.high_draw
        )
        assert task.next_attempt_at is not None
        assert (task.next_attempt_at - testing.EPOCH).total_seconds() == 30  # standard floor
