"""Schema migrations: ``seedance-archiver migrate`` is ``alembic upgrade head`` with our scripts."""

from __future__ import annotations

import importlib.resources

import alembic.command
import alembic.config
import sqlalchemy.exc

from seedance_archiver import errors, store


def alembic_config(url: str) -> alembic.config.Config:
    """An Alembic config for the migrations shipped in the package, aimed at ``url``."""
    cfg = alembic.config.Config()
    cfg.set_main_option(
        "script_location", str(importlib.resources.files("seedance_archiver.migrations"))
    )
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision``; StoreError with one line (never the
    statement or its parameters) when the database cannot be reached or refuses."""
    try:
        alembic.command.upgrade(alembic_config(url), revision)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise errors.StoreError(f"database error: {store.first_line(exc)}") from exc


def downgrade(url: str, revision: str) -> None:
    alembic.command.downgrade(alembic_config(url), revision)
