"""Fewer polls per archived video with the skip on than off, counted in the table's ``polls`` column.

The installed CLI runs the daemon as a subprocess against the simulator over HTTP on loopback; each
task takes 6 s to make (its model ends in ``_720p``), polled on a 0.5-1 s standard cadence. With
the skip off every task is polled at least 6 times; with ``SEEDANCE_EXPECTED_SECONDS_720P=5-8`` the
intake poll is followed by one at created + 5 s and a few more. Counts, not timings, are asserted.
"""

from __future__ import annotations

import pathlib
import sqlite3
from collections.abc import Callable

from seedance_archiver import simulator

from tests.helpers import Daemon, base_env, cli, wait_for

TASKS = [f"video_fewer_{i}" for i in range(4)]
READY_SECONDS = 6.0


def _run(
    tmp_path: pathlib.Path,
    sim: simulator.SimulatorThread,
    start_daemon: Callable[[dict[str, str]], Daemon],
    name: str,
    expected_720p: str,
) -> tuple[dict[str, tuple[str, int]], str]:
    db = tmp_path / f"{name}.db"
    env = base_env(sim.url, f"sqlite:///{db}", f"file://{tmp_path}/{name}-archive")
    env["SEEDANCE_EXPECTED_SECONDS_720P"] = expected_720p
    cli(env, "migrate")
    daemon = start_daemon(env)
    wait_for(lambda: "daemon_started" in daemon.log(), timeout=30, what="the daemon to start")
    ids = [f"{task_id}_{name}" for task_id in TASKS]
    with sqlite3.connect(db, timeout=10) as conn:
        for task_id in ids:
            # Created at the provider the moment the feeder hands it over, as an app would.
            sim.simulator.add_task(task_id, queued_seconds=1.0, ready_seconds=READY_SECONDS)
            conn.execute("INSERT INTO video_tasks (task_id) VALUES (?)", (task_id,))

    def rows() -> dict[str, tuple[str, int]]:
        with sqlite3.connect(db, timeout=10) as conn:
            found = conn.execute("SELECT task_id, state, polls FROM video_tasks").fetchall()
        return {task_id: (state, polls) for task_id, state, polls in found}

    wait_for(
        lambda: all(state == "archived" for state, _ in rows().values()),
        timeout=60,
        what=f"every {name} task archived",
    )
    status = cli(env, "status").stdout
    assert daemon.terminate() == 0
    return rows(), status


def test_the_skip_saves_polls_per_archived_video(
    tmp_path: pathlib.Path,
    sim: simulator.SimulatorThread,
    start_daemon: Callable[[dict[str, str]], Daemon],
) -> None:
    plain, _ = _run(tmp_path, sim, start_daemon, "plain", "off")
    skip, status = _run(tmp_path, sim, start_daemon, "skip", "5-8")

    plain_polls = [polls for _, polls in plain.values()]
    skip_polls = [polls for _, polls in skip.values()]
    assert min(plain_polls) >= READY_SECONDS  # one poll a second at most, until it is ready
    assert sum(skip_polls) <= 0.75 * sum(plain_polls), (plain, skip)
    assert max(skip_polls) < min(plain_polls), (plain, skip)
    # status shows what the daemon saw of the model, and the skip it uses.
    line = next(line for line in status.splitlines() if line.startswith("seedance_1_5_pro_720p"))
    assert line.split()[1] == str(len(TASKS))  # its completions are the samples
    assert line.split()[-2:] == ["5", "(settings)"]
