"""Alembic environment: the URL comes from the caller, ``-x url=``, or SEEDANCE_DATABASE_URL.

Each revision runs in its own transaction, on a connection of its own (``db.make_migrate_engine``:
a lock timeout, but neither the daemon's statement timeout nor its watchdog), once no other
migrate runs on the database; ``schema`` says why and how a revision builds an index.
"""

from __future__ import annotations

import os

from alembic import context
from seedance_archiver import db, models

config = context.config
url = (
    config.attributes.get("url")
    or context.get_x_argument(as_dictionary=True).get("url")
    or os.environ.get("SEEDANCE_DATABASE_URL")
    or "sqlite:///seedance-archiver.db"
)
OPTIONS = {"target_metadata": models.Base.metadata, "transaction_per_migration": True}


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
        return
    lock_timeout = config.attributes.get("lock_timeout_seconds", db.MIGRATE_LOCK_TIMEOUT_SECONDS)
    engine = db.make_migrate_engine(url, lock_timeout)
    try:
        with engine.connect() as conn:
            db.lock_migrations(conn)
            context.configure(connection=conn, **OPTIONS)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(url=str(db.engine_url(url)), **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations()
