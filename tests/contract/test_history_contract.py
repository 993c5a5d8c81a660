"""A row's history, once, over every store (``any_store``): a line each time its state, the
provider's status or its error changes, written with the change, gone with the row. The database
writes it by trigger (migration 0009); the fake's table does the same."""

from __future__ import annotations

import datetime as dt

from seedance_archiver import models, store, utils

OWNER = "contract-history"


def claimed(any_store: store.Store, task_id: str) -> models.Task:
    (task,) = [
        t for t in any_store.claim_due(OWNER, utils.utcnow(), 60, 100) if t.task_id == task_id
    ]
    return task


def written(any_store: store.Store, task: models.Task, at: dt.datetime, **changes: object) -> None:
    """``task`` claimed and saved again with ``changes`` at ``at``."""
    again = claimed(any_store, task.task_id)
    assert any_store.save([again.replace(updated_at=at, **changes)], OWNER) == 1


class TestHistory:
    def test_each_move_is_a_line_and_a_poll_that_changes_nothing_is_none(
        self, any_store: store.Store
    ) -> None:
        assert any_store.add("video_moves")
        assert any_store.history("video_moves") == []
        first = utils.utcnow().replace(microsecond=0)
        task = claimed(any_store, "video_moves")
        polled = {"state": "polling", "provider_status": "processing", "polls": 1}
        assert any_store.save([task.replace(updated_at=first, **polled)], OWNER) == 1
        # The next poll says the same: no line, whatever else it changed.
        written(any_store, task, first + dt.timedelta(seconds=30), **{**polled, "polls": 2})
        done = first + dt.timedelta(seconds=60)
        written(
            any_store,
            task,
            done,
            state="downloading",
            provider_status="completed",
            polls=3,
            video_url="https://videos.example/x.mp4",
        )
        failed = "the download broke off after 10 bytes: ReadError " + "x" * 1000
        written(any_store, task, done + dt.timedelta(seconds=5), state="downloading", error=failed)
        moves = any_store.history("video_moves")
        assert [(m.at, m.state, m.provider_status, m.polls) for m in moves] == [
            (first, "polling", "processing", 1),
            (done, "downloading", "completed", 3),
            (done + dt.timedelta(seconds=5), "downloading", "completed", 3),
        ]
        assert moves[-1].error == failed[: models.HISTORY_ERROR_CHARS]
        assert any_store.history("video_nobody") == []

    def test_the_history_goes_with_the_row(self, any_store: store.Store) -> None:
        assert any_store.add("video_pruned")
        assert any_store.add("video_kept")
        long_ago = utils.utcnow() - dt.timedelta(days=30)
        both = any_store.claim_due(OWNER, utils.utcnow(), 60, 100)
        ends = {"video_pruned": "archived", "video_kept": "polling"}
        saved = [t.replace(state=ends[t.task_id], updated_at=long_ago) for t in both]
        assert any_store.save(saved, OWNER) == 2
        assert any_store.prune(utils.utcnow() - dt.timedelta(days=1)) == 1
        assert any_store.history("video_pruned") == []
        assert [m.state for m in any_store.history("video_kept")] == ["polling"]
