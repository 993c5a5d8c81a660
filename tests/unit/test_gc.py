"""The daemon's process collects garbage less often, and not what start-up built (scheduler.tune_gc)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from seedance_archiver import cli, config, scheduler

from tests.helpers import SIM_KEY


def test_tune_gc_raises_the_youngest_threshold_and_freezes_start_up() -> None:
    # In a process of its own: a frozen collector would outlive this test in the suite's.
    code = (
        "import gc; from seedance_archiver import scheduler; before = gc.get_threshold(); "
        "scheduler.tune_gc(); after = gc.get_threshold(); "
        "print(before[1:] == after[1:], after[0], gc.get_freeze_count() > 1000)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["True", str(scheduler.GC_YOUNGEST_THRESHOLD), "True"]


def test_run_tunes_it_before_the_daemon_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    calls: list[str] = []

    async def daemon(settings: config.Settings) -> int:
        calls.append("run")
        return 0

    monkeypatch.setattr(scheduler, "tune_gc", lambda: calls.append("tune_gc"))
    monkeypatch.setattr(scheduler, "run", daemon)
    monkeypatch.setenv("SEEDANCE_API_KEY", SIM_KEY)
    monkeypatch.setenv("SEEDANCE_DATABASE_URL", f"sqlite:///{tmp_path / 'tasks.db'}")
    monkeypatch.setenv("SEEDANCE_ARCHIVE_URL", (tmp_path / "archive").as_uri())
    assert cli.main(["run"]) == 0
    assert calls == ["tune_gc", "run"]
