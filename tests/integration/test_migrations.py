"""Migrations: they create the table DESIGN.md describes, round-trip, and agree with the models."""

from __future__ import annotations

import alembic.autogenerate
import alembic.migration
import pytest
import sqlalchemy as sa
from seedance_archiver import models, schema, store


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


def _not_the_claim_index(obj: object, name: str | None, kind: str, *_: object) -> bool:
    # Its NULLS FIRST ordering exists on PostgreSQL only, which one model index cannot say;
    # test_claim_index_is_in_claim_order checks its exact definition on each database instead.
    return not (kind == "index" and name == "ix_video_tasks_due")


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
                    conn,
                    opts={
                        "compare_type": True,
                        "compare_server_default": False,
                        "include_object": _not_the_claim_index,
                    },
                )
                diff = alembic.autogenerate.compare_metadata(context, models.Base.metadata)
        finally:
            engine.dispose()
        assert diff == []

    def test_claim_index_is_in_claim_order(self, empty_url: str) -> None:
        schema.upgrade(empty_url)
        engine = store.make_engine(empty_url)
        try:
            with engine.connect() as conn:
                if engine.dialect.name == "postgresql":
                    sql = conn.execute(
                        sa.text(
                            "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_video_tasks_due'"
                        )
                    ).scalar_one()
                else:
                    sql = conn.execute(
                        sa.text("SELECT sql FROM sqlite_master WHERE name = 'ix_video_tasks_due'")
                    ).scalar_one()
        finally:
            engine.dispose()
        text = " ".join(sql.split())
        if engine.dialect.name == "postgresql":
            assert "(expires_at NULLS FIRST, next_attempt_at)" in text
            assert (
                "WHERE (state = ANY (ARRAY['downloading'::text, 'pending'::text, 'polling'::text]))"
                in text
            )
        else:
            assert (
                '("expires_at", "next_attempt_at")' in text
                or "(expires_at, next_attempt_at)" in text
            )
            assert "WHERE state IN ('downloading', 'pending', 'polling')" in text
