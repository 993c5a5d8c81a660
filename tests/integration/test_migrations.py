"""Migrations: they create the table DESIGN.md describes, round-trip, and agree with the models."""

from __future__ import annotations

import alembic.autogenerate
import alembic.migration
import pytest
import sqlalchemy as sa

from daemon import models, schema, store


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/empty.db"
    return str(request.getfixturevalue("empty_pg_url"))


def _columns(url: str) -> set[str]:
    engine = store.make_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("video_tasks"):
                return set()
            return {c["name"] for c in sa.inspect(conn).get_columns("video_tasks")}
    finally:
        engine.dispose()


class TestMigrations:
    """Alembic upgrade/downgrade of video_tasks."""

    def test_upgrade_creates_every_designed_column(self, empty_url: str) -> None:
        schema.upgrade(empty_url)
        assert _columns(empty_url) == set(models.TASK_FIELDS)

    def test_round_trip_down_and_up_again(self, empty_url: str) -> None:
        schema.upgrade(empty_url)
        schema.downgrade(empty_url, "base")
        assert _columns(empty_url) == set()
        schema.upgrade(empty_url)
        assert _columns(empty_url) == set(models.TASK_FIELDS)

    def test_models_agree_with_migrated_schema(self, empty_url: str) -> None:
        schema.upgrade(empty_url)
        engine = store.make_engine(empty_url)
        try:
            with engine.connect() as conn:
                context = alembic.migration.MigrationContext.configure(
                    conn, opts={"compare_type": True, "compare_server_default": False}
                )
                diff = alembic.autogenerate.compare_metadata(context, models.Base.metadata)
        finally:
            engine.dispose()
        assert diff == []
