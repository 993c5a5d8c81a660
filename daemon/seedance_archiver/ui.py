"""A page to look at, under ``/ui/`` on the daemon's HTTP port: the tasks, what is at risk, and the
archived video itself.

Server-rendered HTML from the standard library (``html.escape``), no JavaScript but the page's own
refresh. Every text a provider or a feeder wrote (ids, errors, model names) goes through
:func:`text`: control and direction characters made visible, then escaped. No page shows a provider
link (signed), a key or a database URL; a stored video plays through ``/ui/tasks/<id>/video``,
which streams a folder's file (with Range) or redirects to a short-lived presigned S3 link.

- ``/ui/``: counts by state, tasks at risk with the time each has left, the last failures and
  expiries with their reasons, the webhook backlog, the provider's answers in the last hour, and
  whether the API key works; it refreshes itself.
- ``/ui/tasks``: newest first, filtered by state, mode and provider, or one id; paged by keyset.
  Each row says when it is next worked on, and why then.
- ``/ui/tasks/<id>``: the row, its timeline (the row's own times, its moves from ``task_history``,
  its webhook deliveries), and the video.
- Actions (``retry``, ``webhooks redeliver``) only with SEEDANCE_UI_TOKEN set: a POST carrying the
  token (compared in constant time) and the page's CSRF value (a same-site cookie repeated in the
  form). Without the token the pages are read-only.

The page is as private as the port (loopback by default): put it behind the reverse proxy's
authentication to show it further (docs/pages/operations.md).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import datetime as dt
import hashlib
import hmac
import html
import pathlib
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web

from seedance_archiver import (
    archive,
    errors,
    keygate,
    metrics,
    models,
    outbox,
    policy,
    store,
    views,
)

log = structlog.get_logger(__name__)

R = TypeVar("R")

PAGE_ROWS = 50
AT_RISK_ROWS = 20
ENDED_ROWS = 10
REFRESH_SECONDS = 15
VIDEO_LINK_SECONDS = 300  # a presigned S3 link lives this long: enough to start and seek
CSRF_COOKIE = "seedance_ui_csrf"
ANSWERS_WINDOW_SECONDS = 3600.0
ANSWERS_SAMPLE_SECONDS = 60.0
ENDED_STATES = ("failed", "expired", "rejected", "cancelled")
TEXT_CHARS = 300  # an error shown in a table; the task's page shows the whole


class Service(Protocol):
    """What the pages read from the running daemon."""

    rules: policy.Rules
    metrics: metrics.Metrics
    keygate: keygate.KeyGate


class UiStore(Protocol):
    """What the pages ask of the database: one small Protocol for this consumer."""

    def counts(self) -> dict[str, int]: ...

    def get(self, task_id: str) -> models.Task | None: ...

    def history(self, task_id: str) -> list[models.Move]: ...

    def at_risk_tasks(
        self, now: dt.datetime, at_risk: models.AtRisk, limit: int
    ) -> list[models.Task]: ...

    def webhooks(
        self, failed: bool = ..., limit: int | None = ..., *, task_id: str | None = ...
    ) -> list[models.OutboxEvent]: ...

    def webhook_backlog(self) -> outbox.WebhookBacklog: ...

    def retry(
        self, task_id: str, now: dt.datetime, *, force: bool = False
    ) -> store.RetryOutcome: ...

    def redeliver_webhook(self, event_id: int, now: dt.datetime) -> bool: ...

    # Last: below it, ``list`` in an annotation would mean this method.
    def list(
        self,
        state: str | None = None,
        limit: int | None = None,
        *,
        mode: str | None = None,
        provider: str | None = None,
        before: tuple[dt.datetime, str] | None = None,
    ) -> list[models.Task]: ...


# --- text ----------------------------------------------------------------------------------------


def text(value: object, limit: int | None = None) -> str:
    """Anything shown: control and direction characters made visible, cut to ``limit``, escaped
    for HTML text and attribute values alike."""
    if value is None:
        return ""
    shown = views.printable(str(value))
    if limit is not None and len(shown) > limit:
        shown = shown[:limit] + "…"
    return html.escape(shown, quote=True)


def when(at: dt.datetime | None, now: dt.datetime) -> str:
    """A time as UTC text, with how long ago or ahead, in a ``<time>`` element."""
    if at is None:
        return ""
    seconds = (at - now).total_seconds()
    relative = f"in {_span(seconds)}" if seconds >= 0 else f"{_span(-seconds)} ago"
    stamp = at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f'<time datetime="{at.isoformat()}" title="{stamp} UTC">{stamp}</time> ({relative})'


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def query(**params: str | None) -> str:
    return urllib.parse.urlencode({k: v for k, v in params.items() if v})


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}
header a{color:#cfe0ff;text-decoration:none}header strong{margin-right:1em}
main{padding:1em 1.2em;max-width:1200px}
table{border-collapse:collapse;width:100%;background:#fff;margin:.4em 0 1.2em}
th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #e3e6ea;vertical-align:top}
td a code{word-break:normal;white-space:nowrap}
th{background:#eef1f5;font-weight:600}code{font-size:12px;word-break:break-all}
.state{padding:0 .4em;border-radius:3px;background:#e3e6ea}
.archived{background:#cdeccd}.failed,.expired,.rejected{background:#f6d0d0}
.cancelled{background:#eee1c4}.polling,.downloading,.pending{background:#d6e4f7}
.cards{display:flex;gap:.8em;flex-wrap:wrap}.card{background:#fff;padding:.6em 1em;
border:1px solid #e3e6ea;border-radius:4px}.card b{font-size:20px;display:block}
form.inline{display:inline}.note{color:#5b6472}.bad{color:#a11}.ok{color:#171}
video{max-width:640px;width:100%;background:#000;display:block;margin:.5em 0}
"""


def page(title: str, body: str, *, refresh: bool = False) -> str:
    head = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{head}<title>{text(title)} · seedance-archiver</title><style>{STYLE}</style></head>"
        '<body><header><strong>seedance-archiver</strong><a href="/ui/">Overview</a>'
        '<a href="/ui/tasks">Tasks</a></header>'
        f"<main><h1>{text(title)}</h1>{body}</main></body></html>"
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str) -> str:
    """A table of cells already made safe (each cell is HTML)."""
    lines = ["<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows]
    if not lines:
        return f'<p class="note">{text(empty)}</p>'
    head = "".join(f"<th>{text(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def state(name: str) -> str:
    return f'<span class="state {text(name)}">{text(name)}</span>'


def task_link(task_id: str) -> str:
    href = "/ui/tasks/" + urllib.parse.quote(task_id, safe="")
    return f'<a href="{text(href)}"><code>{text(task_id)}</code></a>'


# --- the provider's answers in the last hour -------------------------------------------------------


class AnswerWindow:
    """The provider's answers in the last hour, as ``seedance_provider_responses`` counts them:
    the counters sampled every minute (as pages are asked for), the newest less the one an hour
    before (or the counters since the start, while the daemon is younger than an hour)."""

    def __init__(self, meters: metrics.Metrics, clock: Callable[[], float] = time.monotonic):
        self.meters = meters
        self.clock = clock
        keep = int(ANSWERS_WINDOW_SECONDS / ANSWERS_SAMPLE_SECONDS) + 1
        # The daemon starts with every counter at zero: the first sample.
        self._samples: collections.deque[tuple[float, dict[str, float]]] = collections.deque(
            [(clock(), {})], maxlen=keep
        )

    def _now(self) -> dict[str, float]:
        counts: dict[str, float] = {}
        for family in self.meters.provider_responses.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["code_class"]] = sample.value
        return counts

    def last_hour(self) -> tuple[dict[str, int], float]:
        """Answers by class since the oldest sample kept, and that span in seconds."""
        at, current = self.clock(), self._now()
        if not self._samples or at - self._samples[-1][0] >= ANSWERS_SAMPLE_SECONDS:
            self._samples.append((at, current))
        then, before = self._samples[0]
        seen = {k: int(v - before.get(k, 0.0)) for k, v in current.items()}
        return {k: v for k, v in sorted(seen.items()) if v}, at - then


# --- the pages -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Pages:
    """The pages of one daemon: its service, its database (on a thread of their own) and the
    settings of the actions."""

    svc: Service
    task_store: UiStore
    token: str | None = None
    archive_root: pathlib.Path | None = None  # the folder archive's, to stream its files from
    clock: Callable[[], dt.datetime] = dataclasses.field(default=lambda: dt.datetime.now(dt.UTC))

    def __post_init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ui-db")
        self.answers = AnswerWindow(self.svc.metrics)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/ui", self.to_overview)
        app.router.add_get("/ui/", self.overview)
        app.router.add_get("/ui/tasks", self.tasks)
        app.router.add_get("/ui/tasks/{task_id}", self.task)
        app.router.add_get("/ui/tasks/{task_id}/video", self.video)
        app.router.add_post("/ui/tasks/{task_id}/retry", self.retry)
        app.router.add_post("/ui/webhooks/{event_id}/redeliver", self.redeliver)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _db(self, call: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: call(*args, **kwargs))

    def _html(self, request: web.Request, body: str) -> web.Response:
        response = web.Response(text=body, content_type="text/html", charset="utf-8")
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; media-src 'self' https: http:; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        if self.token is not None and CSRF_COOKIE not in request.cookies:
            response.set_cookie(
                CSRF_COOKIE,
                self._csrf(request),
                httponly=True,
                samesite="Strict",
                path="/ui/",
            )
        return response

    def _csrf(self, request: web.Request) -> str:
        """The page's CSRF value: the cookie's, or a new one (set with the page)."""
        value = request.cookies.get(CSRF_COOKIE)
        if not value:
            value = request.get("csrf") or secrets.token_urlsafe(24)
            request["csrf"] = value
        return str(value)

    async def to_overview(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    # --- overview --------------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        now = self.clock()
        rules = self.svc.rules
        counts = await self._db(self.task_store.counts)
        risky = await self._db(self.task_store.at_risk_tasks, now, rules.at_risk, AT_RISK_ROWS)
        ended: list[models.Task] = []
        for name in ENDED_STATES:
            ended += await self._db(self.task_store.list, name, ENDED_ROWS)
        ended = sorted(ended, key=lambda t: t.updated_at or now, reverse=True)[:ENDED_ROWS]
        backlog = await self._db(self.task_store.webhook_backlog)
        answers, span = self.answers.last_hour()
        cards = "".join(
            f'<a class="card" href="/ui/tasks?{query(state=name)}">{state(name)}<b>{count}</b></a>'
            for name, count in sorted(counts.items())
        )
        key = self.svc.keygate.state
        key_class = "ok" if key == "accepted" else "bad"
        body = [
            f'<section id="counts"><h2>Tasks by state</h2><div class="cards">{cards or "none yet"}'
            "</div></section>",
            '<section id="at-risk"><h2>At risk</h2>'
            + table(
                ["task", "state", "deadline", "provider"],
                (
                    [
                        task_link(t.task_id),
                        state(t.state),
                        when(t.expires_at, now),
                        text(t.provider),
                    ]
                    for t in risky
                ),
                "No task is at risk.",
            )
            + "</section>",
            '<section id="ended"><h2>Last failures and expiries</h2>'
            + table(
                ["task", "state", "when", "reason"],
                (
                    [
                        task_link(t.task_id),
                        state(t.state),
                        when(t.updated_at, now),
                        text(t.error, TEXT_CHARS),
                    ]
                    for t in ended
                ),
                "None.",
            )
            + "</section>",
            '<section id="webhooks"><h2>Webhooks</h2>'
            f"<p>{backlog.pending} waiting to be delivered, {backlog.given_up} given up on"
            + (
                f", the oldest from {when(backlog.oldest_pending_at, now)}"
                if backlog.oldest_pending_at
                else ""
            )
            + (
                f"; {backlog.paused_endpoints} URL(s) paused by a 410 Gone"
                if backlog.paused_endpoints
                else ""
            )
            + ".</p></section>",
            '<section id="provider"><h2>The provider</h2>'
            f'<p>API key: <span class="{key_class}" id="api-key">{text(key)}</span>.</p>'
            f"<p>Answers in the last {_span(max(span, 1.0)) if span < 3590 else 'hour'}: "
            + (", ".join(f"{text(k)}: {v}" for k, v in answers.items()) or "none")
            + ".</p></section>",
        ]
        return self._html(request, page("Overview", "".join(body), refresh=True))

    # --- the task list ---------------------------------------------------------------------------

    async def tasks(self, request: web.Request) -> web.Response:
        now = self.clock()
        q = request.query
        wanted = {name: q.get(name) or None for name in ("state", "mode", "provider")}
        found = (q.get("id") or "").strip()
        before = _cursor(q.get("before"))
        if found:
            one = await self._db(self.task_store.get, found)
            rows = [one] if one is not None else []
        else:
            rows = await self._db(
                self.task_store.list,
                wanted["state"],
                PAGE_ROWS,
                mode=wanted["mode"],
                provider=wanted["provider"],
                before=before,
            )
        listed = table(
            [
                "task",
                "state",
                "mode",
                "provider",
                "inserted",
                "next worked on",
                "why then",
                "error",
            ],
            (
                [
                    task_link(t.task_id),
                    state(t.state),
                    text(t.mode),
                    text(t.provider),
                    when(t.inserted_at, now),
                    "" if t.is_terminal else when(t.next_attempt_at, now),
                    text(policy.why_waiting(t, now, self.svc.rules)),
                    text(t.error, TEXT_CHARS),
                ]
                for t in rows
            ),
            "No task here." if not found else "No task has this id.",
        )
        more = ""
        if len(rows) == PAGE_ROWS and not found and rows[-1].inserted_at is not None:
            last = rows[-1]
            assert last.inserted_at is not None
            cursor = f"{last.inserted_at.isoformat()}|{last.task_id}"
            more = (
                f'<p><a id="next" href="/ui/tasks?{text(query(**wanted, before=cursor))}">'
                "Older tasks →</a></p>"
            )
        body = _filters(wanted, found) + listed + more
        return self._html(request, page("Tasks", body))

    # --- one task --------------------------------------------------------------------------------

    async def task(self, request: web.Request) -> web.Response:
        now = self.clock()
        task_id = request.match_info["task_id"]
        task = await self._db(self.task_store.get, task_id)
        if task is None:
            raise web.HTTPNotFound(text="no such task")
        moves = await self._db(self.task_store.history, task_id)
        events = await self._db(self.task_store.webhooks, False, 50, task_id=task_id)
        done = request.query.get("done")
        notice = f'<p class="ok" id="notice">{text(done)}</p>' if done else ""
        facts = [
            ("state", state(task.state)),
            ("provider's status", text(task.provider_status)),
            ("mode", text(task.mode)),
            ("provider", text(task.provider)),
            ("model", text(task.model)),
            ("error", text(task.error)),
            ("deadline", when(task.expires_at, now)),
            ("next worked on", "" if task.is_terminal else when(task.next_attempt_at, now)),
            ("why then", text(policy.why_waiting(task, now, self.svc.rules))),
            ("polls", str(task.polls)),
            ("archive", f"<code>{text(task.archive_uri)}</code>" if task.archive_uri else ""),
            ("size", f"{task.archive_bytes:,} bytes" if task.archive_bytes is not None else ""),
            ("SHA-256", f"<code>{text(task.archive_sha256)}</code>"),
        ]
        details = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
        details += "</table>"
        video = ""
        if task.archive_uri:
            src = "/ui/tasks/" + urllib.parse.quote(task_id, safe="") + "/video"
            video = (
                f'<section id="video"><h2>The video</h2><video id="archived" controls '
                f'preload="auto" src="{text(src)}"></video></section>'
            )
        body = (
            notice
            + details
            + video
            + _timeline(task, moves, events, now)
            + self._actions(request, task, events)
        )
        return self._html(request, page(f"Task {task_id}", body))

    def _actions(
        self, request: web.Request, task: models.Task, events: Sequence[models.OutboxEvent]
    ) -> str:
        if self.token is None:
            return (
                '<section id="actions"><h2>Actions</h2><p class="note">Read-only: set '
                "SEEDANCE_UI_TOKEN to retry tasks and redeliver webhooks from this page."
                "</p></section>"
            )
        csrf = text(self._csrf(request))

        def form(action: str, label: str, name: str) -> str:
            return (
                f'<form class="inline" method="post" action="{text(action)}" id="{name}">'
                f'<input type="hidden" name="csrf" value="{csrf}">'
                '<input type="password" name="token" placeholder="UI token" autocomplete="off">'
                f'<button type="submit">{text(label)}</button></form>'
            )

        quoted = urllib.parse.quote(task.task_id, safe="")
        forms = [form(f"/ui/tasks/{quoted}/retry", "Retry", "retry")]
        forms += [
            form(
                f"/ui/webhooks/{e.id}/redeliver",
                f"Redeliver {e.event} #{e.id}",
                f"redeliver-{e.id}",
            )
            for e in events
        ]
        return '<section id="actions"><h2>Actions</h2>' + "<br>".join(forms) + "</section>"

    # --- the video -------------------------------------------------------------------------------

    async def video(self, request: web.Request) -> web.StreamResponse:
        task = await self._db(self.task_store.get, request.match_info["task_id"])
        if task is None or not task.archive_uri:
            raise web.HTTPNotFound(text="no archived video")
        uri = task.archive_uri
        try:
            link = await self._db(archive.link, uri, VIDEO_LINK_SECONDS)
        except (errors.ArchiveError, ValueError) as exc:
            log.warning("ui_video_link_failed", task_id=task.task_id, error=str(exc))
            raise web.HTTPNotFound(text="no link to the archived video") from None
        if urllib.parse.urlsplit(uri).scheme != "file":
            # A presigned link, never in a page: the browser follows the redirect.
            raise web.HTTPFound(link, headers={"Cache-Control": "no-store"})
        path = self._archived_file(link)
        if path is None:
            raise web.HTTPNotFound(text="the video is not in this daemon's archive folder")
        return web.FileResponse(path, headers={"Content-Type": "video/mp4"})

    def _archived_file(self, local: str) -> pathlib.Path | None:
        """The file at ``local``, if it lies in this daemon's archive folder (a row's URI is
        anybody's text: never a file elsewhere)."""
        if self.archive_root is None:
            return None
        path = pathlib.Path(local).resolve()
        if not path.is_relative_to(self.archive_root.resolve()) or not path.is_file():
            return None
        return path

    # --- actions ---------------------------------------------------------------------------------

    async def _authorised(self, request: web.Request) -> Mapping[str, str]:
        """The POSTed form, once the token, the CSRF value and the origin pass; else 403."""
        if self.token is None:
            raise web.HTTPForbidden(text="actions are off: SEEDANCE_UI_TOKEN is not set")
        form = await request.post()
        given = str(form.get("token", ""))
        csrf = str(form.get("csrf", ""))
        cookie = request.cookies.get(CSRF_COOKIE, "")
        origin = request.headers.get("Origin")
        same_origin = origin is None or urllib.parse.urlsplit(origin).netloc == request.host
        if not (
            same_origin
            and cookie
            and hmac.compare_digest(csrf.encode(), cookie.encode())
            and _same(given, self.token)
        ):
            log.warning("ui_action_refused", path=request.path, peer=request.remote)
            raise web.HTTPForbidden(text="refused: a wrong or missing token, or a stale page")
        return {k: str(v) for k, v in form.items()}

    async def retry(self, request: web.Request) -> web.Response:
        await self._authorised(request)
        task_id = request.match_info["task_id"]
        outcome = await self._db(self.task_store.retry, task_id, self.clock())
        log.info("ui_retry", task_id=task_id, outcome=outcome.value)
        done = (
            "retried: polled at the next tick"
            if outcome is store.RetryOutcome.RETRIED
            else outcome.value
        )
        raise web.HTTPSeeOther(_task_href(task_id) + "?" + query(done=done))

    async def redeliver(self, request: web.Request) -> web.Response:
        await self._authorised(request)
        try:
            event_id = int(request.match_info["event_id"])
        except ValueError:
            raise web.HTTPNotFound() from None
        events = await self._db(self.task_store.webhooks, False, None)
        event = next((e for e in events if e.id == event_id), None)
        if event is None or not await self._db(
            self.task_store.redeliver_webhook, event_id, self.clock()
        ):
            raise web.HTTPNotFound(text="no such webhook event")
        log.info("ui_redeliver", webhook_id=event.webhook_id, task_id=event.task_id)
        done = f"webhook #{event_id} ({event.event}) will be sent again now"
        raise web.HTTPSeeOther(_task_href(event.task_id) + "?" + query(done=done))


def _same(given: str, expected: str) -> bool:
    digest = hashlib.sha256
    return hmac.compare_digest(digest(given.encode()).digest(), digest(expected.encode()).digest())


def _task_href(task_id: str) -> str:
    return "/ui/tasks/" + urllib.parse.quote(task_id, safe="")


def _cursor(value: str | None) -> tuple[dt.datetime, str] | None:
    """A page's keyset cursor, ``<inserted_at ISO>|<task_id>``; None for anything else."""
    if not value or "|" not in value:
        return None
    at, _, task_id = value.partition("|")
    try:
        parsed = dt.datetime.fromisoformat(at)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed, task_id


def _filters(wanted: Mapping[str, str | None], found: str) -> str:
    choices = {
        "state": [s.value for s in models.State],
        "mode": [m.value for m in models.Mode],
        "provider": _providers(),
    }
    selects = []
    for name, options in choices.items():
        items = [f'<option value="">any {name}</option>'] + [
            f'<option value="{text(o)}"{" selected" if wanted.get(name) == o else ""}>{text(o)}'
            "</option>"
            for o in options
        ]
        selects.append(f'<select name="{name}" id="filter-{name}">{"".join(items)}</select>')
    return (
        '<form method="get" action="/ui/tasks" id="filters">'
        + "".join(selects)
        + f' <input name="id" id="search" placeholder="task id" value="{text(found)}">'
        + ' <button type="submit">Show</button> <a href="/ui/tasks">clear</a></form>'
    )


def _providers() -> list[str]:
    from seedance_archiver import providers  # the registry; only its names

    return list(providers.NAMES)


def _timeline(
    task: models.Task,
    moves: Sequence[models.Move],
    events: Sequence[models.OutboxEvent],
    now: dt.datetime,
) -> str:
    """The task's moments, oldest first: the row's own times, its moves, its webhook deliveries."""
    entries: list[tuple[dt.datetime, str]] = []
    if task.inserted_at is not None:
        entries.append((task.inserted_at, "inserted by the feeding application"))
    for move in moves:
        said = f" (the provider: {text(move.provider_status)})" if move.provider_status else ""
        polls = f", after {move.polls} poll{'s' if move.polls != 1 else ''}"
        what = f"{state(move.state)}{said}{polls}"
        if move.error:
            what += f': <span class="bad">{text(move.error)}</span>'
        entries.append((move.at, what))
    if task.completed_at is not None:
        entries.append((task.completed_at, "the provider's video was ready (completed)"))
    if task.archived_at is not None:
        entries.append((task.archived_at, f"{state('archived')}: the video is safe"))
    for event in events:
        delivered = (
            f"delivered {when(event.delivered_at, now)}"
            if event.delivered_at
            else f"{text(event.state)} after {event.attempts} attempt(s)"
        )
        last = f": {text(event.last_error, TEXT_CHARS)}" if event.last_error else ""
        entries.append(
            (event.created_at, f"webhook {text(event.event)} #{event.id}: {delivered}{last}")
        )
    entries.sort(key=lambda entry: entry[0])
    items = "".join(f"<li>{when(at, now)}: {what}</li>" for at, what in entries)
    return f'<section id="timeline"><h2>Timeline</h2><ol>{items}</ol></section>'
