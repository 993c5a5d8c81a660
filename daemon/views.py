"""How tasks are shown to people (a fixed-width table) and to scripts (JSON)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from daemon import models

TABLE_COLUMNS = ("task_id", "mode", "state", "polls", "archive_bytes", "where / why")


def task_dict(task: models.Task) -> dict[str, Any]:
    out = dataclasses.asdict(task)
    for key, value in out.items():
        if isinstance(value, dt.datetime):
            out[key] = value.isoformat()
    return out


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _cell(value: object, width: int = 60) -> str:
    text = "" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def table(tasks: Sequence[models.Task]) -> str:
    """A readable table of ``tasks``, one line each."""
    rows = [
        (
            _cell(t.task_id, 48),
            t.mode,
            t.state,
            str(t.polls),
            "" if t.archive_bytes is None else str(t.archive_bytes),
            _cell(t.archive_uri if t.state == models.State.ARCHIVED else t.error, 200),
        )
        for t in tasks
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def detail(task: models.Task) -> str:
    """Every field of one task, one per line."""
    data = task_dict(task)
    width = max(len(k) for k in data)
    return "\n".join(f"{k.ljust(width)}  {'' if v is None else v}" for k, v in data.items())
