"""The task rows: claim due rows, write outcomes back, leases; the operator's verbs; heartbeats.

Each consumer names the small Protocol of what it uses (:class:`TaskStore` for the service, ...);
:class:`SqlStore` offers them all, with the outbox (``outbox.py``), over one ``db.Database``.
The store is synchronous SQLAlchemy Core: the command line calls it directly and the daemon calls it
through ``asyncio.to_thread``. One claim statement serves both databases: on PostgreSQL its sub-select
is ``FOR UPDATE SKIP LOCKED`` so replicas never claim the same row; SQLite ignores that clause and is
limited to one daemon per database file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import psycopg
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql as sa_postgresql
from sqlalchemy.dialects import sqlite as sa_sqlite

from seedance_archiver import db, errors, listener, models, outbox

log = structlog.get_logger(__name__)
t = models.video_tasks
hb = models.heartbeats
ob = models.webhook_outbox


_TASK_COLUMNS = [t.c[name] for name in models.TASK_FIELDS]


@dataclasses.dataclass(frozen=True)
class _Lease:
    """A claim's statements: on SQLite the select of the rows (``picked``: each task id, and
    whether its lease ran out) and the update that leases them by id; on PostgreSQL the update."""

    picked: sa.Select[Any] | None
    lease: sa.Update


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
# The write-back on SQLite: the same UPDATE as Tasks._save_stmt, its parameters made here (see
# _sqlite_row), in _COPY_COLUMNS' order after the first, then task_id and the owner.
_SQLITE_SAVE = (
    "UPDATE video_tasks SET "
    + ", ".join(f"{name} = ?" for name in _COPY_COLUMNS[1:])
    + ", lease_owner = NULL, lease_expires_at = NULL WHERE task_id = ? AND lease_owner = ?"
)


def _sqlite_time(value: dt.datetime | None) -> str | None:
    """A timestamp as SQLAlchemy's UTCDateTime stores it on SQLite: naive UTC text, microseconds
    always written (``2026-12-07 05:00:00.000000``); ValueError for a naive datetime, as there."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given; use utils.utcnow()")
    if value.tzinfo is not dt.UTC:
        value = value.astimezone(dt.UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


_SQLITE_TIMES = frozenset(_COPY_TIMES)
# Float columns: SQLAlchemy's processor stores an int given as a float (5 as 5.0), so this does.
_SQLITE_FLOATS = frozenset(
    i
    for i, name in enumerate(_COPY_COLUMNS)
    if isinstance(models.video_tasks.c[name].type, sa.Float)
)


def _sqlite_row(task: models.Task, owner: str) -> tuple[Any, ...]:
    """``task``'s parameters of :data:`_SQLITE_SAVE`."""
    row: list[Any] = [getattr(task, name) for name in _COPY_COLUMNS]
    for i in _SQLITE_TIMES:
        row[i] = _sqlite_time(row[i])
    for i in _SQLITE_FLOATS:
        if row[i] is not None:
            row[i] = float(row[i])
    task_id = row[0]
    return (*row[1:], task_id, owner)


_COPY_UPDATE = (
    "UPDATE video_tasks AS t SET "
    + ", ".join(f"{name} = v.{name}" for name in _COPY_COLUMNS[1:])
    + ", lease_owner = NULL, lease_expires_at = NULL FROM seedance_write_back AS v "
    "WHERE t.task_id = v.task_id AND t.lease_owner = %s"
)


class RetryOutcome(enum.StrEnum):
    """What ``retry`` did."""

    RETRIED = "retried"
    NO_SUCH_TASK = "no such task"
    ARCHIVED = "archived: its video is safe (use --force to copy it again)"
    LEASED = "a running daemon is working on it right now; try again in a minute"


class _NoTemporary(Exception):
    """The role may not create the temporary table COPY writes go through."""


@dataclasses.dataclass(frozen=True)
class Summary:
    """The table at a glance: what operators, ``status`` and the gauges need."""

    counts: dict[str, int]
    at_risk: int  # not archived yet, deadline nearer than models.AtRisk says
    oldest_pending: models.Task | None
    due_soon: int = 0  # rows to poll (pending, polling) due within LOAD_WINDOW, overdue included
    waiting_on_setting: int = 0  # rows downloading whose video one of our settings refuses


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


class TaskStore(Protocol):
    """What the service asks of the task rows: claim due rows, write outcomes back, hold leases."""

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

    def generation_times(self, since: dt.datetime, per_model: int) -> dict[str, list[float]]:
        """Per model, the seconds from creation to completion of its latest ``per_model`` tasks
        completed at or after ``since`` (what the daemons saw, shared through the table)."""
        ...

    def summary(self, now: dt.datetime, at_risk: models.AtRisk = ...) -> Summary: ...

    def prune(
        self, finished_before: dt.datetime, batch: int = ..., *, keep_undelivered: bool = ...
    ) -> int: ...

    def wake_waiting_on_settings(self, now: dt.datetime, provider_name: str) -> int:
        """Make every row of ``provider_name`` waiting on a setting due now (a daemon starts: the
        setting may have changed); the number of rows."""
        ...


class CallbackStore(Protocol):
    """What the providers' callbacks ask: make the rows they name due sooner."""

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


class DaemonStore(Protocol):
    """What the scheduler itself asks: the schema, LISTEN, heartbeats, closing."""

    def check_schema(self) -> None: ...

    def listener(self, on_notify: Callable[[], None]) -> listener.Listener | None:
        """A listener that calls ``on_notify`` when rows are inserted, where the database has one."""
        ...

    def beat(self, beat: DaemonBeat) -> None: ...

    def forget_daemon(self, owner: str) -> None: ...

    def close(self) -> None: ...


class OperatorStore(outbox.OutboxAdmin, Protocol):
    """What the command line and the demo ask: the rows, the daemons' heartbeats, the outbox."""

    def add(self, task_id: str, mode: str = ...) -> bool: ...

    def get(self, task_id: str) -> models.Task | None: ...

    def history(self, task_id: str) -> list[models.Move]:
        """The row's moves, oldest first (``task_history``; empty for a row never changed)."""
        ...

    def counts(self) -> dict[str, int]: ...

    def summary(self, now: dt.datetime, at_risk: models.AtRisk = ...) -> Summary: ...

    def generation_times(self, since: dt.datetime, per_model: int) -> dict[str, list[float]]:
        """Per model, the seconds from creation to completion of its latest ``per_model`` tasks
        completed at or after ``since`` (what the daemons saw, shared through the table)."""
        ...

    def retry(self, task_id: str, now: dt.datetime, *, force: bool = False) -> RetryOutcome: ...

    def daemons(self) -> list[DaemonBeat]: ...

    def check_schema(self) -> None: ...

    def close(self) -> None: ...

    def at_risk_tasks(
        self, now: dt.datetime, at_risk: models.AtRisk, limit: int
    ) -> list[models.Task]:
        """Rows not archived yet and at risk, the nearest deadline first."""
        ...

    # Last: below it, ``list`` in an annotation would mean this method.
    def list(
        self,
        state: str | None = None,
        limit: int | None = None,
        *,
        mode: str | None = ...,
        provider: str | None = ...,
        before: tuple[dt.datetime, str] | None = ...,
    ) -> list[models.Task]:
        """Rows newest first (``inserted_at``, then ``task_id``), of one state, mode and provider
        where given; with ``before``, those after that (inserted_at, task_id) in this order: a
        keyset page, an index scan however large the table."""
        ...


class Store(
    TaskStore,
    CallbackStore,
    DaemonStore,
    OperatorStore,
    outbox.OutboxStore,
    db.Reachable,
    Protocol,
):
    """All of them: what :class:`SqlStore` and ``testing.FakeStore`` offer, for the scheduler that
    hands the parts to their consumers, and for the tests that run one behaviour on both."""


class Tasks:
    """The real task store, on SQLite or PostgreSQL: :class:`TaskStore`, :class:`CallbackStore`,
    the rows' side of :class:`OperatorStore`, and the daemons' heartbeats."""

    def __init__(self, database: db.Database) -> None:
        self.db = database
        self.dialect = database.dialect
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
        # anew took 40% of a 55-row claim's CPU (5.3 -> 3.1 ms; bench/README.md).
        self._claim_stmts: dict[tuple[tuple[str, ...] | None, str | None], _Lease] = {}

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
        rows are due; whose lease is live is decided by :meth:`db.Database.lease_clock`. With
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

    def _claim_due_stmt(self, states: tuple[str, ...] | None, provider_name: str | None) -> _Lease:
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
        """No live lease, by the clock of :meth:`db.Database.lease_clock` (parameter ``lease_clock`` on
        SQLite; :meth:`_lease_rows` gives it)."""
        clock = (
            sa.func.now()
            if self.dialect == "postgresql"
            else sa.bindparam("lease_clock", type_=models.UTCDateTime())
        )
        return sa.or_(t.c.lease_expires_at.is_(None), t.c.lease_expires_at < clock)

    def _lease_stmt(self, due: sa.Select[Any]) -> _Lease:
        """Lease the rows ``due`` selects (task ids) to parameter ``owner``, until ``now()`` plus
        parameter ``lease`` on PostgreSQL (:meth:`db.Database.lease_until`), parameter ``lease_until`` on
        SQLite; each claimed row says whether its earlier lease had run out (``Task.taken_over``).
        """
        until = (
            sa.func.now() + sa.bindparam("lease", type_=sa.Interval())
            if self.dialect == "postgresql"
            else sa.bindparam("lease_until", type_=models.UTCDateTime())
        )
        lease = sa.update(t).values(lease_owner=sa.bindparam("owner"), lease_expires_at=until)
        # A lease still set on a free row ran out: a row saved or released has none.
        ran_out = t.c.lease_expires_at.is_not(None).label("taken_over")
        if self.dialect == "postgresql":
            # The earlier lease is read as the row is locked: RETURNING sees only the new one. In
            # Task's field order (taken_over last), so each row becomes a Task positionally (a
            # claim returns up to a thousand rows: fetched at once, no mapping per row).
            was = due.add_columns(ran_out).subquery("due")
            return _Lease(
                None,
                lease.where(t.c.task_id == was.c.task_id).returning(
                    *_TASK_COLUMNS, was.c.taken_over
                ),
            )
        # SQLite's RETURNING cannot name another table: the rows are read first, then leased by
        # id, in one transaction that holds the write lock from its start (:meth:`_lease_rows`).
        return _Lease(
            due.add_columns(ran_out),
            lease.where(t.c.task_id.in_(sa.bindparam("ids", expanding=True))).returning(
                *_TASK_COLUMNS
            ),
        )

    def _lease_rows(
        self,
        stmt: _Lease,
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
        with self.db.begin() as conn:
            if stmt.picked is None:
                return [models.Task(*row) for row in conn.execute(stmt.lease, params).all()]
            # pysqlite would begin the transaction only at the update, after the select.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            picked = conn.execute(stmt.picked, params).all()
            if not picked:
                return []
            taken_over = {task_id for task_id, ran_out in picked if ran_out}
            leased = conn.execute(stmt.lease, params | {"ids": [row[0] for row in picked]}).all()
        claimed = [models.Task(*row) for row in leased]
        return [
            dataclasses.replace(task, taken_over=True) if task.task_id in taken_over else task
            for task in claimed
        ]

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
        except db.RowRefused as exc:
            log.warning("batch_write_refused", rows=len(tasks), error=str(exc))
        written = 0
        for task in tasks:
            try:
                written += self._save_batch([task], owner)
            except db.RowRefused as exc:
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
        if self.dialect == "sqlite":
            # SQLAlchemy's own executemany spent twice the CPU of the statement on its
            # parameters (a type processor per column per row): 9% of the daemon's Python time
            # in a burst (bench/burst.py). The rows are made here, as its processors made them
            # (tests/integration/test_store.py compares the two).
            with self.db.begin(rows=True) as conn:
                rows = [_sqlite_row(task, owner) for task in tasks]
                return int(conn.exec_driver_sql(_SQLITE_SAVE, rows).rowcount)
        params = [
            {"b_task_id": task.task_id, "b_owner": owner}
            | {f"v_{name}": getattr(task, name) for name in models.DAEMON_FIELDS}
            for task in tasks
        ]
        with self.db.begin(rows=True) as conn:
            return int(conn.execute(self._save_stmt, params).rowcount)

    def _save_copy(self, tasks: Sequence[models.Task], owner: str) -> int:
        """PostgreSQL: COPY the batch into a temporary table, then one UPDATE ... FROM it.

        The same columns and lease check as :attr:`_save_stmt`, at less than half its CPU per call
        on either side (bench/writeback.py). Errors are sorted as :meth:`_save_batch` sorts them.
        """
        with self.db.begin(rows=True) as conn:
            raw: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
            with raw.cursor() as cur:
                try:
                    with db.translated(rows=True):
                        cur.execute(_COPY_TABLE)
                except errors.PermissionMissing as exc:
                    raise _NoTemporary(db.first_line(exc.__cause__ or exc)) from exc
                with cur.copy(_COPY_IN) as copy:
                    for task in tasks:
                        row = [getattr(task, name) for name in _COPY_COLUMNS]
                        if any(row[i] is not None and row[i].tzinfo is None for i in _COPY_TIMES):
                            # As UTCDateTime refuses it in the statement per row.
                            raise ValueError(f"naive datetime in the outcome of {task.task_id}")
                        copy.write_row(row)
                cur.execute(_COPY_UPDATE, (owner,))
                self.db.sent_raw(3)  # the temporary table, the COPY and the UPDATE
                return int(cur.rowcount)

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
            .values(lease_expires_at=self.db.lease_until(now, lease_seconds))
            .returning(t.c.task_id)
        )
        with self.db.begin() as conn:
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
        with self.db.begin() as conn:
            return int(conn.execute(stmt).rowcount)

    def leased(self, task_ids: Iterable[str], now: dt.datetime) -> set[str]:
        """Which of ``task_ids`` some daemon holds a live lease on right now."""
        ids = list(task_ids)
        if not ids:
            return set()
        stmt = sa.select(t.c.task_id).where(
            t.c.task_id.in_(ids),
            t.c.lease_owner.is_not(None),
            t.c.lease_expires_at >= self.db.lease_clock(now),
        )
        with self.db.begin() as conn:
            return set(conn.scalars(stmt))

    def summary(self, now: dt.datetime, at_risk: models.AtRisk = models.AT_RISK_HOUR) -> Summary:
        active = [s.value for s in models.ACTIVE_STATES]
        at_risk_stmt = sa.select(sa.func.count()).where(
            t.c.state.in_(active), at_risk.where(t.c.provider, t.c.expires_at, now)
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
        with self.db.begin() as conn:
            risky = int(conn.execute(at_risk_stmt).scalar_one())
            oldest = conn.execute(oldest_stmt).first()
            due_soon = int(conn.execute(due_stmt).scalar_one())
            waiting = int(conn.execute(waiting_stmt).scalar_one())
        return Summary(
            self.counts(),
            risky,
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
        with self.db.begin() as conn:
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
            with self.db.begin() as conn:
                doomed = list(conn.scalars(doomed_stmt))
                if doomed:
                    conn.execute(sa.delete(ob).where(ob.c.task_id.in_(doomed)))
                    conn.execute(sa.delete(t).where(t.c.task_id.in_(doomed)))
            total += len(doomed)
            if len(doomed) < batch:
                return total

    # --- daemons' heartbeats --------------------------------------------------------------------

    def beat(self, beat: DaemonBeat) -> None:
        """Record that daemon ``beat.owner`` is alive (insert or update its heartbeat row)."""
        values = dataclasses.asdict(beat)
        insert = sa_postgresql.insert if self.dialect == "postgresql" else sa_sqlite.insert
        # One statement: an UPDATE then an INSERT raced when the first tick's beat and the
        # scheduled one ran at once, and the second INSERT broke the unique key (bench/scale.py).
        stmt = insert(hb).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[hb.c.owner],
            set_={name: stmt.excluded[name] for name in values if name != "owner"},
        )
        with self.db.begin() as conn:
            conn.execute(stmt)

    def forget_daemon(self, owner: str) -> None:
        with self.db.begin() as conn:
            conn.execute(sa.delete(hb).where(hb.c.owner == owner))

    def daemons(self) -> list[DaemonBeat]:
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(hb).order_by(hb.c.last_tick_at.desc().nulls_last())).all()
        return [DaemonBeat(**row._mapping) for row in rows]

    # --- the operator's and feeder's side ---------------------------------------------------------

    def add(self, task_id: str, mode: str = models.Mode.STANDARD.value) -> bool:
        """Track ``task_id``; False if it was already tracked."""
        stmt = sa.insert(t).values(task_id=task_id, mode=mode)
        try:
            with self.db.begin() as conn:
                conn.execute(stmt)
        except db.RowRefused as exc:
            if self.get(task_id) is not None:
                return False
            detail = db.first_line(exc.__cause__ or exc)
            raise errors.StoreError(f"the database refused the row: {detail}") from exc
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
        free = sa.or_(
            t.c.lease_expires_at.is_(None), t.c.lease_expires_at < self.db.lease_clock(now)
        )
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
        with self.db.begin() as conn:
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
        free = sa.or_(
            t.c.lease_expires_at.is_(None), t.c.lease_expires_at < self.db.lease_clock(now)
        )
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
        with self.db.begin() as conn:
            return int(conn.execute(stmt).rowcount)

    def get(self, task_id: str) -> models.Task | None:
        with self.db.begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.task_id == task_id)).first()
        return _task(row) if row is not None else None

    def history(self, task_id: str) -> list[models.Move]:
        h = models.task_history.c
        stmt = (
            sa.select(h.at, h.state, h.provider_status, h.polls, h.attempts, h.error)
            .where(h.task_id == task_id)
            .order_by(h.id)
        )
        with self.db.begin() as conn:
            return [models.Move(*row) for row in conn.execute(stmt)]

    def at_risk_tasks(
        self, now: dt.datetime, at_risk: models.AtRisk, limit: int
    ) -> list[models.Task]:
        active = [s.value for s in models.ACTIVE_STATES]
        stmt = (
            sa.select(t)
            .where(t.c.state.in_(active), at_risk.where(t.c.provider, t.c.expires_at, now))
            .order_by(t.c.expires_at)
            .limit(limit)
        )
        with self.db.begin() as conn:
            return [_task(row) for row in conn.execute(stmt)]

    def list(
        self,
        state: str | None = None,
        limit: int | None = None,
        *,
        mode: str | None = None,
        provider: str | None = None,
        before: tuple[dt.datetime, str] | None = None,
    ) -> list[models.Task]:
        stmt = sa.select(t).order_by(t.c.inserted_at.desc(), t.c.task_id.desc())
        for column, wanted in ((t.c.state, state), (t.c.mode, mode), (t.c.provider, provider)):
            if wanted is not None:
                stmt = stmt.where(column == wanted)
        if before is not None:
            stmt = stmt.where(
                sa.tuple_(t.c.inserted_at, t.c.task_id)
                < sa.tuple_(
                    self.db.default_time(before[0], t.c.inserted_at),
                    sa.literal(before[1], sa.Text),
                )
            )
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.db.begin() as conn:
            return [_task(row) for row in conn.execute(stmt)]

    def retry(self, task_id: str, now: dt.datetime, *, force: bool = False) -> RetryOutcome:
        """Put a task back to polling now, keeping its history (polls, times, last error).

        An ``archived`` row is left alone unless ``force`` (its video is safe; retrying it copies
        it again). A row a live daemon holds is never touched, forced or not: clearing its lease
        would let a second daemon start the same work.
        """
        free = sa.or_(
            t.c.lease_expires_at.is_(None), t.c.lease_expires_at < self.db.lease_clock(now)
        )
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
        with self.db.begin() as conn:
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
        with self.db.begin() as conn:
            found = {state: int(n) for state, n in conn.execute(stmt)}
        return {s.value: found.get(s.value, 0) for s in models.State}


class SqlStore(Tasks, outbox.Outbox):
    """Tasks, heartbeats and the outbox over one engine: the one object that the command line and
    the scheduler build from a URL. Its consumers name the Protocol of what they use."""

    def __init__(self, database: db.Database) -> None:
        Tasks.__init__(self, database)
        outbox.Outbox.__init__(self, database)

    @classmethod
    def from_url(
        cls, url: str, statement_timeout_seconds: float = db.STATEMENT_TIMEOUT_SECONDS
    ) -> SqlStore:
        return cls(db.Database.from_url(url, statement_timeout_seconds))

    @property
    def engine(self) -> sa.Engine:
        """The engine under every part (tests and benchmarks write rows through it)."""
        return self.db.engine

    def close(self) -> None:
        self.db.close()

    def ping(self) -> None:
        self.db.ping()

    def check_schema(self) -> None:
        self.db.check_schema()

    def listener(self, on_notify: Callable[[], None]) -> listener.Listener | None:
        """PostgreSQL's LISTEN on new rows; None on SQLite, where the table poll alone finds them."""
        if self.dialect != "postgresql":
            return None
        url = self.db.engine.url.render_as_string(hide_password=False)
        return listener.Listener(url, on_notify, self.db.statement_timeout_seconds)
