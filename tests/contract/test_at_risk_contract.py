"""When a row is at risk, once, over every store (``any_store``): in the last hour before its
deadline, or in the last quarter of a shorter window (``models.AtRisk``, by the provider the row is
stamped with). The count (``status``, the gauge) and the ``task.at_risk`` event agree."""

from __future__ import annotations

import datetime as dt

from seedance_archiver import models, providers, store, utils

OWNER = "contract-at-risk"


def stamped(any_store: store.Store, task_id: str, provider: str, left: dt.timedelta) -> None:
    """A row polled by ``provider``'s daemon whose deadline is ``left`` away."""
    assert any_store.add(task_id)
    now = utils.utcnow()
    (claimed,) = [t for t in any_store.claim_due(OWNER, now, 60, 100) if t.task_id == task_id]
    polled = claimed.replace(state="polling", provider=provider, expires_at=now + left)
    assert any_store.save([polled], OWNER) == 1


class TestAtRisk:
    def test_a_short_window_is_at_risk_only_in_its_last_quarter(
        self, any_store: store.Store
    ) -> None:
        stamped(any_store, "a" * 26, "replicate", dt.timedelta(minutes=30))  # not yet
        stamped(any_store, "b" * 26, "replicate", dt.timedelta(minutes=10))  # at risk
        stamped(any_store, "video_day_1", "reseller", dt.timedelta(minutes=30))  # at risk
        stamped(any_store, "video_day_2", "reseller", dt.timedelta(hours=3))  # not yet
        now = utils.utcnow()
        assert any_store.summary(now, providers.AT_RISK).at_risk == 2
        # The same rows counted by the one-hour rule for all: the 30 minutes Replicate row too.
        assert any_store.summary(now, models.AT_RISK_HOUR).at_risk == 3
        assert any_store.add_at_risk_events(now, 1000, providers.AT_RISK) == 2
        warned = {e.task_id for e in any_store.webhooks() if e.event == models.Event.AT_RISK}
        assert warned == {"b" * 26, "video_day_1"}
