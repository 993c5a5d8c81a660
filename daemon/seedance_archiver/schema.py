"""Schema migrations: ``seedance-archiver migrate`` is ``alembic upgrade head`` with our scripts."""

from __future__ import annotations

import importlib.resources

from alembic import command
from alembic.config import Config


def alembic_config(url: str) -> Config:
    """An Alembic config for the migrations shipped in the package, aimed at ``url``."""
    cfg = Config()
    cfg.set_main_option(
        "script_location", str(importlib.resources.files("seedance_archiver.migrations"))
    )
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
