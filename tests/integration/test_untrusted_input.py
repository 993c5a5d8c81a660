"""Hostile rows, unsafe links and poisoned answers: nothing let in, nothing written where it should
not be, and every other task archived."""

from __future__ import annotations

import pathlib
import time
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from seedance_archiver import policy, simulator
from seedance_archiver.archive import folder
from seedance_archiver.providers import http as provider_http

from tests.helpers import (
    FOREVER,
    SMALL,
    Launcher,
    assert_archived_intact,
    insert,
    leftovers,
    no_crashes,
)

HOSTILE_IDS = (
    "../../etc/passwd",
    "",
    "x" * 5000,
    "vidéo_ü",
    "a b",
    "a\nb",
    "x'; DROP TABLE video_tasks;--",
    "a?b#c",
    "a%2Fb",
    "a/b",
    ".hidden",
)


def _tree(root: pathlib.Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


class TestHostileTaskIds:
    """Ids that cannot be a provider's are refused before any request or file."""

    @pytest.mark.parametrize(
        "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
    )
    async def test_each_is_rejected_and_the_daemon_keeps_working(
        self,
        request: pytest.FixtureRequest,
        sim: simulator.SimulatorThread,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
        backend: str,
    ) -> None:
        """Rejected with a reason, never sent to the provider, never a path; the valid one archived."""
        db_url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
        sim.simulator.add_task("video_fine", ready_seconds=0.5, size=SMALL)
        launch = Launcher(sim, db_url, tmp_path, monkeypatch)
        before = _tree(tmp_path)
        async with launch() as d:
            with d.rows.engine.begin() as conn:
                for tid in (*HOSTILE_IDS, "video_fine"):
                    conn.execute(
                        sa.text("INSERT INTO video_tasks (task_id) VALUES (:id)"), {"id": tid}
                    )
            for tid in HOSTILE_IDS:
                row = await d.until_state(tid, "rejected", 10)
                assert row.error is not None and row.error.startswith("invalid task id"), row.error
            await d.until_state("video_fine", "archived")
        assert set(sim.simulator.stats.polls) - {provider_http.KEY_CHECK_TASK_ID} == {"video_fine"}
        assert set(sim.simulator.stats.downloads_started) == {"video_fine"}
        assert_archived_intact(d, "video_fine", SMALL)
        # Nothing written outside the archive folder but the database's own files, and nothing in
        # the folder but the valid video and its sidecar.
        new = _tree(tmp_path) - before
        outside = {p for p in new if not p.startswith("archive")}
        assert outside <= {"tasks.db", "tasks.db-wal", "tasks.db-shm", "tasks.db.lock"}
        assert _tree(d.archive_dir) <= {"video_fine.mp4", "video_fine.json", folder.INCOMING_DIR}
        assert not (d.archive_dir / "../../etc/passwd.mp4").exists()
        assert d.rows.counts()["rejected"] == len(HOSTILE_IDS)  # and the table is still there


class TestVideoUrlSafety:
    """Links to private hosts, other schemes, or redirects to them are refused, never fetched."""

    @pytest.mark.parametrize(
        ("settings", "redirect", "names"),
        [
            (
                {"allowed_video_url_schemes": "http,https", "allow_private_video_hosts": False},
                None,
                "SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS",
            ),
            ({"allowed_video_url_schemes": "https"}, None, "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES"),
            ({}, "ftp://127.0.0.1/x", "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES"),
            ({}, "file:///etc/passwd", "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES"),
        ],
        ids=["private-host", "http-not-allowed", "redirect-to-ftp", "redirect-to-file"],
    )
    async def test_unsafe_link_waits_on_the_setting_and_nothing_is_downloaded(
        self,
        launch: Launcher,
        sim: simulator.SimulatorThread,
        settings: dict[str, Any],
        redirect: str | None,
        names: str,
    ) -> None:
        """The task waits, `downloading`, naming the setting; no byte of any video is fetched or
        stored. With the setting changed and a restart, it is archived."""
        tid = "video_unsafe"
        sim.simulator.add_task(tid, created=time.time() - 60, ready_seconds=1, size=SMALL)
        if redirect is not None:
            sim.simulator.add_fault(tid, on="download", redirect=redirect, times=FOREVER)
        async with launch(**settings) as d:
            insert(d.rows, tid)
            await d.until(lambda: d.row(tid).attempts >= 2, "two refusals")
            row = d.row(tid)
        assert row.state == "downloading"
        assert row.error is not None and row.error.startswith(policy.WAITING_ON_SETTING)
        assert names in row.error, row.error
        if redirect is not None:
            scheme = redirect.split(":", 1)[0]
            assert repr(scheme) in row.error
            # The redirect was served on each try and never followed.
            assert sim.simulator.faults[tid][0]["times"] <= FOREVER - 2
        assert sim.simulator.stats.downloads_started[tid] == 0
        assert not (d.archive_dir / f"{tid}.mp4").exists()
        assert leftovers(d.archive_dir) == []
        if redirect is None:
            async with launch() as d:  # the settings these tests otherwise run with
                await d.until_state(tid, "archived")
            assert_archived_intact(d, tid, SMALL)


HUGE = 200 * 1024


class TestPoisonedAnswers:
    """Answers carrying NUL bytes, lone surrogates or a 200 KB model name poison nothing."""

    POISONED: ClassVar[dict[str, dict[str, Any]]] = {
        "video_nul_error": {"outcome": "failed", "error": "content\x00policy violation"},
        "video_surrogate_error": {"outcome": "failed", "error": "refused \ud800 by policy"},
        "video_huge_model": {"outcome": "failed", "model": "m" * HUGE, "error": "e" * HUGE},
        "video_nul_model": {"model": "seedance\x00_1_5_pro_720p"},
        "video_surrogate_model": {"model": "seedance_\udfff_720p"},
    }
    GOOD = ("video_good_1", "video_good_2", "video_good_3")

    async def test_every_other_task_is_archived(
        self, launch_db: Launcher, sim: simulator.SimulatorThread
    ) -> None:
        for tid, fields in self.POISONED.items():
            sim.simulator.add_task(tid, ready_seconds=0.5, size=SMALL, **fields)
        for tid in self.GOOD:
            sim.simulator.add_task(tid, ready_seconds=0.5, size=SMALL)
        async with launch_db() as d:
            for tid in (*self.POISONED, *self.GOOD):
                insert(d.rows, tid)
            for tid in self.GOOD:
                await d.until_state(tid, "archived")
            for tid, fields in self.POISONED.items():
                state = "failed" if fields.get("outcome") == "failed" else "archived"
                await d.until_state(tid, state)
            no_crashes(d)
            assert d.events("outcome_not_saved") == []
        for tid in self.GOOD:
            assert_archived_intact(d, tid, SMALL)
        for tid, fields in self.POISONED.items():
            row = d.row(tid)
            for text in (row.error, row.model):
                if text is not None:
                    assert "\x00" not in text
                    text.encode("utf-8")  # storable: no lone surrogate
                    assert len(text) < 10_000
            if fields.get("outcome") == "failed":
                assert row.error, tid  # a reason a person can read
                assert row.error.startswith(("content", "refused", "eee")), row.error
            else:
                assert_archived_intact(d, tid, SMALL)
        assert "truncated" in (d.row("video_huge_model").model or "")
