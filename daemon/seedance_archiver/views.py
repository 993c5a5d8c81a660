"""How tasks are shown to people (a fixed-width table) and to scripts (JSON)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import unicodedata
from collections.abc import Sequence
from typing import Any

from seedance_archiver import models, outbox, policy, store, utils

TABLE_COLUMNS = ("task_id", "mode", "state", "polls", "archive_bytes", "next poll", "where / why")
NO_TASKS = "no tasks match"
NO_EVENTS = "no webhook events match"


def task_dict(task: models.Task, show_secrets: bool = False) -> dict[str, Any]:
    """Every field of ``task``; a signed ``video_url`` loses its query string unless ``show_secrets``."""
    out = {name: getattr(task, name) for name in models.TASK_FIELDS}
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
    # ensure_ascii (the default) writes every control and format character as \uXXXX: JSON output
    # is as safe on a terminal as the tables.
    return json.dumps(value, indent=2, sort_keys=True, default=str)


# Unicode categories a terminal must never receive raw from a provider's answer or a feeder's row:
# controls (Cc: C0, DEL, C1, so ESC sequences that clear the screen or move the cursor, and CR that
# rewrites a line), format characters (Cf: the bidi overrides such as U+202E that reorder what is
# shown, zero-width characters that hide text), line and paragraph separators (Zl, Zp) and lone
# surrogates (Cs, which cannot even be encoded). Every other character, é and 日本 included, is kept.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: each character of :data:`_UNSAFE_CATEGORIES` written
    as a visible escape (``\\x1b``, ``\\r``, ``\\u202e``), so no answer can move the cursor,
    rewrite the screen or reverse a line."""
    if text.isprintable():  # no Cc, Cf, Zl, Zp or Cs (nor anything else unusual): the common case
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in _UNSAFE_CATEGORIES
        else ch
        for ch in text
    )


def _cell(value: object, width: int = 60) -> str:
    text = "" if value is None else printable(str(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def table(
    tasks: Sequence[models.Task],
    show_secrets: bool = False,
    *,
    now: dt.datetime | None = None,
    rules: policy.Rules | None = None,
) -> str:
    """A readable table of ``tasks``, one line each: where an archived video is, why a finished task
    ended, and for an active one when it is worked on next and why then (URLs in errors redacted
    unless ``show_secrets``). :data:`NO_TASKS` when there is none."""
    if not tasks:
        return NO_TASKS
    now = now or utils.utcnow()
    rows = [
        (
            _cell(t.task_id, 48),
            t.mode,
            t.state,
            str(t.polls),
            "" if t.archive_bytes is None else str(t.archive_bytes),
            next_poll(t, now),
            _cell(_where_or_why(t, now, rules, show_secrets), 200),
        )
        for t in tasks
    ]
    return _render(TABLE_COLUMNS, rows)


def next_poll(task: models.Task, now: dt.datetime) -> str:
    """When an active task is worked on next, from ``now``: ``now``, ``in 42s``, ``5m late``."""
    due = task.next_attempt_at
    if task.is_terminal or due is None:
        return ""
    seconds = (due - now).total_seconds()
    if -1 < seconds <= 0:
        return "now"
    return f"in {_duration(seconds)}" if seconds > 0 else f"{_duration(-seconds)} late"


def _duration(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.0f}s"
    if seconds < 6000:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _where_or_why(
    task: models.Task, now: dt.datetime, rules: policy.Rules | None, show_secrets: bool
) -> str | None:
    if task.state == models.State.ARCHIVED:
        return task.archive_uri
    text = task.error
    if not task.is_terminal and rules is not None:
        text = policy.why_waiting(task, now, rules)
    if text is None or show_secrets:
        return text
    return utils.redact_text(text)


def _render(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width columns under a header and a rule."""
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def detail(
    task: models.Task,
    show_secrets: bool = False,
    *,
    now: dt.datetime | None = None,
    rules: policy.Rules | None = None,
) -> str:
    """Every field of one task, one per line (see :func:`task_dict` for ``show_secrets``); for an
    active task also when it is worked on next, and why then."""
    data = task_dict(task, show_secrets)
    if not task.is_terminal:
        now = now or utils.utcnow()
        data["next_poll"] = next_poll(task, now)
        if rules is not None:
            data["why"] = _where_or_why(task, now, rules, show_secrets)
    width = max(len(k) for k in data)
    return "\n".join(
        f"{k.ljust(width)}  {'' if v is None else printable(str(v))}" for k, v in data.items()
    )


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
    """The outbox, one event a line; :data:`NO_EVENTS` when there is none."""
    if not events:
        return NO_EVENTS
    rows = [
        (
            str(e.id),
            _cell(e.event),
            _cell(e.task_id, 48),
            _cell(e.state),
            str(e.attempts),
            _cell(e.last_error or ("" if e.last_status is None else str(e.last_status)), 40),
            _iso(e.delivered_at if e.state == models.Delivery.DELIVERED else e.next_attempt_at)
            or "",
        )
        for e in events
    ]
    return _render(WEBHOOK_COLUMNS, rows)


def paused_endpoints(paused: Sequence[models.PausedEndpoint]) -> str:
    """One line per paused webhook URL (redacted), and how to resume it."""
    lines = [
        f"PAUSED since {_iso(p.paused_at)}: {printable(utils.redact_url(p.url))} "
        f"({printable(p.reason)}); nothing is delivered to it until "
        "`seedance-archiver webhooks resume`"
        for p in paused
    ]
    return "\n".join(lines)


def summary_dict(
    summary: store.Summary,
    daemons: Sequence[store.DaemonBeat],
    now: dt.datetime,
    generation: Sequence[policy.ModelTimes] = (),
    backlog: outbox.WebhookBacklog | None = None,
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
            "paused_endpoints": backlog.paused_endpoints,
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
    backlog: outbox.WebhookBacklog | None = None,
) -> str:
    """The operator's overview: counts by state, what is at risk, whether daemons tick, per model
    the observed generation times with the skip in use, and the webhook backlog."""
    width = max(len(s) for s in summary.counts)
    lines = [f"{state.ljust(width)}  {n}" for state, n in summary.counts.items()]
    lines.append(f"{'total'.ljust(width)}  {sum(summary.counts.values())}")
    lines.append("")
    lines.append(
        f"at risk (not archived, in the last hour or quarter of its window): {summary.at_risk}"
    )
    oldest = summary.oldest_pending
    if oldest is not None and oldest.inserted_at is not None:
        age = (now - oldest.inserted_at).total_seconds()
        lines.append(f"oldest pending: {printable(oldest.task_id)} (inserted {age:.0f}s ago)")
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
        lines.append(f"last tick: {age_text} by {printable(d.owner)}{key}")
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
        if backlog.paused_endpoints:
            lines.append(
                f"webhooks PAUSED: {backlog.paused_endpoints} URL(s) answered 410 Gone; nothing "
                "is delivered to them until `seedance-archiver webhooks resume`"
            )
    return "\n".join(lines)


GENERATION_COLUMNS = ("model", "samples", "p5 s", "p50 s", "p95 s", "skip s")


def generation_table(generation: Sequence[policy.ModelTimes]) -> str:
    """Per model: observed generation times (the last day) and the skip the daemon uses."""

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    rows = [
        (
            printable(g.model),
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
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(GENERATION_COLUMNS)]
    lines = ["generation times (created to completed, as seen):"]
    lines.append("  ".join(c.ljust(w) for c, w in zip(GENERATION_COLUMNS, widths, strict=True)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()
