"""seedance_archiver.track: the feeding application's one call, on each kind of connection it has."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from seedance_archiver import db, track

Rows = Callable[[], dict[str, tuple[str, str | None]]]


def _rows_of(url: str) -> Rows:
    def rows() -> dict[str, tuple[str, str | None]]:
        engine = db.make_engine(url)
        try:
            with engine.connect() as conn:
                found = conn.execute(sa.text("SELECT task_id, mode, provider FROM video_tasks"))
                return {task_id: (mode, provider) for task_id, mode, provider in found}
        finally:
            engine.dispose()

    return rows


@pytest.fixture(params=["sqlite3", "psycopg", "sqlalchemy-sqlite", "sqlalchemy-postgresql"])
def connection(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Rows]]:
    """A feeder's own connection of each kind, on a migrated database, and a way to read it."""
    kind = request.param
    if kind in ("sqlite3", "sqlalchemy-sqlite"):
        url = str(request.getfixturevalue("sqlite_url"))
    else:
        url = str(request.getfixturevalue("pg_url"))
    if kind == "sqlite3":
        conn: Any = sqlite3.connect(url.removeprefix("sqlite:///"))
    elif kind == "psycopg":
        conn = psycopg.connect(url)
    else:
        engine = db.make_engine(url)
        conn = engine.connect()
    try:
        yield conn, _rows_of(url)
    finally:
        conn.close()
        if kind.startswith("sqlalchemy"):
            engine.dispose()


class TestTrack:
    """One idempotent insert, the id checked first, in the caller's transaction."""

    def test_inserted_once(self, connection: tuple[Any, Rows]) -> None:
        conn, rows = connection
        assert track(conn, "video_feed_1") is True
        assert track(conn, "video_feed_1", mode="draft") is False  # tracked already
        assert track(conn, "cgt-20261206-feed", mode="flex", provider="ark") is True
        conn.commit()
        assert rows() == {
            "video_feed_1": ("standard", None),
            "cgt-20261206-feed": ("flex", "ark"),
        }

    def test_it_is_the_callers_transaction(self, connection: tuple[Any, Rows]) -> None:
        conn, rows = connection
        assert track(conn, "video_feed_rolled_back") is True
        conn.rollback()
        assert rows() == {}

    @pytest.mark.parametrize(
        ("task_id", "mode", "why"),
        [("../etc/passwd", "standard", "invalid task id"), ("video_ok", "turbo", "unknown mode")],
    )
    def test_refused_before_anything_is_written(
        self, connection: tuple[Any, Rows], task_id: str, mode: str, why: str
    ) -> None:
        conn, rows = connection
        with pytest.raises(ValueError, match=why):
            track(conn, task_id, mode=mode)
        conn.commit()
        assert rows() == {}

    def test_not_a_connection(self) -> None:
        with pytest.raises(TypeError, match="SQLAlchemy Connection or a DB-API connection"):
            track(object(), "video_x")
