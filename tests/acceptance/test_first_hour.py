"""A new user's first hour, with the installed command: a trial that just works, a daemon on an
empty table, the simulator that says how to use it, commands that follow a task, and errors in one
line."""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO

import pytest
from seedance_archiver import simulator

from tests.helpers import CLI, base_env, cli, free_port, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a new user: no SEEDANCE_* setting but ``extra``; HTTP off, so several
    tests can run side by side."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SEEDANCE_")}
    return env | {"SEEDANCE_HTTP_PORT": "0"} | extra


class Lines:
    """A child's standard output, read line by line as it comes."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.seen: list[str] = []

    def until(self, pattern: str, seconds: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            line = self.stream.readline()
            if not line:
                break
            self.seen.append(line.rstrip("\n"))
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"no line matching {pattern!r} in: {self.seen}")


Spawn = Callable[..., tuple["subprocess.Popen[str]", Lines]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a child whose standard output is read line by line; every one is killed after."""
    children: list[subprocess.Popen[str]] = []

    def start(
        argv: list[str], env: dict[str, str], cwd: pathlib.Path | None = None
    ) -> tuple[subprocess.Popen[str], Lines]:
        child = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        children.append(child)
        assert child.stdout is not None
        return child, Lines(child.stdout)

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


def rows(db: pathlib.Path) -> dict[str, dict[str, object]]:
    with sqlite3.connect(db, timeout=10) as conn:
        conn.row_factory = sqlite3.Row
        return {r["task_id"]: dict(r) for r in conn.execute("SELECT * FROM video_tasks")}


class TestTry:
    """`seedance-archiver try`: the simulator and the daemon together, on files of their own
    (never the table the settings name); ids inserted with SQL are archived, and Ctrl-C stops
    both cleanly."""

    def test_a_trial_run(self, tmp_path: pathlib.Path, spawn: Spawn) -> None:
        port = free_port()
        child, out = spawn(
            [str(CLI), "try", "--simulator-port", str(port)],
            # A real table named by the settings: the trial must leave it alone.
            clean_env(
                SEEDANCE_LOG_FORMAT="json",
                SEEDANCE_DATABASE_URL=f"sqlite:///{tmp_path}/production.db",
                SEEDANCE_ARCHIVE_URL=f"file://{tmp_path}/production-archive",
            ),
            cwd=tmp_path,
        )
        out.until(r"^seedance-archiver try: a trial on this machine")
        feed = out.until(r'^  (sqlite3 seedance-archiver-try\.db "INSERT INTO video_tasks .*")$')
        out.until(r"Ctrl-C stops")
        assert f"at http://127.0.0.1:{port}, API key sim-key" in "\n".join(out.seen)
        db = tmp_path / "seedance-archiver-try.db"
        ids = ["video_try_1", "video_try_2"]
        with sqlite3.connect(db) as conn:  # as the printed line says, the same SQL
            for task_id in ids:
                sql = re.search(r'"(INSERT .*)"', feed.group(1))
                assert sql is not None
                conn.execute(sql.group(1).replace("video_try_1", task_id))
        wait_for(
            lambda: all(rows(db).get(i, {}).get("state") == "archived" for i in ids),
            timeout=90,
            what="the trial's ids archived",
        )
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) == 0
        assert not (tmp_path / "production.db").exists()
        assert not (tmp_path / "production-archive").exists()
        for task_id in ids:
            size = pathlib.Path(tmp_path / "archive-try" / f"{task_id}.mp4").stat().st_size
            assert rows(db)[task_id]["archive_sha256"] == simulator.video_sha256(task_id, size)


class TestDaemonOnAnEmptyTable:
    """`run` on a brand-new table starts, `check` passes within seconds (the first beat follows
    the first tick), and SIGTERM stops it with 0. Its stderr, read by a log shipper (not a
    terminal), is one JSON object per line from the first; on a terminal's format it first says,
    in words, what it works on."""

    def test_run_and_check(self, tmp_path: pathlib.Path, start_daemon: object) -> None:
        with simulator.SimulatorThread(simulator.Simulator(api_key="sim-test-key")) as sim:
            env = base_env(sim.url, f"sqlite:///{tmp_path}/t.db", f"file://{tmp_path}/a")
            cli(env, "migrate")
            daemon = start_daemon(env)  # type: ignore[operator]
            wait_for(
                lambda: cli(env, "check", check=False).returncode == 0,
                timeout=30,
                what="check to pass",
            )
            checked = cli(env, "check")
            assert checked.stdout.splitlines() == [
                "settings: ok",
                "database: ok",
                "archive: ok",
                "daemon: ok (1 running)",
                "api key: ok",
            ]
            assert daemon.terminate() == 0
        lines = daemon.log().splitlines()
        records = [json.loads(line) for line in lines]  # each line, the first included
        starting = next(r for r in records if r["event"] == "daemon_starting")
        assert starting["database_url"] == f"sqlite:///{tmp_path}/t.db"
        assert records[-1]["event"] == "daemon_stopped"

    def test_on_the_console_format_it_first_says_what_it_works_on(
        self, tmp_path: pathlib.Path, start_daemon: object
    ) -> None:
        with simulator.SimulatorThread(simulator.Simulator(api_key="sim-test-key")) as sim:
            env = base_env(sim.url, f"sqlite:///{tmp_path}/t.db", f"file://{tmp_path}/a")
            cli(env, "migrate")
            daemon = start_daemon(env | {"SEEDANCE_LOG_FORMAT": "console"})  # type: ignore[operator]
            wait_for(lambda: "daemon_started" in daemon.log(), timeout=30, what="a start")
            assert daemon.terminate() == 0
        first = daemon.log().splitlines()[0]
        assert first == (
            f"seedance-archiver: database sqlite:///{tmp_path}/t.db, archive file://{tmp_path}/a"
        )


class TestSimulator:
    """`python -m seedance_archiver.simulator` says where it is, its key and the daemon's
    settings for it, and creates the ids it is asked about."""

    def test_it_says_how_to_use_it(self, spawn: Spawn) -> None:
        port = free_port()
        _, out = spawn(
            [sys.executable, "-m", "seedance_archiver.simulator", "--port", str(port)], clean_env()
        )
        out.until(rf"the reseller API at http://127\.0\.0\.1:{port}, API key sim-key")
        out.until(rf"export SEEDANCE_API_BASE_URL=http://127\.0\.0\.1:{port}$")
        out.until(r"export SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS=true")

        def answer() -> dict[str, object] | None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request(
                    "GET", "/v1/result/video_anything", headers={"Authorization": "Bearer sim-key"}
                )
                response = conn.getresponse()
                return json.loads(response.read()) if response.status == 200 else None
            except OSError:
                return None
            finally:
                conn.close()

        found = wait_for(answer, timeout=30, what="an answer about an id it never saw")
        assert isinstance(found, dict) and found["status"] == "queued"
        help_text = subprocess.run(
            [sys.executable, "-m", "seedance_archiver.simulator", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "sim-key" in help_text and "--no-auto" in help_text


class TestFollowing:
    """`list --watch` and `status ID --follow` show the task again as it changes, and end when it
    has ended."""

    @pytest.mark.parametrize(
        "argv", [("list", "--watch"), ("status", "video_followed", "--follow")], ids=" ".join
    )
    def test_until_it_has_ended(
        self, tmp_path: pathlib.Path, spawn: Spawn, argv: tuple[str, ...]
    ) -> None:
        env = clean_env(SEEDANCE_DATABASE_URL=f"sqlite:///{tmp_path}/t.db")
        cli(env, "migrate")
        db = tmp_path / "t.db"
        with sqlite3.connect(db) as conn:
            conn.execute(
                "INSERT INTO video_tasks (task_id, state, polls) VALUES ('video_followed', "
                "'polling', 1)"
            )
        child, out = spawn([str(CLI), *argv], env)
        out.until("polling")
        with sqlite3.connect(db) as conn:
            conn.execute(
                "UPDATE video_tasks SET state = 'archived', archive_uri = 'file:///a/v.mp4', "
                "updated_at = '2999-01-01 00:00:00.000000' WHERE task_id = 'video_followed'"
            )
        out.until("archived")
        assert child.wait(timeout=30) == 0


class TestErrorsInOneLine:
    """A command that cannot reach its database says so in one line, naming it (password
    hidden), and never a traceback."""

    @pytest.mark.parametrize("verb", ["migrate", "list", "status", "check"])
    def test_an_unreachable_database(self, verb: str) -> None:
        url = f"postgresql://archiver:not-the-password@127.0.0.1:{free_port()}/videos"
        result = cli(clean_env(SEEDANCE_DATABASE_URL=url), verb, check=False)
        assert result.returncode == 1
        output = result.stdout + result.stderr
        assert "Traceback" not in output and "not-the-password" not in output
        assert "postgresql://archiver:***@127.0.0.1" in result.stderr
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) <= 3, lines  # the database named, then the error

    def test_make_demo_says_how_to_run_the_command(self) -> None:
        recipe = subprocess.run(
            ["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60
        ).stdout
        assert ".venv/bin/seedance-archiver" in recipe and "activate" in recipe
