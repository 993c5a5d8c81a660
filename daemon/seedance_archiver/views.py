"""How tasks are shown to people (a fixed-width table) and to scripts (JSON)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from seedance_archiver import models, policy, store, utils

TABLE_COLUMNS = ("task_id", "mode", "state", "polls", "archive_bytes", "where / why")


def task_dict(task: models.Task, show_secrets: bool = False) -> dict[str, Any]:
    """Every field of ``task``; a signed ``video_url`` loses its query string unless ``show_secrets``."""
    out = dataclasses.asdict(task)
    if not show_secrets:
        if out.get("video_url"):
            out["video_url"] = utils.redact_url(out["video_url"])
        if out.get("error"):
            out["error"] = utils.redact_text(out["error"])
    for key, value in out.items():
        if isinstance(value, dt.datetime):
            out[key] = value.isoformat()
    return out


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _cell(value: object, width: int = 60) -> str:
    text = "" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def table(tasks: Sequence[models.Task], show_secrets: bool = False) -> str:
    """A readable table of ``tasks``, one line each (URLs in errors redacted unless ``show_secrets``)."""
    rows = [
        (
            _cell(t.task_id, 48),
            t.mode,
            t.state,
            str(t.polls),
            "" if t.archive_bytes is None else str(t.archive_bytes),
            _cell(
                t.archive_uri
                if t.state == models.State.ARCHIVED
                else (t.error if show_secrets or t.error is None else utils.redact_text(t.error)),
                200,
            ),
        )
        for t in tasks
    ]
    return _render(TABLE_COLUMNS, rows)


def _render(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width columns under a header and a rule."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def detail(task: models.Task, show_secrets: bool = False) -> str:
    """Every field of one task, one per line (see :func:`task_dict` for ``show_secrets``)."""
    data = task_dict(task, show_secrets)
    width = max(len(k) for k in data)
    return "\n".join(f"{k.ljust(width)}  {'' if v is None else v}" for k, v in data.items())


WEBHOOK_COLUMNS = ("id", "event", "task_id", "state", "attempts", "last", "next / delivered")


def webhook_dict(event: models.OutboxEvent) -> dict[str, Any]:
    """One outbox event for scripts (its payload as JSON, never a signed link: it has none)."""
    out = dataclasses.asdict(event)
    out["payload"] = json.loads(event.payload)
    for key, value in out.items():
        if isinstance(value, dt.datetime):
            out[key] = value.isoformat()
    return out


def webhook_table(events: Sequence[models.OutboxEvent]) -> str:
    """The outbox, one event a line."""
    rows = [
        (
            str(e.id),
            e.event,
            _cell(e.task_id, 48),
            e.state,
            str(e.attempts),
            _cell(e.last_error or ("" if e.last_status is None else str(e.last_status)), 40),
            _iso(e.delivered_at if e.state == models.Delivery.DELIVERED else e.next_attempt_at)
            or "",
        )
        for e in events
    ]
    return _render(WEBHOOK_COLUMNS, rows)


def summary_dict(
    summary: store.Summary,
    daemons: Sequence[store.DaemonBeat],
    now: dt.datetime,
    generation: Sequence[policy.ModelTimes] = (),
    backlog: store.WebhookBacklog | None = None,
) -> dict[str, Any]:
    oldest = summary.oldest_pending
    return {
        "generation_times": [dataclasses.asdict(g) for g in generation],
        "webhooks": None
        if backlog is None
        else {
            "backlog": backlog.pending,
            "oldest_undelivered_at": _iso(backlog.oldest_pending_at),
            "given_up": backlog.given_up,
        },
        "counts": summary.counts,
        "total": sum(summary.counts.values()),
        "at_risk": summary.at_risk,
        "oldest_pending": None
        if oldest is None
        else {"task_id": oldest.task_id, "inserted_at": _iso(oldest.inserted_at)},
        "daemons": [
            {
                "owner": d.owner,
                "last_tick_at": _iso(d.last_tick_at),
                "last_tick_age_s": None
                if d.last_tick_at is None
                else round((now - d.last_tick_at).total_seconds(), 1),
                "api_key_ok": d.api_key_ok,
                "version": d.version,
            }
            for d in daemons
        ],
    }


def summary(
    summary: store.Summary,
    daemons: Sequence[store.DaemonBeat],
    now: dt.datetime,
    generation: Sequence[policy.ModelTimes] = (),
    backlog: store.WebhookBacklog | None = None,
) -> str:
    """The operator's overview: counts by state, what is at risk, whether daemons tick, per model
    the observed generation times with the skip in use, and the webhook backlog."""
    width = max(len(s) for s in summary.counts)
    lines = [f"{state.ljust(width)}  {n}" for state, n in summary.counts.items()]
    lines.append(f"{'total'.ljust(width)}  {sum(summary.counts.values())}")
    lines.append("")
    lines.append(f"at risk (deadline within an hour, not archived): {summary.at_risk}")
    oldest = summary.oldest_pending
    if oldest is not None and oldest.inserted_at is not None:
        age = (now - oldest.inserted_at).total_seconds()
        lines.append(f"oldest pending: {oldest.task_id} (inserted {age:.0f}s ago)")
    else:
        lines.append("oldest pending: none")
    if not daemons:
        lines.append("last tick: no daemon running")
    for d in daemons:
        age_text = (
            "never"
            if d.last_tick_at is None
            else f"{(now - d.last_tick_at).total_seconds():.0f}s ago"
        )
        key = "" if d.api_key_ok else ", API KEY REJECTED"
        lines.append(f"last tick: {age_text} by {d.owner}{key}")
    if generation:
        lines.append("")
        lines.append(generation_table(generation))
    if backlog is not None:
        oldest_at = backlog.oldest_pending_at
        since = "" if oldest_at is None else f", oldest {(now - oldest_at).total_seconds():.0f}s"
        lines.append(
            f"webhooks: {backlog.pending} undelivered{since}; {backlog.given_up} given up"
            + (" (seedance-archiver webhooks --failed)" if backlog.given_up else "")
        )
    return "\n".join(lines)


GENERATION_COLUMNS = ("model", "samples", "p5 s", "p50 s", "p95 s", "skip s")


def generation_table(generation: Sequence[policy.ModelTimes]) -> str:
    """Per model: observed generation times (the last day) and the skip the daemon uses."""

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    rows = [
        (
            g.model,
            str(g.samples),
            secs(g.p5),
            secs(g.p50),
            secs(g.p95),
            "none"
            if g.skip_seconds is None
            else f"{secs(g.skip_seconds)} (" + ("learned" if g.learned else "settings") + ")",
        )
        for g in generation
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(GENERATION_COLUMNS)]
    lines = ["generation times (created to completed, as seen):"]
    lines.append("  ".join(c.ljust(w) for c, w in zip(GENERATION_COLUMNS, widths, strict=True)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()
