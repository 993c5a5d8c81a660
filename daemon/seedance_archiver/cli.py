"""The ``seedance-archiver`` command: parse, configure, call. No behaviour lives here."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from seedance_archiver import config, errors, logs, models, policy, store, utils, views

# The daemon's own modules (and what they bring: APScheduler, httpx, aiohttp, boto3, Alembic) are
# imported by the commands that use them: `add`, `list`, `status` and `check` start in half the time
# (`python -X importtime`: 3.8 s for everything on a loaded 2-core machine, boto3 alone 0.55 s),
# and scripts and tests call them often.

PROG = "seedance-archiver"
# `check` passes only if some daemon's heartbeat (every 10 s) is at most this old.
CHECK_MAX_TICK_AGE_SECONDS = 60.0
DEFAULT_LINK_SECONDS = 3600
MAX_LINK_SECONDS = 7 * 86400  # S3's own limit for a presigned URL


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Archive every finished Seedance video to S3 before the provider deletes it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon (until SIGTERM)")
    run.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="run N daemon processes under a supervisor that restarts a dead one (PostgreSQL only; "
        "process i serves HTTP on SEEDANCE_HTTP_PORT + i)",
    )
    sub.add_parser("migrate", help="create or upgrade the table video_tasks (alembic upgrade head)")
    add = sub.add_parser("add", help="track a task id")
    add.add_argument("task_id")
    add.add_argument("--mode", default="standard", choices=[m.value for m in models.Mode])
    # The output options of status and list.
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON for scripts")
    output.add_argument(
        "--show-secrets",
        action="store_true",
        help="print video_url with its query string (a signed link: anyone who has it can download)",
    )
    status = sub.add_parser("status", help="a summary, or one task's details", parents=[output])
    status.add_argument("task_id", nargs="?")
    listing = sub.add_parser("list", help="list tracked tasks", parents=[output])
    listing.add_argument("--state", choices=[s.value for s in models.State])
    listing.add_argument("--limit", type=int, default=None)
    retry = sub.add_parser("retry", help="put a task back to polling now, keeping its history")
    retry.add_argument("task_id")
    retry.add_argument(
        "--force", action="store_true", help="also retry an archived task (copies it again)"
    )
    sub.add_parser(
        "check", help="exit 0 if the database answers and a daemon ticks with an accepted key"
    )
    sub.add_parser("demo", help="the whole pipeline on SQLite + ./archive against the simulator")
    url = sub.add_parser(
        "url", help="print a presigned GET URL of an archived video (a path for a folder archive)"
    )
    url.add_argument("task_id")
    url.add_argument(
        "--expires", type=int, default=DEFAULT_LINK_SECONDS, help="seconds the link is valid"
    )
    hooks = sub.add_parser("webhooks", help="list webhook deliveries (newest first)")
    hooks.add_argument("--failed", action="store_true", help="only those given up on")
    hooks.add_argument("--limit", type=int, default=100)
    hooks.add_argument("--json", action="store_true", help="print JSON for scripts")
    hooks_sub = hooks.add_subparsers(dest="webhooks_action", metavar="ACTION")
    redeliver = hooks_sub.add_parser("redeliver", help="send one event again (same webhook-id)")
    redeliver.add_argument("event_id", type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = config.load()
        logs.configure(settings.log_format)
        return _dispatch(args, settings)
    except errors.ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except errors.ArchiverError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: config.Settings) -> int:
    command = args.command
    if command == "run":
        settings.resolve_api_key()  # fail before anything starts
        from seedance_archiver import scheduler, supervisor, webhooks

        if settings.webhook_url is not None:
            webhooks.check_url(settings.webhook_url, settings.allow_private_webhook_hosts)
            webhooks.Signer(settings.resolve_webhook_secrets())
        if args.processes != 1:
            _check_processes(args.processes, settings)
            return supervisor.run(
                args.processes,
                http_port=settings.http_port,
                grace_seconds=settings.shutdown_grace_seconds,
            )
        scheduler.tune_gc()
        return asyncio.run(scheduler.run(settings))
    if command == "migrate":
        from seedance_archiver import schema

        schema.upgrade(settings.resolve_database_url())
        print(f"{PROG}: video_tasks is at the latest schema")
        return 0
    if command == "demo":
        from seedance_archiver import demo

        return demo.run()
    sql_store = store.SqlStore.from_url(settings.resolve_database_url())
    try:
        if command == "add":
            problem = policy.task_id_problem(args.task_id)
            if problem is not None:
                print(f"{PROG}: {problem}", file=sys.stderr)
                return 2
            added = sql_store.add(args.task_id, args.mode)
            print(f"{PROG}: {'added' if added else 'already tracked'}: {args.task_id}")
            return 0
        if command == "status":
            return _status(sql_store, args, policy.Rules.from_settings(settings))
        if command == "check":
            return _check(sql_store)
        if command == "list":
            tasks = sql_store.list(state=args.state, limit=args.limit)
            print(
                views.to_json([views.task_dict(t, args.show_secrets) for t in tasks])
                if args.json
                else views.table(tasks, args.show_secrets)
            )
            return 0
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


def _check_processes(processes: int, settings: config.Settings) -> None:
    if processes < 1:
        raise errors.ConfigError("invalid option --processes: expected 1 or more")
    if store.engine_url(settings.resolve_database_url()).get_backend_name() != "postgresql":
        raise errors.ConfigError(
            "invalid option --processes: several processes need PostgreSQL "
            "(SQLite allows one daemon per database file)"
        )


def _status(sql_store: store.Store, args: argparse.Namespace, rules: policy.Rules) -> int:
    if args.task_id:
        task = sql_store.get(args.task_id)
        if task is None:
            print(f"{PROG}: no such task: {args.task_id}", file=sys.stderr)
            return 1
        print(
            views.to_json(views.task_dict(task, args.show_secrets))
            if args.json
            else views.detail(task, args.show_secrets)
        )
        return 0
    now = utils.utcnow()
    summary = sql_store.summary(now)
    daemons = sql_store.daemons()
    times = sql_store.generation_times(now - rules.retention, policy.LEARN_WINDOW)
    generation = policy.model_times(times, rules)
    backlog = sql_store.webhook_backlog()
    if args.json:
        print(views.to_json(views.summary_dict(summary, daemons, now, generation, backlog)))
    else:
        print(views.summary(summary, daemons, now, generation, backlog))
    return 0


def _url(sql_store: store.Store, args: argparse.Namespace) -> int:
    if not 1 <= args.expires <= MAX_LINK_SECONDS:
        print(f"{PROG}: --expires must be 1..{MAX_LINK_SECONDS} seconds", file=sys.stderr)
        return 2
    task = sql_store.get(args.task_id)
    if task is None or task.state != models.State.ARCHIVED or not task.archive_uri:
        why = "no such task" if task is None else f"not archived ({task.state})"
        print(f"{PROG}: no link: {args.task_id}: {why}", file=sys.stderr)
        return 1
    from seedance_archiver import archive

    print(archive.link(task.archive_uri, args.expires))
    return 0


def _webhooks(sql_store: store.Store, args: argparse.Namespace) -> int:
    if args.webhooks_action == "redeliver":
        if not sql_store.redeliver_webhook(args.event_id, utils.utcnow()):
            print(f"{PROG}: no such webhook event: {args.event_id}", file=sys.stderr)
            return 1
        print(f"{PROG}: webhook event {args.event_id} will be sent again now")
        return 0
    events = sql_store.webhooks(failed=args.failed, limit=args.limit)
    if args.json:
        print(views.to_json([views.webhook_dict(e) for e in events]))
    else:
        print(views.webhook_table(events))
    return 0


def _check(sql_store: store.Store) -> int:
    """Exit 0 when the database answers, the schema is there, and a daemon ticks with a good key."""
    try:
        sql_store.check_schema()
    except errors.StoreError as exc:
        print(f"database: {exc}")
        return 1
    print("database: ok")
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
