"""The webhook outbox: the events the feeding application is told of, leased, sent and recorded.

A trigger writes one event per move into a terminal state, in the transaction that makes the move
(migration 0006); ``task.at_risk`` is written here. :mod:`webhooks` delivers them through
:class:`OutboxStore`; the command line lists, redelivers and discards them through
:class:`OutboxAdmin`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Protocol

import sqlalchemy as sa

from seedance_archiver import db, models

t = models.video_tasks
ob = models.webhook_outbox
we = models.webhook_endpoints


@dataclasses.dataclass(frozen=True)
class WebhookBacklog:
    """The outbox at a glance: what is still to deliver, since when, and what was given up on."""

    pending: int
    oldest_pending_at: dt.datetime | None  # when the oldest undelivered event was written
    # Failed (the schedule ran out), or disabled (410 Gone, before 410 paused the endpoint).
    given_up: int
    paused_endpoints: int = 0  # webhook URLs paused by a 410 Gone, until an operator resumes them


class OutboxStore(Protocol):
    """What the webhook deliverer asks of the outbox."""

    def add_at_risk_events(
        self, now: dt.datetime, limit: int = ..., at_risk: models.AtRisk = ...
    ) -> int: ...

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

    def record_webhook(self, event: models.OutboxEvent, owner: str) -> bool: ...

    def record_webhooks(self, events: Sequence[models.OutboxEvent], owner: str) -> int: ...

    def release_webhooks(self, owner: str) -> int: ...

    def webhook_backlog(self) -> WebhookBacklog: ...


class OutboxAdmin(Protocol):
    """What the command line's ``webhooks`` verbs and ``status`` ask of the outbox."""

    def webhook_backlog(self) -> WebhookBacklog: ...

    def webhooks(
        self, failed: bool = ..., limit: int | None = ..., *, task_id: str | None = ...
    ) -> list[models.OutboxEvent]: ...

    def redeliver_webhook(self, event_id: int, now: dt.datetime) -> bool: ...

    def discard_webhooks(self, before: dt.datetime, now: dt.datetime) -> int:
        """Give up on the undelivered events written before ``before`` (a backlog that piled up
        while webhooks were off), except those being sent right now; the number discarded. They
        stay listed, and ``redeliver`` still sends one."""
        ...

    def resume_webhook_endpoints(self, url: str | None = None) -> list[str]:
        """Deliver to ``url`` again (every paused URL when None): the URLs resumed."""
        ...

    def paused_webhook_endpoints(self) -> list[models.PausedEndpoint]: ...


def new_webhook_id() -> str:
    """A webhook-id like the trigger's: ``msg_`` and 32 hex digits, the same on every attempt."""
    return "msg_" + uuid.uuid4().hex


# What a discarded webhook event says of itself (``webhooks discard``).
DISCARDED = "discarded by an operator (seedance-archiver webhooks discard)"


class Outbox:
    """The real outbox, on SQLite or PostgreSQL: :class:`OutboxStore` and :class:`OutboxAdmin`."""

    def __init__(self, database: db.Database) -> None:
        self.db = database

    def add_at_risk_events(
        self, now: dt.datetime, limit: int = 1000, at_risk: models.AtRisk = models.AT_RISK_HOUR
    ) -> int:
        """Write ``task.at_risk`` for rows not archived whose deadline is as near as ``at_risk``
        says (by the provider that serves the row: a quarter of its window, at most an hour).

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
            .where(
                t.c.state.in_(active),
                at_risk.where(t.c.provider, t.c.expires_at, now),
                ~warned.exists(),
            )
            .order_by(t.c.expires_at)
            .limit(limit)
            .with_for_update(of=t, skip_locked=True)
        )
        with self.db.begin() as conn:
            if self.db.dialect == "sqlite":
                # pysqlite opens a transaction only at the first write, after the select.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            tasks = [models.Task(**row._mapping) for row in conn.execute(stmt)]
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

    def webhooks(
        self, failed: bool = False, limit: int | None = None, *, task_id: str | None = None
    ) -> list[models.OutboxEvent]:
        """The outbox, newest first; with ``failed``, only the events given up on; with
        ``task_id``, only that task's."""
        stmt = sa.select(ob).order_by(ob.c.id.desc())
        if task_id is not None:
            stmt = stmt.where(ob.c.task_id == task_id)
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
                ob.c.created_at < self.db.default_time(before, ob.c.created_at),
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
