"""The ``seedance-archiver`` command: parse, configure, call. No behaviour lives here."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TextIO

import seedance_archiver
from seedance_archiver import (
    archive,
    config,
    db,
    errors,
    logs,
    models,
    outbox,
    policy,
    store,
    utils,
    views,
)

# The daemon's own modules (and what they bring: APScheduler, httpx, aiohttp, Alembic) are imported
# by the commands that use them, and boto3 by an s3:// archive alone (archive.from_url): `add`,
# `list`, `status` and `check` start in half the time (`python -X importtime`: 3.8 s for everything
# on a loaded 2-core machine, boto3 alone 0.55 s), and scripts and tests call them often.

PROG = "seedance-archiver"
# `check` passes only if some daemon's heartbeat (every 10 s) is at most this old.
CHECK_MAX_TICK_AGE_SECONDS = 60.0
LIST_LIMIT = 50  # rows `list` shows unless --limit or --all
WATCH_SECONDS = 2.0  # how often `list --watch` and `status ID --follow` look again

# What each command reads, said in its --help.
READS_DATABASE = (
    "Reads SEEDANCE_DATABASE_URL (or SEEDANCE_DATABASE_URL_FILE, or the systemd credential "
    "seedance-database-url); nothing else, so a bad daemon setting never blocks it."
)
READS_ALL = (
    "Reads every SEEDANCE_* setting (see `seedance-archiver config` and docs/pages/settings.md)."
)
READS_STATUS = (
    READS_DATABASE.removesuffix("; nothing else, so a bad daemon setting never blocks it.")
    + "; also the cadences and expected times (SEEDANCE_POLL_*, SEEDANCE_EXPECTED_SECONDS_*) to "
    "say why a task waits, their defaults where one is invalid."
)
READS_CHECK = (
    "Reads SEEDANCE_DATABASE_URL (or its _FILE, or the credential) and SEEDANCE_ARCHIVE_URL (with "
    "boto3's AWS_* for S3), and validates every other SEEDANCE_* setting as `run` would."
)
READS_TRY = (
    "Reads SEEDANCE_PROVIDER (which API the simulator plays) and SEEDANCE_HTTP_PORT; the database "
    "(./seedance-archiver-try.db), the archive (./archive-try), the key, the URL rules and the "
    "cadences are the trial's own, whatever the other settings say."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Archive every finished Seedance video to S3 before the provider deletes it.",
        epilog="Settings come from SEEDANCE_* variables: `seedance-archiver config` shows them.",
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {seedance_archiver.__version__}"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="an unknown SEEDANCE_* variable (a misspelt setting) is an error, not a warning",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def verb(name: str, help_text: str, reads: str, **kwargs: object) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=reads, **kwargs)  # type: ignore[arg-type]

    run = verb("run", "run the daemon (until SIGTERM)", READS_ALL)
    run.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="run N daemon processes under a supervisor that restarts a dead one (PostgreSQL only; "
        "process i serves HTTP on SEEDANCE_HTTP_PORT + i)",
    )
    verb(
        "migrate",
        "create or upgrade the table video_tasks (alembic upgrade head)",
        READS_DATABASE,
    )
    add = verb(
        "add",
        "track task ids (given, or one per line on standard input)",
        READS_DATABASE,
    )
    add.add_argument("task_ids", nargs="*", metavar="ID", help="task ids; none or - reads stdin")
    add.add_argument("--mode", default="standard", choices=[m.value for m in models.Mode])
    # The output options of status and list.
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON for scripts")
    output.add_argument(
        "--show-secrets",
        action="store_true",
        help="print video_url with its query string (a signed link: anyone who has it can download)",
    )
    status = verb("status", "a summary, or one task's details", READS_STATUS, parents=[output])
    status.add_argument("task_id", nargs="?")
    status.add_argument(
        "--follow",
        action="store_true",
        help="with ID: print the task again whenever it changes, until it has ended",
    )
    listing = verb("list", "list tracked tasks, newest first", READS_STATUS, parents=[output])
    listing.add_argument("--state", choices=[s.value for s in models.State])
    shown = listing.add_mutually_exclusive_group()
    shown.add_argument(
        "--limit", type=int, default=LIST_LIMIT, metavar="N", help="show at most N rows"
    )
    shown.add_argument("--all", action="store_true", help="show every row")
    listing.add_argument(
        "--watch",
        action="store_true",
        help=f"show the list again every {WATCH_SECONDS:.0f} s while it changes, until every "
        "row listed has ended",
    )
    retry = verb("retry", "put a task back to polling now, keeping its history", READS_DATABASE)
    retry.add_argument("task_id")
    retry.add_argument(
        "--force", action="store_true", help="also retry an archived task (copies it again)"
    )
    verb(
        "check",
        "exit 0 if the settings are valid, the database and the archive answer, and a daemon "
        "ticks with an accepted key",
        READS_CHECK,
    )
    verb(
        "demo",
        "the whole pipeline on SQLite + ./archive against the simulator, checked, then exit",
        READS_DATABASE.split(";")[0] + " and SEEDANCE_ARCHIVE_URL; the rest is the demo's own.",
    )
    trial = verb(
        "try",
        "a trial on this machine: the simulator and the daemon together on files of their own, "
        "until Ctrl-C; insert task ids with SQL (or `add`) and watch them archived",
        READS_TRY,
    )
    trial.add_argument(
        "--simulator-port", type=int, default=0, metavar="PORT", help="0 picks a free port"
    )
    url = verb(
        "url",
        "print a presigned GET URL of an archived video (a path for a folder archive)",
        READS_DATABASE.split(";")[0] + "; for S3, boto3's AWS_* settings.",
    )
    url.add_argument("task_id")
    url.add_argument(
        "--expires", type=int, default=archive.LINK_SECONDS, help="seconds the link is valid"
    )
    hooks = verb("webhooks", "list webhook deliveries (newest first)", READS_DATABASE)
    hooks.add_argument("--failed", action="store_true", help="only those given up on")
    hooks.add_argument("--limit", type=int, default=100)
    hooks.add_argument("--json", action="store_true", help="print JSON for scripts")
    hooks_sub = hooks.add_subparsers(dest="webhooks_action", metavar="ACTION")
    redeliver = hooks_sub.add_parser(
        "redeliver", help="send one event again (same webhook-id)", epilog=READS_DATABASE
    )
    redeliver.add_argument("event_id", type=int)
    discard = hooks_sub.add_parser(
        "discard",
        help="give up on the undelivered events written before a time (a backlog that piled up "
        "while webhooks were off)",
        epilog=READS_DATABASE,
    )
    discard.add_argument(
        "--before",
        required=True,
        type=_when,
        metavar="TIME",
        help="ISO 8601, e.g. 2026-12-06T12:00:00Z (UTC when no offset is given), or 'now'",
    )
    resume = hooks_sub.add_parser(
        "resume",
        help="deliver again to a webhook URL paused by a 410 Gone (every paused URL when none is "
        "given); the events held meanwhile are sent at once",
        epilog=READS_DATABASE,
    )
    resume.add_argument("url", nargs="?", metavar="URL", help="as `webhooks` lists it")
    settings = verb(
        "config",
        "print the settings in effect, secrets masked, and where each came from",
        READS_ALL,
    )
    settings.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def _when(text: str) -> dt.datetime:
    if text.strip().lower() == "now":
        return utils.utcnow()
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


# The commands that need only the database (a bad daemon setting must not block them).
DATABASE_ONLY = frozenset({"migrate", "add", "status", "list", "retry", "url", "webhooks"})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not _known_settings(args.strict):
            return 2
        if args.command in DATABASE_ONLY:
            database = config.load_database()
            logs.configure(database.log_format)
            return _dispatch_database(args, database)
        if args.command == "check":
            return _check(args)
        settings = config.load()
        log_format = logs.configure(settings.log_format)
        return _dispatch(args, settings, log_format)
    except errors.ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except errors.ArchiverError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _known_settings(strict: bool) -> bool:
    """Say which SEEDANCE_* variables name no setting (a misspelling is otherwise silently the
    default); False when that stops the command (--strict)."""
    unknown = config.unknown_settings()
    for name, nearest in unknown:
        hint = f" (did you mean {nearest}?)" if nearest else ""
        kind = "error" if strict else "warning"
        print(f"{PROG}: {kind}: {name} is not a setting{hint}", file=sys.stderr)
    return not (strict and unknown)


def _say(text: str) -> None:
    """A line for the person at the terminal, on stderr: stdout stays what scripts read."""
    print(f"{PROG}: {text}", file=sys.stderr)


def _dispatch(args: argparse.Namespace, settings: config.Settings, log_format: str) -> int:
    command = args.command
    if command == "run":
        settings.resolve_api_key()  # fail before anything starts
        if settings.callbacks:
            settings.resolve_callback_secret()
        from seedance_archiver import scheduler, supervisor, webhooks

        if settings.webhook_url is not None:
            webhooks.check_url(settings.webhook_url, settings.allow_private_webhook_hosts)
            webhooks.Signer(settings.resolve_webhook_secrets())
        if log_format == "console":
            # For the person at the terminal. In JSON, where a log shipper reads stderr, every line
            # is one object (docs/pages/logs-and-security.md): daemon_starting names the same.
            _say(_uses(settings.resolve_database_url(), settings.archive_url))
        if args.processes != 1:
            _check_processes(args.processes, settings)
            return supervisor.run(
                args.processes,
                http_port=settings.http_port,
                grace_seconds=settings.shutdown_grace_seconds,
            )
        scheduler.tune_gc()
        return asyncio.run(scheduler.run(settings))
    if command == "demo":
        from seedance_archiver import demo

        return demo.run()
    if command == "try":
        from seedance_archiver import trial

        return trial.run(simulator_port=args.simulator_port)
    if command == "config":
        return _config(settings, args.json)
    raise AssertionError(command)


def _uses(database_url: str, archive_url: str | None = None) -> str:
    """What a command works on, named (redacted) so that a misspelt setting shows."""
    text = f"database {config.database_where(database_url)}"
    if archive_url is not None:
        text += f", archive {config.archive_where(archive_url)}"
    return text


def _dispatch_database(args: argparse.Namespace, database: config.DatabaseSettings) -> int:
    command = args.command
    url = database.resolve_database_url()
    _say(_uses(url))
    if command == "migrate":
        from seedance_archiver import schema

        schema.upgrade(url)
        print(f"{PROG}: video_tasks is at the latest schema in {config.database_where(url)}")
        return 0
    sql_store = store.SqlStore.from_url(url, database.database_statement_timeout_seconds)
    try:
        if command == "add":
            return _add(sql_store, args.task_ids, args.mode, sys.stdin)
        if command == "status":
            return _status(sql_store, args, _rules())
        if command == "list":
            return _list(sql_store, args, _rules())
        if command == "url":
            return _url(sql_store, args)
        if command == "webhooks":
            return _webhooks(sql_store, args)
        if command == "retry":
            outcome = sql_store.retry(args.task_id, utils.utcnow(), force=args.force)
            if outcome is not store.RetryOutcome.RETRIED:
                print(f"{PROG}: not retried: {args.task_id}: {outcome.value}", file=sys.stderr)
                return 1
            print(f"{PROG}: {args.task_id} will be polled again now")
            return 0
    finally:
        sql_store.close()
    raise AssertionError(command)


def _rules() -> policy.Rules:
    """The rules a daemon with these settings follows, to say why a task waits; the defaults,
    with a warning, where a setting is invalid (``list`` and ``status`` still work)."""
    try:
        return policy.Rules.from_settings(config.load())
    except errors.ConfigError as exc:
        _say(f"warning: {exc}; the waits shown are the defaults'")
        return policy.Rules.from_settings(config.Settings.model_construct())


def _check_processes(processes: int, settings: config.Settings) -> None:
    if processes < 1:
        raise errors.ConfigError("invalid option --processes: expected 1 or more")
    if db.engine_url(settings.resolve_database_url()).get_backend_name() != "postgresql":
        raise errors.ConfigError(
            "invalid option --processes: several processes need PostgreSQL "
            "(SQLite allows one daemon per database file)"
        )


def _add(sql_store: store.OperatorStore, task_ids: list[str], mode: str, stdin: TextIO) -> int:
    """Track ``task_ids``, or the ids on standard input (one per line; blank lines and lines
    starting with # are skipped). Exit 2 if any id was refused; the others are added."""
    if not task_ids or task_ids == ["-"]:
        task_ids = [line.strip() for line in stdin if line.strip() and not line.startswith("#")]
    refused = 0
    for task_id in task_ids:
        problem = policy.task_id_problem(task_id)
        if problem is not None:
            print(f"{PROG}: not added: {task_id[:80]!r}: {problem}", file=sys.stderr)
            refused += 1
            continue
        added = sql_store.add(task_id, mode)
        print(f"{PROG}: {'added' if added else 'already tracked'}: {task_id}")
    if not task_ids:
        print(f"{PROG}: no task ids given")
    return 2 if refused else 0


def _status(sql_store: store.OperatorStore, args: argparse.Namespace, rules: policy.Rules) -> int:
    if args.task_id:
        return _status_of(sql_store, args, rules)
    if args.follow:
        print(f"{PROG}: --follow needs a task id", file=sys.stderr)
        return 2
    now = utils.utcnow()
    summary = sql_store.summary(now, rules.at_risk)
    daemons = sql_store.daemons()
    times = sql_store.generation_times(now - rules.retention, policy.LEARN_WINDOW)
    generation = policy.model_times(times, rules)
    backlog = sql_store.webhook_backlog()
    if args.json:
        print(views.to_json(views.summary_dict(summary, daemons, now, generation, backlog)))
    else:
        print(views.summary(summary, daemons, now, generation, backlog))
    return 0


def _status_of(
    sql_store: store.OperatorStore, args: argparse.Namespace, rules: policy.Rules
) -> int:
    def show() -> models.Task | None:
        task = sql_store.get(args.task_id)
        if task is None:
            return None
        now = utils.utcnow()
        if args.json:
            data = views.task_dict(task, args.show_secrets)
            if not task.is_terminal:
                data["why"] = policy.why_waiting(task, now, rules)
            print(views.to_json(data))
        else:
            print(views.detail(task, args.show_secrets, now=now, rules=rules))
        return task

    def changed(before: models.Task | None, after: models.Task | None) -> bool:
        return after is None or before is None or after.updated_at != before.updated_at

    task = show()
    if task is None:
        print(f"{PROG}: no such task: {args.task_id}", file=sys.stderr)
        return 1
    if args.follow:
        _follow(lambda: sql_store.get(args.task_id), task, changed, show)
    return 0


def _follow(
    read: Callable[[], models.Task | None],
    first: models.Task,
    changed: Callable[[models.Task | None, models.Task | None], bool],
    show: Callable[[], object],
) -> None:
    """Show the task again whenever it changes, until it has ended (or is gone)."""
    last: models.Task | None = first
    while last is not None and not last.is_terminal:
        time.sleep(WATCH_SECONDS)
        now = read()
        if changed(last, now):
            print()
            show()
        last = now


def _list(sql_store: store.OperatorStore, args: argparse.Namespace, rules: policy.Rules) -> int:
    limit = None if args.all else args.limit
    if limit is not None and limit < 1:
        print(f"{PROG}: --limit must be 1 or more (or --all)", file=sys.stderr)
        return 2

    def render(tasks: list[models.Task]) -> str:
        if args.json:
            return views.to_json([views.task_dict(t, args.show_secrets) for t in tasks])
        text = views.table(tasks, args.show_secrets, rules=rules)
        if not tasks and args.state:
            text = f"{views.NO_TASKS} (state {args.state})"
        if limit is not None and len(tasks) == limit:
            text += f"\n(the newest {limit}; --limit N or --all for more)"
        return text

    tasks = sql_store.list(state=args.state, limit=limit)
    print(render(tasks))
    if args.watch:
        shown = _fingerprint(tasks)
        while not all(t.is_terminal for t in tasks):
            time.sleep(WATCH_SECONDS)
            tasks = sql_store.list(state=args.state, limit=limit)
            if _fingerprint(tasks) != shown:
                shown = _fingerprint(tasks)
                print()
                print(render(tasks))
    return 0


def _fingerprint(tasks: Iterable[models.Task]) -> list[tuple[str, str, int, object]]:
    return [(t.task_id, t.state, t.polls, t.next_attempt_at) for t in tasks]


def _url(sql_store: store.OperatorStore, args: argparse.Namespace) -> int:
    if not 1 <= args.expires <= archive.MAX_LINK_SECONDS:
        print(f"{PROG}: --expires must be 1..{archive.MAX_LINK_SECONDS} seconds", file=sys.stderr)
        return 2
    task = sql_store.get(args.task_id)
    if task is None or task.state != models.State.ARCHIVED or not task.archive_uri:
        why = "no such task" if task is None else f"not archived ({task.state})"
        print(f"{PROG}: no link: {args.task_id}: {why}", file=sys.stderr)
        return 1
    print(archive.link(task.archive_uri, args.expires))
    return 0


def _webhooks(sql_store: outbox.OutboxAdmin, args: argparse.Namespace) -> int:
    if args.webhooks_action == "redeliver":
        if not sql_store.redeliver_webhook(args.event_id, utils.utcnow()):
            print(f"{PROG}: no such webhook event: {args.event_id}", file=sys.stderr)
            return 1
        print(f"{PROG}: webhook event {args.event_id} will be sent again now")
        return 0
    if args.webhooks_action == "discard":
        discarded = sql_store.discard_webhooks(args.before, utils.utcnow())
        print(
            f"{PROG}: {discarded} undelivered webhook event(s) written before "
            f"{args.before.isoformat()} discarded (each can still be sent with "
            f"`{PROG} webhooks redeliver ID`)"
        )
        return 0
    if args.webhooks_action == "resume":
        return _resume_webhooks(sql_store, args.url)
    events = sql_store.webhooks(failed=args.failed, limit=args.limit)
    if args.json:
        print(views.to_json([views.webhook_dict(e) for e in events]))
        return 0
    paused = sql_store.paused_webhook_endpoints()
    if paused:
        print(views.paused_endpoints(paused))
        print()
    if not events:
        print(f"{views.NO_EVENTS}{' (given up on)' if args.failed else ''}")
    else:
        print(views.webhook_table(events))
    return 0


def _resume_webhooks(sql_store: outbox.OutboxAdmin, url: str | None) -> int:
    """Resume ``url`` (as stored, or as listed: redacted), or every paused URL when None."""
    if url is not None:
        named = [
            p.url
            for p in sql_store.paused_webhook_endpoints()
            if url in (p.url, utils.redact_url(p.url))
        ]
        if not named:
            print(f"{PROG}: not paused: {views.printable(url)}", file=sys.stderr)
            return 1
        resumed = [u for each in named for u in sql_store.resume_webhook_endpoints(each)]
    else:
        resumed = sql_store.resume_webhook_endpoints()
    if not resumed:
        print(f"{PROG}: no webhook URL is paused")
    for each in resumed:
        shown = views.printable(utils.redact_url(each))
        print(f"{PROG}: webhook deliveries to {shown} resumed; the events held are sent now")
    return 0


def _config(settings: config.Settings, as_json: bool) -> int:
    entries = config.effective(settings)
    if as_json:
        print(views.to_json({e.variable: {"value": e.value, "source": e.source} for e in entries}))
        return 0
    width = max(len(e.variable) for e in entries)
    value_width = min(60, max(len(e.value) for e in entries))
    for e in entries:
        print(f"{e.variable.ljust(width)}  {e.value.ljust(value_width)}  {e.source}")
    return 0


def _check(args: argparse.Namespace) -> int:
    """Exit 0 when the settings are valid, the database answers with the schema current, the
    archive can be written, and a daemon ticks with an accepted key. One line per check."""
    try:
        settings = config.load()
    except errors.ConfigError as exc:
        print(f"settings: {exc}")
        return 1
    logs.configure(settings.log_format)
    url = settings.resolve_database_url()
    _say(_uses(url, settings.archive_url))
    print("settings: ok")
    sql_store = store.SqlStore.from_url(url, settings.database_statement_timeout_seconds)
    try:
        return _check_all(sql_store, settings)
    finally:
        sql_store.close()


def _check_all(sql_store: store.OperatorStore, settings: config.Settings) -> int:
    try:
        sql_store.check_schema()
    except errors.StoreError as exc:
        print(f"database: {views.printable(str(exc))}")
        return 1
    print("database: ok")
    try:
        asyncio.run(archive.from_url(settings.archive_url).check())
    except errors.ArchiveError as exc:
        print(f"archive: {views.printable(str(exc))}")
        return 1
    print("archive: ok")
    now = utils.utcnow()
    alive = [
        d
        for d in sql_store.daemons()
        if d.last_tick_at is not None
        and (now - d.last_tick_at).total_seconds() <= CHECK_MAX_TICK_AGE_SECONDS
    ]
    if not alive:
        print(f"daemon: no daemon has ticked in the last {CHECK_MAX_TICK_AGE_SECONDS:.0f}s")
        return 1
    print(f"daemon: ok ({len(alive)} running)")
    if not all(d.api_key_ok for d in alive):
        print("api key: rejected by the provider (see the api_key_rejected log lines)")
        return 1
    print("api key: ok")
    return 0
