"""Acceptance fixtures: the installed ``seedance-archiver`` command, run as a user would run it."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers import Daemon


@pytest.fixture
def start_daemon(tmp_path: pathlib.Path) -> Iterator[Callable[[dict[str, str]], Daemon]]:
    """Start ``seedance-archiver run`` with an environment; every one started is stopped after."""
    started: list[Daemon] = []

    def start(env: dict[str, str]) -> Daemon:
        daemon = Daemon.start(env, tmp_path / f"daemon-{len(started)}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what each test that counts archived videos reported (``record_property``): the
    acceptance suite's archived/total per situation, for a person reading the run."""
    lines = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            properties = dict(getattr(report, "user_properties", ()) or ())
            if getattr(report, "when", None) == "call" and "archived" in properties:
                extra = "".join(f", {k} {v}" for k, v in properties.items() if k != "archived")
                name = report.nodeid.split("::", 1)[1]
                lines.append(f"archived {properties['archived']:>6}  {name}{extra}")
    if lines:
        terminalreporter.write_sep("-", "videos archived of those the provider had")
        for line in sorted(lines, key=lambda text: text.split("  ", 1)[1]):
            terminalreporter.write_line(line)
