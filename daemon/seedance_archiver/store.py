"""Every SQL statement of the daemon: claim due rows, write outcomes, leases, feeding, notifications.

The store is synchronous SQLAlchemy Core: the command line calls it directly and the daemon calls it
through ``asyncio.to_thread``. One claim statement serves both databases: on PostgreSQL its sub-select
is ``FOR UPDATE SKIP LOCKED`` so replicas never claim the same row; SQLite ignores that clause and is
limited to one daemon per database file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import psycopg
import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
import sqlalchemy.exc
import structlog

from seedance_archiver import errors, models

log = structlog.get_logger(__name__)
t = models.video_tasks
hb = models.heartbeats
ob = models.webhook_outbox
we = models.webhook_endpoints

LISTEN_CHANNEL = "video_tasks"
# Every move into a terminal state is announced here (migration 0006), for feeding applications.
DONE_CHANNEL = "video_tasks_done"
SQLITE_BUSY_TIMEOUT_MS = 10_000


class Store(Protocol):
    """Everything the daemon, its web server and the command line ask of the database.

    :class:`SqlStore` is the real one; ``testing.FakeStore`` keeps the same semantics on a dict.
    """

    # --- the daemon's work on rows

    def claim_due(
        self,
        owner: str,
        now: dt.datetime,
        lease_seconds: float,
        limit: int,
        states: Iterable[str] | None = None,
        provider_name: str | None = None,
    ) -> list[models.Task]: ...

    def claim_overdue(
        self,
        owner: str,
        now: dt.datetime,
        lease_seconds: float,
        limit: int,
        due_before: Mapping[str, dt.datetime],
        provider_name: str | None = None,
    ) -> list[models.Task]:
        """Lease up to ``limit`` rows to poll whose ``next_attempt_at`` is before their mode's
        ``due_before`` time, longest overdue first (what keeps a tight budget from starving rows)."""
        ...

    def save(self, tasks: Sequence[models.Task], owner: str) -> int: ...

    def renew(
        self, owner: str, task_ids: Iterable[str], now: dt.datetime, lease_seconds: float
    ) -> set[str]: ...

    def release(self, owner: str, task_ids: Iterable[str]) -> int: ...

    def leased(self, task_ids: Iterable[str], now: dt.datetime) -> set[str]: ...

    def prune(
        self, finished_before: dt.datetime, batch: int = ..., *, keep_undelivered: bool = ...
    ) -> int: ...

    def generation_times(self, since: dt.datetime, per_model: int) -> dict[str, list[float]]:
        """Per model, the seconds from creation to completion of its latest ``per_model`` tasks
        completed at or after ``since`` (what the daemons saw, shared through the table)."""
        ...

    # --- the feeding application's webhooks (the outbox)

    def add_at_risk_events(self, now: dt.datetime, limit: int = ...) -> int: ...

    def claim_webhooks(
        self,
        owner: str,
        now: dt.datetime,
        lease_seconds: float,
        limit: int,
        url: str | None = None,
    ) -> list[models.OutboxEvent]:
        """Lease up to ``limit`` due undelivered events to ``owner``; none while ``url`` (the
        endpoint they are for) is paused."""
        ...

    def pause_webhook_endpoint(self, url: str, reason: str, now: dt.datetime) -> bool:
        """Deliver nothing more to ``url`` until it is resumed; False if it was paused already."""
        ...

    def resume_webhook_endpoints(self, url: str | None = None) -> list[str]:
        """Deliver to ``url`` again (every paused URL when None): the URLs resumed."""
        ...

    def paused_webhook_endpoints(self) -> list[models.PausedEndpoint]: ...

    def record_webhook(self, event: models.OutboxEvent, owner: str) -> bool: ...

    def record_webhooks(self, events: Sequence[models.OutboxEvent], owner: str) -> int: ...

    def release_webhooks(self, owner: str) -> int: ...

    def webhook_backlog(self) -> WebhookBacklog: ...

    def webhooks(self, failed: bool = ..., limit: int | None = ...) -> list[models.OutboxEvent]: ...

    def redeliver_webhook(self, event_id: int, now: dt.datetime) -> bool: ...

    def discard_webhooks(self, before: dt.datetime, now: dt.datetime) -> int:
        """Give up on the undelivered events written before ``before`` (a backlog that piled up
        while webhooks were off), except those being sent right now; the number discarded. They
        stay listed, and ``redeliver`` still sends one."""
        ...

    # --- what is there

    def summary(self, now: dt.datetime) -> Summary: ...

    def counts(self) -> dict[str, int]: ...

    def get(self, task_id: str) -> models.Task | None: ...

    # --- the operator's and feeder's side

    def add(self, task_id: str, mode: str = ...) -> bool: ...

    def hasten(
        self,
        task_ids: Iterable[str],
        now: dt.datetime,
        provider_name: str,
        cadences: Mapping[str, models.Cadence],
    ) -> int:
        """Make active, free rows of ``provider_name`` (or unstamped) due at
        :func:`models.hastened_poll_at` where that is sooner than their due time: providers'
        callbacks say they changed. The number of rows moved."""
        ...

    def wake_waiting_on_settings(self, now: dt.datetime, provider_name: str) -> int:
        """Make every row of ``provider_name`` waiting on a setting due now (a daemon starts: the
        setting may have changed); the number of rows."""
        ...

    def retry(self, task_id: str, now: dt.datetime, *, force: bool = False) -> RetryOutcome: ...

    # --- daemons' heartbeats

    def beat(self, beat: DaemonBeat) -> None: ...

    def forget_daemon(self, owner: str) -> None: ...

    def daemons(self) -> list[DaemonBeat]: ...

    # --- the connection

    def ping(self) -> None: ...

    def check_schema(self) -> None: ...

    def listener(self, on_notify: Callable[[], None]) -> Listener | None:
        """A listener that calls ``on_notify`` when rows are inserted, where the database has one."""
        ...

    def close(self) -> None: ...

    # Last: below it, ``list`` in an annotation would mean this method.
    def list(self, state: str | None = None, limit: int | None = None) -> list[models.Task]: ...


def engine_url(url: str) -> sa.URL:
    """The SQLAlchemy URL with our driver: a plain ``postgresql://`` works as users write it."""
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


# Every PostgreSQL connection, the LISTEN one included: a connect timeout, and keepalives that find
# a peer gone silent (a dropped network path) within about a minute.
CONNECT_TIMEOUT_SECONDS = 10  # at most; never longer than the statement timeout (libpq's floor: 2)
STATEMENT_TIMEOUT_SECONDS = 15.0  # the default of SEEDANCE_DATABASE_STATEMENT_TIMEOUT_SECONDS
# The client side gives the server this much longer than its own statement timeout before it cuts
# the connection: the server's timeout, when it can fire, gives the clearer error.
WATCHDOG_MARGIN_SECONDS = 2.0
PG_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    # Sent data unacknowledged this long means the peer is gone (Linux TCP_USER_TIMEOUT, in ms).
    "tcp_user_timeout": 60_000,
}


def connect_timeout(statement_timeout_seconds: float) -> int:
    return max(2, min(CONNECT_TIMEOUT_SECONDS, math.ceil(statement_timeout_seconds)))


def set_statement_timeout(dbapi_conn: Any, seconds: float) -> None:
    """Set the server's statement timeout on a new psycopg connection.

    A SET, not the ``options`` start-up parameter, so it also works through pgbouncer.
    """
    dbapi_conn.execute(f"SET statement_timeout = {round(seconds * 1000)}")
    if not dbapi_conn.autocommit:
        dbapi_conn.commit()


class Watchdog:
    """Cuts a PostgreSQL connection that has not answered by its deadline.

    A server that stops answering without closing the connection (a hung server, a stuck proxy or
    pooler) leaves a blocking driver call waiting forever: the peer's kernel still answers TCP
    keepalives, and the server's statement_timeout never fires on a query it has not read. Shutting
    the socket down from this thread makes the blocked call fail at once with a connection error,
    which SQLAlchemy treats as a disconnect (the connection is discarded, the next call reconnects).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: dict[int, tuple[float, int]] = {}  # key -> (monotonic deadline, fd)
        self._thread: threading.Thread | None = None
        self.cuts = 0

    def guard(self, key: int, fd: int, seconds: float) -> None:
        with self._cond:
            self._deadlines[key] = (time.monotonic() + seconds, fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="db-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def release(self, key: int) -> None:
        with self._cond:
            self._deadlines.pop(key, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for key, (deadline, fd) in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[key]
                        self._cut(fd)
                wait = min((d for d, _ in self._deadlines.values()), default=now + 60) - now
                self._cond.wait(timeout=max(0.01, wait))

    def _cut(self, fd: int) -> None:
        # Called with the lock held, while the connection is still checked out (so ``fd`` is its).
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            return
        with sock:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.cuts += 1
        log.warning("database_connection_cut", reason="no answer by the statement deadline")


WATCHDOG = Watchdog()


def make_engine(
    url: str, statement_timeout_seconds: float = STATEMENT_TIMEOUT_SECONDS
) -> sa.Engine:
    """An engine for ``url``.

    SQLite gets WAL and a busy timeout so feeders can write alongside us. PostgreSQL gets a connect
    timeout, keepalives and a statement timeout on every connection, and the :class:`Watchdog` on
    every checkout, so no call can hang the daemon; a checkout pings the connection first.
    """
    parsed = engine_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    engine = sa.create_engine(
        parsed,
        pool_size=5,
        max_overflow=5,
        pool_timeout=statement_timeout_seconds,
        connect_args={
            "connect_timeout": connect_timeout(statement_timeout_seconds),
            **PG_KEEPALIVES,
        },
    )
    deadline = statement_timeout_seconds + WATCHDOG_MARGIN_SECONDS

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        set_statement_timeout(dbapi_conn, statement_timeout_seconds)

    @sa.event.listens_for(engine, "checkout")
    def _guard_and_ping(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        # Our own pre-ping, inside the watchdog's deadline (SQLAlchemy's pool_pre_ping runs
        # before any event could guard it). A failed ping makes the pool take a new connection.
        WATCHDOG.guard(id(dbapi_conn), dbapi_conn.fileno(), deadline)
        try:
            dbapi_conn.execute("SELECT 1")
        except psycopg.Error as exc:
            WATCHDOG.release(id(dbapi_conn))
            raise sqlalchemy.exc.DisconnectionError(first_line(exc)) from exc

    def _unguard(dbapi_conn: Any, *_args: Any) -> None:
        WATCHDOG.release(id(dbapi_conn))

    for name in ("checkin", "invalidate", "soft_invalidate", "close", "detach"):
        sa.event.listen(engine, name, _unguard)
    return engine


# `migrate` waits this long for a table lock, then gives it up (and retries): a DDL statement that
# waits for a lock queues every feeder's INSERT behind it for as long as it waits.
MIGRATE_LOCK_TIMEOUT_SECONDS = 2.0
# Any key will do, as long as it is ours: one migrate at a time per database.
MIGRATE_ADVISORY_LOCK = 0x5EEDA2C1
# The tables the migrations lock; what a migrate that timed out on a lock names as its blockers.
MIGRATED_TABLES = ("video_tasks", "webhook_outbox", "archiver_heartbeats", "alembic_version")


def make_migrate_engine(
    url: str, lock_timeout_seconds: float = MIGRATE_LOCK_TIMEOUT_SECONDS
) -> sa.Engine:
    """An engine for ``migrate``: the daemon's, less the limits that would cut a long migration.

    On PostgreSQL an index build on a large table may run for minutes, on one connection, by design:
    no statement timeout and no :class:`Watchdog`, but a ``lock_timeout``, so that no statement
    waits long for a lock while the feeders' inserts queue behind it. Connections are not pooled:
    the session-level settings and the advisory lock (:func:`lock_migrations`) end with them.
    SQLite's engine is the daemon's (its busy timeout bounds every lock wait already).
    """
    parsed = engine_url(url)
    if parsed.get_backend_name() == "sqlite":
        return make_engine(url)
    engine = sa.create_engine(
        parsed,
        poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS, **PG_KEEPALIVES},
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Explicitly off: a role's own statement_timeout (postgres-roles.sql gives the daemon's
        # role 30 s) must not cut an index build half-way either.
        dbapi_conn.execute("SET statement_timeout = 0")
        dbapi_conn.execute(f"SET lock_timeout = {round(lock_timeout_seconds * 1000)}")
        if not dbapi_conn.autocommit:
            dbapi_conn.commit()

    return engine


def lock_migrations(conn: sa.Connection) -> None:
    """Wait, without a lock timeout, until no other ``migrate`` runs on this database.

    Two daemons started together (the template unit) both migrate; without this one would see the
    other's index build, unfinished and so still INVALID, and drop it. The advisory lock blocks no
    feeder. It lasts as long as the connection; the transaction is committed so that Alembic runs
    its own, one per revision.
    """
    if conn.dialect.name != "postgresql":
        return
    with no_lock_timeout(conn):
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATE_ADVISORY_LOCK})
    conn.commit()


@contextlib.contextmanager
def no_lock_timeout(conn: sa.Connection) -> Iterator[None]:
    """Lift the PostgreSQL session's ``lock_timeout`` for the statements inside (waits that queue
    no feeder behind them), then put it back. After an error the connection is not used again."""
    saved = conn.execute(sa.text("SELECT current_setting('lock_timeout')")).scalar_one()
    conn.execute(sa.text("SET lock_timeout = 0"))
    yield
    conn.execute(sa.text("SELECT set_config('lock_timeout', :value, false)"), {"value": saved})


def is_lock_timeout(exc: BaseException) -> bool:
    """Whether a database error is PostgreSQL's ``lock_timeout`` giving up (SQLSTATE 55P03)."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == "55P03"


def lock_holders(conn: sa.Connection) -> list[dict[str, Any]]:
    """The other sessions holding locks on the migrated tables, oldest transaction first: what a
    migrate that gave up waiting for a lock was waiting on (pid, table, lock mode, state, client,
    seconds in its transaction)."""
    if conn.dialect.name != "postgresql":
        return []
    rows = conn.execute(
        sa.text(
            "SELECT l.pid, c.relname AS table, l.mode, a.state, a.application_name,"
            " a.client_addr::text AS client,"
            " round(extract(epoch FROM now() - a.xact_start)::numeric, 1)::float AS xact_seconds"
            " FROM pg_locks l"
            " JOIN pg_class c ON c.oid = l.relation"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.granted AND l.pid <> pg_backend_pid()"
            " AND l.relation = ANY(ARRAY(SELECT to_regclass(t) FROM unnest(CAST(:tables AS text[])) AS t))"
            " ORDER BY a.xact_start NULLS LAST, l.pid"
        ),
        {"tables": list(MIGRATED_TABLES)},
    )
    return [dict(row._mapping) for row in rows]


_TASK_COLUMNS = [t.c[name] for name in models.TASK_FIELDS]


def _task(row: sa.Row[Any]) -> models.Task:
    return models.Task(**row._mapping)


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def _claim_order_by() -> list[sa.UnaryExpression[Any]]:
    """:data:`models.CLAIM_ORDER` as ORDER BY terms."""
    return [
        t.c[column].asc().nulls_first() if nulls_first else t.c[column].asc()
        for column, nulls_first in models.CLAIM_ORDER
    ]


def _ours(provider_name: str) -> sa.ColumnElement[bool]:
    """Rows of ``provider_name``'s daemon: unstamped, or stamped with it."""
    return sa.or_(t.c.provider.is_(None), t.c.provider == provider_name)


def _waiting_on_setting() -> sa.ColumnElement[bool]:
    """The row waits on one of our settings (policy.on_waiting_on_setting wrote its error)."""
    return t.c.error.startswith(models.WAITING_ON_SETTING + ":", autoescape=True)


def _typed(name: str) -> sa.BindParameter[Any]:
    return sa.bindparam(f"v_{name}", type_=t.c[name].type)


AT_RISK = dt.timedelta(hours=1)
# Rows due within this long (overdue ones included) make the polling load (Summary.due_soon).
LOAD_WINDOW = dt.timedelta(seconds=60)


# The write-back by COPY (PostgreSQL): the columns save writes, the lease cleared by the UPDATE.
_COPY_COLUMNS = ["task_id", *(n for n in models.DAEMON_FIELDS if n != "lease_expires_at")]
_COPY_TABLE = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS seedance_write_back ON COMMIT DELETE ROWS AS "
    f"SELECT {', '.join(_COPY_COLUMNS)} FROM video_tasks WITH NO DATA"
)
_COPY_TIMES = [
    i
    for i, name in enumerate(_COPY_COLUMNS)
    if isinstance(models.video_tasks.c[name].type, models.UTCDateTime)
]
_COPY_IN = f"COPY seedance_write_back ({', '.join(_COPY_COLUMNS)}) FROM STDIN"
_COPY_UPDATE = (
    "UPDATE video_tasks AS t SET "
    + ", ".join(f"{name} = v.{name}" for name in _COPY_COLUMNS[1:])
    + ", lease_owner = NULL, lease_expires_at = NULL FROM seedance_write_back AS v "
    "WHERE t.task_id = v.task_id AND t.lease_owner = %s"
)


def new_webhook_id() -> str:
    """A webhook-id like the trigger's: ``msg_`` and 32 hex digits, the same on every attempt."""
    return "msg_" + uuid.uuid4().hex


def _insert(dialect: str, table: sa.Table) -> Any:
    """An INSERT that can say ON CONFLICT DO NOTHING, on either database."""
    if dialect == "postgresql":
        return sqlalchemy.dialects.postgresql.insert(table)
    return sqlalchemy.dialects.sqlite.insert(table)


# What a discarded webhook event says of itself (``webhooks discard``).
DISCARDED = "discarded by an operator (seedance-archiver webhooks discard)"


class RetryOutcome(enum.StrEnum):
    """What ``retry`` did."""

    RETRIED = "retried"
    NO_SUCH_TASK = "no such task"
    ARCHIVED = "archived: its video is safe (use --force to copy it again)"
    LEASED = "a running daemon is working on it right now; try again in a minute"


# Only these mean "the database is down or unreachable". Any other refusal of a write (a value the
# database cannot store, a constraint, an encoding error) is about the rows, which are then written
# again one by one.
_DOWN_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.TimeoutError,
)


class _RowRefused(Exception):
    """The database refused a write for its content."""


class _NoTemporary(Exception):
    """The role may not create the temporary table COPY writes go through."""


_DENIED_ON = re.compile(r'permission denied for (?:table|relation|sequence) "?([\w.]+)"?')


def _permission_missing(exc: BaseException) -> errors.PermissionMissing:
    """A write refused for a missing grant, said plainly: which table, which grant, what to do.

    The trigger on ``video_tasks`` writes every move into a terminal state to ``webhook_outbox``
    (migration 0006); a role upgraded without its grant there cannot save any such outcome.
    """
    found = _DENIED_ON.search(first_line(exc))
    what = found.group(1) if found else "a table the write-back needs"
    return errors.PermissionMissing(
        f"the database role may not write to {what} (permission denied): outcomes are kept in "
        "memory and no task can end until it may. The trigger on video_tasks writes every move "
        "into a final state to webhook_outbox; grant the daemon's role SELECT, INSERT, UPDATE, "
        "DELETE ON webhook_outbox and USAGE ON SEQUENCE webhook_outbox_id_seq, as "
        "deploy/postgres-roles.sql does"
    )


@dataclasses.dataclass(frozen=True)
class Summary:
    """The table at a glance: what operators, ``status`` and the gauges need."""

    counts: dict[str, int]
    at_risk: int  # not archived yet, deadline less than AT_RISK away
    oldest_pending: models.Task | None
    due_soon: int = 0  # rows to poll (pending, polling) due within LOAD_WINDOW, overdue included
    waiting_on_setting: int = 0  # rows downloading whose video one of our settings refuses


@dataclasses.dataclass(frozen=True)
class WebhookBacklog:
    """The outbox at a glance: what is still to deliver, since when, and what was given up on."""

    pending: int
    oldest_pending_at: dt.datetime | None  # when the oldest undelivered event was written
    given_up: int  # failed (the schedule ran out), or disabled (410 Gone, before issue 26)
    paused_endpoints: int = 0  # webhook URLs paused by a 410 Gone, until an operator resumes them


@dataclasses.dataclass(frozen=True)
class DaemonBeat:
    """One daemon's heartbeat row: who it is and when it last completed a tick."""

    owner: str
    hostname: str
    pid: int
    version: str
    started_at: dt.datetime
    last_tick_at: dt.datetime | None
    api_key_ok: bool


class SqlStore:
    """The real store, on SQLite or PostgreSQL."""

    def __init__(
        self, engine: sa.Engine, statement_timeout_seconds: float = STATEMENT_TIMEOUT_SECONDS
    ) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.statement_timeout_seconds = statement_timeout_seconds
        self.rows_refused = 0  # outcomes the database refused even alone, since start
        # Batches go through COPY on PostgreSQL, unless the role may not create a temporary table.
        self._copy_writes = self.dialect == "postgresql"
        self._save_stmt = (
            sa.update(t)
            .where(
                t.c.task_id == sa.bindparam("b_task_id"), t.c.lease_owner == sa.bindparam("b_owner")
            )
            .values({name: _typed(name) for name in models.DAEMON_FIELDS})
            .values(lease_owner=None, lease_expires_at=None)
        )
        # claim_due's statement per (states, provider), built once: building and cache-keying it
        # anew took 40% of a 55-row claim's CPU (5.3 -> 3.1 ms; bench/README.md, issue 14).
        self._claim_stmts: dict[tuple[tuple[str, ...] | None, str | None], sa.Update] = {}

    @classmethod
    def from_url(
        cls, url: str, statement_timeout_seconds: float = STATEMENT_TIMEOUT_SECONDS
    ) -> SqlStore:
        return cls(make_engine(url, statement_timeout_seconds), statement_timeout_seconds)

    def close(self) -> None:
        self.engine.dispose()

    def listener(self, on_notify: Callable[[], None]) -> Listener | None:
        """PostgreSQL's LISTEN on new rows; None on SQLite, where the table poll alone finds them."""
        if self.dialect != "postgresql":
            return None
        url = self.engine.url.render_as_string(hide_password=False)
        return Listener(url, on_notify, self.statement_timeout_seconds)

    # --- the daemon's side ----------------------------------------------------------------------

    def claim_due(
        self,
        owner: str,
        now: dt.datetime,
        lease_seconds: float,
        limit: int,
        states: Iterable[str] | None = None,
        provider_name: str | None = None,
    ) -> list[models.Task]:
        """Lease up to ``limit`` due rows to ``owner``, nearest deadline first, in one statement.

        Rows not yet polled have no known deadline; they come first so the intake poll learns it.
        ``states`` narrows the claim to some active states (while the API key is rejected, only
        rows already downloading are worked on: their link needs no key). ``now`` decides which
        rows are due; whose lease is live is decided by :meth:`_lease_clock`. With
        ``provider_name``, only rows unstamped or stamped with it are claimed: a row another
        provider's daemon has answered for is never sent to this one's API.
        """
        if limit <= 0:
            return []
        key = (None if states is None else tuple(sorted(states)), provider_name)
        stmt = self._claim_stmts.get(key)
        if stmt is None:
            stmt = self._claim_stmts[key] = self._claim_due_stmt(*key)
        claimed = self._lease_rows(stmt, {"due_at": now, "limit": limit}, owner, now, lease_seconds)
        # RETURNING gives rows in table order; the service starts them in the order given.
        claimed.sort(key=models.claim_key)
        return claimed

    def _claim_due_stmt(
        self, states: tuple[str, ...] | None, provider_name: str | None
    ) -> sa.Update:
        """:meth:`claim_due`'s statement; the time (``due_at``) and ``limit`` are parameters."""
        due = (
            sa.select(t.c.task_id)
            .where(
                # Literal SQL identical to the partial index's predicate, so even a generic
                # (prepared) plan can use ix_video_tasks_due.
                sa.text(models.ACTIVE_SQL),
                sa.true() if states is None else t.c.state.in_(states),
                sa.true() if provider_name is None else _ours(provider_name),
                t.c.next_attempt_at <= sa.bindparam("due_at", type_=models.UTCDateTime()),
                self._lease_free(),
            )
            .order_by(*_claim_order_by())
            .limit(sa.bindparam("limit", type_=sa.Integer()))
            .with_for_update(skip_locked=True)
        )
        return self._lease_stmt(due)

    def _lease_free(self) -> sa.ColumnElement[bool]:
        """No live lease, by the clock of :meth:`_lease_clock` (parameter ``lease_clock`` on
        SQLite; :meth:`_lease_rows` gives it)."""
        clock = (
            sa.func.now()
            if self.dialect == "postgresql"
            else sa.bindparam("lease_clock", type_=models.UTCDateTime())
        )
        return sa.or_(t.c.lease_expires_at.is_(None), t.c.lease_expires_at < clock)

    def _lease_stmt(self, due: sa.Select[Any]) -> sa.Update:
        """Lease the rows ``due`` selects (task ids) to parameter ``owner``, until ``now()`` plus
        parameter ``lease`` on PostgreSQL (:meth:`_lease_until`), parameter ``lease_until`` on
        SQLite."""
        until = (
            sa.func.now() + sa.bindparam("lease", type_=sa.Interval())
            if self.dialect == "postgresql"
            else sa.bindparam("lease_until", type_=models.UTCDateTime())
        )
        return (
            sa.update(t)
            .where(t.c.task_id.in_(due.scalar_subquery()))
            .values(lease_owner=sa.bindparam("owner"), lease_expires_at=until)
            # In Task's field order, so each row becomes a Task positionally (a claim returns up
            # to a thousand rows: fetched at once, no mapping per row).
            .returning(*_TASK_COLUMNS)
        )

    def _lease_rows(
        self,
        stmt: sa.Update,
        params: dict[str, Any],
        owner: str,
        now: dt.datetime,
        lease_seconds: float,
    ) -> list[models.Task]:
        """Run a :meth:`_lease_stmt` with ``params`` and the lease's own: the claimed rows."""
        lease = dt.timedelta(seconds=lease_seconds)
        params = params | {"owner": owner}
        if self.dialect == "postgresql":
            params["lease"] = lease
        else:
            params |= {"lease_clock": now, "lease_until": now + lease}
        with self._begin() as conn:
            return [models.Task(*row) for row in conn.execute(stmt, params).all()]

    def claim_overdue(
        self,
        owner: str,
        now: dt.datetime,
        lease_seconds: float,
        limit: int,
        due_before: Mapping[str, dt.datetime],
        provider_name: str | None = None,
    ) -> list[models.Task]:
        """Lease up to ``limit`` rows to poll (pending or polling) that are overdue past their
        mode's ``due_before``, longest overdue first.

        Only called while the claim comes back full (the budget is tight): it scans the active rows
        in ``ix_video_tasks_due`` without its order, so it costs O(active rows), not O(due rows).
        """
        if limit <= 0 or not due_before:
            return []
        overdue = sa.or_(
            *(
                sa.and_(t.c.mode == mode, t.c.next_attempt_at < before)
                for mode, before in sorted(due_before.items())
            )
        )
        due = (
            sa.select(t.c.task_id)
            .where(
                sa.text(models.ACTIVE_SQL),
                t.c.state != models.State.DOWNLOADING.value,
                overdue,
                sa.true() if provider_name is None else _ours(provider_name),
                self._lease_free(),
            )
            .order_by(t.c.next_attempt_at.asc())
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        claimed = self._lease_rows(self._lease_stmt(due), {}, owner, now, lease_seconds)
        claimed.sort(key=lambda task: task.next_attempt_at or now)
        return claimed

    def save(self, tasks: Sequence[models.Task], owner: str) -> int:
        """Write the daemon's columns of each task and release its lease, if ``owner`` still holds it.

        One batch normally. If the database refuses the batch for its content (a value it cannot
        store, a constraint), the rows are written one by one, so one bad row never holds up the
        rest; a row refused even alone is logged and left for its lease to run out. Only a lost
        connection (StoreError) means the database is down.
        """
        if not tasks:
            return 0
        try:
            return self._save_batch(tasks, owner)
        except _RowRefused as exc:
            log.warning("batch_write_refused", rows=len(tasks), error=str(exc))
        written = 0
        for task in tasks:
            try:
                written += self._save_batch([task], owner)
            except _RowRefused as exc:
                self.rows_refused += 1
                log.error(
                    "outcome_not_saved",
                    task_id=task.task_id,
                    state=task.state,
                    error=str(exc),
                    action="left for its lease to run out; the task is worked on again then",
                )
        return written

    def _save_batch(self, tasks: Sequence[models.Task], owner: str) -> int:
        if self._copy_writes and len(tasks) > 1:
            try:
                return self._save_copy(tasks, owner)
            except _NoTemporary as exc:
                # A role without TEMPORARY on the database: the statement per row still works.
                self._copy_writes = False
                log.warning("copy_write_back_refused", error=str(exc), fallback="executemany")
        params = [
            {"b_task_id": task.task_id, "b_owner": owner}
            | {f"v_{name}": getattr(task, name) for name in models.DAEMON_FIELDS}
            for task in tasks
        ]
        try:
            with self._begin(translate=False) as conn:
                result = conn.execute(self._save_stmt, params)
                return int(result.rowcount)
        except errors.StoreError:
            raise  # could not even connect
        except _DOWN_ERRORS as exc:
            raise errors.StoreError(f"database error: {first_line(exc)}") from exc
        except sqlalchemy.exc.ProgrammingError as exc:
            if isinstance(exc.orig, psycopg.errors.InsufficientPrivilege):
                raise _permission_missing(exc.orig) from exc
            raise _RowRefused(first_line(exc)) from exc
        except (sqlalchemy.exc.SQLAlchemyError, UnicodeError, ValueError) as exc:
            raise _RowRefused(first_line(exc)) from exc

    def _save_copy(self, tasks: Sequence[models.Task], owner: str) -> int:
        """PostgreSQL: COPY the batch into a temporary table, then one UPDATE ... FROM it.

        The same columns and lease check as :attr:`_save_stmt`, at less than half its CPU per call
        on either side (bench/writeback.py). Errors are sorted as :meth:`_save_batch` sorts them.
        """
        try:
            with self._begin(translate=False) as conn:
                raw: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
                with raw.cursor() as cur:
                    try:
                        cur.execute(_COPY_TABLE)
                    except psycopg.errors.InsufficientPrivilege as exc:
                        raise _NoTemporary(first_line(exc)) from exc
                    with cur.copy(_COPY_IN) as copy:
                        for task in tasks:
                            row = [getattr(task, name) for name in _COPY_COLUMNS]
                            if any(
                                row[i] is not None and row[i].tzinfo is None for i in _COPY_TIMES
                            ):
                                # As UTCDateTime refuses it in the statement per row.
                                raise ValueError(f"naive datetime in the outcome of {task.task_id}")
                            copy.write_row(row)
                    cur.execute(_COPY_UPDATE, (owner,))
                    return int(cur.rowcount)
        except (errors.StoreError, _NoTemporary):
            raise
        except psycopg.errors.InsufficientPrivilege as exc:
            raise _permission_missing(exc) from exc
        except (psycopg.OperationalError, *_DOWN_ERRORS) as exc:
            raise errors.StoreError(f"database error: {first_line(exc)}") from exc
        except (psycopg.Error, sqlalchemy.exc.SQLAlchemyError, UnicodeError, ValueError) as exc:
            raise _RowRefused(first_line(exc)) from exc

    def renew(
        self, owner: str, task_ids: Iterable[str], now: dt.datetime, lease_seconds: float
    ) -> set[str]:
        """Extend the leases ``owner`` still holds on ``task_ids``; return the ids it still holds.

        An id missing from the answer was taken over by another daemon (our lease ran out): its
        work must stop without writing back.
        """
        ids = list(task_ids)
        if not ids:
            return set()
        stmt = (
            sa.update(t)
            .where(t.c.task_id.in_(ids), t.c.lease_owner == owner)
            .values(lease_expires_at=self._lease_until(now, lease_seconds))
            .returning(t.c.task_id)
        )
        with self._begin() as conn:
            return set(conn.scalars(stmt))

    def release(self, owner: str, task_ids: Iterable[str]) -> int:
        """Give rows back untouched, so the next claim (ours or a replica's) takes them."""
        ids = list(task_ids)
        if not ids:
            return 0
        stmt = (
            sa.update(t)
            .where(t.c.task_id.in_(ids), t.c.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
        )
        with self._begin() as conn:
            return int(conn.execute(stmt).rowcount)

    def _lease_clock(self, now: dt.datetime) -> sa.ColumnElement[Any]:
        """The clock that leases follow.

        On PostgreSQL it is the database's ``now()``: every replica compares against the same
        clock, so one whose own clock runs ahead never takes another's live lease. On SQLite one
        daemon owns the file, and its clock (``now``) is the only one.
        """
        if self.dialect == "postgresql":
            return sa.func.now()
        return sa.literal(now, models.UTCDateTime())

    def _lease_until(self, now: dt.datetime, lease_seconds: float) -> sa.ColumnElement[Any]:
        lease = dt.timedelta(seconds=lease_seconds)
        if self.dialect == "postgresql":
            return sa.func.now() + sa.literal(lease, sa.Interval())
        return sa.literal(now + lease, models.UTCDateTime())

    def leased(self, task_ids: Iterable[str], now: dt.datetime) -> set[str]:
        """Which of ``task_ids`` some daemon holds a live lease on right now."""
        ids = list(task_ids)
        if not ids:
            return set()
        stmt = sa.select(t.c.task_id).where(
            t.c.task_id.in_(ids),
            t.c.lease_owner.is_not(None),
            t.c.lease_expires_at >= self._lease_clock(now),
        )
        with self._begin() as conn:
            return set(conn.scalars(stmt))

    def summary(self, now: dt.datetime) -> Summary:
        active = [s.value for s in models.ACTIVE_STATES]
        at_risk_stmt = sa.select(sa.func.count()).where(
            t.c.state.in_(active), t.c.expires_at < now + AT_RISK
        )
        oldest_stmt = (
            sa.select(t)
            .where(t.c.state == models.State.PENDING.value)
            .order_by(t.c.inserted_at)
            .limit(1)
        )
        due_stmt = sa.select(sa.func.count()).where(
            sa.text(models.ACTIVE_SQL),
            t.c.state != models.State.DOWNLOADING.value,
            t.c.next_attempt_at <= now + LOAD_WINDOW,
        )
        waiting_stmt = sa.select(sa.func.count()).where(
            t.c.state == models.State.DOWNLOADING.value, _waiting_on_setting()
        )
        with self._begin() as conn:
            at_risk = int(conn.execute(at_risk_stmt).scalar_one())
            oldest = conn.execute(oldest_stmt).first()
            due_soon = int(conn.execute(due_stmt).scalar_one())
            waiting = int(conn.execute(waiting_stmt).scalar_one())
        return Summary(
            self.counts(),
            at_risk,
            _task(oldest) if oldest is not None else None,
            due_soon,
            waiting,
        )

    def generation_times(self, since: dt.datetime, per_model: int) -> dict[str, list[float]]:
        """Per model, creation-to-completion seconds of its latest ``per_model`` completions since
        ``since``: one statement, numbered per model by a window function (both databases)."""
        if per_model <= 0:
            return {}
        latest = (
            sa.select(
                t.c.model,
                t.c.provider_created_at,
                t.c.completed_at,
                sa.func.row_number()
                .over(partition_by=t.c.model, order_by=t.c.completed_at.desc())
                .label("rank"),
            )
            .where(
                t.c.model.is_not(None),
                t.c.provider_created_at.is_not(None),
                t.c.completed_at >= since,
            )
            .subquery()
        )
        stmt = sa.select(latest.c.model, latest.c.provider_created_at, latest.c.completed_at).where(
            latest.c.rank <= per_model
        )
        times: dict[str, list[float]] = {}
        with self._begin() as conn:
            for model, created, completed in conn.execute(stmt):
                # Differences in Python: the subquery loses the column type's UTC tagging.
                times.setdefault(model, []).append(
                    (_utc(completed) - _utc(created)).total_seconds()
                )
        return times

    def prune(
        self, finished_before: dt.datetime, batch: int = 5000, *, keep_undelivered: bool = False
    ) -> int:
        """Delete finished rows last updated before ``finished_before``, in small batches, and
        their webhook events with them.

        With ``keep_undelivered`` (webhooks are on), a row waits while any of its events is not
        delivered (pending, or given up on and so still to redeliver): no event is deleted unsent.
        An event disabled (discarded by an operator, or refused with 410 Gone before 410 paused
        the endpoint instead) is done with.
        """
        terminal = [s.value for s in models.TERMINAL_STATES]
        unsent = sa.select(ob.c.id).where(
            ob.c.task_id == t.c.task_id,
            ob.c.state.in_([models.Delivery.PENDING.value, models.Delivery.FAILED.value]),
        )
        total = 0
        while True:
            doomed_stmt = (
                sa.select(t.c.task_id)
                .where(
                    t.c.state.in_(terminal),
                    t.c.updated_at < finished_before,
                    ~unsent.exists() if keep_undelivered else sa.true(),
                )
                .limit(batch)
            )
            with self._begin() as conn:
                doomed = list(conn.scalars(doomed_stmt))
                if doomed:
                    conn.execute(sa.delete(ob).where(ob.c.task_id.in_(doomed)))
                    conn.execute(sa.delete(t).where(t.c.task_id.in_(doomed)))
            total += len(doomed)
            if len(doomed) < batch:
                return total

    # --- the feeding application's webhooks (the outbox) ----------------------------------------

    def add_at_risk_events(self, now: dt.datetime, limit: int = 1000) -> int:
        """Write ``task.at_risk`` for rows not archived whose deadline is under AT_RISK away.

        Once per task: the outbox's unique index on (task_id) for this event makes a second insert,
        by us or by a replica at the same moment, a no-op.

        Never for a row archived meanwhile: the rows stay locked from the select to the insert's
        commit, so a move into ``archived`` (and its own event) comes wholly before or wholly
        after. On PostgreSQL the select is ``FOR UPDATE SKIP LOCKED``: a row being archived right
        now is skipped (and looked at again next time, if it is still at risk), and a row selected
        here can be archived only once its warning is committed. On SQLite the transaction takes
        the write lock before the select (``BEGIN IMMEDIATE``), so no writer comes in between.
        """
        active = [s.value for s in models.ACTIVE_STATES]
        warned = sa.select(ob.c.task_id).where(
            ob.c.task_id == t.c.task_id, ob.c.event == models.Event.AT_RISK.value
        )
        stmt = (
            sa.select(t)
            .where(t.c.state.in_(active), t.c.expires_at < now + AT_RISK, ~warned.exists())
            .order_by(t.c.expires_at)
            .limit(limit)
            .with_for_update(of=t, skip_locked=True)
        )
        with self._begin() as conn:
            if self.dialect == "sqlite":
                # pysqlite opens a transaction only at the first write, after the select.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            tasks = [_task(row) for row in conn.execute(stmt)]
            if not tasks:
                return 0
            insert = _insert(self.dialect, ob).on_conflict_do_nothing().returning(ob.c.id)
            rows = [
                {
                    "webhook_id": new_webhook_id(),
                    "task_id": task.task_id,
                    "event": models.Event.AT_RISK.value,
                    "payload": models.event_payload(task),
                    "created_at": now,
                    "next_attempt_at": now,
                }
                for task in tasks
            ]
            # RETURNING counts what was written (rowcount is -1 for an executemany on psycopg).
            return len(conn.execute(insert, rows).all())

    def claim_webhooks(
        self,
        owner: str,
        now: dt.datetime,
        lease_seconds: float,
        limit: int,
        url: str | None = None,
    ) -> list[models.OutboxEvent]:
        """Lease up to ``limit`` due undelivered events to ``owner``, oldest due first; none while
        ``url`` is paused (checked in the same statement, so a pause another replica committed
        holds from its next claim on).

        SKIP LOCKED on PostgreSQL, and the lease after it, so replicas never send one event at once.
        """
        if limit <= 0:
            return []
        paused = sa.select(we.c.url).where(we.c.url == url).exists()
        due = (
            sa.select(ob.c.id)
            .where(
                sa.true() if url is None else ~paused,
                ob.c.state == models.Delivery.PENDING.value,
                ob.c.next_attempt_at <= now,
                sa.or_(
                    ob.c.lease_expires_at.is_(None), ob.c.lease_expires_at < self._lease_clock(now)
                ),
            )
            .order_by(ob.c.next_attempt_at, ob.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            sa.update(ob)
            .where(ob.c.id.in_(due.scalar_subquery()))
            .values(lease_owner=owner, lease_expires_at=self._lease_until(now, lease_seconds))
            .returning(*ob.c)
        )
        with self._begin() as conn:
            claimed = [models.OutboxEvent(**row._mapping) for row in conn.execute(stmt)]
        return sorted(claimed, key=lambda e: e.id)

    def record_webhook(self, event: models.OutboxEvent, owner: str) -> bool:
        """Write the outcome of one attempt and release the lease; False if it was not written."""
        return self.record_webhooks([event], owner) == 1

    def record_webhooks(self, events: Sequence[models.OutboxEvent], owner: str) -> int:
        """Write the outcomes of a batch of attempts in one transaction (one commit, not one per
        event) and release their leases; return how many were written.

        A delivery is recorded even if ``owner``'s lease ran out meanwhile (the receiver has it:
        recording it spares a duplicate); any other outcome only while ``owner`` holds the lease.
        """
        written = 0
        with self._begin() as conn:
            for event in events:
                mine = ob.c.lease_owner == owner
                if event.state == models.Delivery.DELIVERED.value:
                    mine = sa.or_(mine, ob.c.state == models.Delivery.PENDING.value)
                stmt = (
                    sa.update(ob)
                    .where(ob.c.id == event.id, mine)
                    .values(
                        state=event.state,
                        attempts=event.attempts,
                        next_attempt_at=event.next_attempt_at,
                        last_status=event.last_status,
                        last_error=event.last_error,
                        delivered_at=event.delivered_at,
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                )
                written += int(conn.execute(stmt).rowcount)
        return written

    def release_webhooks(self, owner: str) -> int:
        """Give back every undelivered event ``owner`` holds (a clean stop), so the next claim
        sends it at once instead of after the lease."""
        stmt = (
            sa.update(ob)
            .where(ob.c.lease_owner == owner, ob.c.state == models.Delivery.PENDING.value)
            .values(lease_owner=None, lease_expires_at=None)
        )
        with self._begin() as conn:
            return int(conn.execute(stmt).rowcount)

    def pause_webhook_endpoint(self, url: str, reason: str, now: dt.datetime) -> bool:
        stmt = (
            _insert(self.dialect, we)
            .values(url=url, paused_at=now, reason=reason)
            .on_conflict_do_nothing()
            .returning(we.c.url)
        )
        with self._begin() as conn:
            return conn.execute(stmt).first() is not None

    def resume_webhook_endpoints(self, url: str | None = None) -> list[str]:
        stmt = sa.delete(we).returning(we.c.url)
        if url is not None:
            stmt = stmt.where(we.c.url == url)
        with self._begin() as conn:
            return sorted(conn.scalars(stmt))

    def paused_webhook_endpoints(self) -> list[models.PausedEndpoint]:
        with self._begin() as conn:
            rows = conn.execute(sa.select(we).order_by(we.c.paused_at, we.c.url)).all()
        return [models.PausedEndpoint(**row._mapping) for row in rows]

    def webhook_backlog(self) -> WebhookBacklog:
        pending = ob.c.state == models.Delivery.PENDING.value
        stmt = sa.select(
            sa.func.count().filter(pending),
            sa.func.min(ob.c.created_at).filter(pending),
            # Given up on: failed or disabled, but not discarded on purpose by an operator.
            sa.func.count().filter(
                ~pending,
                ob.c.state != models.Delivery.DELIVERED.value,
                sa.func.coalesce(ob.c.last_error, "") != DISCARDED,
            ),
        )
        with self._begin() as conn:
            count, oldest, given_up = conn.execute(stmt).one()
            paused = conn.execute(sa.select(sa.func.count()).select_from(we)).scalar_one()
        oldest_at = models.UTCDateTime().process_result_value(oldest, self.engine.dialect)
        if isinstance(oldest, str):  # SQLite's aggregate loses the column's type
            oldest_at = dt.datetime.fromisoformat(oldest).replace(tzinfo=dt.UTC)
        return WebhookBacklog(int(count), oldest_at, int(given_up), int(paused))

    def webhooks(self, failed: bool = False, limit: int | None = None) -> list[models.OutboxEvent]:
        """The outbox, newest first; with ``failed``, only the events given up on."""
        stmt = sa.select(ob).order_by(ob.c.id.desc())
        if failed:
            stmt = stmt.where(
                ob.c.state.in_([models.Delivery.FAILED.value, models.Delivery.DISABLED.value])
            )
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._begin() as conn:
            return [models.OutboxEvent(**row._mapping) for row in conn.execute(stmt)]

    def redeliver_webhook(self, event_id: int, now: dt.datetime) -> bool:
        """Send event ``event_id`` again now, under the same webhook-id; False if there is none."""
        stmt = (
            sa.update(ob)
            .where(ob.c.id == event_id)
            .values(
                state=models.Delivery.PENDING.value,
                next_attempt_at=now,
                attempts=0,
                delivered_at=None,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        with self._begin() as conn:
            return int(conn.execute(stmt).rowcount) == 1

    def discard_webhooks(self, before: dt.datetime, now: dt.datetime) -> int:
        free = sa.or_(
            ob.c.lease_expires_at.is_(None), ob.c.lease_expires_at < self._lease_clock(now)
        )
        stmt = (
            sa.update(ob)
            .where(
                ob.c.state == models.Delivery.PENDING.value,
                ob.c.created_at < before,
                free,
            )
            .values(
                state=models.Delivery.DISABLED.value,
                last_error=DISCARDED,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        with self._begin() as conn:
            return int(conn.execute(stmt).rowcount)

    # --- daemon heartbeats ------------------------------------------------------------------------

    def beat(self, beat: DaemonBeat) -> None:
        """Record that daemon ``beat.owner`` is alive (insert or update its heartbeat row)."""
        values = dataclasses.asdict(beat)
        owner = values.pop("owner")
        with self._begin() as conn:
            updated = conn.execute(sa.update(hb).where(hb.c.owner == owner).values(values))
            if updated.rowcount == 0:
                conn.execute(sa.insert(hb).values(owner=owner, **values))

    def forget_daemon(self, owner: str) -> None:
        with self._begin() as conn:
            conn.execute(sa.delete(hb).where(hb.c.owner == owner))

    def daemons(self) -> list[DaemonBeat]:
        with self._begin() as conn:
            rows = conn.execute(sa.select(hb).order_by(hb.c.last_tick_at.desc())).all()
        return [DaemonBeat(**row._mapping) for row in rows]

    def ping(self) -> None:
        """Raise StoreError unless the database answers."""
        with self._begin() as conn:
            conn.execute(sa.text("SELECT 1"))

    def check_schema(self) -> None:
        """Raise StoreError with the fix if ``video_tasks`` has not been created yet."""
        with self._begin() as conn:
            inspector = sa.inspect(conn)
            for table in (t.name, hb.name, ob.name, we.name):
                if not inspector.has_table(table):
                    raise errors.StoreError(
                        f"the table {table} does not exist: run `seedance-archiver migrate` first"
                    )

    # --- the operator's and feeder's side ---------------------------------------------------------

    def add(self, task_id: str, mode: str = models.Mode.STANDARD.value) -> bool:
        """Track ``task_id``; False if it was already tracked."""
        stmt = sa.insert(t).values(task_id=task_id, mode=mode)
        try:
            with self._begin(translate=False) as conn:
                conn.execute(stmt)
        except sqlalchemy.exc.IntegrityError as exc:
            if self.get(task_id) is not None:
                return False
            raise errors.StoreError(f"the database refused the row: {first_line(exc)}") from exc
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise errors.StoreError(f"database error: {first_line(exc)}") from exc
        return True

    def hasten(
        self,
        task_ids: Iterable[str],
        now: dt.datetime,
        provider_name: str,
        cadences: Mapping[str, models.Cadence],
    ) -> int:
        """See :meth:`Store.hasten`. Only ``next_attempt_at`` moves: the poll that follows decides.
        A row a daemon holds is left alone (its work is under way).

        One transaction: read the rows' modes and last polls, then move each whose due time is
        still what was read (another daemon may have polled it in between).
        """
        ids = sorted(set(task_ids))
        if not ids:
            return 0
        free = sa.or_(t.c.lease_expires_at.is_(None), t.c.lease_expires_at < self._lease_clock(now))
        read = sa.select(t.c.task_id, t.c.mode, t.c.last_polled_at, t.c.next_attempt_at).where(
            t.c.task_id.in_(ids), sa.text(models.ACTIVE_SQL), _ours(provider_name), free
        )
        move = (
            sa.update(t)
            .where(
                t.c.task_id == sa.bindparam("b_id"),
                t.c.next_attempt_at == sa.bindparam("b_was"),
                free,
            )
            .values(next_attempt_at=sa.bindparam("b_at"))
        )
        with self._begin() as conn:
            moves = []
            for row in conn.execute(read):
                at = models.hastened_poll_at(row.mode, row.last_polled_at, now, cadences)
                if row.next_attempt_at is not None and row.next_attempt_at > at:
                    moves.append({"b_id": row.task_id, "b_was": row.next_attempt_at, "b_at": at})
            moved = 0
            for params in moves:  # few rows: one UPDATE each keeps the count exact
                moved += int(conn.execute(move, params).rowcount)
        return moved

    def wake_waiting_on_settings(self, now: dt.datetime, provider_name: str) -> int:
        free = sa.or_(t.c.lease_expires_at.is_(None), t.c.lease_expires_at < self._lease_clock(now))
        stmt = (
            sa.update(t)
            .where(
                t.c.state == models.State.DOWNLOADING.value,
                _waiting_on_setting(),
                _ours(provider_name),
                t.c.next_attempt_at > now,
                free,
            )
            .values(next_attempt_at=now)
        )
        with self._begin() as conn:
            return int(conn.execute(stmt).rowcount)

    def get(self, task_id: str) -> models.Task | None:
        with self._begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.task_id == task_id)).first()
        return _task(row) if row is not None else None

    def list(self, state: str | None = None, limit: int | None = None) -> list[models.Task]:
        """Rows, newest first (as ``webhooks`` lists events), optionally of one state."""
        stmt = sa.select(t).order_by(t.c.inserted_at.desc(), t.c.task_id.desc())
        if state is not None:
            stmt = stmt.where(t.c.state == state)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._begin() as conn:
            return [_task(row) for row in conn.execute(stmt)]

    def retry(self, task_id: str, now: dt.datetime, *, force: bool = False) -> RetryOutcome:
        """Put a task back to polling now, keeping its history (polls, times, last error).

        An ``archived`` row is left alone unless ``force`` (its video is safe; retrying it copies
        it again). A row a live daemon holds is never touched, forced or not: clearing its lease
        would let a second daemon start the same work.
        """
        free = sa.or_(t.c.lease_expires_at.is_(None), t.c.lease_expires_at < self._lease_clock(now))
        allowed = sa.true() if force else t.c.state != models.State.ARCHIVED.value
        stmt = (
            sa.update(t)
            .where(t.c.task_id == task_id, free, allowed)
            .values(
                state=models.State.POLLING.value,
                next_attempt_at=now,
                attempts=0,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        with self._begin() as conn:
            if int(conn.execute(stmt).rowcount) == 1:
                return RetryOutcome.RETRIED
            row = conn.execute(
                sa.select(t.c.state, t.c.lease_owner).where(t.c.task_id == task_id)
            ).first()
        if row is None:
            return RetryOutcome.NO_SUCH_TASK
        if not force and row.state == models.State.ARCHIVED.value:
            return RetryOutcome.ARCHIVED
        return RetryOutcome.LEASED

    def counts(self) -> dict[str, int]:
        """How many rows are in each state (every state listed, zeros included)."""
        stmt = sa.select(t.c.state, sa.func.count()).group_by(t.c.state)
        with self._begin() as conn:
            found = {state: int(n) for state, n in conn.execute(stmt)}
        return {s.value: found.get(s.value, 0) for s in models.State}

    # --- plumbing ---------------------------------------------------------------------------------

    def _begin(self, translate: bool = True) -> _Transaction:
        return _Transaction(self.engine, translate)


class _Transaction:
    """``engine.begin()`` that turns SQLAlchemy's errors into StoreError at this edge."""

    def __init__(self, engine: sa.Engine, translate: bool) -> None:
        self._cm = engine.begin()
        self._translate = translate

    def __enter__(self) -> sa.Connection:
        try:
            return self._cm.__enter__()
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise errors.StoreError(f"database unreachable: {first_line(exc)}") from exc

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._cm.__exit__(*exc_info)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise errors.StoreError(f"database error: {first_line(exc)}") from exc
        failure = exc_info[1]
        if self._translate and isinstance(failure, sqlalchemy.exc.SQLAlchemyError):
            raise errors.StoreError(f"database error: {first_line(failure)}") from failure


def first_line(exc: BaseException) -> str:
    """The first line of a database error, for logs and messages."""
    # SQLAlchemy messages carry the statement and parameters after the first line; keep them out.
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


class Listener:
    """Wakes the daemon when a feeder inserts rows (PostgreSQL LISTEN/NOTIFY), reconnecting forever.

    Runs in its own thread with its own connection; polling the table stays the fallback while it is
    disconnected.
    """

    POLL_SECONDS = 1.0
    RECONNECT_MIN_SECONDS = 1.0
    RECONNECT_MAX_SECONDS = 30.0
    # A connection that silently stopped delivering would leave us deaf: ping it this often.
    PING_SECONDS = 30.0

    def __init__(
        self,
        url: str,
        on_notify: Callable[[], None],
        statement_timeout_seconds: float = STATEMENT_TIMEOUT_SECONDS,
    ) -> None:
        parsed = engine_url(url).set(drivername="postgresql")
        self._dsn = parsed.render_as_string(hide_password=False)
        self._timeout = statement_timeout_seconds
        self._on_notify = on_notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listener", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        delay = self.RECONNECT_MIN_SECONDS
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=connect_timeout(self._timeout),
                    **PG_KEEPALIVES,
                ) as conn:
                    self._guarded(conn, set_statement_timeout, conn, self._timeout)
                    self._guarded(conn, conn.execute, f"LISTEN {LISTEN_CHANNEL}")
                    self.connected.set()
                    log.info("listen_connected", channel=LISTEN_CHANNEL)
                    delay = self.RECONNECT_MIN_SECONDS
                    # Rows inserted while we were away are found by the table poll; wake once anyway.
                    self._on_notify()
                    pinged = time.monotonic()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self.POLL_SECONDS):
                            self._on_notify()
                        if time.monotonic() - pinged >= self.PING_SECONDS:
                            self._guarded(conn, conn.execute, "SELECT 1")
                            pinged = time.monotonic()
            except psycopg.Error as exc:
                self.connected.clear()
                log.warning("listen_disconnected", error=first_line(exc), retry_in_s=delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.RECONNECT_MAX_SECONDS)
        self.connected.clear()

    def _guarded(
        self, conn: psycopg.Connection[Any], call: Callable[..., object], *args: Any
    ) -> None:
        """Run one statement on the LISTEN connection under the watchdog's deadline."""
        WATCHDOG.guard(id(conn), conn.fileno(), self._timeout + WATCHDOG_MARGIN_SECONDS)
        try:
            call(*args)
        finally:
            WATCHDOG.release(id(conn))


class SqliteLock:
    """One daemon per SQLite file: an exclusive ``flock`` on ``{database}.lock`` while it runs.

    SQLite has no SKIP LOCKED, so two daemons on one file would poll the same rows; the lock makes a
    second ``run`` exit with a clear message instead. The kernel drops the lock if the process dies.
    """

    def __init__(self, url: str) -> None:
        parsed = engine_url(url)
        database = parsed.database if parsed.get_backend_name() == "sqlite" else None
        self.path = None if not database or database == ":memory:" else database + ".lock"
        self._fh: Any = None

    def acquire(self) -> None:
        if self.path is None:
            return
        import fcntl

        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise errors.AlreadyRunning(
                f"another seedance-archiver already runs on this SQLite database ({self.path}); "
                "SQLite allows one daemon per file, use PostgreSQL for several replicas"
            ) from None
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
