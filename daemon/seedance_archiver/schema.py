"""Schema migrations: ``seedance-archiver migrate`` is ``alembic upgrade head`` with our scripts.

Migrating must not stall the feeders, whose inserts go on meanwhile, however large ``video_tasks``
is. So ``migrate`` runs on its own connection (:func:`db.make_migrate_engine`): no statement
timeout and no watchdog, but a ``lock_timeout``; a revision that gives up waiting for a lock is
retried a few times, later (:func:`upgrade`). Each revision is its own transaction, so what was
applied stays applied, and the revision that failed runs again from its start on the next attempt.

**How a revision builds an index.** On a table that already exists (``video_tasks``,
``webhook_outbox``), call :func:`build_index` instead of ``op.create_index``: on PostgreSQL it
builds the index ``CONCURRENTLY`` (outside the revision's transaction, so that inserts go on during
the build), first dropping an INVALID index of that name that a cut build left behind; on SQLite it
is ``op.create_index``. A build commits what the revision did before it, so a revision cut later
(or failing later) is run again with that part done: write it so that a second run does no harm.
``build_index`` skips an index that exists and is valid, :func:`drop_index` one that is gone.
An index on a table the same revision creates needs none of this: it is empty, and unseen until
the revision commits. Revision 0007 is the plain example; 0003 replaces an index under its name.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import alembic.command
import alembic.config
import alembic.migration
import sqlalchemy as sa
import structlog
from alembic import op

from seedance_archiver import db, errors

log = structlog.get_logger(__name__)

# Pauses between attempts when a revision gave up waiting for a lock: then migrate gives up too
# (about 2 minutes in all with the lock waits; the systemd unit's start timeout is 5).
LOCK_RETRY_PAUSES_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 30.0)


def alembic_config(url: str) -> alembic.config.Config:
    """An Alembic config for the migrations shipped in the package, aimed at ``url``."""
    cfg = alembic.config.Config()
    cfg.set_main_option(
        "script_location", str(importlib.resources.files("seedance_archiver.migrations"))
    )
    cfg.attributes["url"] = url
    return cfg


def upgrade(
    url: str,
    revision: str = "head",
    *,
    lock_timeout_seconds: float = db.MIGRATE_LOCK_TIMEOUT_SECONDS,
    retry_pauses_seconds: Sequence[float] = LOCK_RETRY_PAUSES_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Migrate the database at ``url`` to ``revision``; StoreError with one line (never the
    statement or its parameters) when the database cannot be reached or refuses, or when a lock
    stays held through every retry."""
    cfg = alembic_config(url)
    cfg.attributes["lock_timeout_seconds"] = lock_timeout_seconds
    pauses = list(retry_pauses_seconds)
    for attempt in range(1, len(pauses) + 2):
        try:
            with db.translated():
                alembic.command.upgrade(cfg, revision)
            return
        except db.LockTimeout as exc:
            if attempt > len(pauses):
                detail = db.first_line(exc.__cause__ or exc)
                raise errors.StoreError(
                    f"gave up after {attempt} attempts waiting for a lock (the sessions holding "
                    f"it are in the migrate_lock_wait log lines): {detail}"
                ) from exc
            pause = pauses[attempt - 1]
            _log_lock_wait(url, lock_timeout_seconds, attempt, pause)
            sleep(pause)


def _log_lock_wait(url: str, lock_timeout_seconds: float, attempt: int, pause: float) -> None:
    """Say which revision waited and on whom, as far as the database still tells."""
    engine = db.make_migrate_engine(url, lock_timeout_seconds)
    try:
        with db.translated(), engine.connect() as conn:
            at = alembic.migration.MigrationContext.configure(conn).get_current_revision()
            holders = db.lock_holders(conn)
    except errors.StoreError as exc:
        at, holders = None, [{"error": db.first_line(exc.__cause__ or exc)}]
    finally:
        engine.dispose()
    log.warning(
        "migrate_lock_wait",
        at_revision=at,
        attempt=attempt,
        lock_timeout_seconds=lock_timeout_seconds,
        retry_in_seconds=pause,
        holders=holders,
    )


def downgrade(url: str, revision: str) -> None:
    alembic.command.downgrade(alembic_config(url), revision)


# --- for the revisions ---------------------------------------------------------------------------


def _postgresql_online() -> bool:
    return op.get_bind().dialect.name == "postgresql" and not op.get_context().as_sql


def _index_is_valid(name: str) -> bool | None:
    """Whether the PostgreSQL index ``name`` is valid; None when there is none."""
    valid = (
        op.get_bind()
        .execute(
            sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
            {"name": name},
        )
        .scalar_one_or_none()
    )
    return None if valid is None else bool(valid)


def index_definition(name: str) -> str | None:
    """The PostgreSQL index ``name`` as ``CREATE INDEX`` (``pg_get_indexdef``); None when there is
    none, or when there is no database to ask (offline ``--sql``)."""
    if not _postgresql_online():
        return None
    definition = (
        op.get_bind()
        .execute(sa.text("SELECT pg_get_indexdef(to_regclass(:name))"), {"name": name})
        .scalar_one()
    )
    return None if definition is None else str(definition)


def build_index(name: str, table: str, columns: Sequence[str | sa.TextClause], **kw: Any) -> None:
    """``op.create_index(name, table, columns, **kw)`` that inserts go on through, and that may be
    cut and run again (the module docstring says how a revision uses it).

    On PostgreSQL: ``CREATE INDEX CONCURRENTLY IF NOT EXISTS`` outside the revision's transaction
    (what the revision did before it is committed), after ``DROP INDEX CONCURRENTLY`` of an INVALID
    index of that name. Both run without a lock timeout: they wait only for transactions to end,
    and their lock (SHARE UPDATE EXCLUSIVE) queues no insert, update or delete behind it.
    """
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(name, table, list(columns), **kw)
        return
    with op.get_context().autocommit_block(), _no_lock_timeout():
        if _postgresql_online() and _index_is_valid(name) is False:
            log.warning("migrate_invalid_index_dropped", index=name)
            op.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
        op.create_index(
            name, table, list(columns), postgresql_concurrently=True, if_not_exists=True, **kw
        )


def drop_index(name: str) -> None:
    """``DROP INDEX IF EXISTS``, ``CONCURRENTLY`` and outside the transaction on PostgreSQL."""
    if op.get_bind().dialect.name != "postgresql":
        op.execute(f'DROP INDEX IF EXISTS "{name}"')
        return
    with op.get_context().autocommit_block(), _no_lock_timeout():
        op.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')


@contextlib.contextmanager
def _no_lock_timeout() -> Iterator[None]:
    if _postgresql_online():
        with db.no_lock_timeout(op.get_bind()):
            yield
    else:
        yield
