"""Acceptance fixtures: the installed ``seedance-archiver`` command, run as a user would run it."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from seedance_archiver import config

from tests.conftest import SIM_KEY

CLI = pathlib.Path(sys.executable).parent / "seedance-archiver"


def base_env(sim_url: str, database_url: str, archive_url: str) -> dict[str, str]:
    """The environment of a daemon aimed at the simulator, polling fast so tests end quickly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE_")}
    env.update(
        {
            "SEEDANCE_API_KEY": SIM_KEY,
            "SEEDANCE_API_BASE_URL": sim_url,
            "SEEDANCE_DATABASE_URL": database_url,
            "SEEDANCE_ARCHIVE_URL": archive_url,
            "SEEDANCE_POLL_DRAFT": "0.3-0.6",
            "SEEDANCE_POLL_STANDARD": "0.5-1",
            "SEEDANCE_POLL_FLEX": "0.8-1.5",
            "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES": "http",
            "SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS": "true",
            "SEEDANCE_HTTP_PORT": "0",
            "SEEDANCE_LOG_FORMAT": "json",
            "SEEDANCE_MAX_REQUESTS_PER_SECOND": "200",
            "SEEDANCE_SHUTDOWN_GRACE_SECONDS": "5",
        }
    )
    # The simulator's tasks take seconds, not the seed's minutes: no skip unless a test sets one.
    env.update({config.ENV_PREFIX + k.upper(): v for k, v in config.SKIP_OFF.items()})
    return env


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command of the installed CLI to completion."""
    result = subprocess.run(
        [str(CLI), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}: {result.stderr[-2000:]}")
    return result


@dataclasses.dataclass
class Daemon:
    """A ``seedance-archiver run`` subprocess whose log goes to a file."""

    process: subprocess.Popen[bytes]
    log_path: pathlib.Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def start_daemon(tmp_path: pathlib.Path) -> Iterator[object]:
    """Start ``seedance-archiver run`` with an environment; every one started is stopped after."""
    started: list[Daemon] = []

    def start(env: dict[str, str]) -> Daemon:
        log_path = tmp_path / f"daemon-{len(started)}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [str(CLI), "run"], env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        daemon = Daemon(process, log_path)
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
