"""One cycle of the daemon (claim, poll, decide, archive, write back) on in-memory fakes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import structlog.testing
from seedance_archiver import (
    errors,
    models,
    policy,
    provider,
    scheduler,
    testing,
    web,
)
from seedance_archiver.models import State
from seedance_archiver.providers import http as providers_http

from tests.helpers import OWNER, RULES, TASK_ID, Rig, make_rig, wait_until

EPOCH = testing.EPOCH
answer = testing.answer

URL = "https://cdn.example.com/videos/video_abc123def456.mp4?sig=1"
VIDEO = testing.mp4(bytes(range(256)) * 1000)  # 256 KB: several chunks


def seconds(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


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

    async def test_the_next_poll_is_timed_from_the_answer(self) -> None:
        """A poll whose answer came 5 s after it was started (a busy loop, a slow link): the next is
        due a cadence after the answer, so the provider never sees two polls closer than that."""
        slow = SlowAnswerProvider()
        rig = make_rig(fake_provider=slow)
        slow.clock, slow.seconds = rig.clock, 5.0
        rig.store.add(TASK_ID)
        slow.script(TASK_ID, answer(TASK_ID, "processing"))
        await rig.cycle()
        row = rig.row()
        assert row.last_polled_at == EPOCH + seconds(5)
        assert row.next_attempt_at == EPOCH + seconds(5 + RULES.cadence("standard").low)

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

    async def test_before_a_download_only_the_archive_is_looked_at(self, rig: Rig) -> None:
        """The store's put clears a dead attempt's unfinished upload itself: the worker asks for
        nothing else before the download (on S3 that was a LIST per video; bench/burst.py)."""
        calls: list[str] = []
        archive = rig.archive

        class Recorded(testing.FakeArchive):
            async def find(self, task_id: str, *, read_back: bool = False) -> Any:
                calls.append("find")
                return await archive.find(task_id, read_back=read_back)

            async def discard_incomplete(self, task_id: str, started_before: Any = None) -> int:
                calls.append("discard")
                return await archive.discard_incomplete(task_id, started_before)

            async def put(
                self,
                task_id: str,
                chunks: Any,
                expected_size: Any,
                metadata: Any = None,
                *,
                leftovers: bool = True,
            ) -> Any:
                calls.append("put" if leftovers else "put without leftovers")
                return await archive.put(
                    task_id, chunks, expected_size, metadata, leftovers=leftovers
                )

        rig.svc.archive = Recorded()
        archive.leave_unfinished(TASK_ID, EPOCH)
        rig.store.rows[TASK_ID] = seen(
            state="downloading", video_url=URL, attempts=1
        )  # failed once
        rig.provider.videos[URL] = VIDEO
        await rig.cycle()
        assert calls == ["find", "put"]
        assert (rig.row().state, archive.discarded) == (State.ARCHIVED, [TASK_ID])

    async def test_a_download_that_ends_asks_for_a_tick_at_once(self, rig: Rig) -> None:
        """A slot that frees is filled now, not at the next interval: the scheduler's hook runs
        once per download that ends, and not for a poll that finds the video still coming."""
        asked: list[str] = []
        rig.svc.on_download_room = lambda: asked.append("tick")
        rig.store.add("video_generating")
        rig.provider.script("video_generating", answer("video_generating", "processing"))
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = VIDEO
        await rig.cycle()
        assert rig.row().state == State.ARCHIVED
        assert rig.row("video_generating").state == State.POLLING
        assert asked == ["tick"]

    async def test_an_id_the_provider_never_issues_is_rejected_after_a_look_in_the_archive(
        self, rig: Rig
    ) -> None:
        """The provider's own id rule refuses it unasked; a video another provider's daemon
        archived under it is found first, and the row ends archived, not rejected."""
        rig.provider.id_rule = lambda task_id: None if task_id.isalnum() else "not its kind of id"
        rig.archive.objects["video_kept"] = b"archived by another provider's daemon"
        for task_id in ("video_kept", "video_refused"):
            rig.store.add(task_id)
        await rig.cycle()
        assert rig.row("video_kept").state == State.ARCHIVED
        refused = rig.row("video_refused")
        assert (refused.state, refused.error) == (State.REJECTED, "not its kind of id")
        assert rig.provider.fetches == []

    async def test_a_video_a_dead_holder_archived_is_not_downloaded_again(self, rig: Rig) -> None:
        """A daemon archived the video and died before writing so: its lease ran out, and the
        next holder finds the video in the archive instead of downloading it."""
        stored = b"committed before a crash"
        rig.archive.objects[TASK_ID] = stored
        rig.store.add(TASK_ID)
        assert len(rig.store.claim_due("dead-daemon", rig.clock(), 30, 10)) == 1
        rig.clock.advance(31)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = VIDEO
        await rig.cycle()
        row = rig.row()
        assert row.state == State.ARCHIVED
        assert rig.provider.downloads == []
        assert rig.archive.puts == []
        assert row.archive_sha256 == hashlib.sha256(stored).hexdigest()
        assert row.archive_bytes == len(stored)

    @pytest.mark.parametrize(
        ("attempts", "looked"), [(1, True), (0, False)], ids=["download-failed", "no-slot"]
    )
    async def test_a_video_written_back_downloading_is_looked_for_after_a_failed_download(
        self, rig: Rig, attempts: int, looked: bool
    ) -> None:
        """A download that failed may have failed after the video was stored whole (its answer
        lost): the next one looks first. One handed back unstarted (no slot, a stop) does not."""
        stored = b"stored whole before the failure was seen"
        rig.archive.objects[TASK_ID] = stored
        rig.store.add(TASK_ID)
        shaped = rig.row().replace(state=State.DOWNLOADING, video_url=URL, attempts=attempts)
        rig.store.rows[TASK_ID] = shaped
        rig.provider.videos[URL] = VIDEO
        await rig.cycle()
        assert rig.row().state == State.ARCHIVED
        kept = stored if looked else VIDEO
        assert rig.row().archive_sha256 == hashlib.sha256(kept).hexdigest()
        assert rig.archive.finds == ([(TASK_ID, False)] if looked else [])
        assert rig.provider.downloads == ([] if looked else [URL])

    async def test_a_video_no_holder_left_unsaid_is_downloaded_without_a_look(
        self, rig: Rig
    ) -> None:
        """No daemon held the row and went away: none archived its video, so the download starts
        without a look (into S3, a request per video). A row fed again for a video archived
        already is downloaded once more while the provider has it: the same bytes, archived."""
        rig.archive.objects[TASK_ID] = VIDEO
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = VIDEO
        await rig.cycle()
        assert (rig.archive.finds, rig.archive.puts) == ([], [TASK_ID])
        assert (rig.row().state, rig.row().archive_sha256) == (
            State.ARCHIVED,
            hashlib.sha256(VIDEO).hexdigest(),
        )

    async def test_a_video_no_holder_left_unsaid_leaves_stray_uploads_to_housekeeping(
        self, rig: Rig
    ) -> None:
        """Where no holder went away, none left an unfinished upload either: the put is told so,
        and does not list the folder (or S3's uploads) for one. One that lies there all the same
        (a writer killed on its own) is housekeeping's, and goes there."""
        rig.archive.leave_unfinished(TASK_ID, EPOCH - dt.timedelta(minutes=1))
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = VIDEO
        await rig.cycle()
        assert rig.row().state == State.ARCHIVED
        assert (rig.archive.discarded, await rig.archive.incomplete()) == ([], {TASK_ID})
        assert await rig.svc.maintenance.housekeeping() == 1
        assert (rig.archive.discarded, await rig.archive.incomplete()) == ([TASK_ID], set())

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
    async def test_a_video_our_settings_refuse_waits_on_them(
        self, rig: Rig, refusal: Exception
    ) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = refusal
        await rig.cycle()
        row = rig.row()
        assert (row.state, row.video_url) == (State.DOWNLOADING, URL)
        assert row.error is not None and row.error.startswith(f"waiting on a setting: {refusal}")
        assert row.next_attempt_at == EPOCH + seconds(RULES.cadence("standard").high)
        for _ in range(3):  # tried again on the slow schedule, never given up
            assert row.next_attempt_at is not None
            rig.clock.now = row.next_attempt_at
            await rig.cycle()
            row = rig.row()
            assert row.state == State.DOWNLOADING
        assert len(rig.provider.downloads) == 4
        rig.provider.videos[URL] = VIDEO  # the setting changed (a restart)
        assert row.next_attempt_at is not None
        rig.clock.now = row.next_attempt_at
        await rig.cycle()
        assert rig.row().state == State.ARCHIVED

    async def test_a_video_too_large_now_but_archived_whole_before_is_archived(
        self, rig: Rig
    ) -> None:
        rig.archive.objects[TASK_ID] = VIDEO
        rig.archive.untagged.add(TASK_ID)  # its hash was never recorded: found only read back
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = errors.VideoTooLarge("too large", length=len(VIDEO))
        await rig.cycle()
        row = rig.row()
        assert row.state == State.ARCHIVED
        assert row.archive_sha256 == hashlib.sha256(VIDEO).hexdigest()
        # No look before the download (no holder left the row unsaid); the refusal reads it back.
        assert rig.archive.finds == [(TASK_ID, True)]

    async def test_a_shorter_object_is_not_taken_for_it(self, rig: Rig) -> None:
        rig.archive.objects[TASK_ID] = VIDEO[:1000]
        rig.archive.untagged.add(TASK_ID)
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = errors.VideoTooLarge("too large", length=len(VIDEO))
        await rig.cycle()
        assert rig.row().state == State.DOWNLOADING

    @pytest.mark.parametrize(
        ("content_type", "body"),
        [
            ("video/mp4", b""),
            ("text/html; charset=utf-8", b"<html>link expired</html>"),
            ("application/json", b'{"error": "expired"}'),
            ("application/problem+xml", b"<Error><Code>AccessDenied</Code></Error>"),
            ("application/octet-stream", b"\x00" * 64),
        ],
        ids=["empty", "html", "json", "xml", "no container"],
    )
    async def test_a_200_that_is_not_a_video_is_retried_then_the_link_asked_for(
        self, rig: Rig, content_type: str, body: bytes
    ) -> None:
        fresh = "https://cdn.example.com/videos/fresh.mp4?sig=2"
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed(url=URL), completed(url=fresh))
        rig.provider.videos[URL] = body
        rig.provider.content_type = content_type
        await rig.cycle()
        for _ in range(RULES.not_a_video_tries - 1):
            row = rig.row()
            assert row.state == State.DOWNLOADING and TASK_ID not in rig.archive.objects
            assert row.error is not None and row.error.startswith(errors.NotAVideo.PREFIX)
            assert row.next_attempt_at is not None
            rig.clock.now = row.next_attempt_at
            await rig.cycle()
        row = rig.row()
        assert (row.state, row.video_url) == (State.POLLING, None)
        assert rig.provider.downloads == [URL] * RULES.not_a_video_tries
        rig.provider.videos[fresh] = VIDEO
        rig.provider.content_type = "video/mp4"
        assert row.next_attempt_at is not None
        rig.clock.now = row.next_attempt_at
        await rig.cycle()
        assert rig.row().state == State.ARCHIVED
        assert rig.archive.objects[TASK_ID] == VIDEO


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

    async def test_expired_tasks_are_counted_once_each(self, rig: Rig) -> None:
        """Gone from the provider (its own 404s, once seen) counts; failed does not."""
        rig.store.add("video_gone")
        rig.provider.script("video_gone", answer("video_gone", "processing"), errors.TaskNotFound())
        rig.store.add("video_failed")
        rig.provider.script("video_failed", answer("video_failed", "failed", error="no"))

        def expired() -> float | None:
            return rig.svc.metrics.registry.get_sample_value("seedance_tasks_expired_total")

        await rig.cycle()
        assert expired() == 0
        for _ in range(RULES.not_found_polls):
            await rig.at(3600)
        assert rig.row("video_gone").state == State.EXPIRED
        assert rig.row("video_failed").state == State.FAILED
        assert expired() == 1
        await rig.at(3600)
        assert expired() == 1

    async def test_invalid_task_id_is_rejected_without_a_poll(self, rig: Rig) -> None:
        rig.store.add("../etc/passwd")
        await rig.cycle()
        assert rig.row("../etc/passwd").state == State.REJECTED
        assert rig.provider.fetches == []

    async def test_unknown_id_is_rejected_after_a_few_polls(self, rig: Rig) -> None:
        """Brief retries: each 404 is polled again at the mode's cadence, with no back-off."""
        rig.store.add(TASK_ID)  # no script: the fake answers 404
        await rig.cycle()
        cadence = RULES.cadences[rig.row().mode]
        for _ in range(RULES.not_found_polls - 1):
            row = rig.row()
            assert row.state == State.POLLING and row.next_attempt_at is not None
            wait = (row.next_attempt_at - rig.clock.now).total_seconds()
            assert cadence.low <= wait <= cadence.high
            await rig.at(wait)
        assert rig.row().state == State.REJECTED
        assert len(rig.provider.fetches) == RULES.not_found_polls


def seen(task_id: str = TASK_ID, **fields: object) -> models.Task:
    """A row the provider has answered for, due now."""
    values: dict[str, object] = {
        "state": State.POLLING.value,
        "provider_status": "processing",
        "provider_created_at": EPOCH - seconds(600),
        "expires_at": EPOCH + dt.timedelta(days=1) - seconds(600),
        "next_attempt_at": EPOCH,
        "inserted_at": EPOCH - seconds(600),
    } | fields
    return models.Task(task_id=task_id, **values)  # type: ignore[arg-type]


async def until_verdict(rig: Rig, task_id: str = TASK_ID, cycles: int = 20) -> models.Task:
    """Run cycles at each of the row's due times until it is terminal (or ``cycles`` ran out)."""
    for _ in range(cycles):
        row = rig.row(task_id)
        if row.is_terminal:
            break
        assert row.next_attempt_at is not None
        rig.clock.now = max(rig.clock.now, row.next_attempt_at)
        await rig.cycle()
    return rig.row(task_id)


class TestTheProvidersWord:
    """A task ends only on the provider's word, and only after a look in the archive."""

    async def test_past_its_deadline_a_served_video_is_archived(self, rig: Rig) -> None:
        rig.store.rows[TASK_ID] = seen(expires_at=EPOCH - seconds(20))
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = VIDEO
        await rig.cycle()
        assert rig.row().state == State.ARCHIVED
        assert rig.provider.fetches == [TASK_ID]

    async def test_past_its_deadline_a_queued_flex_task_is_polled_on(self, rig: Rig) -> None:
        rig.store.rows[TASK_ID] = seen(mode="flex", expires_at=EPOCH - seconds(3600))
        rig.provider.script(TASK_ID, answer(TASK_ID, "queued"))
        for _ in range(3):
            await rig.at(120)
        assert rig.row().state == State.POLLING
        assert len(rig.provider.fetches) == 3

    async def test_a_download_under_way_is_not_cut_by_the_deadline(self) -> None:
        slow = SlowVideoProvider()
        rig = make_rig(fake_provider=slow)
        rig.store.rows[TASK_ID] = seen(
            state="downloading", video_url=URL, expires_at=EPOCH - seconds(1)
        )
        await rig.svc.tick()
        await asyncio.wait_for(slow.streaming.wait(), 5)
        slow.release.set()
        await rig.settle()
        await rig.svc.flush()
        assert rig.row().state == State.ARCHIVED

    async def test_one_404_never_ends_a_seen_task(self, rig: Rig) -> None:
        rig.store.rows[TASK_ID] = seen()
        rig.provider.script(TASK_ID, errors.TaskNotFound(), answer(TASK_ID, "processing"))
        await rig.cycle()
        assert rig.row().state == State.POLLING
        await until_verdict(rig, cycles=3)
        assert rig.row().state == State.POLLING and rig.row().error is None

    @pytest.mark.parametrize(
        ("row", "verdict"),
        [(seen(), State.EXPIRED), (models.Task(TASK_ID, next_attempt_at=EPOCH), State.REJECTED)],
        ids=["seen", "never seen"],
    )
    async def test_its_own_404s_end_it_after_a_look_in_the_archive(
        self, rig: Rig, row: models.Task, verdict: State
    ) -> None:
        rig.store.rows[TASK_ID] = row
        ended = await until_verdict(rig)
        assert ended.state == verdict
        assert len(rig.provider.fetches) == RULES.not_found_polls
        assert rig.archive.finds == [(TASK_ID, True)]

    @pytest.mark.parametrize("untagged", [False, True], ids=["tagged", "untagged"])
    async def test_a_video_found_in_the_archive_is_archived_not_expired(
        self, rig: Rig, untagged: bool
    ) -> None:
        rig.store.rows[TASK_ID] = seen(state="downloading", video_url=URL)
        rig.archive.objects[TASK_ID] = VIDEO
        if untagged:
            rig.archive.untagged.add(TASK_ID)
        rig.provider.videos[URL] = errors.LinkExpired("the video link was refused (HTTP 404)")
        # The normal path finds a tagged object at once; an untagged one only when all else failed.
        ended = await until_verdict(rig)
        assert ended.state == State.ARCHIVED
        assert ended.archive_sha256 == hashlib.sha256(VIDEO).hexdigest()
        assert rig.archive.puts == []

    async def test_retry_of_an_archived_row_never_makes_it_expired(self, rig: Rig) -> None:
        rig.store.rows[TASK_ID] = seen(state="archived", archive_uri=f"mem://{TASK_ID}.mp4")
        rig.archive.objects[TASK_ID] = VIDEO
        rig.archive.untagged.add(TASK_ID)
        assert rig.store.retry(TASK_ID, EPOCH, force=True).value == "retried"
        ended = await until_verdict(rig)  # the provider deleted it: its own 404s
        assert ended.state == State.ARCHIVED
        assert len(rig.provider.fetches) == RULES.not_found_polls

    @pytest.mark.parametrize("status", ["failed", "cancelled"])
    async def test_even_failed_and_cancelled_look_first(self, rig: Rig, status: str) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, status))
        await rig.cycle()
        assert rig.row().state == status
        assert rig.archive.finds == [(TASK_ID, True)]

    async def test_no_verdict_while_the_archive_cannot_be_looked_at(self, rig: Rig) -> None:
        rig.store.rows[TASK_ID] = seen()
        rig.archive.find_fails = errors.ArchiveError("S3 unreachable: EndpointConnectionError")
        ended = await until_verdict(rig, cycles=8)
        assert ended.state == State.POLLING
        assert ended.error is not None and "the archive could not be checked" in ended.error
        rig.archive.find_fails = None
        assert (await until_verdict(rig)).state == State.EXPIRED

    async def test_an_impossible_id_is_rejected_without_a_look(self, rig: Rig) -> None:
        rig.store.add("../etc/passwd")
        await rig.cycle()
        assert rig.row("../etc/passwd").state == State.REJECTED
        assert rig.archive.finds == []

    async def test_a_task_unfinished_for_a_week_is_given_up(self, rig: Rig) -> None:
        created = EPOCH - policy.GIVE_UP_AFTER
        rig.store.rows[TASK_ID] = seen(provider_created_at=created)
        rig.provider.script(TASK_ID, answer(TASK_ID, "queued", created=created))
        await rig.cycle()
        row = rig.row()
        assert row.state == State.EXPIRED
        assert row.error is not None and row.error.startswith(policy.GIVE_UP_REASON)
        assert rig.archive.finds == [(TASK_ID, True)]


class TestOutage:
    """When most tasks the provider should still have answer its 404, no 404 counts."""

    async def test_a_404_storm_ends_no_task_before_its_deadline(self, rig: Rig) -> None:
        ids = [f"video_storm_{i}" for i in range(10)]
        for task_id in ids:
            rig.store.rows[task_id] = seen(task_id)
        for _ in range(10):
            await rig.at(600)
        assert {rig.row(task_id).state for task_id in ids} == {State.POLLING}
        assert all(policy.STORM_REASON in (rig.row(t).error or "") for t in ids)
        assert rig.svc.worker.provider_trouble() is not None
        assert rig.svc.metrics.registry.get_sample_value("seedance_provider_outage") == 1

    async def test_past_its_deadline_a_404_is_evidence_even_then(self, rig: Rig) -> None:
        ids = [f"video_storm_{i}" for i in range(10)]
        for task_id in ids:
            rig.store.rows[task_id] = seen(task_id)
        rig.store.rows["video_done_for"] = seen("video_done_for", expires_at=EPOCH - seconds(5))
        for _ in range(10):
            await rig.at(600)
        assert rig.row("video_done_for").state == State.EXPIRED
        assert {rig.row(task_id).state for task_id in ids} == {State.POLLING}

    async def test_a_batch_of_unknown_ids_is_no_storm(self, rig: Rig) -> None:
        for i in range(10):
            rig.store.add(f"video_typo_{i}")
        for _ in range(5):
            await rig.at(600)
        assert {rig.row(f"video_typo_{i}").state for i in range(10)} == {State.REJECTED}
        assert rig.svc.worker.provider_trouble() is None

    async def test_a_provider_outage_is_said_and_ends(self, rig: Rig) -> None:
        ids = [f"video_{i}" for i in range(6)]
        for task_id in ids:
            rig.store.rows[task_id] = seen(task_id)
            rig.provider.script(task_id, errors.ProviderUnavailable(providers_http.NOT_OWN_404))
        with structlog.testing.capture_logs() as logs:
            await rig.cycle()
            assert rig.svc.worker.provider_trouble() is not None
            assert rig.svc.metrics.registry.get_sample_value("seedance_provider_outage") == 1
            for task_id in ids:
                rig.provider.script(task_id, answer(task_id, "processing"))
            await until_verdict(rig, ids[-1], cycles=1)
            assert rig.svc.worker.provider_trouble() is None
            assert rig.svc.metrics.registry.get_sample_value("seedance_provider_outage") == 0
        events = [e["event"] for e in logs if e["event"].startswith("provider_outage")]
        assert events == ["provider_outage", "provider_outage_over"]
        assert {rig.row(task_id).state for task_id in ids} == {State.POLLING}


class TestGuardedJobs:
    """A scheduled job's failure is logged and the schedule goes on; a cancelled one is no crash."""

    async def test_a_job_cancelled_by_a_stop_ends_quietly(self) -> None:
        started = asyncio.Event()

        async def key_check() -> None:
            started.set()
            await asyncio.Event().wait()  # a request the stop meets under way

        job = asyncio.ensure_future(scheduler._guarded("key_check", key_check)())
        await started.wait()
        with structlog.testing.capture_logs() as logs:
            job.cancel()
            await asyncio.wait([job])
        # Ended, not cancelled: APScheduler logs a job that raises, CancelledError too, as
        # "raised an exception" with its traceback.
        assert not job.cancelled() and job.exception() is None
        assert [(e["event"], e["log_level"]) for e in logs] == [("job_cancelled", "debug")]

    async def test_a_job_that_crashes_is_logged(self) -> None:
        async def broken() -> None:
            raise RuntimeError("a bug")

        with structlog.testing.capture_logs() as logs:
            await scheduler._guarded("broken", broken)()
        assert [(e["event"], e["log_level"]) for e in logs] == [("job_crashed", "error")]


class TestDownloadRoom:
    """A daemon claims no more downloads than it can start soon; others take the rest."""

    async def test_downloads_beyond_the_room_are_left_for_others(self) -> None:
        slow = SlowVideoProvider()
        rig = make_rig(fake_provider=slow)
        for i in range(20):
            rig.store.rows[f"video_{i:02}"] = seen(
                f"video_{i:02}", state="downloading", video_url=f"{URL}&n={i}"
            )
        room = rig.svc.worker.max_downloads + rig.svc.worker.download_queue
        assert await rig.svc.tick() == room
        # Never leased at all, not leased and given back at the next tick: a burst of finished
        # videos would otherwise be claimed and released whole for every download that ends.
        held = [t for t in rig.store.rows.values() if t.lease_owner == OWNER]
        assert len(held) == room
        await rig.svc.flush()
        held = [t for t in rig.store.rows.values() if t.lease_owner == OWNER]
        assert len(held) == room
        assert await rig.svc.tick() == 0  # full: nothing more is claimed
        await rig.svc.stop(0)

    async def test_a_tick_is_asked_for_once_the_queue_runs_low(self, rig: Rig) -> None:
        """A slot that frees takes the next row queued for one; a tick is asked for only once at
        most half the queue is left, and then claims several (bench/burst.py)."""
        worker = rig.svc.worker
        full = worker.max_downloads + worker.download_queue
        worker.downloading = {f"video_{i:02}" for i in range(full)}
        asked: list[int] = []
        while worker.downloading:
            worker.downloading.pop()
            if worker.queue_running_low():
                asked.append(len(worker.downloading))
        assert asked[0] == worker.max_downloads + worker.download_queue // 2
        assert asked == list(range(asked[0], -1, -1))

    async def test_once_downloads_are_quick_found_videos_wait_here_for_a_slot(self) -> None:
        """A burst's videos, polled and found finished, wait in this daemon for a slot the
        slots reach soon, instead of being written back and claimed again."""
        slow = SlowVideoProvider()
        rig = make_rig(fake_provider=slow)
        worker = rig.svc.worker
        size = 3 * worker.download_room()

        async def burst(name: str) -> list[str]:
            """``size`` finished tasks, polled while every download hangs: those handed back."""
            task_ids = [f"video_{name}_{i:02}" for i in range(size)]
            for task_id in task_ids:
                url = f"{URL}&id={task_id}"
                rig.store.add(task_id)
                slow.script(task_id, completed(task_id, url))
                slow.videos[url] = VIDEO
            await rig.svc.tick()

            def answered() -> bool:
                running = rig.svc._running
                return all(t in worker.downloading or t not in running for t in task_ids)

            await wait_until(answered, 5, "every poll answered")
            await rig.svc.flush()
            return [t for t in task_ids if rig.row(t).state == State.DOWNLOADING]

        # No download timed yet: twice the slots wait for one, the rest go back to the table.
        assert len(await burst("first")) == size - worker.max_downloads - 2 * worker.max_downloads
        slow.release.set()  # those downloads end, in no time (the clock stands still)
        await rig.settle()
        await rig.svc.flush()
        assert worker.download_queue == worker.MAX_QUEUE_PER_SLOT * worker.max_downloads
        slow.release.clear()
        assert await burst("second") == []  # all wait here
        slow.release.set()
        await rig.settle()
        await rig.svc.flush()
        second = [t for t in rig.store.rows if t.startswith("video_second")]
        assert {rig.row(t).state for t in second} == {State.ARCHIVED}

    async def test_the_queue_holds_what_the_slots_start_within_its_seconds(self) -> None:
        """Slow downloads keep the queue at twice the slots: a replica with room takes the rest
        rather than wait behind ours. Quicker ones let it grow, to at most 64 per slot."""
        timed = TimedVideoProvider()
        rig = make_rig(fake_provider=timed)
        worker = rig.svc.worker

        async def downloads(count: int, seconds: float) -> None:
            timed.clock, timed.seconds = rig.clock, seconds
            for n in range(count):
                task_id = f"video_{seconds:g}_{n:02}".replace(".", "_")
                url = f"{URL}&id={task_id}"
                rig.store.rows[task_id] = seen(task_id, state="downloading", video_url=url)
                timed.videos[url] = VIDEO
                await rig.at(1)
                assert rig.row(task_id).state == State.ARCHIVED

        await downloads(1, 10.0)
        assert worker.download_queue == worker.min_download_queue == 2 * worker.max_downloads
        await downloads(40, 0.05)  # the mean comes down to ~0.05 s: 2 s x 4 slots / 0.05
        assert worker.min_download_queue < worker.download_queue <= 160
        await downloads(40, 10.0)
        assert worker.download_queue == worker.min_download_queue

    async def test_an_empty_claim_of_downloads_waits_a_second(self, rig: Rig) -> None:
        """With nothing waiting to download, the claim of downloads is made once a second, not
        every tick; a replica's row waits at most that long, ours not at all."""
        assert await rig.cycle() == 0
        rig.store.rows["video_01"] = seen("video_01", state="downloading", video_url=URL)
        rig.provider.videos[URL] = VIDEO
        assert await rig.at(0.5) == 0  # the last claim of downloads found none half a second ago
        assert await rig.at(0.6) == 1
        assert rig.row("video_01").state == State.ARCHIVED

    async def test_a_download_handed_back_is_claimed_at_the_next_tick(self, rig: Rig) -> None:
        worker = rig.svc.worker
        worker.download_queue = 0
        busy = {f"video_busy_{i}" for i in range(worker.max_downloads)}
        assert await rig.cycle() == 0  # nothing waits to download: that claim found none
        worker.downloading |= busy  # every slot taken
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, completed())
        rig.provider.videos[URL] = VIDEO
        assert await rig.at(0.1) == 1
        assert (rig.row().state, rig.row().lease_owner) == (State.DOWNLOADING, None)  # handed back
        worker.downloading -= busy  # the slots free
        assert await rig.at(0.1) == 1  # within the second: our own hand-back is claimed at once
        assert rig.row().state == State.ARCHIVED

    async def test_a_tick_for_download_room_claims_no_polls(self) -> None:
        """The tick a download's end asks for refills the downloads only; the regular ticks claim
        the polls."""
        rig = make_rig(fake_provider=SlowVideoProvider())
        rig.store.add(TASK_ID)
        rig.store.rows["video_01"] = seen("video_01", state="downloading", video_url=URL)
        assert await rig.svc.tick(polls=False) == 1
        assert rig.row("video_01").lease_owner == OWNER
        assert rig.row().lease_owner is None
        assert await rig.svc.tick() == 1
        assert rig.row().lease_owner == OWNER
        await rig.svc.stop(0)

    async def test_the_ticker_makes_a_tick_asked_for_meanwhile_whole(self) -> None:
        """Ticks never overlap; asked for during one, the next runs right after, claiming polls if
        any of those asked for wanted them."""
        ran: list[bool] = []
        release = asyncio.Event()

        async def tick(polls: bool) -> None:
            ran.append(polls)
            if len(ran) == 1:
                await release.wait()

        ticker = scheduler._Ticker(tick)
        first = asyncio.create_task(ticker.run(polls=False))
        await wait_until(lambda: ran == [False], 10, "the first tick")
        await ticker.run(polls=False)
        await ticker.run(polls=True)
        await ticker.run(polls=False)
        release.set()
        await first
        assert ran == [False, True]

    async def test_a_poll_that_finds_a_video_with_no_room_hands_it_back(self) -> None:
        slow = SlowVideoProvider()
        rig = make_rig(fake_provider=slow)
        rig.svc.worker.download_queue = 0
        for i in range(rig.svc.worker.max_downloads):
            rig.store.rows[f"video_{i:02}"] = seen(
                f"video_{i:02}", state="downloading", video_url=f"{URL}&n={i}"
            )
        rig.store.add(TASK_ID)
        slow.script(TASK_ID, completed())
        await rig.svc.tick()
        for _ in range(100):
            if TASK_ID not in rig.svc._running:
                break
            await asyncio.sleep(0)
        await rig.svc.flush()
        row = rig.row()
        assert (row.state, row.video_url, row.lease_owner) == (State.DOWNLOADING, URL, None)
        assert row.next_attempt_at == EPOCH
        await rig.svc.stop(0)


def key_rejected_gauge(rig: Rig) -> float | None:
    return rig.svc.metrics.registry.get_sample_value("seedance_api_key_rejected")


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
        """Polling pauses to one key check per AUTH_PROBE_SECONDS, each said loudly; no row is
        touched or given up; a key that works again resumes polling."""
        other = "video_other000001"
        rig.store.add(TASK_ID)
        rig.store.add(other)
        rig.provider.script(TASK_ID, errors.AuthRejected("HTTP 401"), answer(TASK_ID, "processing"))
        rig.provider.script(other, errors.AuthRejected("HTTP 401"), answer(other, "processing"))
        rig.provider.key_ok = False
        before = {tid: rig.row(tid) for tid in (TASK_ID, other)}
        with structlog.testing.capture_logs() as logs:
            await rig.cycle()

        assert rig.svc.keygate.blocked
        assert key_rejected_gauge(rig) == 1
        [rejected] = [e for e in logs if e["event"] == "api_key_rejected"]
        assert rejected["log_level"] == "error"
        assert "SEEDANCE_API_KEY" in rejected["action"]
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
            await rig.at((rig.svc.keygate.AUTH_PROBE_SECONDS - 1) / 3)
            assert await rig.svc.keygate.check_if_due() is None
        assert len(rig.provider.fetches) == 2 and rig.provider.key_checks == 1

        rig.provider.key_ok = True
        rig.clock.advance(1)
        with structlog.testing.capture_logs() as logs:
            assert await rig.svc.keygate.check_if_due() is True  # the probe: no task needed
        assert rig.provider.key_checks == 2
        assert not rig.svc.keygate.blocked
        assert key_rejected_gauge(rig) == 0
        assert [e["event"] for e in logs] == ["api_key_accepted_again"]

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
        assert await rig.svc.keygate.check_if_due() is False
        assert rig.svc.keygate.blocked

        await rig.cycle()
        assert rig.row().state == "archived"
        assert rig.svc.keygate.blocked
        assert rig.provider.fetches == []
        waits = rig.row(waiting)
        assert (waits.state, waits.attempts, waits.lease_owner) == ("pending", 0, None)

    async def test_a_403_for_one_task_only_rejects_that_task(self, rig: Rig) -> None:
        """The key check says the key is fine: the refusal is the task's own."""
        other = "video_other000001"
        rig.store.add(TASK_ID)
        rig.store.add(other)
        rig.provider.script(TASK_ID, errors.AuthRejected("HTTP 403", status_code=403))
        rig.provider.script(other, answer(other, "processing"))
        with structlog.testing.capture_logs() as logs:
            await rig.cycle()
            assert not rig.svc.keygate.blocked
            assert rig.row().state == "polling" and rig.row().attempts == 1
            assert rig.row(other).state == "polling"
            for _ in range(policy.FORBIDDEN_POLLS - 1):
                await rig.at(3600)
        assert not rig.svc.keygate.blocked
        assert [e for e in logs if e["event"] == "api_key_rejected"] == []
        row = rig.row()
        assert row.state == "rejected"
        assert row.error is not None and "refuses this task" in row.error
        assert "HTTP 403" in row.error
        assert f"on {policy.FORBIDDEN_POLLS} polls in a row" in row.error
        assert rig.row(other).state == "polling"

    async def test_a_key_check_that_cannot_tell_pauses_without_giving_up(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, errors.AuthRejected("HTTP 401"))
        rig.provider.key_ok = None
        await rig.cycle()
        assert rig.svc.keygate.blocked
        assert (rig.row().state, rig.row().attempts) == ("pending", 0)

    async def test_the_key_is_checked_at_start_and_while_idle(self, rig: Rig) -> None:
        """A wrong key is found before any task needs it; an active daemon spends no checks."""
        rig.provider.key_ok = False
        assert await rig.svc.keygate.check_if_due() is False  # at start: never checked
        assert rig.svc.keygate.blocked
        rig.provider.key_ok = True
        rig.clock.advance(rig.svc.keygate.AUTH_PROBE_SECONDS)
        assert await rig.svc.keygate.check_if_due() is True
        assert not rig.svc.keygate.blocked

        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, "processing"))
        for _ in range(10):  # polls answered every 60 s: no check needed
            await rig.at(60)
            assert await rig.svc.keygate.check_if_due() is None
        checks = rig.provider.key_checks
        rig.store.rows[TASK_ID] = rig.row().replace(state="archived")
        rig.clock.advance(
            rig.svc.keygate.KEY_CHECK_IDLE_SECONDS
        )  # idle: nothing answered for a while
        assert await rig.svc.keygate.check_if_due() is True
        assert rig.provider.key_checks == checks + 1

    async def test_a_failed_probe_keeps_the_block(self, rig: Rig) -> None:
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, errors.AuthRejected("HTTP 403"))
        rig.provider.key_ok = False
        await rig.cycle()
        rig.clock.advance(rig.svc.keygate.AUTH_PROBE_SECONDS)
        with structlog.testing.capture_logs() as logs:
            assert await rig.svc.keygate.check_if_due() is False
        assert rig.provider.key_checks == 2
        assert rig.svc.keygate.blocked
        # Each failed check is said again, as loudly as the first.
        assert [(e["event"], e["log_level"]) for e in logs] == [("api_key_rejected", "error")]
        await rig.at(rig.svc.keygate.AUTH_PROBE_SECONDS - 1)
        assert await rig.svc.keygate.check_if_due() is None
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

    async def test_our_own_crash_never_gives_a_week_old_task_up(self, rig: Rig) -> None:
        rig.store.rows[TASK_ID] = seen(provider_created_at=EPOCH - policy.GIVE_UP_AFTER * 2)
        rig.provider.script(TASK_ID, RuntimeError("bug in a client"))
        await rig.cycle()
        assert rig.row().state == State.POLLING
        assert (rig.row().error or "").startswith("internal error")


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
    async def open_video(self, task: models.Task) -> AsyncIterator[provider.Video]:
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

    async def test_a_video_found_and_cancelled_keeps_its_link_for_the_next_daemon(self) -> None:
        """Cancelled by a stop while it waits for a slot or downloads, a video a poll found is
        written back as downloading, with its link: the next daemon downloads it, no poll first."""
        slow = SlowVideoProvider()
        rig = make_rig(fake_provider=slow)
        worker = rig.svc.worker
        task_ids = [f"video_{i:02}" for i in range(worker.max_downloads + 2)]  # two wait
        links = {task_id: f"{URL}&id={task_id}" for task_id in task_ids}
        for task_id, url in links.items():
            rig.store.add(task_id)
            slow.script(task_id, completed(task_id, url))
            slow.videos[url] = VIDEO
        await rig.svc.tick()
        await wait_until(lambda: worker.downloading == set(task_ids), 5, "every video found")
        await rig.svc.stop(0)
        assert rig.svc.in_flight == 0 and rig.store.released == []
        for task_id, url in links.items():
            row = rig.row(task_id)
            assert (row.state, row.video_url, row.lease_owner) == (State.DOWNLOADING, url, None)
        # The next daemon, on the same table.
        again = make_rig(fake_store=rig.store)
        again.provider.videos.update(slow.videos)
        again.clock.advance(60)
        assert await again.cycle() == len(task_ids)
        assert {again.row(task_id).state for task_id in task_ids} == {State.ARCHIVED}
        assert again.provider.fetches == []

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
    """A store whose next ``failures`` saves fail as a lost database connection would (or with
    ``error``)."""

    def __init__(self, failures: int, error: errors.StoreError | None = None) -> None:
        super().__init__()
        self.failures = failures
        self.error = error or errors.StoreError("the database is unreachable")

    def save(self, tasks: Sequence[models.Task], owner: str) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise self.error
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


GRANT_MISSING = errors.PermissionMissing(
    "the database role may not write to webhook_outbox (permission denied): grant ..."
)


class TestWritesRefused:
    """A database that refuses write-backs for a missing grant is said to, plainly; nothing is
    lost, and all is written once the grant is back."""

    async def test_said_in_the_log_the_metric_and_readyz_then_recovered(self) -> None:
        rig = make_rig(fake_store=FlakyStore(failures=2, error=GRANT_MISSING))
        rig.store.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, "failed", error="no"))
        await rig.svc.tick()
        await rig.settle()
        server = web.WebServer(rig.svc, rig.store, "127.0.0.1", 0)

        def refused() -> float | None:
            return rig.svc.metrics.registry.get_sample_value("seedance_database_writes_refused")

        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                rig.svc.wake()  # skip the back-off from the database
                assert await rig.svc.tick() == 0
        assert [e["log_level"] for e in logs if e["event"] == "database_writes_refused"] == [
            "error",
            "error",
        ]
        assert not any(e["event"] == "database_unavailable" for e in logs)
        assert rig.svc.writes_refused is not None and "webhook_outbox" in rig.svc.writes_refused
        assert refused() == 1
        ready = await server.readyz(None)  # type: ignore[arg-type]
        body = json.loads(ready.text or "")
        assert ready.status == 503 and "webhook_outbox" in body["checks"]["database"]
        assert rig.row().state == State.PENDING  # not saved, and not lost
        rig.svc.wake()
        await rig.cycle()
        assert rig.row().state == State.FAILED
        assert rig.svc.writes_refused is None and refused() == 0
        assert (await server.readyz(None)).status == 200
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


class DownStore(testing.FakeStore):
    """A store whose claims fail as a lost connection would while ``down``; it counts them."""

    down = True

    def __init__(self) -> None:
        super().__init__()
        self.claims = 0

    def claim_due(self, *args: object, **kwargs: object) -> list[models.Task]:
        self.claims += 1
        if self.down:
            raise errors.StoreError("database unreachable: connection refused")
        return super().claim_due(*args, **kwargs)  # type: ignore[arg-type]


async def wait_for_a_claim(rig: Rig, store: DownStore) -> float:
    """Tick every half second of the moved clock until a claim is tried; the seconds it took."""
    claims, waited = store.claims, 0.0
    while store.claims == claims:
        rig.clock.advance(0.5)
        waited += 0.5
        await rig.svc.tick()
    return waited


class TestDatabaseBackOff:
    """While the database does not answer, ticks leave it be for a doubling wait, at most
    STORE_RETRY_MAX_SECONDS; its answer, or a NOTIFY, ends the back-off."""

    async def test_the_waits_double_up_to_the_cap(self) -> None:
        down = DownStore()
        rig = make_rig(fake_store=down)
        await rig.svc.tick()
        waits = [await wait_for_a_claim(rig, down) for _ in range(7)]
        assert rig.svc.STORE_RETRY_MAX_SECONDS == 30
        assert waits == [1, 2, 4, 8, 16, 30, 30]
        assert rig.svc.healthy and rig.svc.tick_failures == 0

    async def test_an_answer_or_a_wake_up_ends_it(self) -> None:
        down = DownStore()
        rig = make_rig(fake_store=down)
        down.add(TASK_ID)
        rig.provider.script(TASK_ID, answer(TASK_ID, "processing"))
        await rig.svc.tick()
        await wait_for_a_claim(rig, down)
        await rig.svc.tick()
        assert down.claims == 2  # backing off, for 2 s
        down.down = False
        rig.svc.wake()
        with structlog.testing.capture_logs() as logs:
            assert await rig.cycle() == 1
        back = [e for e in logs if e["event"] == "database_available_again"]
        assert [e["after_failures"] for e in back] == [2]
        down.down = True
        rig.clock.advance(60)
        await rig.svc.tick()
        assert await wait_for_a_claim(rig, down) == 1  # the count starts over


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
    async def open_video(self, task: models.Task) -> AsyncIterator[provider.Video]:
        self.downloads.append(task.video_url or "")

        async def chunks() -> AsyncIterator[bytes]:
            yield VIDEO[:1000]
            self.streaming.set()
            await self.release.wait()
            yield VIDEO[1000:]

        yield provider.Video(length=len(VIDEO), chunks=chunks())


class SlowAnswerProvider(testing.FakeProvider):
    """Each poll's answer comes ``seconds`` after the request: it moves ``clock`` that far."""

    def __init__(self) -> None:
        super().__init__()
        self.clock: testing.MovableClock | None = None
        self.seconds = 0.0

    async def fetch(self, task_id: str) -> models.Answer:
        if self.clock is not None:
            self.clock.advance(self.seconds)
        return await super().fetch(task_id)


class TimedVideoProvider(testing.FakeProvider):
    """Each download moves ``clock`` by ``seconds``: a download that takes that long."""

    def __init__(self) -> None:
        super().__init__()
        self.clock: testing.MovableClock | None = None
        self.seconds = 0.0

    @contextlib.asynccontextmanager
    async def open_video(self, task: models.Task) -> AsyncIterator[provider.Video]:
        async with super().open_video(task) as video:
            if self.clock is not None:
                self.clock.advance(self.seconds)
            yield video


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
    """A download ends by SEEDANCE_MAX_DOWNLOAD_SECONDS (never by the row's deadline), and is
    retried."""

    async def test_a_trickling_download_is_cut_then_retried_and_archived(self) -> None:
        slow = SlowVideoProvider()
        rig = make_rig(fake_provider=slow)
        # A real (short) timer: the one thing not faked here.
        rig.svc.worker.max_download_seconds = 0.05
        rig.store.add(TASK_ID)
        rig.store.rows[TASK_ID] = rig.row().replace(state="downloading", video_url=URL)
        with structlog.testing.capture_logs() as logs:
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

            # The host delivers at full speed again: the retry archives the whole video.
            slow.release.set()
            assert row.next_attempt_at is not None
            await rig.at((row.next_attempt_at - rig.clock.now).total_seconds())
        assert rig.row().state == "archived"
        assert rig.archive.objects[TASK_ID] == VIDEO
        assert slow.downloads == [URL, URL]  # cut once, fetched again, nothing more
        failed = [e for e in logs if e["event"] == "video_download_failed"]
        assert len(failed) == 1 and "did not finish within" in failed[0]["error"]


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
