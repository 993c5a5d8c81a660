"""Feeding the daemon from code: :func:`track` inserts a task id on the application's own connection.

The feeding contract (DESIGN.md) is one INSERT into ``video_tasks``; this is that INSERT, written once,
idempotent, with the id checked first. It needs only the feeder's grants of
``deploy/postgres-roles.sql``: INSERT on ``video_tasks (task_id, mode, provider)`` (ON CONFLICT DO
NOTHING asks for nothing more). It runs in the caller's transaction: commit as usual.
"""

from __future__ import annotations

import sqlite3
import sys
from typing import Any

from seedance_archiver import models, policy

_INSERT = (
    "INSERT INTO video_tasks (task_id, mode, provider) VALUES ({0}, {1}, {2}) "
    "ON CONFLICT (task_id) DO NOTHING"
)
# The DB-API parameter styles (PEP 249) and how each writes three parameters.
_STYLES = {
    "qmark": ("?", "?", "?"),
    "format": ("%s", "%s", "%s"),
    "pyformat": ("%(task_id)s", "%(mode)s", "%(provider)s"),
    "named": (":task_id", ":mode", ":provider"),
    "numeric": (":1", ":2", ":3"),
}


def track(
    conn: Any,
    task_id: str,
    mode: str = models.Mode.STANDARD.value,
    provider: str | None = None,
) -> bool:
    """Ask the daemon to archive ``task_id``'s video: True if the row was added, False if the id
    was tracked already (inserting twice is harmless).

    ``conn`` is the application's own connection: a SQLAlchemy ``Connection``, or any DB-API
    connection (``sqlite3``, psycopg 3, psycopg2, ...). ``mode`` is ``draft``, ``standard`` or
    ``flex``; ``provider`` routes the row to one provider's daemon where two share the table
    (``reseller``, ``ark``), else the first daemon to poll it stamps it. An id that can never be a
    provider's, or an unknown mode, is a ValueError and nothing is written.
    """
    problem = policy.task_id_problem(task_id)
    if problem is not None:
        raise ValueError(problem)
    if mode not in {m.value for m in models.Mode}:
        raise ValueError(f"unknown mode {mode!r}: expected draft, standard or flex")
    values = {"task_id": task_id, "mode": mode, "provider": provider}
    if type(conn).__module__.startswith("sqlalchemy"):
        import sqlalchemy as sa

        statement = sa.text(_INSERT.format(*_STYLES["named"]))
        return int(conn.execute(statement, values).rowcount) == 1
    style = _paramstyle(conn)
    sql = _INSERT.format(*_STYLES[style])
    params: Any = values if style in ("pyformat", "named") else tuple(values.values())
    cursor = conn.cursor()
    try:
        cursor.execute(sql, params)
        return int(cursor.rowcount) == 1
    finally:
        cursor.close()


def _paramstyle(conn: Any) -> str:
    """The parameter style of a DB-API connection's driver (its module's ``paramstyle``)."""
    if isinstance(conn, sqlite3.Connection):
        return "qmark"
    driver = sys.modules.get(type(conn).__module__.split(".", 1)[0])
    style = getattr(driver, "paramstyle", None)
    if style not in _STYLES:
        raise TypeError(
            f"track() takes a SQLAlchemy Connection or a DB-API connection, not {type(conn)!r}"
        )
    return str(style)
