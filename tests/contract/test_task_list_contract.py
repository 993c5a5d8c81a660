"""The task list the page shows, once, over every store (``any_store``): newest first, filtered by
state, mode and provider, paged by keyset; and the rows at risk, the nearest deadline first."""

from __future__ import annotations

import datetime as dt

from seedance_archiver import models, providers, store, utils

OWNER = "contract-list"


def fed(any_store: store.Store) -> list[str]:
    """Seven rows inserted one after another (the same second or later: ties go by task_id), in
    states, modes and providers of their own."""
    shapes = [
        ("video_l0", "draft", "polling", "reseller"),
        ("video_l1", "standard", "archived", "reseller"),
        ("video_l2", "standard", "polling", "ark"),
        ("video_l3", "flex", "failed", "reseller"),
        ("video_l4", "standard", "polling", "reseller"),
        ("video_l5", "draft", "archived", "ark"),
        ("video_l6", "standard", "polling", None),
    ]
    for task_id, mode, _, _ in shapes:
        assert any_store.add(task_id, mode)
    claimed = {t.task_id: t for t in any_store.claim_due(OWNER, utils.utcnow(), 60, 100)}
    rows = [
        claimed[task_id].replace(state=state, provider=provider)
        for task_id, _, state, provider in shapes
    ]
    assert any_store.save(rows, OWNER) == len(rows)
    return [task_id for task_id, *_ in shapes]


def cursor(task: models.Task) -> tuple[dt.datetime, str]:
    """The keyset after ``task``: its (inserted_at, task_id)."""
    assert task.inserted_at is not None
    return task.inserted_at, task.task_id


def ids(tasks: list[models.Task]) -> list[str]:
    return [t.task_id for t in tasks]


class TestTaskList:
    def test_pages_newest_first_by_keyset(self, any_store: store.Store) -> None:
        fed(any_store)
        first = any_store.list(limit=3)
        assert ids(first) == ["video_l6", "video_l5", "video_l4"]
        second = any_store.list(limit=3, before=cursor(first[-1]))
        assert ids(second) == ["video_l3", "video_l2", "video_l1"]
        assert ids(any_store.list(limit=3, before=cursor(second[-1]))) == ["video_l0"]

    def test_filters_combine(self, any_store: store.Store) -> None:
        fed(any_store)
        assert ids(any_store.list("polling")) == ["video_l6", "video_l4", "video_l2", "video_l0"]
        assert ids(any_store.list(mode="standard", provider="reseller")) == [
            "video_l4",
            "video_l1",
        ]
        assert ids(any_store.list("archived", provider="ark")) == ["video_l5"]
        assert any_store.list("expired") == []


class TestAtRisk:
    def test_at_risk_nearest_deadline_first(self, any_store: store.Store) -> None:
        now = utils.utcnow()
        lefts = {"video_r1": 50, "video_r2": 10, "video_r3": 300, "video_r4": 30}
        for task_id in lefts:
            assert any_store.add(task_id)
        claimed = any_store.claim_due(OWNER, utils.utcnow(), 60, 100)
        rows = [
            t.replace(
                state="polling",
                provider="reseller",
                expires_at=now + dt.timedelta(minutes=lefts[t.task_id]),
            )
            for t in claimed
        ]
        assert any_store.save(rows, OWNER) == 4
        risky = any_store.at_risk_tasks(now, providers.AT_RISK, 10)
        assert ids(risky) == ["video_r2", "video_r4", "video_r1"]
        assert ids(any_store.at_risk_tasks(now, providers.AT_RISK, 1)) == ["video_r2"]
