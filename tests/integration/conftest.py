"""Fixtures the integration modules share."""

from __future__ import annotations

import pathlib
import urllib.parse
from collections.abc import Iterator

import pytest
from seedance_archiver import simulator

from tests.helpers import Launcher
from tests.integration.faultproxy import FaultProxy


@pytest.fixture
def launch(
    sim: simulator.SimulatorThread,
    sqlite_url: str,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Launcher:
    """The daemon on a fresh SQLite database and a local archive folder."""
    return Launcher(sim, sqlite_url, tmp_path, monkeypatch)


@pytest.fixture
def launch_db(
    sim: simulator.SimulatorThread,
    db_url: str,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Launcher:
    """The daemon on SQLite and on PostgreSQL (the same test twice)."""
    return Launcher(sim, db_url, tmp_path, monkeypatch)


@pytest.fixture
def s3_proxy(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A fault proxy in front of moto; the daemon's boto3 client is pointed at it."""
    port = int(urllib.parse.urlsplit(s3_endpoint).port or 0)
    with FaultProxy(port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        yield proxy
