"""Schema migrations: ``seedance-archiver migrate`` is ``alembic upgrade head`` with our scripts.

Migrating must not stall the feeders, whose inserts go on meanwhile, however large ``video_tasks``
is. So ``migrate`` runs on its own connection (:func:`store.make_migrate_engine`): no statement
timeout and no watchdog, but a ``lock_timeout``; a revision that gives up waiting for a lock is
retried a few times, later (:func:`upgrade`). Each revision is its own transaction, so what was
applied stays applied, and the revision that failed runs again from its start on the next attempt.
"""

from __future__ import annotations

import importlib.resources
import time
from collections.abc import Callable, Sequence

import alembic.command
import alembic.config
import alembic.migration
import sqlalchemy.exc
import structlog

from seedance_archiver import errors, store

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
    lock_timeout_seconds: float = store.MIGRATE_LOCK_TIMEOUT_SECONDS,
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
            alembic.command.upgrade(cfg, revision)
            return
        except sqlalchemy.exc.SQLAlchemyError as exc:
            if not store.is_lock_timeout(exc):
                raise errors.StoreError(f"database error: {store.first_line(exc)}") from exc
            if attempt > len(pauses):
                raise errors.StoreError(
                    f"gave up after {attempt} attempts waiting for a lock (the sessions holding "
                    f"it are in the migrate_lock_wait log lines): {store.first_line(exc)}"
                ) from exc
            pause = pauses[attempt - 1]
            _log_lock_wait(url, lock_timeout_seconds, attempt, pause)
            sleep(pause)


def _log_lock_wait(url: str, lock_timeout_seconds: float, attempt: int, pause: float) -> None:
    """Say which revision waited and on whom, as far as the database still tells."""
    engine = store.make_migrate_engine(url, lock_timeout_seconds)
    try:
        with engine.connect() as conn:
            at = alembic.migration.MigrationContext.configure(conn).get_current_revision()
            holders = store.lock_holders(conn)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        at, holders = None, [{"error": store.first_line(exc)}]
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
