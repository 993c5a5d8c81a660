"""Two providers: daemons of each share one table without touching each other's rows, and Ark's
callbacks make a finished task's archive come at once rather than at the next poll."""

from __future__ import annotations

import datetime as dt
import pathlib
import re
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from seedance_archiver import providers

from tests.helpers import PostgresFeeder, SqliteFeeder, base_env, cli, free_port, serving, wait_for

RESELLER_IDS = ["video_share_1", "video_share_2", "video_share_3"]
ARK_IDS = ["cgt-20261202-share-1", "cgt-20261202-share-2", "cgt-20261202-share-3"]
KEY_CHECKS = {providers.http.KEY_CHECK_TASK_ID}


def _archived(rows: dict[str, dict[str, Any]], ids: list[str]) -> bool:
    return all(i in rows and rows[i]["state"] == "archived" for i in ids)


@pytest.mark.postgres
class TestTwoProvidersShareOneTable:
    """A reseller daemon and an Ark daemon on one PostgreSQL table, each with its own rows."""

    def test_each_daemon_works_only_its_own_providers_rows(
        self, pg_url: str, tmp_path: pathlib.Path, start_daemon: Any
    ) -> None:
        with serving("reseller") as reseller_sim, serving("ark") as ark_sim:
            for sim, ids in ((reseller_sim, RESELLER_IDS), (ark_sim, ARK_IDS)):
                for task_id in ids:
                    sim.simulator.add_task(task_id, queued_seconds=0.3, ready_seconds=1.0)
            feeder = PostgresFeeder(pg_url)
            archive = f"file://{tmp_path}/archive"
            reseller_env = {
                **base_env(reseller_sim.url, pg_url, archive),
                "SEEDANCE_PROVIDER": "reseller",
            }
            ark_env = {**base_env(ark_sim.url, pg_url, archive), "SEEDANCE_PROVIDER": "ark"}
            cli(reseller_env, "migrate")
            # The feeder routes each row to its provider's daemon.
            for task_id, name in [(i, "reseller") for i in RESELLER_IDS] + [
                (i, "ark") for i in ARK_IDS
            ]:
                feeder.insert_for(task_id, name)
            reseller_daemon = start_daemon(reseller_env)
            ark_daemon = start_daemon(ark_env)
            wait_for(
                lambda: _archived(feeder.rows(), RESELLER_IDS + ARK_IDS),
                timeout=90,
                what="every task of both providers archived",
            )
            assert reseller_daemon.terminate() == 0, reseller_daemon.log()[-3000:]
            assert ark_daemon.terminate() == 0, ark_daemon.log()[-3000:]
            # Neither API was ever asked about the other's tasks.
            assert set(reseller_sim.simulator.stats.polls) - KEY_CHECKS == set(RESELLER_IDS)
            assert set(ark_sim.simulator.stats.polls) - KEY_CHECKS == set(ARK_IDS)
            rows = feeder.rows()
            assert {rows[i]["provider"] for i in RESELLER_IDS} == {"reseller"}
            assert {rows[i]["provider"] for i in ARK_IDS} == {"ark"}


class TestChangingTheSetting:
    """SEEDANCE_PROVIDER changed under a running deployment: no task goes to the wrong API."""

    def test_rows_stamped_reseller_are_never_sent_to_ark(
        self, tmp_path: pathlib.Path, start_daemon: Any
    ) -> None:
        db = tmp_path / "tasks.db"
        feeder = SqliteFeeder(db)
        archive = f"file://{tmp_path}/archive"
        with serving("reseller") as reseller_sim:
            # Still generating when the setting changes: the reseller daemon has stamped it.
            reseller_sim.simulator.add_task("video_long", ready_seconds=3600)
            env = base_env(reseller_sim.url, f"sqlite:///{db}", archive)
            cli(env, "migrate")
            feeder.insert("video_long")
            daemon = start_daemon(env)
            wait_for(
                lambda: feeder.rows()["video_long"]["provider"] == "reseller",
                timeout=30,
                what="the reseller daemon's stamp",
            )
            assert daemon.terminate() == 0, daemon.log()[-3000:]
        with serving("ark") as ark_sim:
            ark_sim.simulator.add_task("cgt-20261202-new", queued_seconds=0.3, ready_seconds=1.0)
            env = {**base_env(ark_sim.url, f"sqlite:///{db}", archive), "SEEDANCE_PROVIDER": "ark"}
            feeder.insert("cgt-20261202-new")
            daemon = start_daemon(env)
            wait_for(
                lambda: _archived(feeder.rows(), ["cgt-20261202-new"]),
                timeout=60,
                what="the ark daemon's own task archived",
            )
            assert daemon.terminate() == 0, daemon.log()[-3000:]
            assert set(ark_sim.simulator.stats.polls) - KEY_CHECKS == {"cgt-20261202-new"}
        row = feeder.rows()["video_long"]
        assert (row["state"], row["provider"], row["lease_owner"]) == ("polling", "reseller", None)


def _metric(port: int, name: str, outcome: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf'^{name}{{outcome="{outcome}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _post(url: str, data: bytes) -> int:
    request = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


CALLBACK_TOKEN = "acceptance-callback-token-0123456789"
LOW = 10  # seconds: the standard mode's shortest interval in TestArkCallbacks


class TestArkCallbacks:
    """A callback makes its row due as soon as its cadence allows; the poll that follows is the
    truth."""

    TASK_ID = "cgt-20261202-callback"

    def test_a_callback_gets_the_video_archived_before_the_next_poll(
        self, tmp_path: pathlib.Path, start_daemon: Any
    ) -> None:
        port = free_port()
        db = tmp_path / "tasks.db"
        with serving("ark") as sim:
            env = {
                **base_env(sim.url, f"sqlite:///{db}", f"file://{tmp_path}/archive"),
                "SEEDANCE_PROVIDER": "ark",
                "SEEDANCE_CALLBACKS": "true",
                "SEEDANCE_CALLBACK_TOKEN": CALLBACK_TOKEN,
                "SEEDANCE_HTTP_PORT": str(port),
                "SEEDANCE_POLL_STANDARD": f"{LOW}-600",
            }
            feeder = SqliteFeeder(db)
            cli(env, "migrate")
            daemon = start_daemon(env)
            wait_for(lambda: "http_listening" in daemon.log(), timeout=30, what="the HTTP port")
            # Ready 3 s after creation: well after the intake poll, well before its shortest
            # interval has passed.
            sim.simulator.add_task(self.TASK_ID, queued_seconds=0.3, ready_seconds=3.0)
            feeder.insert(self.TASK_ID)
            wait_for(
                lambda: feeder.rows()[self.TASK_ID]["polls"] == 1,
                timeout=30,
                what="the intake poll",
            )
            intake = feeder.rows()[self.TASK_ID]
            scheduled = intake["next_attempt_at"]
            wait_for(
                lambda: sim.simulator.tasks[self.TASK_ID].status(time.time()) == "completed",
                timeout=30,
                what="the task to finish at the provider",
            )
            callback_url = f"http://127.0.0.1:{port}/callbacks/ark/{CALLBACK_TOKEN}"
            # Malformed and unknown callbacks are answered 2xx, ignored and counted.
            assert _post(callback_url, b"not json") == 204
            assert _post(callback_url, b'{"id": "cgt-unknown", "status": "succeeded"}') == 204
            wait_for(
                lambda: _metric(port, "seedance_callbacks_total", "ignored") == 2.0,
                timeout=20,
                what="the malformed and the unknown callback counted",
            )

            started = time.monotonic()
            assert sim.simulator.send_callback(self.TASK_ID, callback_url) == 204
            # Due sooner, but no sooner than the mode's shortest interval after the intake poll.
            hastened = wait_for(
                lambda: (
                    (due := feeder.rows()[self.TASK_ID]["next_attempt_at"]) != scheduled and due
                ),
                timeout=20,
                what="the row made due sooner",
            )
            assert _utc(str(hastened)) == _utc(intake["last_polled_at"]) + dt.timedelta(seconds=LOW)
            assert _utc(str(hastened)) < _utc(scheduled)
            wait_for(
                lambda: feeder.rows()[self.TASK_ID]["state"] == "archived",
                timeout=LOW + 20,
                what="the archive after the callback",
            )
            delay = time.monotonic() - started
            assert _metric(port, "seedance_callbacks_total", "hastened") == 1.0
            # Without the token: 404, as for any unknown path, and nothing moves.
            with pytest.raises(urllib.error.HTTPError) as refused:
                _post(f"http://127.0.0.1:{port}/callbacks/ark", b'{"id": "cgt-unknown"}')
            assert refused.value.code == 404
            assert _metric(port, "seedance_callbacks_total", "refused") == 1.0
            assert daemon.terminate() == 0, daemon.log()[-3000:]

        row = feeder.rows()[self.TASK_ID]
        # One poll after the callback, at the time it set.
        assert row["polls"] == 2
        assert _utc(row["last_polled_at"]) >= _utc(str(hastened))
        print(f"callback-to-archive delay: {delay:.3f} s")


def _utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
