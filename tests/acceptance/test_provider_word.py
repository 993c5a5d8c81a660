"""A video is given up only on the provider's word: the installed CLI, fed by SQL, against a provider
stand-in over HTTP that misbehaves the way real ones do.

Each situation counts the videos archived (with the provider's own bytes) out of those the provider
had, and reports it (``archived`` in the test's user properties, printed at the end of the run by
the acceptance ``conftest.py``): drifted side fields and bodies that are not videos on both
providers, an HTML-404 outage, tasks the provider still serves past their nominal deadline, Ark flex
tasks queued past a day, a size limit raised after the fact, and gzip bombs for answers (with the
daemon's peak memory).

Only the simulator is imported from the package: the daemon is a separate process, judged by its
table, its archive and its ``/proc`` entry.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from seedance_archiver import simulator

from tests.helpers import SIM_KEY, Daemon, base_env, cli, wait_for

DAY = 86_400.0
SIZE = 200 * 1024
TERMINAL = {"archived", "failed", "cancelled", "expired", "rejected"}
# How long a situation may take at most before its count is taken (the daemon is done far sooner).
SETTLE_SECONDS = 150.0


class Feeder:
    """The feeding application: plain SQL through the standard library, on the daemon's SQLite."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def insert(self, task_id: str, mode: str = "standard") -> None:
        with sqlite3.connect(self.path, timeout=10) as conn:
            conn.execute("INSERT INTO video_tasks (task_id, mode) VALUES (?, ?)", (task_id, mode))

    def rows(self) -> dict[str, dict[str, Any]]:
        with sqlite3.connect(self.path, timeout=10) as conn:
            conn.row_factory = sqlite3.Row
            return {r["task_id"]: dict(r) for r in conn.execute("SELECT * FROM video_tasks")}


class Situation:
    """One situation: a simulator, a table and its archive, a daemon, and what it archived."""

    def __init__(
        self,
        tmp_path: pathlib.Path,
        start_daemon: Callable[[dict[str, str]], Daemon],
        record: Callable[[str, object], None],
        dialect: str = "reseller",
        retention_seconds: float = simulator.DEFAULT_RETENTION_SECONDS,
    ) -> None:
        sim = simulator.Simulator(
            api_key=SIM_KEY, dialect=dialect, retention_seconds=retention_seconds
        )
        self.server = simulator.SimulatorThread(sim).start()
        self.sim = sim
        self.db = tmp_path / "tasks.db"
        self.archive = tmp_path / "archive"
        self.env = base_env(self.server.url, f"sqlite:///{self.db}", f"file://{self.archive}")
        self.env["SEEDANCE_PROVIDER"] = dialect
        self.feeder = Feeder(self.db)
        self._start = start_daemon
        self._record = record
        self.daemons: list[Daemon] = []
        cli(self.env, "migrate")

    def start(self, **settings: str) -> Daemon:
        env = {**self.env, **{f"SEEDANCE_{k.upper()}": v for k, v in settings.items()}}
        daemon = self._start(env)
        self.daemons.append(daemon)
        return daemon

    def stop(self) -> None:
        for daemon in self.daemons:
            assert daemon.terminate() == 0, daemon.log()[-3000:]
        self.daemons.clear()

    def settle(self, ids: list[str], seconds: float = SETTLE_SECONDS) -> dict[str, dict[str, Any]]:
        """Wait until every row of ``ids`` has ended (or ``seconds`` passed); report and return
        the rows."""
        deadline = time.monotonic() + seconds
        while True:
            rows = self.feeder.rows()
            if all(rows.get(i, {}).get("state") in TERMINAL for i in ids):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.report(rows, ids)
        return rows

    def report(self, rows: dict[str, dict[str, Any]], ids: list[str]) -> None:
        """Record how many of ``ids`` are archived with the provider's own bytes (a row that says
        archived over an error page has lost its video all the same)."""
        archived = 0
        for task_id in ids:
            row = rows.get(task_id, {})
            size = self.sim.tasks[task_id].size
            if row.get("state") == "archived" and row.get(
                "archive_sha256"
            ) == simulator.video_sha256(task_id, size):
                archived += 1
        self._record("archived", f"{archived}/{len(ids)}")

    def assert_archived_intact(self, rows: dict[str, dict[str, Any]], ids: list[str]) -> None:
        not_archived = {
            i: (rows.get(i, {}).get("state"), rows.get(i, {}).get("error"))
            for i in ids
            if rows.get(i, {}).get("state") != "archived"
        }
        assert not_archived == {}, self.daemons[-1].log()[-3000:] if self.daemons else ""
        for task_id in ids:
            size = self.sim.tasks[task_id].size
            assert rows[task_id]["archive_bytes"] == size
            assert rows[task_id]["archive_sha256"] == simulator.video_sha256(task_id, size)
            assert (self.archive / f"{task_id}.mp4").stat().st_size == size

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.kill()
        self.server.stop()


@pytest.fixture
def situation(
    tmp_path: pathlib.Path, start_daemon: Any, record_property: Any
) -> Iterator[Callable[..., Situation]]:
    made: list[Situation] = []

    def make(**kwargs: Any) -> Situation:
        made.append(Situation(tmp_path, start_daemon, record_property, **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.close()


def iso(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- 3. drifted side fields ----------------------------------------------------------------------


class TestDriftedAnswers:
    """Side fields drifted from their documented types: every video is archived all the same."""

    @staticmethod
    def archive(s: Situation, created: float, drift: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Serve each task with its drifted fields, feed them, and return the rows once archived."""
        for task_id, overrides in drift.items():
            s.sim.add_task(
                task_id, created=created, ready_seconds=1, size=SIZE, overrides=overrides
            )
            s.feeder.insert(task_id)
        s.start()
        rows = s.settle(list(drift))
        s.assert_archived_intact(rows, list(drift))
        s.stop()
        return rows

    def test_reseller(self, situation: Callable[..., Situation]) -> None:
        created = float(int(time.time()) - 30)
        drift: dict[str, dict[str, Any]] = {
            "video_drift_duration_text": {"actualDuration": "5.04"},
            "video_drift_created_ms": {"created": int(created * 1000)},
            "video_drift_created_text": {"created": str(int(created))},
            "video_drift_created_iso": {"created": iso(created)},
        }
        rows = self.archive(situation(dialect="reseller"), created, drift)
        assert rows["video_drift_duration_text"]["actual_duration"] == 5.04
        assert {rows[t]["provider_created_at"][:19] for t in drift} == {
            iso(created)[:19].replace("T", " ")
        }

    def test_ark(self, situation: Callable[..., Situation]) -> None:
        created = float(int(time.time()) - 30)
        drift: dict[str, dict[str, Any]] = {
            "cgt-drift-updated-ms": {"updated_at": int(time.time() * 1000)},
            "cgt-drift-seed-text": {"seed": "42"},
            "cgt-drift-duration-text": {"duration": "5"},
            "cgt-drift-created-iso": {"created_at": iso(created)},
        }
        rows = self.archive(situation(dialect="ark"), created, drift)
        assert rows["cgt-drift-duration-text"]["actual_duration"] == 5.0


# --- 4. a 200 that is not a video -----------------------------------------------------------------

NOT_VIDEOS = {
    "empty": {"body": "", "content_type": "video/mp4"},
    "html": {
        "body": "<html><body>This link has expired.</body></html>",
        "content_type": "text/html; charset=utf-8",
    },
    "json": {"body": '{"error": {"code": "LinkExpired"}}', "content_type": "application/json"},
    "xml": {
        "body": "<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>",
        "content_type": "application/xml",
    },
}


class TestNotAVideo:
    """A video host answering 200 with an empty body or an error page: nothing archived from it,
    the real video archived once the host serves it."""

    @pytest.mark.parametrize("dialect", ["reseller", "ark"])
    def test_bodies_that_are_not_videos(
        self, situation: Callable[..., Situation], dialect: str
    ) -> None:
        s = situation(dialect=dialect)
        prefix = "video_" if dialect == "reseller" else "cgt-"
        ids = []
        for kind, body in NOT_VIDEOS.items():
            task_id = f"{prefix}not_a_video_{kind}"
            ids.append(task_id)
            s.sim.add_task(task_id, created=time.time() - 30, ready_seconds=1, size=SIZE)
            # Three in a row send the daemon back for a fresh link; the empty one gets two.
            times = 2 if kind == "empty" else 3
            s.sim.add_fault(task_id, on="download", times=times, **body)
            s.feeder.insert(task_id)
        s.start()
        rows = s.settle(ids)
        s.assert_archived_intact(rows, ids)
        for task_id in ids:
            assert s.sim.stats.downloads_completed[task_id] == 1
        log = s.daemons[-1].log()
        assert log.count('"event": "video_not_a_video"') == 11
        assert "sig=" not in log and "X-Tos-Signature" not in log  # never the link
        s.stop()


# --- 2. an HTML 404 for every path ---------------------------------------------------------------


class TestHtml404Outage:
    """The gateway answers an HTML 404 to every path until the daemon has called it an outage:
    no task is lost. (Ended by the test, not by a clock: a busy machine polls less in a window.)"""

    OUTAGE_SECONDS = 15.0  # the tasks finish this long and 10 s more after their creation

    def test_no_task_is_lost(self, situation: Callable[..., Situation]) -> None:
        s = situation(dialect="reseller")
        seen = [f"video_seen_{i:02}" for i in range(10)]
        new = [f"video_new_{i:02}" for i in range(15)]
        ready = self.OUTAGE_SECONDS + 10
        for task_id in seen:
            s.sim.add_task(task_id, ready_seconds=ready, size=SIZE)
            s.feeder.insert(task_id)
        daemon = s.start()
        wait_for(
            lambda: all(r["provider_status"] for r in s.feeder.rows().values()),
            timeout=60,
            what="every task seen once",
        )
        s.sim.add_fault(
            "*",
            on="poll",
            status=404,
            body="<html><head><title>404 Not Found</title></head><body>nginx</body></html>",
            content_type="text/html",
            until=time.time() + 600,
        )
        for task_id in new:
            s.sim.add_task(task_id, ready_seconds=ready, size=SIZE)
            s.feeder.insert(task_id)
        wait_for(
            lambda: '"event": "provider_outage"' in daemon.log(),
            timeout=120,
            what="the daemon to call it an outage",
        )
        s.sim.end_faults("*")
        rows = s.settle(seen + new)
        s.assert_archived_intact(rows, seen + new)
        s.stop()


# --- 1. the deadline orders work, it does not end it -------------------------------------------


class TestPastTheDeadline:
    """Tasks the provider still serves after their nominal deadline (created + 1 day)."""

    def test_finished_before_it_and_polled_after(self, situation: Callable[..., Situation]) -> None:
        s = situation(dialect="reseller", retention_seconds=2 * DAY)
        now = time.time()
        done_long_ago = [f"video_late_done_{i}" for i in range(3)]
        for task_id in done_long_ago:
            s.sim.add_task(task_id, created=now - DAY - 60, ready_seconds=120, size=SIZE)
        # Still processing at the deadline; done 20 s after it.
        finishing = [f"video_late_finishing_{i}" for i in range(3)]
        for task_id in finishing:
            s.sim.add_task(task_id, created=now - DAY + 5, ready_seconds=DAY + 15, size=SIZE)
        ids = done_long_ago + finishing
        for task_id in ids:
            s.feeder.insert(task_id)
        s.start()
        rows = s.settle(ids)
        s.assert_archived_intact(rows, ids)
        for task_id in finishing:
            completed = dt.datetime.fromisoformat(rows[task_id]["completed_at"])
            expires = dt.datetime.fromisoformat(rows[task_id]["expires_at"])
            assert completed > expires  # archived after its nominal deadline
        s.stop()

    def test_an_ark_flex_task_queued_past_a_day(self, situation: Callable[..., Situation]) -> None:
        s = situation(dialect="ark", retention_seconds=7 * DAY)
        now = time.time()
        ids = [f"cgt-flex-queued-{i}" for i in range(6)]
        for task_id in ids:
            s.sim.add_task(
                task_id,
                created=now - DAY - 3600,
                queued_seconds=DAY + 3600 + 5,
                ready_seconds=DAY + 3600 + 10,
                size=SIZE,
            )
            s.feeder.insert(task_id, mode="flex")
        s.start()
        rows = s.settle(ids)
        s.assert_archived_intact(rows, ids)
        s.stop()


# --- 6. our own refusals are not verdicts --------------------------------------------------------


class TestRaisedSizeLimit:
    """SEEDANCE_MAX_VIDEO_BYTES too low: the videos wait; raised and restarted, all are archived
    with no row touched by hand."""

    def test_archived_after_a_restart(self, situation: Callable[..., Situation]) -> None:
        s = situation(dialect="reseller")
        ids = [f"video_large_{i}" for i in range(4)]
        for task_id in ids:
            s.sim.add_task(task_id, created=time.time() - 30, ready_seconds=1, size=300_000)
            s.feeder.insert(task_id)
        s.start(max_video_bytes="100000")

        def all_waiting() -> bool:
            rows = s.feeder.rows()
            return all(
                rows[i]["state"] in TERMINAL
                or (rows[i]["error"] or "").startswith("waiting on a setting")
                for i in ids
            )

        wait_for(all_waiting, timeout=60, what="every large video refused once")
        rows = s.feeder.rows()
        refused = {i: (rows[i]["state"], rows[i]["error"]) for i in ids}
        s.stop()
        s.start(max_video_bytes="1000000")
        rows = s.settle(ids, seconds=60)
        assert all(state == "downloading" for state, _ in refused.values()), refused
        assert all("SEEDANCE_MAX_VIDEO_BYTES" in (error or "") for _, error in refused.values())
        s.assert_archived_intact(rows, ids)
        s.stop()


# --- 5. answers bounded after decoding -----------------------------------------------------------


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


class TestGzipBombs:
    """Poll answers of half a MiB of gzip that inflate to 512 MiB: refused as too large, at no
    cost in memory; the videos are archived once the answers are sane again."""

    BOMBS = 30
    # An idle daemon peaks near 100 MiB here; one bomb decoded would add 512.
    PEAK_MIB = 250.0

    def test_refused_at_no_cost_in_memory(self, situation: Callable[..., Situation]) -> None:
        s = situation(dialect="reseller")
        ids = [f"video_bombed_{i}" for i in range(5)]
        for task_id in ids:
            s.sim.add_task(task_id, created=time.time() - 30, ready_seconds=1, size=SIZE)
        s.sim.add_fault("*", on="poll", gzip_bomb=512 * 1024 * 1024, times=self.BOMBS)
        daemon = s.start()
        for task_id in ids:
            s.feeder.insert(task_id)
        rows = s.settle(ids)
        peak = peak_rss_mib(daemon.process.pid)
        s._record("peak_rss_mib", round(peak, 1))
        assert not s.sim.faults["*"], "every bomb was sent"
        s.assert_archived_intact(rows, ids)
        assert peak < self.PEAK_MIB
        assert "answer refused: the answer is longer than 1048576 bytes once decoded" in (
            daemon.log()
        )
        s.stop()
