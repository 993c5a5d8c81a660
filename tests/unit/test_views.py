"""What people are shown: tables that never fail on no rows, and why each active task waits."""

from __future__ import annotations

import datetime as dt

import pytest
from seedance_archiver import config, models, policy, testing, views

NOW = testing.EPOCH
RULES = policy.Rules.from_settings(config.Settings.model_construct())


def seconds(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


def task(**fields: object) -> models.Task:
    values: dict[str, object] = {"task_id": "video_a", "state": "polling", "polls": 1} | fields
    return models.Task(**values)  # type: ignore[arg-type]


class TestEmpty:
    """No rows is an answer, not a crash."""

    def test_no_tasks(self) -> None:
        assert views.table([]) == views.NO_TASKS

    def test_no_webhook_events(self) -> None:
        assert views.webhook_table([]) == views.NO_EVENTS

    def test_no_generation_times(self) -> None:
        assert "generation times" in views.generation_table([])


class TestWhyWaiting:
    """Each active task says why its next poll is when it is."""

    def test_a_new_row(self) -> None:
        new = task(state="pending", polls=0, next_attempt_at=NOW)
        assert policy.why_waiting(new, NOW, RULES) == "new: polled at the next tick"

    def test_the_cadence(self) -> None:
        row = task(mode="draft", last_polled_at=NOW, next_attempt_at=NOW + seconds(15))
        assert policy.why_waiting(row, NOW, RULES) == "the draft cadence: every 10-20 s"

    def test_a_daemon_of_other_cadences_is_described_by_the_row(self) -> None:
        """`list` reads its own settings; the daemon may poll on others (a trial, 3-6 s)."""
        row = task(last_polled_at=NOW, next_attempt_at=NOW + seconds(4))
        assert policy.why_waiting(row, NOW, RULES) == (
            "the standard cadence: 4 s after the last poll"
        )

    def test_a_back_off(self) -> None:
        row = task(attempts=3, error="the provider answered HTTP 502 (attempt 3; next try in 120s)")
        why = policy.why_waiting(row, NOW, RULES)
        assert why is not None and why.startswith("back-off after 3 failures in a row")
        assert "HTTP 502" in why

    def test_the_skip(self) -> None:
        created = NOW - seconds(10)
        row = task(
            model="seedance_1_5_pro_720p",
            provider_status="processing",
            provider_created_at=created,
            last_polled_at=NOW,
            next_attempt_at=created + seconds(120),
        )
        why = policy.why_waiting(row, NOW, RULES)
        assert why is not None and why.startswith("the skip: not polled before created + 120s")
        assert "SEEDANCE_EXPECTED_SECONDS_720P" in why

    def test_waiting_on_a_setting(self) -> None:
        error = "waiting on a setting: video is 3 GB, more than SEEDANCE_MAX_VIDEO_BYTES; ..."
        row = task(state="downloading", attempts=2, error=error)
        assert policy.why_waiting(row, NOW, RULES) == error

    def test_a_finished_task_waits_for_nothing(self) -> None:
        assert policy.why_waiting(task(state="archived"), NOW, RULES) is None


class TestTable:
    """The list: next poll and why for active tasks, where or why for finished ones."""

    @pytest.mark.parametrize(
        ("due", "shown"),
        [(0, "now"), (42, "in 42s"), (600, "in 10m"), (-300, "5m late"), (7200, "in 2h")],
    )
    def test_next_poll(self, due: float, shown: str) -> None:
        assert views.next_poll(task(next_attempt_at=NOW + seconds(due)), NOW) == shown

    def test_columns(self) -> None:
        rows = [
            task(
                task_id="video_waits",
                mode="draft",
                last_polled_at=NOW,
                next_attempt_at=NOW + seconds(15),
            ),
            task(task_id="video_done", state="archived", archive_uri="s3://b/video_done.mp4"),
            task(task_id="video_failed", state="failed", error="content policy violation"),
        ]
        lines = views.table(rows, now=NOW, rules=RULES).splitlines()
        assert lines[0].split()[:3] == ["task_id", "mode", "state"]
        assert "next poll" in lines[0]
        by_id = {line.split()[0]: line for line in lines[2:]}
        assert "in 15s" in by_id["video_waits"] and "the draft cadence" in by_id["video_waits"]
        assert by_id["video_done"].rstrip().endswith("s3://b/video_done.mp4")
        assert by_id["video_failed"].rstrip().endswith("content policy violation")

    def test_detail_of_an_active_task(self) -> None:
        row = task(last_polled_at=NOW, next_attempt_at=NOW + seconds(40))
        text = views.detail(row, now=NOW, rules=RULES)
        assert "next_poll" in text and "in 40s" in text
        assert "the standard cadence: every 30-60 s" in text
