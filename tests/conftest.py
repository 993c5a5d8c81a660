"""Shared fixtures: real PostgreSQL and SQLite databases, moto's S3 server over HTTP, the simulator.
(Shared functions and constants are not fixtures: they live in tests/helpers.py.)

PostgreSQL: one migrated template database per session, cloned for every test (fast, isolated) and
dropped after it. Where PostgreSQL is unreachable, its tests skip with a message naming what is missing;
with CI=true they fail instead, because CI must run them.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import structlog
from seedance_archiver import logs, schema, simulator, store, testing, utils

from tests.helpers import IN_CI, PG_ADMIN_DSN, free_port, serving


@pytest.fixture(autouse=True)
def _logging_per_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Logging is global: ``cli.main`` configures it (to the stderr of the moment, pytest's capture
    in a test). Each test configures it without the logger cache (a logger cached in one test
    would keep that test's stream and processors for every later one) and leaves structlog's
    defaults and the root logger's handlers as it found them."""
    real = logs.configure

    def configure(
        log_format: str | None = None, level: int = logging.INFO, stream: Any = None, **_: Any
    ) -> None:
        real(log_format, level, stream, cache=False)

    monkeypatch.setattr(logs, "configure", configure)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


# --- PostgreSQL --------------------------------------------------------------------------------


def _pg_admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def pg_available() -> None:
    try:
        with _pg_admin():
            pass
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL is unreachable at {PG_ADMIN_DSN.split('@')[-1]}: {exc}".strip()
        if IN_CI:
            pytest.fail(f"{message} (CI=true: PostgreSQL tests must run)")
        pytest.skip(message)


def _url_for(dbname: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    return f"{base}/{dbname}"


def _drop(dbname: str) -> None:
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_template(pg_available: None) -> Iterator[str]:
    """A migrated database to clone; its name."""
    name = f"seedance_tpl_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        schema.upgrade(_url_for(name))
        yield name
    finally:
        _drop(name)


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test: its URL as a user would write it."""
    name = f"seedance_t_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    try:
        yield _url_for(name)
    finally:
        _drop(name)


@pytest.fixture
def empty_pg_url(pg_available: None) -> Iterator[str]:
    """A fresh PostgreSQL database with no table at all (for migration tests)."""
    name = f"seedance_e_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _url_for(name)
    finally:
        _drop(name)


# --- SQLite ------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    """A fresh, migrated SQLite database file for this test."""
    url = f"sqlite:///{tmp_path}/tasks.db"
    schema.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same test on SQLite and on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture(params=["fake", "sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest) -> Iterator[store.Store]:
    """The same store behaviour on the fake store, SQLite and PostgreSQL."""
    if request.param == "fake":
        yield testing.FakeStore(clock=utils.utcnow)
        return
    url = str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))
    sql_store = store.SqlStore.from_url(url)
    try:
        yield sql_store
    finally:
        sql_store.close()


# --- S3 (moto's server mode, over real HTTP on loopback) ---------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "test-access-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
        }
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_S3",
)


@pytest.fixture
def s3_client(s3_endpoint: str) -> object:
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def s3_bucket(s3_client: object) -> str:
    """A new, empty bucket on the moto server."""
    name = f"archive-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
    return name


# --- the provider simulator, over real HTTP on loopback ----------------------------------------


@pytest.fixture
def sim() -> Iterator[simulator.SimulatorThread]:
    """A fresh simulator serving on 127.0.0.1 (``sim.simulator`` is its state, ``sim.url`` its base)."""
    with serving() as server:
        yield server
