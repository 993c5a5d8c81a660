"""``seedance-archiver try``: the provider simulator and the daemon together, for a first look.

Nothing leaves the machine. The simulator plays the provider of ``SEEDANCE_PROVIDER`` on loopback and
creates every task id it is asked about on first sight, finishing it in about
:data:`READY_SECONDS`; the daemon polls it on short cadences, with the URL rules loosened for
loopback and no skip. The user inserts ids with SQL (or ``add``), as their application will, and
watches them archived (``list --watch``). Ctrl-C stops both.

It works on files of its own, :data:`DATABASE` and :data:`ARCHIVE` in the current folder, whatever
``SEEDANCE_DATABASE_URL`` and ``SEEDANCE_ARCHIVE_URL`` say: a trial pointed at a real table would
have the simulator "finish" real tasks, and their fake videos archived in place of the real ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from seedance_archiver import config, scheduler, schema, simulator

TRY_KEY = "sim-key"
DATABASE = "seedance-archiver-try.db"
ARCHIVE = "archive-try"
QUEUED_SECONDS = 3.0
READY_SECONDS = 15.0
VIDEO_BYTES = 2 * 1024 * 1024
# A trial's settings: the simulator on loopback over http, and waits of seconds, not minutes.
TRIAL_SETTINGS: dict[str, Any] = {
    "allowed_video_url_schemes": "http,https",
    "allow_private_video_hosts": True,
    "poll_draft": "2-4",
    "poll_standard": "3-6",
    "poll_flex": "5-10",
    **config.SKIP_OFF,
}


def run(out: Callable[[str], None] = print, simulator_port: int = 0) -> int:
    """Serve the simulator and run the daemon against it until SIGTERM or Ctrl-C."""
    chosen = config.load()
    auto = {"queued_seconds": QUEUED_SECONDS, "ready_seconds": READY_SECONDS, "size": VIDEO_BYTES}
    sim = simulator.Simulator(api_key=TRY_KEY, auto=auto, dialect=chosen.provider)
    with simulator.SimulatorThread(sim, port=simulator_port) as server:
        settings = config.load(
            api_base_url=server.url,
            api_key=TRY_KEY,
            database_url=f"sqlite:///{DATABASE}",
            archive_url=f"file://./{ARCHIVE}",
            **TRIAL_SETTINGS,
        )
        database = settings.resolve_database_url()
        schema.upgrade(database)
        for line in instructions(server.url, settings):
            out(line)
        return asyncio.run(scheduler.run(settings))


def instructions(simulator_url: str, settings: config.Settings) -> list[str]:
    """What the user is told at the start of a trial: what runs where, and what to type."""
    database = settings.resolve_database_url()
    insert = "INSERT INTO video_tasks (task_id) VALUES ('video_try_1')"
    env = f"SEEDANCE_DATABASE_URL={database}"
    return [
        "seedance-archiver try: a trial on this machine; nothing leaves it.",
        f"  provider  the simulator ({settings.provider}) at {simulator_url}, API key {TRY_KEY}: "
        f"every task id you insert exists there and is done in about {READY_SECONDS:.0f} s",
        f"  database  {config.database_where(database)}",
        f"  archive   {config.archive_where(settings.archive_url)}",
        "Insert task ids as your application will, in another terminal:",
        f'  sqlite3 {DATABASE} "{insert}"',
        f"  (or: {env} seedance-archiver add video_try_1 video_try_2)",
        f"and watch them archived: {env} seedance-archiver list --watch",
        "Ctrl-C stops the daemon and the simulator.",
    ]
