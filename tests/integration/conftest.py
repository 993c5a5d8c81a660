"""Fixtures the integration modules share."""

from __future__ import annotations

import pathlib

import pytest
from seedance_archiver import simulator

from tests.helpers import Launcher


@pytest.fixture
def launch(
    sim: simulator.SimulatorThread,
    sqlite_url: str,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Launcher:
    """The daemon on a fresh SQLite database and a local archive folder."""
    return Launcher(sim, sqlite_url, tmp_path, monkeypatch)
