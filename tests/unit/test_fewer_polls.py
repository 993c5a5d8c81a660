"""Fewer polls per video: the skip, learning, the budget order, no starvation, cadence.

All pure: policy functions of (task, answer, rules, now), with a moved clock where time passes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from seedance_archiver import config, models, policy, testing, views
from seedance_archiver.models import State

from tests import helpers

NOW = testing.EPOCH
MODES = [m.value for m in models.Mode]
PLAIN = policy.Rules(cadences=config.Settings().cadences(), retention=dt.timedelta(days=1))
DEFAULTS = policy.Rules.from_settings(config.Settings())
RULES = dataclasses.replace(DEFAULTS, patient=False)  # the skip alone, cadence draws as before
MODEL_480 = "seedance_1_5_pro_480p"
MODEL_720 = "seedance_1_5_pro_720p"
MODEL_1080 = "seedance_1_5_pro_1080p"


def seconds(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


def answer(
    status: str = "processing", model: str | None = MODEL_720, **fields: object
) -> models.Answer:
    base = testing.answer("video_a", status, **fields)  # type: ignore[arg-type]
    return dataclasses.replace(base, model=model)


def task(mode: str = "standard", **fields: object) -> models.Task:
    fields.setdefault("next_attempt_at", NOW)
    return models.Task(task_id="video_a", mode=mode, **fields)  # type: ignore[arg-type]


class TestResolution:
    """The resolution comes from one pure function, fed by the model name (or a stated field)."""

    @pytest.mark.parametrize(
        ("model", "expected"),
        [
            ("seedance_1_5_pro_480p", "480p"),
            ("seedance_1_5_pro_720p", "720p"),
            ("seedance_1_5_pro_1080p", "1080p"),
            ("seedance-1-5-pro_720p", "720p"),
            ("SEEDANCE_1_5_PRO_1080P", "1080p"),
            (" seedance_1_5_pro_480p ", "480p"),
        ],
    )
    def test_read_from_the_model_name(self, model: str, expected: str) -> None:
        assert policy.resolution(answer(model=model)) == expected
        assert policy.resolution(task(model=model)) == expected

    @pytest.mark.parametrize("model", [None, "", "seedance_1_5_pro", "720p_seedance", "x_720"])
    def test_unknown_when_the_name_does_not_end_in_one(self, model: str | None) -> None:
        assert policy.resolution(task(model=model)) is None

    def test_a_stated_resolution_wins(self) -> None:
        @dataclasses.dataclass(frozen=True)
        class WithResolution:
            model: str | None
            resolution: str | None

        stated = WithResolution(model=MODEL_480, resolution="1080P")
        assert policy.resolution(stated) == "1080p"  # type: ignore[arg-type]
        assert policy.resolution(WithResolution(MODEL_480, None)) == "480p"  # type: ignore[arg-type]


class TestResolutionFromTheAnswer:
    """A resolution the answer states (a second provider's field) feeds the skip, model or not."""

    def test_a_stated_resolution_without_a_model(self) -> None:
        """Ark states it (``Answer.resolution``); the reseller's model name carries it."""
        reply = dataclasses.replace(answer(model=None, created=NOW), resolution="1080p")
        after = policy.on_answer(task(), reply, NOW, RULES, testing.low_draw)
        assert after.next_attempt_at == NOW + seconds(180)


class TestSkip:
    """While queued or processing, the next poll is not before created + the shortest time."""

    @pytest.mark.parametrize(
        ("model", "skip"), [(MODEL_480, 30), (MODEL_720, 120), (MODEL_1080, 180)]
    )
    def test_first_poll_after_intake_waits_for_the_seed_minimum(
        self, model: str, skip: float
    ) -> None:
        after = policy.on_answer(
            task(), answer(model=model, created=NOW), NOW, RULES, testing.low_draw
        )
        assert after.next_attempt_at == NOW + seconds(max(skip, 30))

    def test_the_intake_poll_itself_stays_immediate(self) -> None:
        fresh = testing.FakeStore(clock=lambda: NOW)
        fresh.add("video_a")
        assert fresh.rows["video_a"].next_attempt_at == NOW

    @pytest.mark.parametrize("status", ["queued", "processing"])
    def test_skip_counts_from_creation_not_from_the_poll(self, status: str) -> None:
        created = NOW - seconds(50)
        after = policy.on_answer(
            task(), answer(status, created=created), NOW, RULES, testing.low_draw
        )
        assert after.next_attempt_at == created + seconds(120)

    def test_past_the_skip_the_cadence_rules(self) -> None:
        created = NOW - seconds(200)
        after = policy.on_answer(task(), answer(created=created), NOW, RULES, testing.high_draw)
        assert after.next_attempt_at == NOW + seconds(60)

    def test_unknown_resolution_gets_no_skip(self) -> None:
        after = policy.on_answer(
            task(), answer(model="mystery-model", created=NOW), NOW, RULES, testing.low_draw
        )
        assert after.next_attempt_at == NOW + seconds(30)

    def test_off_disables_the_skip_for_that_resolution(self) -> None:
        rules = policy.Rules.from_settings(config.load(expected_seconds_720p="off"))
        assert "720p" not in rules.generation_times
        after = policy.on_answer(task(), answer(created=NOW), NOW, rules, testing.low_draw)
        assert after.next_attempt_at == NOW + seconds(30)
        assert policy.skip_seconds(answer(model=MODEL_1080), rules) == 180

    def test_expected_times_are_settings(self) -> None:
        rules = policy.Rules.from_settings(config.load(expected_seconds_720p="200-400"))
        after = policy.on_answer(task(), answer(created=NOW), NOW, rules, testing.low_draw)
        assert after.next_attempt_at == NOW + seconds(200)

    def test_rules_built_by_hand_poll_on_the_plain_cadence(self) -> None:
        after = policy.on_answer(task(), answer(created=NOW), NOW, PLAIN, testing.low_draw)
        assert after.next_attempt_at == NOW + seconds(30)

    def test_no_created_no_skip(self) -> None:
        plain = dataclasses.replace(answer(), created=None)
        after = policy.on_answer(task(), plain, NOW, RULES, testing.low_draw)
        assert after.next_attempt_at == NOW + seconds(30)

    @pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
    def test_terminal_or_ready_answers_are_not_delayed(self, status: str) -> None:
        reply = answer(status, created=NOW, video_url="https://cdn.example.com/v.mp4")
        after = policy.on_answer(task(), reply, NOW, RULES, testing.low_draw)
        assert after.next_attempt_at == NOW

    def test_a_retry_after_an_error_also_waits_for_the_skip(self) -> None:
        known = task(model=MODEL_720, provider_status="processing", provider_created_at=NOW)
        after = policy.on_poll_error(known, "timeout", NOW, RULES, testing.low_draw)
        assert after.next_attempt_at == NOW + seconds(120)
        unseen = task(model=MODEL_720, provider_created_at=NOW)  # never answered: plain backoff
        after = policy.on_poll_error(unseen, "timeout", NOW, RULES, testing.low_draw)
        assert after.next_attempt_at == NOW + seconds(30)

    def test_the_model_comes_from_the_task_when_the_answer_has_none(self) -> None:
        reply = answer(model=None, created=NOW)
        after = policy.on_answer(task(model=MODEL_1080), reply, NOW, RULES, testing.low_draw)
        assert after.next_attempt_at == NOW + seconds(180)


class TestPatient:
    """With a skip in force, waits come from the top of the cadence range (the default)."""

    @pytest.mark.parametrize("mode", MODES)
    def test_waits_are_drawn_near_the_longest_interval(self, mode: str) -> None:
        assert DEFAULTS.patient is True
        cadence = DEFAULTS.cadence(mode)
        created = NOW - seconds(1000)  # past every skip
        for draw, expected in (
            (testing.low_draw, 0.9 * cadence.high),
            (testing.high_draw, cadence.high),
        ):
            after = policy.on_answer(task(mode), answer(created=created), NOW, DEFAULTS, draw)
            assert after.next_attempt_at == NOW + seconds(max(cadence.low, expected))

    def test_unknown_resolution_keeps_the_plain_draw(self) -> None:
        reply = answer(model="mystery", created=NOW)
        after = policy.on_answer(task(), reply, NOW, DEFAULTS, testing.low_draw)
        assert after.next_attempt_at == NOW + seconds(30)

    def test_it_is_a_setting(self) -> None:
        assert policy.Rules.from_settings(config.load(patient_polling=False)).patient is False


class TestSettings:
    """Expected times and learning knobs are validated like every other setting."""

    def test_defaults_are_the_seed_numbers(self) -> None:
        got = {r: (g.low, g.high) for r, g in config.load().generation_times().items()}
        assert got == {"480p": (30, 120), "720p": (120, 300), "1080p": (180, 480)}
        assert (config.load().learn_min_samples, config.load().learn_quantile) == (50, 5)

    @pytest.mark.parametrize("value", ["abc", "300-120", "-5", "10-1e9", "nan"])
    def test_a_bad_range_stops_start_up_naming_the_setting(self, value: str) -> None:
        with pytest.raises(Exception, match="SEEDANCE_EXPECTED_SECONDS_1080P"):
            config.load(expected_seconds_1080p=value)

    @pytest.mark.parametrize(
        ("field", "value"), [("learn_quantile", 80), ("learn_min_samples", -1)]
    )
    def test_bad_learning_knobs_stop_start_up(self, field: str, value: float) -> None:
        with pytest.raises(Exception, match=f"SEEDANCE_{field.upper()}"):
            config.load(**{field: value})

    def test_read_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SEEDANCE_EXPECTED_SECONDS_480P", " 20-90 ")
        monkeypatch.setenv("SEEDANCE_EXPECTED_SECONDS_1080P", "OFF")
        times = config.load().generation_times()
        assert times["480p"] == models.GenerationTime(20, 90)
        assert "1080p" not in times


class TestLearning:
    """Enough observed times per model replace the seed's number by their low quantile."""

    def test_quantile_interpolates(self) -> None:
        assert policy.quantile([10, 20, 30, 40, 50], 50) == 30
        assert policy.quantile([10, 20], 50) == 15
        assert policy.quantile([5], 95) == 5
        assert policy.quantile(list(range(101)), 5) == 5

    def test_too_few_samples_keep_the_seed_number(self) -> None:
        learned = policy.learn({MODEL_720: [200.0] * 49}, RULES)
        assert learned == {}

    def test_enough_samples_give_the_low_quantile(self) -> None:
        observed = [150.0 + i for i in range(100)]  # 150..249
        learned = policy.learn({MODEL_720: observed}, RULES)
        assert learned[MODEL_720].skip_seconds == pytest.approx(policy.quantile(observed, 5))
        rules = dataclasses.replace(RULES, learned=learned)
        assert policy.skip_seconds(answer(), rules) == pytest.approx(154.95)

    def test_the_learned_skip_is_used_by_the_next_poll(self) -> None:
        rules = dataclasses.replace(RULES, learned={MODEL_720: policy.Learned(160, 200)})
        after = policy.on_answer(task(), answer(created=NOW), NOW, rules, testing.low_draw)
        assert after.next_attempt_at == NOW + seconds(160)

    def test_never_above_the_seed_upper_bound(self) -> None:
        learned = policy.learn({MODEL_720: [900.0] * 60}, RULES)
        rules = dataclasses.replace(RULES, learned=learned)
        assert policy.skip_seconds(answer(), rules) == 300

    def test_never_below_zero(self) -> None:
        learned = policy.learn({MODEL_720: [-30.0] * 60}, RULES)  # clocks out of step
        rules = dataclasses.replace(RULES, learned=learned)
        assert policy.skip_seconds(answer(), rules) == 0

    def test_a_faster_model_learns_a_shorter_skip(self) -> None:
        learned = policy.learn({MODEL_1080: [60.0] * 60}, RULES)
        rules = dataclasses.replace(RULES, learned=learned)
        assert policy.skip_seconds(answer(model=MODEL_1080), rules) == 60

    def test_min_samples_and_quantile_are_settings(self) -> None:
        rules = policy.Rules.from_settings(config.load(learn_min_samples=3, learn_quantile=50))
        learned = policy.learn({MODEL_480: [40.0, 50.0, 60.0]}, rules)
        assert learned[MODEL_480].skip_seconds == 50

    def test_zero_min_samples_never_learns(self) -> None:
        rules = policy.Rules.from_settings(config.load(learn_min_samples=0))
        assert policy.learn({MODEL_480: [40.0] * 500}, rules) == {}

    def test_learning_off_for_an_unknown_resolution(self) -> None:
        learned = policy.learn({"mystery": [40.0] * 60}, RULES)
        rules = dataclasses.replace(RULES, learned=learned)
        assert policy.skip_seconds(task(model="mystery"), rules) is None

    def test_model_times_for_status(self) -> None:
        times = {MODEL_720: [150.0 + i for i in range(100)], MODEL_480: [40.0] * 3}
        got = {g.model: g for g in policy.model_times(times, RULES)}
        assert got[MODEL_720].samples == 100
        assert got[MODEL_720].p50 == pytest.approx(199.5)
        assert got[MODEL_720].learned is True
        assert got[MODEL_720].skip_seconds == pytest.approx(154.95)
        assert (got[MODEL_480].samples, got[MODEL_480].skip_seconds) == (3, 30)
        assert got[MODEL_480].learned is False


class TestBudgetOrder:
    """When polls exceed the limit: downloads, then overdue videos by deadline, then the rest."""

    def row(self, name: str, **fields: object) -> models.Task:
        base: dict[str, object] = {
            "state": "polling",
            "model": MODEL_720,
            "next_attempt_at": NOW,
            "provider_created_at": NOW - seconds(10),
            "expires_at": NOW + seconds(86_000),
        }
        base.update(fields)
        return models.Task(task_id=name, **base)  # type: ignore[arg-type]

    def test_the_issue_order(self) -> None:
        fresh = self.row("fresh", expires_at=NOW + seconds(1000))
        late_far = self.row("late-far", provider_created_at=NOW - seconds(400))
        late_near = self.row(
            "late-near", provider_created_at=NOW - seconds(400), expires_at=NOW + seconds(5000)
        )
        downloading = self.row("downloading", state="downloading", expires_at=NOW + seconds(86_300))
        rows = [fresh, late_far, downloading, late_near]
        order = [t.task_id for t in policy.budget_order(rows, NOW, RULES)]
        assert order == ["downloading", "late-near", "late-far", "fresh"]

    def test_expected_completion_is_the_middle_of_the_range_until_learned(self) -> None:
        created = NOW - seconds(209)  # 720p: 120-300, middle 210
        row = self.row("a", provider_created_at=created)
        assert policy.expected_ready_at(row, RULES) == created + seconds(210)
        learned = dataclasses.replace(RULES, learned={MODEL_720: policy.Learned(130, 150)})
        assert policy.expected_ready_at(row, learned) == created + seconds(150)
        assert policy.expected_ready_at(self.row("b", model="x"), RULES) is None

    def test_a_starving_row_goes_first_whatever_else(self) -> None:
        starving = self.row("starving", next_attempt_at=NOW - seconds(61))  # standard: high 60
        downloading = self.row("downloading", state="downloading")
        order = [t.task_id for t in policy.budget_order([downloading, starving], NOW, RULES)]
        assert order == ["starving", "downloading"]

    def test_starving_is_overdue_past_the_modes_longest_interval(self) -> None:
        for mode in MODES:
            high = RULES.cadence(mode).high
            assert not policy.starving(task(mode, next_attempt_at=NOW - seconds(high)), NOW, RULES)
            assert policy.starving(task(mode, next_attempt_at=NOW - seconds(high + 1)), NOW, RULES)

    def test_starving_rows_longest_overdue_first(self) -> None:
        rows = [self.row(f"r{i}", next_attempt_at=NOW - seconds(100 + i)) for i in range(5)]
        order = [t.task_id for t in policy.budget_order(rows, NOW, RULES)]
        assert order == ["r4", "r3", "r2", "r1", "r0"]

    def test_the_rest_keeps_the_claim_order(self) -> None:
        rows = [
            self.row("later", expires_at=NOW + seconds(2000)),
            self.row("unknown", expires_at=None, provider_created_at=None),
            self.row("sooner", expires_at=NOW + seconds(1000)),
        ]
        order = [t.task_id for t in policy.budget_order(rows, NOW, RULES)]
        assert order == ["unknown", "sooner", "later"]

    def test_no_starvation_under_a_moved_clock(self) -> None:
        """A budget of 1 poll per 5 s for 9 rows that each want one per 30 s, 8 of them nearer
        their deadline: the farthest is still polled at most its interval plus the starving bound
        (its mode's longest interval) plus two steps apart."""
        clock = testing.MovableClock()
        old = NOW - seconds(1000)  # past the skip and the expected completion: all compete
        rows = {
            f"near{i}": self.row(
                f"near{i}", expires_at=NOW + seconds(1000 + i), provider_created_at=old
            )
            for i in range(8)
        }
        rows["far"] = self.row("far", expires_at=NOW + seconds(80_000), provider_created_at=old)
        polled_far: list[dt.datetime] = []
        for _ in range(400):
            now = clock.advance(5)
            due = [t for t in rows.values() if t.next_attempt_at and t.next_attempt_at <= now]
            if due:
                first = policy.budget_order(due, now, RULES)[0]
                if first.task_id == "far":
                    polled_far.append(now)
                reply = answer(created=first.provider_created_at)
                rows[first.task_id] = policy.on_answer(first, reply, now, RULES, testing.low_draw)
        assert polled_far, "the row with the farthest deadline was never polled"
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(polled_far)]
        bound = RULES.cadence("standard").low + RULES.cadence("standard").high + 5 * 2
        assert max(gaps) <= bound

    def test_polling_load(self) -> None:
        assert policy.polling_load(600, 60, 20) == 0.5
        assert policy.polling_load(2400, 60, 20) == 2
        assert policy.polling_load(0, 60, 20) == 0


POLL_ANSWERS = st.sampled_from(["queued", "processing", "completed_no_url", "error", "malformed"])


class TestCadenceProperty:
    """Whatever the provider says and whatever the skip, polls are never closer than the mode's
    minimum (DESIGN.md: never poll a task faster than its mode allows, except the intake poll)."""

    @given(
        mode=st.sampled_from(MODES),
        model=st.sampled_from([MODEL_480, MODEL_720, MODEL_1080, "unknown", None]),
        created_ago=st.floats(min_value=-60, max_value=1000),
        steps=st.lists(POLL_ANSWERS, min_size=1, max_size=12),
        fraction=st.floats(min_value=0, max_value=1),
        learned=st.one_of(st.none(), st.floats(min_value=-100, max_value=1000)),
    )
    def test_consecutive_polls_never_closer_than_the_modes_minimum(
        self,
        mode: str,
        model: str | None,
        created_ago: float,
        steps: list[str],
        fraction: float,
        learned: float | None,
    ) -> None:
        def draw(low: float, high: float) -> float:
            return low + (high - low) * fraction

        rules = DEFAULTS if fraction > 0.5 else RULES
        if learned is not None and model:
            rules = dataclasses.replace(rules, learned={model: policy.Learned(learned, learned)})
        clock = testing.MovableClock()
        created = NOW - seconds(created_ago)
        row = task(mode)
        polls: list[dt.datetime] = []
        for step in steps:
            now = row.next_attempt_at or clock.now
            clock.now = now
            polls.append(now)
            if step == "error":
                row = policy.on_poll_error(row, "timeout", now, rules, draw)
            elif step == "malformed":
                row = policy.on_malformed(row, "bad body", now, rules, draw)
            else:
                status = "completed" if step == "completed_no_url" else step
                reply = dataclasses.replace(
                    answer(status, created=created), model=model, video_url=None
                )
                row = policy.on_answer(row, reply, now, rules, draw)
            assert row.state == State.POLLING
        polls.append(row.next_attempt_at or clock.now)
        floor = rules.cadence(mode).low
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(polls)]
        assert min(gaps) >= floor - 1e-6


class TestService:
    """The service wires the policies: skip on real polls, a learn job, starving rows claimed."""

    def rig(self, rules: policy.Rules = RULES) -> helpers.Rig:
        rig = helpers.make_rig()
        rig.svc.rules = rules
        return rig

    async def test_no_poll_before_the_video_can_be_ready(self) -> None:
        rig = self.rig()
        rig.store.add("video_a")
        rig.provider.script("video_a", answer(created=NOW), answer("completed", created=NOW))
        assert await rig.cycle() == 1  # the intake poll, at once
        for _ in range(3):
            assert await rig.at(30) == 0  # standard cadence would poll at 30, 60, 90
        assert await rig.at(30) == 1  # created + 120 s (720p)
        assert rig.provider.fetches == ["video_a", "video_a"]

    async def test_the_learn_job_reads_the_table_and_changes_the_skip(self) -> None:
        rig = self.rig()
        created = NOW - seconds(3600)
        for i in range(60):
            rig.store.rows[f"done{i}"] = models.Task(
                task_id=f"done{i}",
                state="archived",
                model=MODEL_720,
                provider_created_at=created,
                completed_at=created + seconds(150 + i),
            )
        learned = await rig.svc.maintenance.learn()
        assert learned[MODEL_720].skip_seconds == pytest.approx(152.95)
        assert policy.skip_seconds(answer(), rig.svc.rules) == pytest.approx(152.95)

    async def test_starving_rows_get_a_share_once_claims_come_back_full(self) -> None:
        rig = self.rig()
        for i in range(10):
            rig.store.rows[f"near{i}"] = task(
                "standard", next_attempt_at=NOW - seconds(1), expires_at=NOW + seconds(100 + i)
            ).replace(task_id=f"near{i}", state="polling")
        rig.store.rows["starving"] = task(
            "standard", next_attempt_at=NOW - seconds(600), expires_at=NOW + seconds(80_000)
        ).replace(task_id="starving", state="polling")
        first = await rig.svc._claim(NOW, 4)
        assert "starving" not in {t.task_id for t in first}  # nearest deadline first
        second = await rig.svc._claim(NOW, 4)
        assert second[0].task_id == "starving"

    async def test_the_polling_load_gauge(self) -> None:
        rig = self.rig()
        for i in range(120):
            rig.store.add(f"video_{i}")
        await rig.svc.maintenance.refresh_gauges()
        (gauge,) = rig.svc.metrics.polling_load.collect()
        ratio = gauge.samples[0].value
        assert ratio == pytest.approx(120 / 60 / rig.svc.limiter.max_rate)


class TestStatus:
    """``status`` shows per model the sample count, the quantiles and the skip in use."""

    def test_summary_lists_each_model(self) -> None:
        times = {MODEL_720: [150.0 + i for i in range(100)], "mystery": [40.0]}
        generation = policy.model_times(times, RULES)
        summary = testing.FakeStore().summary(NOW)
        text = views.summary(summary, [], NOW, generation)
        lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
        assert lines[MODEL_720][1:] == ["100", "155", "200", "244", "155", "(learned)"]
        assert lines["mystery"][1:] == ["1", "40", "40", "40", "none"]
        data = views.summary_dict(summary, [], NOW, generation)
        assert data["generation_times"][0]["model"] == "mystery"
        assert data["generation_times"][1]["samples"] == 100

    def test_the_seed_number_is_shown_until_learned(self) -> None:
        generation = policy.model_times({MODEL_1080: [200.0] * 3}, RULES)
        text = views.generation_table(generation)
        assert text.splitlines()[-1].split()[-2:] == ["180", "(settings)"]
