"""Alembic environment: the URL comes from the caller, ``-x url=``, or SEEDANCE_DATABASE_URL."""

from __future__ import annotations

import os

from alembic import context
from seedance_archiver import models, store

config = context.config
url = (
    config.attributes.get("url")
    or context.get_x_argument(as_dictionary=True).get("url")
    or os.environ.get("SEEDANCE_DATABASE_URL")
    or "sqlite:///seedance-archiver.db"
)


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=models.Base.metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = store.make_engine(url)
    try:
        with engine.connect() as conn:
            context.configure(connection=conn, target_metadata=models.Base.metadata)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(url=str(store.engine_url(url)), target_metadata=models.Base.metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations()
