"""Every SQL statement of the daemon: claim due rows, write outcomes, leases, feeding, notifications.

The store is synchronous SQLAlchemy Core: the command line calls it directly and the daemon calls it
through ``asyncio.to_thread``. One claim statement serves both databases: on PostgreSQL its sub-select
is ``FOR UPDATE SKIP LOCKED`` so replicas never claim the same row; SQLite ignores that clause and is
limited to one daemon per database file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import psycopg
import sqlalchemy as sa
import structlog

from seedance_archiver import db, errors, listener, models

log = structlog.get_logger(__name__)
t = models.video_tasks
hb = models.heartbeats
ob = models.webhook_outbox
we = models.webhook_endpoints


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

    def listener(self, on_notify: Callable[[], None]) -> listener.Listener | None:
        """A listener that calls ``on_notify`` when rows are inserted, where the database has one."""
        ...

    def close(self) -> None: ...

    # Last: below it, ``list`` in an annotation would mean this method.
    def list(self, state: str | None = None, limit: int | None = None) -> list[models.Task]: ...


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


# What a discarded webhook event says of itself (``webhooks discard``).
DISCARDED = "discarded by an operator (seedance-archiver webhooks discard)"


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
        # anew took 40% of a 55-row claim's CPU (5.3 -> 3.1 ms; bench/README.md, issue 14).
        self._claim_stmts: dict[tuple[tuple[str, ...] | None, str | None], sa.Update] = {}

    @classmethod
    def from_url(
        cls, url: str, statement_timeout_seconds: float = db.STATEMENT_TIMEOUT_SECONDS
    ) -> SqlStore:
        return cls(db.Database.from_url(url, statement_timeout_seconds))

    @property
    def engine(self) -> sa.Engine:
        """The engine under it (tests and benchmarks write rows through it)."""
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
        """No live lease, by the clock of :meth:`db.Database.lease_clock` (parameter ``lease_clock`` on
        SQLite; :meth:`_lease_rows` gives it)."""
        clock = (
            sa.func.now()
            if self.dialect == "postgresql"
            else sa.bindparam("lease_clock", type_=models.UTCDateTime())
        )
        return sa.or_(t.c.lease_expires_at.is_(None), t.c.lease_expires_at < clock)

    def _lease_stmt(self, due: sa.Select[Any]) -> sa.Update:
        """Lease the rows ``due`` selects (task ids) to parameter ``owner``, until ``now()`` plus
        parameter ``lease`` on PostgreSQL (:meth:`db.Database.lease_until`), parameter ``lease_until`` on
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
        with self.db.begin() as conn:
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
        with self.db.begin() as conn:
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
        with self.db.begin() as conn:
            if self.dialect == "sqlite":
                # pysqlite opens a transaction only at the first write, after the select.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            tasks = [_task(row) for row in conn.execute(stmt)]
            if not tasks:
                return 0
            insert = self.db.insert(ob).on_conflict_do_nothing().returning(ob.c.id)
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
                    ob.c.lease_expires_at.is_(None),
                    ob.c.lease_expires_at < self.db.lease_clock(now),
                ),
            )
            .order_by(ob.c.next_attempt_at, ob.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            sa.update(ob)
            .where(ob.c.id.in_(due.scalar_subquery()))
            .values(lease_owner=owner, lease_expires_at=self.db.lease_until(now, lease_seconds))
            .returning(*ob.c)
        )
        with self.db.begin() as conn:
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
        with self.db.begin() as conn:
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
        with self.db.begin() as conn:
            return int(conn.execute(stmt).rowcount)

    def pause_webhook_endpoint(self, url: str, reason: str, now: dt.datetime) -> bool:
        stmt = (
            self.db.insert(we)
            .values(url=url, paused_at=now, reason=reason)
            .on_conflict_do_nothing()
            .returning(we.c.url)
        )
        with self.db.begin() as conn:
            return conn.execute(stmt).first() is not None

    def resume_webhook_endpoints(self, url: str | None = None) -> list[str]:
        stmt = sa.delete(we).returning(we.c.url)
        if url is not None:
            stmt = stmt.where(we.c.url == url)
        with self.db.begin() as conn:
            return sorted(conn.scalars(stmt))

    def paused_webhook_endpoints(self) -> list[models.PausedEndpoint]:
        with self.db.begin() as conn:
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
        with self.db.begin() as conn:
            count, oldest, given_up = conn.execute(stmt).one()
            paused = conn.execute(sa.select(sa.func.count()).select_from(we)).scalar_one()
        oldest_at = models.UTCDateTime().process_result_value(oldest, self.db.engine.dialect)
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
        with self.db.begin() as conn:
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
        with self.db.begin() as conn:
            return int(conn.execute(stmt).rowcount) == 1

    def discard_webhooks(self, before: dt.datetime, now: dt.datetime) -> int:
        free = sa.or_(
            ob.c.lease_expires_at.is_(None), ob.c.lease_expires_at < self.db.lease_clock(now)
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
        with self.db.begin() as conn:
            return int(conn.execute(stmt).rowcount)

    # --- daemon heartbeats ------------------------------------------------------------------------

    def beat(self, beat: DaemonBeat) -> None:
        """Record that daemon ``beat.owner`` is alive (insert or update its heartbeat row)."""
        values = dataclasses.asdict(beat)
        owner = values.pop("owner")
        with self.db.begin() as conn:
            updated = conn.execute(sa.update(hb).where(hb.c.owner == owner).values(values))
            if updated.rowcount == 0:
                conn.execute(sa.insert(hb).values(owner=owner, **values))

    def forget_daemon(self, owner: str) -> None:
        with self.db.begin() as conn:
            conn.execute(sa.delete(hb).where(hb.c.owner == owner))

    def daemons(self) -> list[DaemonBeat]:
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(hb).order_by(hb.c.last_tick_at.desc())).all()
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

    def list(self, state: str | None = None, limit: int | None = None) -> list[models.Task]:
        """Rows, newest first (as ``webhooks`` lists events), optionally of one state."""
        stmt = sa.select(t).order_by(t.c.inserted_at.desc(), t.c.task_id.desc())
        if state is not None:
            stmt = stmt.where(t.c.state == state)
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
