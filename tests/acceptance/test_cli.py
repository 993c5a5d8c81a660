"""The operator's commands, run as the installed CLI: add, status, list, retry, migrate, demo."""

from __future__ import annotations

import json
import os
import pathlib
import sqlite3
import subprocess
import sys

from tests.helpers import CLI, base_env, cli


def _env(tmp_path: pathlib.Path) -> dict[str, str]:
    env = base_env("http://127.0.0.1:9", f"sqlite:///{tmp_path}/tasks.db", f"file://{tmp_path}/a")
    cli(env, "migrate")
    return env


class TestOperatorCommands:
    """add / status / list / retry against a real SQLite file."""

    def test_add_then_list_shows_a_table_and_json(self, tmp_path: pathlib.Path) -> None:
        env = _env(tmp_path)
        assert "added" in cli(env, "add", "video_one", "--mode", "draft").stdout
        assert "already tracked" in cli(env, "add", "video_one").stdout
        cli(env, "add", "video_two")
        table = cli(env, "list").stdout.splitlines()
        assert table[0].split()[:3] == ["task_id", "mode", "state"]
        assert any(line.split()[:3] == ["video_one", "draft", "pending"] for line in table)
        rows = json.loads(cli(env, "list", "--json").stdout)
        assert {(r["task_id"], r["mode"], r["state"]) for r in rows} == {
            ("video_one", "draft", "pending"),
            ("video_two", "standard", "pending"),
        }
        assert json.loads(cli(env, "list", "--state", "archived", "--json").stdout) == []

    def test_add_refuses_a_bad_id_and_a_bad_mode(self, tmp_path: pathlib.Path) -> None:
        env = _env(tmp_path)
        bad_id = cli(env, "add", "../../etc/passwd", check=False)
        assert bad_id.returncode == 2 and "invalid task id" in bad_id.stderr
        bad_mode = cli(env, "add", "video_x", "--mode", "turbo", check=False)
        assert bad_mode.returncode == 2 and "turbo" in bad_mode.stderr
        assert json.loads(cli(env, "list", "--json").stdout) == []

    def test_status_summarises_and_details(self, tmp_path: pathlib.Path) -> None:
        env = _env(tmp_path)
        cli(env, "add", "video_one")
        summary = json.loads(cli(env, "status", "--json").stdout)
        assert summary["counts"]["pending"] == 1 and summary["total"] == 1
        assert "pending" in cli(env, "status").stdout
        detail = json.loads(cli(env, "status", "video_one", "--json").stdout)
        assert detail["task_id"] == "video_one" and detail["mode"] == "standard"
        missing = cli(env, "status", "video_nope", check=False)
        assert missing.returncode == 1 and "no such task" in missing.stderr

    def test_retry_puts_a_finished_task_back_keeping_its_history(
        self, tmp_path: pathlib.Path
    ) -> None:
        env = _env(tmp_path)
        with sqlite3.connect(tmp_path / "tasks.db") as conn:
            conn.execute(
                "INSERT INTO video_tasks (task_id, state, polls, error) "
                "VALUES ('video_done', 'expired', 7, 'deadline passed')"
            )
        assert cli(env, "retry", "video_done").returncode == 0
        detail = json.loads(cli(env, "status", "video_done", "--json").stdout)
        assert detail["state"] == "polling"
        assert detail["polls"] == 7 and detail["error"] == "deadline passed"
        assert cli(env, "retry", "video_nope", check=False).returncode == 1

    def test_retry_refuses_an_archived_task_unless_forced(self, tmp_path: pathlib.Path) -> None:
        env = _env(tmp_path)
        with sqlite3.connect(tmp_path / "tasks.db") as conn:
            conn.execute(
                "INSERT INTO video_tasks (task_id, state, archive_uri) "
                "VALUES ('video_safe', 'archived', 'file:///a/video_safe.mp4')"
            )
        refused = cli(env, "retry", "video_safe", check=False)
        assert refused.returncode == 1 and "--force" in refused.stderr
        assert json.loads(cli(env, "status", "video_safe", "--json").stdout)["state"] == "archived"
        assert cli(env, "retry", "video_safe", "--force").returncode == 0
        assert json.loads(cli(env, "status", "video_safe", "--json").stdout)["state"] == "polling"

    def test_retry_never_clears_a_live_lease(self, tmp_path: pathlib.Path) -> None:
        env = _env(tmp_path)
        with sqlite3.connect(tmp_path / "tasks.db") as conn:
            conn.execute(
                "INSERT INTO video_tasks (task_id, state, lease_owner, lease_expires_at) "
                "VALUES ('video_busy', 'downloading', 'host:1:abc', '2999-01-01 00:00:00.000000')"
            )
        for args in (("retry", "video_busy"), ("retry", "video_busy", "--force")):
            refused = cli(env, *args, check=False)
            assert refused.returncode == 1 and "running daemon" in refused.stderr
        row = json.loads(cli(env, "status", "video_busy", "--json").stdout)
        assert (row["state"], row["lease_owner"]) == ("downloading", "host:1:abc")

    def test_a_missing_table_says_to_migrate(self, tmp_path: pathlib.Path) -> None:
        env = base_env("http://127.0.0.1:9", f"sqlite:///{tmp_path}/new.db", f"file://{tmp_path}")
        result = cli(env, "run", check=False)
        assert result.returncode == 1
        assert "seedance-archiver migrate" in result.stderr
        assert "heartbeat_not_removed" not in result.stderr  # no noise before the reason


SIGNATURE = "fake-signature-0123456789abcdef"
SIGNED_URL = (
    f"https://cdn.example/v/video_signed.mp4?X-Amz-Signature={SIGNATURE}&X-Amz-Expires=3600"
)


class TestSignedLinks:
    """status and list never print a signed link's query string unless --show-secrets is given."""

    def _env_with_signed_task(self, tmp_path: pathlib.Path) -> dict[str, str]:
        env = _env(tmp_path)
        with sqlite3.connect(tmp_path / "tasks.db") as conn:
            conn.execute(
                "INSERT INTO video_tasks (task_id, state, video_url, error) VALUES "
                "('video_signed', 'downloading', ?, ?)",
                (SIGNED_URL, f"download of {SIGNED_URL} failed: 503"),
            )
        return env

    def test_hidden_by_default(self, tmp_path: pathlib.Path) -> None:
        env = self._env_with_signed_task(tmp_path)
        for args in (
            ("status", "video_signed"),
            ("status", "video_signed", "--json"),
            ("list",),
            ("list", "--json"),
        ):
            result = cli(env, *args)
            assert SIGNATURE not in result.stdout + result.stderr, args
            assert "video_signed" in result.stdout, args
        detail = json.loads(cli(env, "status", "video_signed", "--json").stdout)
        assert detail["video_url"] == "https://cdn.example/v/video_signed.mp4?<redacted>"
        [row] = json.loads(cli(env, "list", "--json").stdout)
        assert row["video_url"] == "https://cdn.example/v/video_signed.mp4?<redacted>"

    def test_shown_when_asked(self, tmp_path: pathlib.Path) -> None:
        env = self._env_with_signed_task(tmp_path)
        detail = json.loads(cli(env, "status", "video_signed", "--json", "--show-secrets").stdout)
        assert detail["video_url"] == SIGNED_URL
        [row] = json.loads(cli(env, "list", "--json", "--show-secrets").stdout)
        assert row["video_url"] == SIGNED_URL
        assert SIGNATURE in cli(env, "status", "video_signed", "--show-secrets").stdout


class TestDemo:
    """`seedance-archiver demo` runs the whole pipeline and verifies it."""

    def test_demo_archives_every_completed_video(self, tmp_path: pathlib.Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE_")}
        result = subprocess.run(
            [str(CLI), "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "demo OK: 5 of 5 completed videos archived" in result.stdout
        assert "the warnings they log are injected and expected" in result.stdout
        archived = sorted(p.name for p in (tmp_path / "archive").glob("*.mp4"))
        assert len(archived) == 5
        assert (tmp_path / "seedance-archiver.db").exists()


class TestAlembicDirectly:
    """`alembic upgrade head` with the root alembic.ini does what `seedance-archiver migrate` does."""

    def test_root_alembic_ini_upgrades_to_head(self, tmp_path: pathlib.Path) -> None:
        root = pathlib.Path(__file__).parents[2]
        alembic = pathlib.Path(sys.executable).parent / "alembic"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE_")}
        env["SEEDANCE_DATABASE_URL"] = f"sqlite:///{tmp_path}/by-alembic.db"
        result = subprocess.run(
            [str(alembic), "-c", str(root / "alembic.ini"), "upgrade", "head"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        with sqlite3.connect(tmp_path / "by-alembic.db") as conn:
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            version = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        assert {"video_tasks", "archiver_heartbeats"} <= tables
        heads = subprocess.run(
            [str(alembic), "-c", str(root / "alembic.ini"), "heads"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert version in heads.stdout
