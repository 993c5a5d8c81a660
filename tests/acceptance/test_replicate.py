"""Seedance on Replicate, run as a user runs it: the installed command against the simulator in
Replicate's dialect, where a prediction's data is removed an hour after it finished."""

from __future__ import annotations

import base64
import datetime as dt
import pathlib
import re
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from seedance_archiver.providers import replicate

from tests.helpers import (
    SqliteFeeder,
    base_env,
    cli,
    expected_sha,
    free_port,
    serving,
    wait_for,
)

SUCCEEDED = "succeeded0000000000000000a"
FAILED = "failed000000000000000000aa"
CANCELED = "canceled0000000000000000aa"
ABORTED = "aborted00000000000000000aa"
STARTING = "starting0000000000000000aa"
PROCESSING = "processing00000000000000aa"
REMOVED = "removed00000000000000000aa"  # finished two hours ago: its data is gone
NOT_REPLICATES = "video_abc123def456"  # the reseller's kind of id
SIZE = 512 * 1024
NEVER = 1e9


def _utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def _replicate_env(sim: Any, db: pathlib.Path, tmp_path: pathlib.Path) -> dict[str, str]:
    return {
        **base_env(sim.url, f"sqlite:///{db}", f"file://{tmp_path}/archive"),
        "SEEDANCE_PROVIDER": "replicate",
    }


class TestEveryStatus:
    """Each of Replicate's statuses ends where ours says, and a finished video is archived inside
    its hour; a prediction whose data is gone before the daemon saw it ends ``expired``."""

    def test_each_prediction_ends_as_replicate_said(
        self, tmp_path: pathlib.Path, start_daemon: Any
    ) -> None:
        db = tmp_path / "tasks.db"
        feeder = SqliteFeeder(db)
        with serving("replicate") as server:
            sim = server.simulator
            sim.add_task(SUCCEEDED, queued_seconds=0.3, ready_seconds=1.5, size=SIZE)
            for task_id, outcome in ((FAILED, "failed"), (CANCELED, "cancelled")):
                sim.add_task(task_id, outcome=outcome, queued_seconds=0.2, ready_seconds=0.5)
            sim.add_task(ABORTED, outcome="aborted", queued_seconds=0.5, ready_seconds=0.5)
            sim.add_task(STARTING, queued_seconds=NEVER, ready_seconds=NEVER)
            sim.add_task(PROCESSING, queued_seconds=0, ready_seconds=NEVER)
            sim.add_task(REMOVED, created=time.time() - 7200, queued_seconds=5, ready_seconds=90)
            env = _replicate_env(server, db, tmp_path)
            cli(env, "migrate")
            ids = [SUCCEEDED, FAILED, CANCELED, ABORTED, STARTING, PROCESSING, REMOVED]
            for task_id in [*ids, NOT_REPLICATES]:
                feeder.insert(task_id)
            daemon = start_daemon(env)
            ended = {SUCCEEDED, FAILED, CANCELED, ABORTED, REMOVED, NOT_REPLICATES}
            wait_for(
                lambda: (
                    all(
                        feeder.rows()[i]["state"] in ("archived", "failed", "cancelled", "expired")
                        or (i == NOT_REPLICATES and feeder.rows()[i]["state"] == "rejected")
                        for i in ended
                    )
                    and feeder.rows()[STARTING]["provider_status"] == "queued"
                    and feeder.rows()[PROCESSING]["provider_status"] == "processing"
                ),
                timeout=60,
                what="every prediction where Replicate's answer puts it",
            )
            assert daemon.terminate() == 0, daemon.log()[-3000:]
            completed_at = _utc(
                sim.replicate_body(sim.tasks[SUCCEEDED], time.time())["completed_at"].rstrip("Z")
            )

        rows = feeder.rows()
        states = {i: (rows[i]["state"], rows[i]["error"]) for i in [*ids, NOT_REPLICATES]}
        assert states == {
            SUCCEEDED: ("archived", None),
            FAILED: ("failed", "content policy violation"),
            CANCELED: ("cancelled", "cancelled at the provider"),
            ABORTED: ("failed", replicate.ABORTED_REASON),
            STARTING: ("polling", None),
            PROCESSING: ("polling", None),
            REMOVED: ("expired", replicate.REMOVED_REASON),
            NOT_REPLICATES: ("rejected", replicate.ID_RULE),
        }
        # Nobody asked Replicate about an id it can never have issued.
        assert NOT_REPLICATES not in sim.stats.polls
        archived = rows[SUCCEEDED]
        assert archived["archive_sha256"] == expected_sha(SUCCEEDED, SIZE)
        assert archived["archive_bytes"] == SIZE
        # The deadline is Replicate's own fact: an hour after the prediction finished; the video
        # was archived before it, with the better part of the hour to spare.
        deadline = _utc(archived["expires_at"])
        assert abs(deadline - (completed_at + replicate.DATA_LIFETIME)) < dt.timedelta(seconds=1)
        assert _utc(archived["archived_at"]) < deadline - 3 * replicate.DATA_LIFETIME / 4
        assert rows[REMOVED]["archive_uri"] is None


def _metric(port: int, outcome: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(
        rf'^seedance_callbacks_total{{outcome="{outcome}"}} (\S+)$', text, re.MULTILINE
    )
    return float(found.group(1)) if found else 0.0


LOW = 10  # seconds: the standard mode's shortest interval in TestSignedWebhooks


class TestSignedWebhooks:
    """A webhook signed with the account's secret hastens a poll; a badly signed one is refused and
    changes nothing."""

    TASK_ID = "webhook000000000000000000a"

    def test_a_signed_webhook_hastens_the_poll_and_a_forged_one_changes_nothing(
        self, tmp_path: pathlib.Path, start_daemon: Any
    ) -> None:
        port = free_port()
        db = tmp_path / "tasks.db"
        feeder = SqliteFeeder(db)
        with serving("replicate") as server:
            sim = server.simulator
            env = {
                **_replicate_env(server, db, tmp_path),
                "SEEDANCE_CALLBACKS": "true",
                "SEEDANCE_REPLICATE_WEBHOOK_SECRET": sim.webhook_secret,
                "SEEDANCE_HTTP_PORT": str(port),
                "SEEDANCE_POLL_STANDARD": f"{LOW}-600",
            }
            cli(env, "migrate")
            daemon = start_daemon(env)
            wait_for(lambda: "http_listening" in daemon.log(), timeout=30, what="the HTTP port")
            sim.add_task(self.TASK_ID, queued_seconds=0.3, ready_seconds=3.0)
            feeder.insert(self.TASK_ID)
            wait_for(
                lambda: feeder.rows()[self.TASK_ID]["polls"] == 1, timeout=30, what="intake poll"
            )
            intake = feeder.rows()[self.TASK_ID]
            wait_for(
                lambda: sim.tasks[self.TASK_ID].status(time.time()) == "completed",
                timeout=30,
                what="the prediction to finish at Replicate",
            )
            url = f"http://127.0.0.1:{port}/callbacks/replicate"
            forged = "whsec_" + base64.b64encode(b"not the account's secret 000000").decode()
            with pytest.raises(urllib.error.HTTPError) as refused:
                sim.send_callback(self.TASK_ID, url, secret=forged)
            assert refused.value.code == 404
            unsigned = urllib.request.Request(
                url, data=f'{{"id": "{self.TASK_ID}"}}'.encode(), method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(unsigned, timeout=10)
            assert refused.value.code == 404
            wait_for(lambda: _metric(port, "refused") == 2.0, timeout=20, what="both counted")
            # Nothing moved: the row is due when its own cadence said.
            assert feeder.rows()[self.TASK_ID] == intake

            assert sim.send_callback(self.TASK_ID, url) == 204
            hastened = wait_for(
                lambda: (
                    (due := feeder.rows()[self.TASK_ID]["next_attempt_at"])
                    != intake["next_attempt_at"]
                    and due
                ),
                timeout=20,
                what="the row made due sooner",
            )
            assert _utc(str(hastened)) == _utc(intake["last_polled_at"]) + dt.timedelta(seconds=LOW)
            wait_for(
                lambda: feeder.rows()[self.TASK_ID]["state"] == "archived",
                timeout=LOW + 30,
                what="the archive after the webhook",
            )
            assert _metric(port, "hastened") == 1.0
            assert daemon.terminate() == 0, daemon.log()[-3000:]
        row = feeder.rows()[self.TASK_ID]
        assert row["polls"] == 2
        assert _utc(row["last_polled_at"]) >= _utc(str(hastened))
