"""The archived object describes itself, and `url` hands out a link that downloads it (moto)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import pathlib
import sqlite3
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from seedance_archiver import archive, cli, models, simulator
from seedance_archiver.archive import folder, s3

from tests.helpers import MIB, expected_sha, new_id, video

SMALL = 100 * 1024
LARGE = 20 * MIB + 12_345  # several parts: two of 8 MiB (PART_BYTES) and a bit

CREATED = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _logs_back_to_default() -> Iterator[None]:
    """cli.main configures structlog onto pytest's captured stream; undo it for later tests."""
    yield
    structlog.reset_defaults()


def task(task_id: str) -> models.Task:
    return models.Task(
        task_id=task_id,
        model="seedance_1_5_pro_720p",
        actual_duration=5.0,
        provider_created_at=CREATED,
    )


class TestMetadata:
    """S3: Content-Type and user metadata; folder: a JSON sidecar committed after the video."""

    @pytest.mark.parametrize("size", [SMALL, LARGE], ids=["put", "multipart"])
    async def test_s3_object_carries_its_description(
        self, s3_bucket: str, s3_client: Any, size: int
    ) -> None:
        task_id = new_id()
        store = s3.S3Archive(s3_bucket, "v")
        await store.put(task_id, video(task_id, size), size, archive.describe(task(task_id)))
        head = s3_client.head_object(Bucket=s3_bucket, Key=f"v/{task_id}.mp4")
        assert head["ContentType"] == "video/mp4"
        meta = head["Metadata"]
        assert meta["task-id"] == task_id and meta["model"] == "seedance_1_5_pro_720p"
        assert meta["actual-duration"] == "5"
        assert meta["provider-created"] == CREATED.isoformat()
        if size == SMALL:  # a single PUT knows its SHA-256 before it commits
            assert meta["sha256"] == expected_sha(task_id, size)

    async def test_folder_gets_a_sidecar(self, tmp_path: pathlib.Path) -> None:
        task_id = new_id()
        store = folder.FileArchive(tmp_path)
        await store.put(task_id, video(task_id, SMALL), SMALL, archive.describe(task(task_id)))
        sidecar = json.loads((tmp_path / f"{task_id}.json").read_text())
        assert sidecar["task-id"] == task_id
        assert sidecar["sha256"] == expected_sha(task_id, SMALL)
        assert sidecar["bytes"] == str(SMALL)
        assert list((tmp_path / folder.INCOMING_DIR).iterdir()) == []  # no temp file left

    async def test_a_left_over_sidecar_temp_is_cleaned_up_with_the_task(
        self, tmp_path: pathlib.Path
    ) -> None:
        store = folder.FileArchive(tmp_path)
        (tmp_path / folder.INCOMING_DIR).mkdir()
        (tmp_path / folder.INCOMING_DIR / "video_k.0123abcd-json.part").write_text("{")  # killed
        assert await store.incomplete() == {"video_k"}
        assert await store.discard_incomplete("video_k") == 1

    def test_non_ascii_values_are_encoded(self) -> None:
        described = archive.describe(models.Task(task_id="video_a", model="模型"))
        assert described["model"].isascii()


class TestUrlCommand:
    """`seedance-archiver url ID` prints a presigned link that downloads the exact bytes."""

    def test_presigned_link_downloads_the_bytes(
        self,
        s3_bucket: str,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        task_id = new_id()
        store = s3.S3Archive(s3_bucket, "v")
        stored = asyncio.run(store.put(task_id, video(task_id, SMALL), SMALL))
        db = tmp_path / "tasks.db"
        monkeypatch.setenv("SEEDANCE_DATABASE_URL", f"sqlite:///{db}")
        assert cli.main(["migrate"]) == 0
        with sqlite3.connect(db) as conn:
            conn.execute(
                "INSERT INTO video_tasks (task_id, state, archive_uri) VALUES (?, 'archived', ?)",
                (task_id, stored.uri),
            )
        capsys.readouterr()
        assert cli.main(["url", task_id, "--expires", "60"]) == 0
        link = capsys.readouterr().out.strip()
        # SigV4, which R2 and the other S3-compatible stores require (not SigV2's Signature=).
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
        assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
        assert query["X-Amz-Expires"] == ["60"]
        assert "Signature" not in query and "AWSAccessKeyId" not in query
        with urllib.request.urlopen(link, timeout=10) as response:  # loopback: moto
            data = response.read()
        assert data == b"".join(simulator.video_chunks(task_id, SMALL))

    def test_folder_archive_prints_the_path_and_unknown_fails(
        self,
        tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        db = tmp_path / "tasks.db"
        monkeypatch.setenv("SEEDANCE_DATABASE_URL", f"sqlite:///{db}")
        assert cli.main(["migrate"]) == 0
        path = tmp_path / "a b" / "video_a.mp4"
        with sqlite3.connect(db) as conn:
            conn.execute(
                "INSERT INTO video_tasks (task_id, state, archive_uri) VALUES ('video_a', "
                "'archived', ?), ('video_b', 'polling', NULL)",
                (path.as_uri(),),
            )
        capsys.readouterr()
        assert cli.main(["url", "video_a"]) == 0
        assert capsys.readouterr().out.strip() == str(path)
        assert cli.main(["url", "video_b"]) == 1
        assert "not archived" in capsys.readouterr().err
        assert cli.main(["url", "video_a", "--expires", "0"]) == 2
