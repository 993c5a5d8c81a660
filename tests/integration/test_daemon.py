"""The daemon in-process (scheduler + service + real store, provider and archive) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from daemon import config, scheduler, simulator, store
from tests.conftest import SIM_KEY


async def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Yield to the loop until ``condition`` holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_daemon(
    settings: config.Settings, tick_seconds: float = scheduler.TICK_SECONDS
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        scheduler.run(settings, stop=stop, handle_signals=False, tick_seconds=tick_seconds)
    )
    try:
        yield
    finally:
        stop.set()
        assert await asyncio.wait_for(task, timeout=30) == 0


def _settings(
    sim: simulator.SimulatorThread, db_url: str, tmp_path: pathlib.Path
) -> config.Settings:
    return config.load(
        api_base_url=sim.url,
        api_key=SIM_KEY,
        database_url=db_url,
        archive_url=f"file://{tmp_path}/archive",
        allowed_video_url_schemes="http",
        allow_private_video_hosts=True,
        http_port=0,
    )


class TestPickup:
    """New rows are worked on promptly."""

    @pytest.mark.postgres
    async def test_notify_wakes_the_daemon_long_before_the_next_tick(
        self, pg_url: str, sim: simulator.SimulatorThread, tmp_path: pathlib.Path
    ) -> None:
        sim.simulator.add_task("video_warmup", ready_seconds=3600)
        sim.simulator.add_task("video_notified", ready_seconds=3600)
        feeder = store.SqlStore.from_url(pg_url)
        polls = sim.simulator.stats.polls
        # A 30 s tick: only the NOTIFY from the insert trigger can make the poll come sooner.
        async with running_daemon(_settings(sim, pg_url, tmp_path), tick_seconds=30):
            feeder.add("video_warmup")
            # The first tick runs at start; the warm-up row proves the listener is connected.
            await wait_until(lambda: polls["video_warmup"] >= 1, 20, "the warm-up poll")
            feeder.add("video_notified")
            await wait_until(lambda: polls["video_notified"] >= 1, 10, "a poll woken by NOTIFY")
        feeder.close()

    async def test_sqlite_rows_are_picked_up_by_the_table_poll(
        self, sqlite_url: str, sim: simulator.SimulatorThread, tmp_path: pathlib.Path
    ) -> None:
        sim.simulator.add_task("video_polled", ready_seconds=3600)
        feeder = store.SqlStore.from_url(sqlite_url)
        async with running_daemon(_settings(sim, sqlite_url, tmp_path)):
            await asyncio.sleep(0)
            feeder.add("video_polled")
            await wait_until(
                lambda: sim.simulator.stats.polls["video_polled"] >= 1, 10, "the first poll"
            )
        feeder.close()
