"""Webhooks end to end: the installed daemon, a loopback receiver that verifies every signature,
kill -9 mid-delivery, three replicas on one PostgreSQL, and the operator's `webhooks` command."""

from __future__ import annotations

import json
import pathlib
import sqlite3
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from seedance_archiver import simulator

from tests.acceptance.webhook_receiver import SECRET, Receiver
from tests.helpers import Daemon, PostgresFeeder, base_env, cli, wait_for

LEASE_SECONDS = 2


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    try:
        yield r
    finally:
        r.stop()


def webhook_env(sim_url: str, db_url: str, tmp_path: pathlib.Path, url: str) -> dict[str, str]:
    env = base_env(sim_url, db_url, f"file://{tmp_path}/archive")
    env.update(
        {
            "SEEDANCE_WEBHOOK_URL": url,
            "SEEDANCE_WEBHOOK_SECRET": SECRET,
            "SEEDANCE_ALLOW_PRIVATE_WEBHOOK_HOSTS": "true",
            "SEEDANCE_WEBHOOK_TIMEOUT_SECONDS": "1",
            "SEEDANCE_LEASE_SECONDS": str(LEASE_SECONDS),
        }
    )
    return env


def plan(sim: simulator.Simulator, prefix: str, count: int) -> dict[str, str]:
    """Tasks that end quickly: every fifth fails, the rest complete. task_id -> expected event."""
    expected = {}
    for i in range(count):
        task_id = f"video_{prefix}_{i:03d}"
        outcome = "failed" if i % 5 == 0 else "completed"
        sim.add_task(task_id, outcome=outcome, queued_seconds=0.1, ready_seconds=0.3, size=2048)
        expected[task_id] = "task.failed" if outcome == "failed" else "task.archived"
    return expected


def outbox(pg_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(pg_url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT * FROM webhook_outbox ORDER BY id")
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def all_delivered(pg_url: str, count: int) -> bool:
    rows = outbox(pg_url)
    return len(rows) >= count and all(r["state"] == "delivered" for r in rows)


def assert_each_delivered_once_in_effect(
    receiver: Receiver, pg_url: str, expected: dict[str, str]
) -> None:
    rows = {r["task_id"]: r for r in outbox(pg_url) if r["event"] != "task.at_risk"}
    assert {t: r["event"] for t, r in rows.items()} == expected
    delivered = receiver.delivered()
    # Every event arrived; any duplicate carried the same webhook-id as the outbox row.
    assert {t: ids for t, ids in delivered.items() if t in expected} == {
        t: {rows[t]["webhook_id"]} for t in expected
    }
    assert receiver.bad_signatures == 0


@pytest.mark.postgres
class TestDurableDelivery:
    """No event is lost, not across a kill -9, not among replicas."""

    def test_kill_9_mid_delivery_then_restart_delivers_every_event(
        self,
        pg_url: str,
        sim: simulator.SimulatorThread,
        start_daemon: Any,
        receiver: Receiver,
        tmp_path: pathlib.Path,
    ) -> None:
        expected = plan(sim.simulator, "kill", 20)
        env = webhook_env(sim.url, pg_url, tmp_path, receiver.url)
        cli(env, "migrate")
        feeder = PostgresFeeder(pg_url)
        receiver.hang()  # every request is held open: the daemon is mid-delivery
        victim: Daemon = start_daemon(env)
        for task_id in expected:
            feeder.insert(task_id, "draft")
        wait_for(lambda: len(receiver.snapshot()) >= 1, timeout=30, what="a delivery in flight")
        victim.kill()  # SIGKILL
        receiver.answer()
        start_daemon(env)
        wait_for(lambda: all_delivered(pg_url, len(expected)), timeout=60, what="every delivery")
        assert_each_delivered_once_in_effect(receiver, pg_url, expected)

    def test_three_replicas_deliver_each_event_and_none_twice_at_once(
        self,
        pg_url: str,
        sim: simulator.SimulatorThread,
        start_daemon: Any,
        receiver: Receiver,
        tmp_path: pathlib.Path,
    ) -> None:
        expected = plan(sim.simulator, "rep", 45)
        env = webhook_env(sim.url, pg_url, tmp_path, receiver.url)
        cli(env, "migrate")
        feeder = PostgresFeeder(pg_url)
        replicas: list[Daemon] = [start_daemon(env) for _ in range(3)]
        wait_for(
            lambda: all("daemon_started" in r.log() for r in replicas),
            timeout=30,
            what="three replicas",
        )
        for task_id in expected:
            feeder.insert(task_id, "draft")
        wait_for(lambda: all_delivered(pg_url, len(expected)), timeout=60, what="every delivery")
        assert [r.terminate() for r in replicas] == [0, 0, 0]
        assert_each_delivered_once_in_effect(receiver, pg_url, expected)
        assert receiver.overlapping() == []
        # Nothing was lost or repeated: one request per event (no daemon died, no lease ran out).
        assert len(receiver.snapshot()) == len(expected)


class TestWebhooksCommand:
    """`webhooks`, `webhooks --failed`, `webhooks redeliver ID` and the backlog in `status`."""

    def test_list_redeliver_and_status(self, tmp_path: pathlib.Path) -> None:
        db = tmp_path / "tasks.db"
        env = base_env("http://127.0.0.1:9", f"sqlite:///{db}", f"file://{tmp_path}/a")
        cli(env, "migrate")
        with sqlite3.connect(db) as conn:
            conn.execute("INSERT INTO video_tasks (task_id) VALUES ('video_a'), ('video_b')")
            conn.execute("UPDATE video_tasks SET state = 'failed'")  # the trigger writes events
            conn.execute("UPDATE webhook_outbox SET state = 'disabled' WHERE task_id = 'video_b'")
        events = json.loads(cli(env, "webhooks", "--json").stdout)
        assert sorted((e["task_id"], e["event"], e["state"]) for e in events) == [
            ("video_a", "task.failed", "pending"),
            ("video_b", "task.failed", "disabled"),
        ]
        table = cli(env, "webhooks", "--failed").stdout.splitlines()
        assert table[0].split()[:4] == ["id", "event", "task_id", "state"]
        [failed] = [line.split() for line in table[2:]]
        assert failed[1:4] == ["task.failed", "video_b", "disabled"]
        status = json.loads(cli(env, "status", "--json").stdout)
        assert (status["webhooks"]["backlog"], status["webhooks"]["given_up"]) == (1, 1)
        assert "sent again" in cli(env, "webhooks", "redeliver", failed[0]).stdout
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT state FROM webhook_outbox").fetchall() == [("pending",)] * 2
        missing = cli(env, "webhooks", "redeliver", "999", check=False)
        assert missing.returncode == 1 and "no such webhook event" in missing.stderr
