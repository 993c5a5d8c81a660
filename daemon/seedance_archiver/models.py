"""The table ``video_tasks`` (the feeding contract of DESIGN.md), its states, and a row snapshot.

The ORM mapping describes the table for Alembic and for readers; ``store.py`` and ``outbox.py`` run
Core statements on it and hand the rest of the daemon immutable :class:`Task` snapshots, which the
pure policy transforms.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import operator
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm


class Mode(enum.StrEnum):
    """The provider's generation modes; each has its own polling cadence."""

    DRAFT = "draft"
    STANDARD = "standard"
    FLEX = "flex"


class State(enum.StrEnum):
    """Where a tracked task is in its life. The last five are terminal."""

    PENDING = "pending"
    POLLING = "polling"
    DOWNLOADING = "downloading"
    ARCHIVED = "archived"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REJECTED = "rejected"

    @property
    def is_terminal(self) -> bool:
        return self not in ACTIVE_STATES


ACTIVE_STATES = frozenset({State.PENDING, State.POLLING, State.DOWNLOADING})
TERMINAL_STATES = frozenset(State) - ACTIVE_STATES
# How the error of a downloading row whose video our own settings refuse begins (policy writes it;
# the store counts such rows and makes them due when a daemon starts).
WAITING_ON_SETTING = "waiting on a setting"
# A row not archived whose deadline is nearer than this is at risk: counted (``status``, the
# gauges) and announced once (``task.at_risk``), by the store and the outbox alike. A provider
# that keeps a video for less than four times this is at risk sooner (:func:`at_risk_within`).
AT_RISK = dt.timedelta(hours=1)


def at_risk_within(video_lifetime: dt.timedelta) -> dt.timedelta:
    """How near its deadline a task is at risk, for a provider that keeps a finished video
    ``video_lifetime``: a quarter of that, and never more than :data:`AT_RISK` (a day's window is
    at risk in its last hour, an hour's window in its last 15 minutes)."""
    return min(AT_RISK, video_lifetime / 4)


@dataclasses.dataclass(frozen=True)
class AtRisk:
    """When a row is at risk, by the provider it is stamped with: ``within`` of its deadline,
    else :data:`AT_RISK` (an unstamped row, or a provider that keeps videos long enough)."""

    within: Mapping[str, dt.timedelta] = dataclasses.field(default_factory=dict)

    def span(self, provider_name: str | None) -> dt.timedelta:
        return self.within.get(provider_name or "", AT_RISK)

    def test(self, task: Task, now: dt.datetime) -> bool:
        """Whether ``task`` (not archived yet, whoever asks) is at risk at ``now``."""
        return task.expires_at is not None and task.expires_at < now + self.span(task.provider)

    def where(self, stamped: Any, expires_at: Any, now: dt.datetime) -> Any:
        """The same test as a SQL condition on the provider and deadline columns (no date
        arithmetic in SQL: each span is added to ``now`` here)."""
        special = [
            sa.and_(stamped == name, expires_at < now + span) for name, span in self.within.items()
        ]
        others = expires_at < now + AT_RISK
        if special:
            others = sa.and_(sa.or_(stamped.is_(None), stamped.not_in(list(self.within))), others)
        return sa.or_(*special, others)


# Every row at risk in its last hour, whichever provider serves it.
AT_RISK_HOUR = AtRisk()


# --- what the provider said, and how often to ask (values the pure policy reads) ----------


class Status(enum.StrEnum):
    """The provider's task statuses (seed: 状态流程)."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the provider said about one task."""

    id: str
    status: Status
    created: dt.datetime | None
    model: str | None
    video_url: str | None
    actual_duration: float | None
    error: str | None
    # The output's resolution (``720p``), where the provider says it (Ark does).
    resolution: str | None = None
    # The best-known deadline, where the provider's own facts give one (Ark: its signed link's
    # expiry); None leaves it to created + SEEDANCE_RETENTION_SECONDS.
    expires_at: dt.datetime | None = None
    # Side fields that could not be read, as (field, why): counted and logged, never a reason
    # not to archive (providers.fields.Lenient).
    ignored: tuple[tuple[str, str], ...] = ()
    # The provider's own word that the task's video is gone (Replicate's ``data_removed``), as the
    # reason to record; the task ends ``expired`` unless the archive holds the video.
    gone: str | None = None


MAX_CADENCE_SECONDS = 86_400  # a wait longer than the provider's retention would miss every video


def _seconds_range(text: str, *, zero_allowed: bool, example: str) -> tuple[float, float]:
    """``min-max`` (or one number) seconds, within (0 or more, MAX_CADENCE_SECONDS)."""
    low_text, sep, high_text = text.strip().partition("-")
    try:
        low = float(low_text)
        high = float(high_text) if sep else low
    except ValueError:
        raise ValueError(f"expected seconds as min-max{example}") from None
    positive = low >= 0 if zero_allowed else low > 0
    if not (math.isfinite(high) and positive and low <= high <= MAX_CADENCE_SECONDS):
        sign = "<=" if zero_allowed else "<"
        raise ValueError(f"expected 0 {sign} min <= max <= {MAX_CADENCE_SECONDS} seconds{example}")
    return low, high


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How long to wait between two polls of one task: each wait is drawn in [low, high] seconds."""

    low: float
    high: float

    @classmethod
    def parse(cls, value: object) -> Cadence:
        if isinstance(value, Cadence):
            return value
        return cls(*_seconds_range(str(value), zero_allowed=False, example=", for example 30-60"))

    def __str__(self) -> str:
        return f"{self.low:g}-{self.high:g}"


@dataclasses.dataclass(frozen=True)
class GenerationTime:
    """How long the provider takes to make a video: between ``low`` and ``high`` seconds.

    The seed (生成时间预估) gives one range per resolution; a poll before ``created + low`` is wasted.
    """

    low: float
    high: float

    @classmethod
    def parse(cls, value: object) -> GenerationTime | None:
        """``min-max`` seconds, or ``off`` (None: no skip for that resolution)."""
        if value is None or isinstance(value, GenerationTime):
            return value
        if str(value).strip().lower() == "off":
            return None
        example = " (for example 120-300) or off"
        return cls(*_seconds_range(str(value), zero_allowed=True, example=example))

    def __str__(self) -> str:
        return f"{self.low:g}-{self.high:g}"


# The seed's generation times (生成时间预估), by the resolution a model name ends in.
SEED_GENERATION_TIMES: dict[str, GenerationTime] = {
    "480p": GenerationTime(30, 120),
    "720p": GenerationTime(120, 300),
    "1080p": GenerationTime(180, 480),
}


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """A timestamp that always comes back timezone-aware UTC.

    PostgreSQL stores ``timestamptz``; SQLite stores naive UTC text, so values are normalised on the way
    in and tagged with UTC on the way out.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: dt.datetime | None, dialect: sa.Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use utils.utcnow()")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: sa.Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def _in(column: str, values: frozenset[str] | type[enum.StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in sorted(values))})"


class Base(orm.DeclarativeBase):
    pass


ACTIVE_SQL = _in("state", frozenset(str(s) for s in ACTIVE_STATES))


class VideoTask(Base):
    """One provider task the daemon tracks until its video is archived or it ends otherwise."""

    __tablename__ = "video_tasks"

    task_id: orm.Mapped[str] = orm.mapped_column(sa.Text, primary_key=True)
    mode: orm.Mapped[str] = orm.mapped_column(sa.Text, server_default=Mode.STANDARD.value)
    state: orm.Mapped[str] = orm.mapped_column(sa.Text, server_default=State.PENDING.value)
    provider_status: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    model: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    video_url: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    actual_duration: orm.Mapped[float | None] = orm.mapped_column(sa.Float)
    error: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    provider_created_at: orm.Mapped[dt.datetime | None] = orm.mapped_column(UTCDateTime)
    expires_at: orm.Mapped[dt.datetime | None] = orm.mapped_column(UTCDateTime)
    inserted_at: orm.Mapped[dt.datetime] = orm.mapped_column(
        UTCDateTime, server_default=sa.func.now()
    )
    updated_at: orm.Mapped[dt.datetime] = orm.mapped_column(
        UTCDateTime, server_default=sa.func.now()
    )
    next_attempt_at: orm.Mapped[dt.datetime] = orm.mapped_column(
        UTCDateTime, server_default=sa.func.now()
    )
    last_polled_at: orm.Mapped[dt.datetime | None] = orm.mapped_column(UTCDateTime)
    completed_at: orm.Mapped[dt.datetime | None] = orm.mapped_column(UTCDateTime)
    archived_at: orm.Mapped[dt.datetime | None] = orm.mapped_column(UTCDateTime)
    polls: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    attempts: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    archive_uri: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    archive_bytes: orm.Mapped[int | None] = orm.mapped_column(sa.BigInteger)
    archive_sha256: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    lease_owner: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    lease_expires_at: orm.Mapped[dt.datetime | None] = orm.mapped_column(UTCDateTime)
    # The provider API the row belongs to (``reseller``, ``ark``): empty on insert (or set by the
    # feeder), stamped by the daemon with its own at the first answer; a daemon claims only rows
    # unstamped or stamped with its own (migration 0005).
    provider: orm.Mapped[str | None] = orm.mapped_column(sa.Text)

    __table_args__ = (
        sa.CheckConstraint(_in("mode", Mode), name="ck_video_tasks_mode"),
        sa.CheckConstraint(_in("state", State), name="ck_video_tasks_state"),
        # The claim query's index, in the claim's order and over active rows only, so finished
        # rows never slow it down (migration 0003; NULLS FIRST on PostgreSQL, SQLite's default).
        sa.Index(
            "ix_video_tasks_due",
            "expires_at",
            "next_attempt_at",
            sqlite_where=sa.text(ACTIVE_SQL),
            postgresql_where=sa.text(ACTIVE_SQL),
        ),
        # The download claim's index (migration 0011): on PostgreSQL (expires_at NULLS FIRST,
        # next_attempt_at) over the downloading rows; on SQLite, as here, led by state.
        sa.Index(
            "ix_video_tasks_downloads",
            "state",
            "expires_at",
            "next_attempt_at",
            sqlite_where=sa.text(ACTIVE_SQL),
        ),
        sa.Index("ix_video_tasks_state", "state"),
        # The task list's keyset pages, newest first, whole and by state (migration 0010).
        sa.Index("ix_video_tasks_newest", "inserted_at", "task_id"),
        sa.Index("ix_video_tasks_state_newest", "state", "inserted_at", "task_id"),
        # The learn job's recent completions (migration 0007).
        sa.Index(
            "ix_video_tasks_completed",
            "completed_at",
            sqlite_where=sa.text("completed_at IS NOT NULL"),
            postgresql_where=sa.text("completed_at IS NOT NULL"),
        ),
    )


video_tasks: sa.Table = VideoTask.__table__  # type: ignore[assignment]


class Heartbeat(Base):
    """One running daemon: when it last ticked, so operators and ``check`` can see it is alive."""

    __tablename__ = "archiver_heartbeats"

    owner: orm.Mapped[str] = orm.mapped_column(sa.Text, primary_key=True)
    hostname: orm.Mapped[str] = orm.mapped_column(sa.Text)
    pid: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    version: orm.Mapped[str] = orm.mapped_column(sa.Text)
    started_at: orm.Mapped[dt.datetime] = orm.mapped_column(UTCDateTime)
    last_tick_at: orm.Mapped[dt.datetime | None] = orm.mapped_column(UTCDateTime)
    api_key_ok: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, server_default=sa.true())


heartbeats: sa.Table = Heartbeat.__table__  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """An immutable snapshot of one ``video_tasks`` row, as the daemon read or will write it."""

    task_id: str
    mode: str = Mode.STANDARD.value
    state: str = State.PENDING.value
    provider_status: str | None = None
    model: str | None = None
    video_url: str | None = None
    actual_duration: float | None = None
    error: str | None = None
    provider_created_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    inserted_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    next_attempt_at: dt.datetime | None = None
    last_polled_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    archived_at: dt.datetime | None = None
    polls: int = 0
    attempts: int = 0
    archive_uri: str | None = None
    archive_bytes: int | None = None
    archive_sha256: str | None = None
    lease_owner: str | None = None
    lease_expires_at: dt.datetime | None = None
    provider: str | None = None
    # Not a column: set by a claim on a row whose earlier lease had run out rather than been let
    # go. Its holder died or lost it mid-work, so it may have archived the video and not said so.
    # Kept by no copy (replace) and no comparison.
    taken_over: bool = dataclasses.field(default=False, compare=False)

    def replace(self, **changes: Any) -> Task:
        """This snapshot with ``changes``: ``dataclasses.replace``, in 60% of its time (once or twice
        per poll, so it shows at scale): all values read at once, the changed ones put in place."""
        values = list(_task_values(self))
        for name, value in changes.items():
            try:
                values[_TASK_INDEX[name]] = value
            except KeyError:
                raise TypeError(f"Task has no field {name!r}") from None
        return Task(*values)

    @property
    def is_terminal(self) -> bool:
        return self.state not in ACTIVE_STATES


TASK_FIELDS = tuple(f.name for f in dataclasses.fields(Task) if f.name != "taken_over")  # columns
_task_values = operator.attrgetter(*TASK_FIELDS)
_TASK_INDEX = {name: index for index, name in enumerate(TASK_FIELDS)}

# The order due rows are claimed in, written once: the nearest deadline first, with rows never polled
# (their deadline unknown) before all others so the intake poll learns it; then the longest overdue.
# Each entry is (column, NULLs first). store.py turns it into the claim's ORDER BY, which
# ix_video_tasks_due serves; claim_key turns it into a sort key for Task snapshots.
CLAIM_ORDER: tuple[tuple[str, bool], ...] = (("expires_at", True), ("next_attempt_at", False))
_NEVER = dt.datetime.min.replace(tzinfo=dt.UTC)


def hastened_poll_at(
    mode: str,
    last_polled_at: dt.datetime | None,
    now: dt.datetime,
    cadences: Mapping[str, Cadence],
) -> dt.datetime:
    """When a provider's callback may make a row due: now, but never sooner than its mode's
    shortest interval after its last poll (a flood of callbacks polls no faster than the cadence).
    A mode the cadences do not name gets the longest of their shortest intervals."""
    if last_polled_at is None:
        return now
    cadence = cadences.get(mode)
    low = cadence.low if cadence is not None else max(c.low for c in cadences.values())
    return max(now, last_polled_at + dt.timedelta(seconds=low))


def claim_key(task: Task) -> tuple[tuple[bool, dt.datetime], ...]:
    """Sorts tasks in :data:`CLAIM_ORDER`."""
    key = []
    for column, nulls_first in CLAIM_ORDER:
        value = getattr(task, column)
        key.append(((value is None) != nulls_first, value or _NEVER))
    return tuple(key)


# The columns the daemon writes back after working on a row (the feeder owns task_id and mode).
DAEMON_FIELDS = tuple(
    name for name in TASK_FIELDS if name not in ("task_id", "mode", "inserted_at", "lease_owner")
)


# --- what the feeding application is told: webhook events and their delivery ---------------------


class Event(enum.StrEnum):
    """The webhook events: one per terminal state, and a warning while a deadline is near."""

    ARCHIVED = "task.archived"
    FAILED = "task.failed"
    CANCELLED = "task.cancelled"
    EXPIRED = "task.expired"
    REJECTED = "task.rejected"
    AT_RISK = "task.at_risk"


class Delivery(enum.StrEnum):
    """Where one outbox event is: waiting (or retrying), delivered, or given up on."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # every attempt of the retry schedule failed
    # Never sent again unless redelivered: discarded by an operator (`webhooks discard`), or, before
    # a 410 Gone paused the whole endpoint instead (migration 0008), refused with 410 Gone.
    DISABLED = "disabled"


# The row's public fields an event carries: no signed link (video_url), no lease.
EVENT_FIELDS = (
    "task_id",
    "mode",
    "state",
    "provider_status",
    "model",
    "actual_duration",
    "error",
    "provider_created_at",
    "expires_at",
    "inserted_at",
    "completed_at",
    "archived_at",
    "polls",
    "archive_uri",
    "archive_bytes",
    "archive_sha256",
)


class WebhookOutbox(Base):
    """One event for the feeding application, written in the transaction that changed the row.

    A trigger on ``video_tasks`` writes it (migration 0006), so every writer is covered; the daemon
    delivers it at least once, ``webhook_id`` staying the same on every attempt.
    """

    __tablename__ = "webhook_outbox"

    id: orm.Mapped[int] = orm.mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    webhook_id: orm.Mapped[str] = orm.mapped_column(sa.Text, unique=True)
    task_id: orm.Mapped[str] = orm.mapped_column(sa.Text)
    event: orm.Mapped[str] = orm.mapped_column(sa.Text)
    payload: orm.Mapped[str] = orm.mapped_column(sa.Text)  # JSON: the row's EVENT_FIELDS
    created_at: orm.Mapped[dt.datetime] = orm.mapped_column(
        UTCDateTime, server_default=sa.func.now()
    )
    state: orm.Mapped[str] = orm.mapped_column(sa.Text, server_default=Delivery.PENDING.value)
    next_attempt_at: orm.Mapped[dt.datetime] = orm.mapped_column(
        UTCDateTime, server_default=sa.func.now()
    )
    attempts: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    last_status: orm.Mapped[int | None] = orm.mapped_column(sa.Integer)
    last_error: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    delivered_at: orm.Mapped[dt.datetime | None] = orm.mapped_column(UTCDateTime)
    lease_owner: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    lease_expires_at: orm.Mapped[dt.datetime | None] = orm.mapped_column(UTCDateTime)

    __table_args__ = (
        sa.CheckConstraint(_in("state", Delivery), name="ck_webhook_outbox_state"),
        sa.Index(
            "ix_webhook_outbox_due",
            "next_attempt_at",
            sqlite_where=sa.text("state = 'pending'"),
            postgresql_where=sa.text("state = 'pending'"),
        ),
        sa.Index("ix_webhook_outbox_task", "task_id"),
        # task.at_risk is sent once per task: a second insert (another replica) is a no-op.
        sa.Index(
            "ux_webhook_outbox_at_risk",
            "task_id",
            unique=True,
            sqlite_where=sa.text("event = 'task.at_risk'"),
            postgresql_where=sa.text("event = 'task.at_risk'"),
        ),
        {"sqlite_autoincrement": True},
    )


webhook_outbox: sa.Table = WebhookOutbox.__table__  # type: ignore[assignment]


class WebhookEndpoint(Base):
    """A webhook URL no event is delivered to: its receiver answered 410 Gone, which Standard
    Webhooks readers take to mean "switch this endpoint off". One row per paused URL (migration
    0008); ``seedance-archiver webhooks resume`` deletes it, and the events held meanwhile go."""

    __tablename__ = "webhook_endpoints"

    url: orm.Mapped[str] = orm.mapped_column(sa.Text, primary_key=True)
    paused_at: orm.Mapped[dt.datetime] = orm.mapped_column(UTCDateTime)
    reason: orm.Mapped[str] = orm.mapped_column(sa.Text)


webhook_endpoints: sa.Table = WebhookEndpoint.__table__  # type: ignore[assignment]


class TaskHistory(Base):
    """A row's moves: one line each time its state, the provider's status or its error changed,
    written by a trigger in the transaction that changed it (migration 0009), and deleted with the
    row. Its times, with the row's own, make a task's timeline (the page at ``/ui/tasks/<id>``)."""

    __tablename__ = "task_history"

    id: orm.Mapped[int] = orm.mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    task_id: orm.Mapped[str] = orm.mapped_column(sa.Text)
    at: orm.Mapped[dt.datetime] = orm.mapped_column(UTCDateTime)
    state: orm.Mapped[str] = orm.mapped_column(sa.Text)
    provider_status: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    polls: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    attempts: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    error: orm.Mapped[str | None] = orm.mapped_column(sa.Text)

    __table_args__ = (
        sa.Index("ix_task_history_task", "task_id", "id"),
        {"sqlite_autoincrement": True},
    )


task_history: sa.Table = TaskHistory.__table__  # type: ignore[assignment]
# How much of an error a history line keeps (the row keeps the whole of the latest).
HISTORY_ERROR_CHARS = 500


@dataclasses.dataclass(frozen=True, slots=True)
class Move:
    """One ``task_history`` line: what the row became at ``at``."""

    at: dt.datetime
    state: str
    provider_status: str | None
    polls: int
    attempts: int
    error: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class PausedEndpoint:
    """A snapshot of one ``webhook_endpoints`` row."""

    url: str
    paused_at: dt.datetime
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A snapshot of one ``webhook_outbox`` row."""

    id: int
    webhook_id: str
    task_id: str
    event: str
    payload: str
    created_at: dt.datetime
    state: str = Delivery.PENDING.value
    next_attempt_at: dt.datetime | None = None
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: dt.datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: dt.datetime | None = None


def event_time(value: dt.datetime | None) -> str | None:
    """A time as event payloads write it: UTC ISO 8601 with milliseconds (as the trigger does)."""
    if value is None:
        return None
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def event_payload(task: Task) -> str:
    """A row's public fields as JSON, the same fields and formats the trigger writes."""
    data = {}
    for name in EVENT_FIELDS:
        value = getattr(task, name)
        data[name] = event_time(value) if isinstance(value, dt.datetime) else value
    return json.dumps(data)
