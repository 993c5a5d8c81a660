"""The database: its engine, with timeouts and the watchdog, and where its errors become ours.

Every statement the daemon runs goes through a :class:`Database`: ``store.py`` (tasks, leases,
heartbeats), ``outbox.py`` (the webhook outbox) and ``listener.py`` (LISTEN) speak SQL over it, and
SQLAlchemy's and psycopg's exceptions become :class:`errors.StoreError` (or a refined one) here, in
:func:`translate`, and nowhere else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import psycopg
import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
import sqlalchemy.exc
import structlog

from seedance_archiver import errors, models

log = structlog.get_logger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000


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


# --- errors: the one place the libraries' exceptions become ours -------------------------------

# The libraries' own exceptions; nothing above this module catches one.
LIBRARY_ERRORS: tuple[type[Exception], ...] = (sqlalchemy.exc.SQLAlchemyError, psycopg.Error)
# Only these mean "the database is down or unreachable". Any other refusal of a write (a value the
# database cannot store, a constraint, an encoding error) is about the rows, which are then written
# again one by one.
DOWN_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.TimeoutError,
    psycopg.OperationalError,
)
# A row's content can be refused before it reaches the database: text it cannot encode, a naive time.
CONTENT_ERRORS: tuple[type[Exception], ...] = (UnicodeError, ValueError)


class RowRefused(errors.StoreError):
    """The database refused a row for its content (a value it cannot store, a constraint)."""


class LockTimeout(errors.StoreError):
    """PostgreSQL's ``lock_timeout`` gave up waiting for a lock (SQLSTATE 55P03)."""


def translate(exc: BaseException, *, rows: bool = False) -> errors.StoreError:
    """Our error for a library's: ``raise db.translate(exc) from exc``.

    Any error is a :class:`errors.StoreError` ("database error: ..."), refined where a caller acts
    on the difference: a constraint's refusal is :class:`RowRefused` (``add`` tells a duplicate by
    it), a lock wait given up :class:`LockTimeout` (``migrate`` retries). With ``rows`` (a write of
    rows, which are written again one by one when refused) only a lost connection stays a plain
    StoreError: a missing grant is :class:`errors.PermissionMissing`, said plainly, and any other
    refusal, content errors included, :class:`RowRefused` with the database's first line alone.
    """
    detail = first_line(exc)
    if rows and not isinstance(exc, DOWN_ERRORS):
        if isinstance(getattr(exc, "orig", None) or exc, psycopg.errors.InsufficientPrivilege):
            return _permission_missing(detail)
        return RowRefused(detail)
    if isinstance(exc, sqlalchemy.exc.IntegrityError):
        return RowRefused(f"database error: {detail}")
    if getattr(getattr(exc, "orig", None), "sqlstate", None) == "55P03":
        return LockTimeout(f"database error: {detail}")
    return errors.StoreError(f"database error: {detail}")


@contextlib.contextmanager
def translated(*, rows: bool = False) -> Iterator[None]:
    """Run the block with the libraries' errors translated (:func:`translate`)."""
    try:
        yield
    except _caught(rows) as exc:
        raise translate(exc, rows=rows) from exc


def _caught(rows: bool) -> tuple[type[Exception], ...]:
    return (*LIBRARY_ERRORS, *CONTENT_ERRORS) if rows else LIBRARY_ERRORS


def first_line(exc: BaseException) -> str:
    """The first line of a database error, for logs and messages."""
    # SQLAlchemy messages carry the statement and parameters after the first line; keep them out.
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


_DENIED_ON = re.compile(r'permission denied for (?:table|relation|sequence) "?([\w.]+)"?')


def _permission_missing(detail: str) -> errors.PermissionMissing:
    """A write refused for a missing grant, said plainly: which table, which grant, what to do.

    The trigger on ``video_tasks`` writes every move into a terminal state to ``webhook_outbox``
    (migration 0006); a role upgraded without its grant there cannot save any such outcome.
    """
    found = _DENIED_ON.search(detail)
    what = found.group(1) if found else "a table the write-back needs"
    return errors.PermissionMissing(
        f"the database role may not write to {what} (permission denied): outcomes are kept in "
        "memory and no task can end until it may. The trigger on video_tasks writes every move "
        "into a final state to webhook_outbox; grant the daemon's role SELECT, INSERT, UPDATE, "
        "DELETE ON webhook_outbox and USAGE ON SEQUENCE webhook_outbox_id_seq, as "
        "deploy/postgres-roles.sql does"
    )


class _Transaction:
    """``engine.begin()`` whose errors are ours: failing to begin or to commit is a StoreError,
    and what the block raises is translated (:func:`translate`)."""

    def __init__(self, engine: sa.Engine, rows: bool) -> None:
        self._cm = engine.begin()
        self._rows = rows

    def __enter__(self) -> sa.Connection:
        try:
            return self._cm.__enter__()
        except LIBRARY_ERRORS as exc:
            raise errors.StoreError(f"database unreachable: {first_line(exc)}") from exc

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._cm.__exit__(*exc_info)
        except LIBRARY_ERRORS as exc:
            raise errors.StoreError(f"database error: {first_line(exc)}") from exc
        failure = exc_info[1]
        if isinstance(failure, _caught(self._rows)):
            raise translate(failure, rows=self._rows) from failure


class Reachable(Protocol):
    """What the web server's readiness check asks: does the database answer."""

    def ping(self) -> None: ...


class Database:
    """One engine, and what every statement over it shares: transactions whose errors are ours,
    and the clock that leases follow. ``store.Tasks`` and ``outbox.Outbox`` work over one."""

    def __init__(
        self, engine: sa.Engine, statement_timeout_seconds: float = STATEMENT_TIMEOUT_SECONDS
    ) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.statement_timeout_seconds = statement_timeout_seconds
        self._statements: Callable[[int], None] | None = None

    def count(self, statements: Callable[[int], None], transactions: Callable[[], None]) -> None:
        """Tell ``statements`` of each statement sent (a round trip) and ``transactions`` of each
        commit, from now on (the daemon's metrics; bench/burst.py reads them per video)."""
        self._statements = statements
        sa.event.listen(self.engine, "before_cursor_execute", lambda *_: statements(1))
        sa.event.listen(self.engine, "commit", lambda *_: transactions())

    def sent_raw(self, statements: int) -> None:
        """``statements`` were sent on a driver's connection directly (COPY), past the engine."""
        if self._statements is not None:
            self._statements(statements)

    @classmethod
    def from_url(
        cls, url: str, statement_timeout_seconds: float = STATEMENT_TIMEOUT_SECONDS
    ) -> Database:
        return cls(make_engine(url, statement_timeout_seconds), statement_timeout_seconds)

    def begin(self, *, rows: bool = False) -> _Transaction:
        """A transaction; with ``rows``, a refused write is sorted as :func:`translate` says."""
        return _Transaction(self.engine, rows)

    def default_time(self, at: dt.datetime, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        """``at``, to compare with a ``column`` that a database default may have written.

        SQLite keeps times as text, and its default (CURRENT_TIMESTAMP, in the table's defaults and
        the outbox trigger) writes whole seconds without a fraction, where a bound datetime gets six
        digits: "12:00:01" < "12:00:01.000000", so the same instant would compare smaller. On SQLite
        a whole second is bound as the default writes it; elsewhere ``at`` is bound as it is."""
        if self.dialect != "sqlite":
            return sa.bindparam(None, at, type_=column.type)
        naive = at.astimezone(dt.UTC).replace(tzinfo=None)
        return sa.literal(naive.isoformat(" ", "microseconds" if naive.microsecond else "seconds"))

    def lease_clock(self, now: dt.datetime) -> sa.ColumnElement[Any]:
        """The clock that leases follow.

        On PostgreSQL it is the database's ``now()``: every replica compares against the same
        clock, so one whose own clock runs ahead never takes another's live lease. On SQLite one
        daemon owns the file, and its clock (``now``) is the only one.
        """
        if self.dialect == "postgresql":
            return sa.func.now()
        return sa.literal(now, models.UTCDateTime())

    def lease_until(self, now: dt.datetime, lease_seconds: float) -> sa.ColumnElement[Any]:
        lease = dt.timedelta(seconds=lease_seconds)
        if self.dialect == "postgresql":
            return sa.func.now() + sa.literal(lease, sa.Interval())
        return sa.literal(now + lease, models.UTCDateTime())

    def insert(self, table: sa.Table) -> Any:
        """An INSERT that can say ON CONFLICT DO NOTHING, on either database."""
        if self.dialect == "postgresql":
            return sqlalchemy.dialects.postgresql.insert(table)
        return sqlalchemy.dialects.sqlite.insert(table)

    def ping(self) -> None:
        """Raise StoreError unless the database answers."""
        with self.begin() as conn:
            conn.execute(sa.text("SELECT 1"))

    def check_schema(self) -> None:
        """Raise StoreError with the fix if the daemon's tables have not been created yet."""
        tables = (
            models.video_tasks,
            models.heartbeats,
            models.webhook_outbox,
            models.webhook_endpoints,
        )
        with self.begin() as conn:
            inspector = sa.inspect(conn)
            for table in tables:
                if not inspector.has_table(table.name):
                    raise errors.StoreError(
                        f"the table {table.name} does not exist: "
                        "run `seedance-archiver migrate` first"
                    )

    def close(self) -> None:
        self.engine.dispose()


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
