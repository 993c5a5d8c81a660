"""models.Task.replace: the same snapshot dataclasses.replace makes, field for field."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from typing import Any

import pytest
from seedance_archiver import models

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def test_replace_is_dataclasses_replace() -> None:
    draw = random.Random(14)
    row = models.Task("video_1", expires_at=T0, next_attempt_at=T0, polls=3, provider="reseller")
    fields = list(models.TASK_FIELDS)
    for _ in range(300):
        names = draw.sample(fields, draw.randint(0, 6))
        # Any value, whatever the field's type: replace copies it as dataclasses.replace does.
        changes: dict[str, Any] = {name: f"{name}-{draw.random()}" for name in names}
        ours = row.replace(**changes)
        assert ours == dataclasses.replace(row, **changes)
        assert [getattr(ours, name) for name in fields] == [
            changes.get(name, getattr(row, name)) for name in fields
        ]
    assert row.polls == 3  # the original stays as it was


def test_an_unknown_field_is_refused() -> None:
    with pytest.raises(TypeError, match="no field 'pols'"):
        models.Task("video_1").replace(pols=4)
