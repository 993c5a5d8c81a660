"""``seedance-archiver demo``: the whole pipeline on the embedded default against the simulator.

It starts the simulator on loopback, migrates the database of SEEDANCE_DATABASE_URL (default: SQLite),
feeds a handful of tasks of all three modes (some failing, some with transient faults), runs the daemon
until every task is finished, prints the table and checks every archived video's SHA-256.
Polling is sped up (seconds instead of tens of seconds) so the demo ends in well under a minute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from seedance_archiver import config, models, scheduler, schema, simulator, store, views

DEMO_KEY = "demo-not-a-secret"
DEMO_DEADLINE_SECONDS = 100.0
MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    mode: str
    outcome: str
    ready_seconds: float
    size: int = MiB
    poll_faults: tuple[dict[str, Any], ...] = ()
    download_faults: tuple[dict[str, Any], ...] = ()


SCENARIOS = (
    Scenario("draft-ok", "draft", "completed", 3, 1 * MiB),
    Scenario("draft-cancelled", "draft", "cancelled", 2),
    Scenario("standard-ok-after-500", "standard", "completed", 4, 3 * MiB, ({"status": 503},)),
    Scenario("standard-failed", "standard", "failed", 3),
    Scenario(
        "standard-ok-after-truncation",
        "standard",
        "completed",
        4,
        12 * MiB,
        (),
        ({"truncate_at": 5 * MiB},),
    ),
    Scenario("flex-ok", "flex", "completed", 5, 2 * MiB),
    Scenario(
        "flex-ok-after-429", "flex", "completed", 5, 1 * MiB, ({"status": 429, "retry_after": 1},)
    ),
)


def run(out: Callable[[str], None] = print) -> int:
    """Run the demo; return 0 if every completed video was archived intact."""
    sim = simulator.Simulator(api_key=DEMO_KEY)
    with simulator.SimulatorThread(sim) as server:
        settings = config.load(
            api_base_url=server.url,
            api_key=DEMO_KEY,
            poll_draft="1-2",
            poll_standard="1.5-3",
            poll_flex="2-4",
            allowed_video_url_schemes="http,https",
            allow_private_video_hosts=True,
            http_port=0,
            shutdown_grace_seconds=5,
            **config.SKIP_OFF,  # its tasks take seconds: the seed's skips would idle it
        )
        out(
            f"demo: simulator on {server.url}; database {settings.public_summary()['database_url']}"
        )
        out(f"demo: archive {config.archive_where(settings.archive_url)}")
        out(
            "demo: some tasks meet faults on purpose (a 503 and a 429 from the provider, a video "
            "cut off mid-download): the warnings they log are injected and expected"
        )
        schema.upgrade(settings.resolve_database_url())
        sql_store = store.SqlStore.from_url(settings.resolve_database_url())
        stamp = time.strftime("%m%d%H%M%S")
        ids: dict[str, Scenario] = {}
        for scenario in SCENARIOS:
            task_id = f"demo{stamp}_{scenario.name.replace('-', '_')}"
            ids[task_id] = scenario
            sim.add_task(
                task_id,
                outcome=scenario.outcome,
                ready_seconds=scenario.ready_seconds,
                size=scenario.size,
            )
            for fault in scenario.poll_faults:
                sim.add_fault(task_id, on="poll", **fault)
            for fault in scenario.download_faults:
                sim.add_fault(task_id, on="download", **fault)
            out(
                "demo: INSERT INTO video_tasks (task_id, mode) "
                f"VALUES ('{task_id}', '{scenario.mode}')"
            )
            sql_store.add(task_id, scenario.mode)

        finished = asyncio.run(_run_until_finished(settings, sql_store, list(ids)))
        tasks = [t for t in sql_store.list() if t.task_id in ids]
        sql_store.close()
    out("")
    out(views.table(tasks))
    out("")
    return _verify(tasks, ids, finished, out)


async def _run_until_finished(
    settings: config.Settings, sql_store: store.OperatorStore, ids: list[str]
) -> bool:
    stop = asyncio.Event()
    done = asyncio.Event()

    async def watch() -> None:
        deadline = time.monotonic() + DEMO_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            tasks = await asyncio.to_thread(sql_store.list)
            mine = [t for t in tasks if t.task_id in ids]
            if len(mine) == len(ids) and all(t.is_terminal for t in mine):
                done.set()
                break
            await asyncio.sleep(0.5)
        stop.set()

    watcher = asyncio.create_task(watch())
    await scheduler.run(settings, stop=stop)
    await watcher
    return done.is_set()


def _verify(
    tasks: list[models.Task], ids: dict[str, Scenario], finished: bool, out: Callable[[str], None]
) -> int:
    problems = [] if finished else [f"not every task finished within {DEMO_DEADLINE_SECONDS:.0f}s"]
    for task in tasks:
        scenario = ids[task.task_id]
        expected_state = "archived" if scenario.outcome == "completed" else scenario.outcome
        if task.state != expected_state:
            problems.append(f"{task.task_id}: {task.state}, expected {expected_state}")
        elif task.state == "archived":
            expected_sha = simulator.video_sha256(task.task_id, scenario.size)
            if task.archive_sha256 != expected_sha or task.archive_bytes != scenario.size:
                problems.append(f"{task.task_id}: archived bytes differ from the video")
    archived = sum(t.state == "archived" for t in tasks)
    if problems:
        out("demo FAILED: " + "; ".join(problems))
        return 1
    out(
        f"demo OK: {archived} of {archived} completed videos archived, SHA-256 verified; "
        "failed and cancelled tasks recorded as such."
    )
    return 0
