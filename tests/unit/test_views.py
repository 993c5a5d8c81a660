"""What people are shown: tables that never fail on no rows, and why each active task waits."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from seedance_archiver import config, models, policy, store, testing, views

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


# What a hostile or broken answer may carry: clear the screen, return to the line's start, reverse
# the rest of the line (RIGHT-TO-LEFT OVERRIDE), a C1 CSI, DEL, a zero-width space, a line separator.
HOSTILE = "bad\x1b[2J\rok\u202egnp.exe \x9b31m\x7f\u200b\u2028end"
RAW = ("\x1b", "\r", "\u202e", "\x9b", "\x7f", "\u200b", "\u2028")
SHOWN = ("\\x1b[2J", "\\r", "\\u202e", "\\x9b31m", "\\x7f", "\\u200b", "\\u2028")


def assert_escaped(text: str) -> None:
    assert not any(ch in text for ch in RAW), repr(text)
    for escape in SHOWN:
        assert escape in text, (escape, text)


class TestTerminalSafety:
    """Nothing a provider or feeder wrote can move the cursor or rewrite the screen."""

    def test_controls_and_format_characters_become_visible_escapes(self) -> None:
        assert_escaped(views.printable(HOSTILE))
        assert views.printable("a\tb\nc\x00") == "a\\tb\\nc\\x00"

    def test_ordinary_text_and_non_ascii_are_kept(self) -> None:
        text = "café 日本語 ü — ok (HTTP 502) \u00a0"
        assert views.printable(text) == text

    def test_the_list_escapes_errors_and_task_ids(self) -> None:
        rows = [
            task(task_id="video_\x1b]0;owned\x07", state="failed", error=HOSTILE),
            task(task_id="video_ok", state="archived", archive_uri="s3://b/\rvideo_ok.mp4"),
        ]
        text = views.table(rows, now=NOW, rules=RULES)
        assert_escaped(text)
        assert "video_\\x1b]0;owned\\x07" in text and "s3://b/\\rvideo_ok.mp4" in text

    def test_a_tasks_detail_escapes_every_field(self) -> None:
        row = task(error=HOSTILE, provider_status="\x1b[31mprocessing", model="m\u202e")
        text = views.detail(row, now=NOW, rules=None) + views.detail(row, now=NOW, rules=RULES)
        assert_escaped(text)
        assert "\\x1b[31mprocessing" in text and "m\\u202e" in text

    def test_the_summary_and_the_webhook_list_escape_what_they_show(self) -> None:
        oldest = task(task_id="video_\x1b[2J", state="pending", inserted_at=NOW)
        summary = views.summary(store.Summary({"pending": 1}, 0, oldest), [], NOW)
        assert "video_\\x1b[2J" in summary and "\x1b" not in summary
        times = [policy.ModelTimes("seedance\u202e", 0, None, None, None, None, False)]
        assert "seedance\\u202e" in views.generation_table(times)
        event = models.OutboxEvent(1, "msg_1", "video_\r\x1b[2J", "task.failed", "{}", NOW)
        event = dataclasses.replace(event, last_error=HOSTILE)
        listed = views.webhook_table([event])
        assert "video_\\r\\x1b[2J" in listed and "\x1b" not in listed and "\r" not in listed
