"""Several replicas on one PostgreSQL: each video archived once, no task polled twice inside its cadence,
and a replica killed with SIGKILL loses nothing (the others take its rows when its leases run out)."""

from __future__ import annotations

import collections
import itertools
import random
import signal
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from seedance_archiver import simulator

from tests.helpers import Daemon, PostgresFeeder, base_env, cli, wait_for

MODES = ("draft", "standard", "flex")
CADENCE_LOW = {"draft": 0.3, "standard": 0.5, "flex": 0.8}  # base_env's SEEDANCE_POLL_* minimums
# Poll times are taken where the simulator receives them; network jitter on loopback is far below this.
JITTER_SECONDS = 0.1
# The kill test's leases: a dead replica's rows are taken over once they run out. A live replica
# renews its own every third of this, so only one stalled for two thirds of it loses them (and
# a task is polled again too soon). With 3 s, two CI runs of the whole suite (six test processes
# on two cores) failed the cadence check in a row, once in each test: a stall of 2 s. So 10 s.
LEASE_SECONDS = 10


def _plan(sim: simulator.Simulator, count: int, seed: int) -> dict[str, tuple[str, str, int]]:
    rng = random.Random(seed)
    plan = {}
    for i in range(count):
        task_id = f"video_rep_{seed}_{i:04d}"
        mode = MODES[i % 3]
        outcome = "failed" if i % 10 == 0 else "completed"
        size = rng.randrange(32 * 1024, 384 * 1024)
        sim.add_task(
            task_id, outcome=outcome, queued_seconds=0.5, ready_seconds=rng.uniform(1, 6), size=size
        )
        plan[task_id] = (mode, outcome, size)
    return plan


def _ticking(pg_url: str) -> int:
    """How many daemons have written a heartbeat after a completed tick."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM archiver_heartbeats WHERE last_tick_at IS NOT NULL"
        ).fetchone()
    return int(row[0]) if row else 0


def _replica_env(
    sim_url: str, pg_url: str, bucket: str, lease_seconds: float = LEASE_SECONDS
) -> dict[str, str]:
    env = base_env(sim_url, pg_url, f"s3://{bucket}/replicas")
    # A modest rate each, so no single replica claims every due row at once: they compete.
    env["SEEDANCE_MAX_REQUESTS_PER_SECOND"] = "60"
    env["SEEDANCE_LEASE_SECONDS"] = str(lease_seconds)
    return env


def _assert_cadence_kept(
    sim: simulator.Simulator,
    plan: dict[str, tuple[str, str, int]],
    orphaned: frozenset[str] = frozenset(),
    replicas: Sequence[Daemon] = (),
) -> None:
    """No task polled sooner than its mode's cadence allows; but a task a killed replica held may be
    polled once too soon. That replica's last poll of it (sent, say, just before its lease ran out)
    died with it, unrecorded: the replica that claims the row once the lease is over polls again."""
    too_soon = []
    for task_id, (mode, _, _) in plan.items():
        times = sim.stats.poll_times[task_id]
        gaps = sorted(b - a for a, b in itertools.pairwise(times))
        allowed = 1 if task_id in orphaned else 0
        if len(gaps) > allowed and gaps[allowed] < CADENCE_LOW[mode] - JITTER_SECONDS:
            too_soon.append((task_id, mode, [round(g, 3) for g in gaps[: allowed + 1]]))
    # What the replicas said of the first few, to tell a lease lost on a busy machine from a bug.
    said = [
        f"replica {n}: {line}"
        for n, replica in enumerate(replicas)
        for line in replica.log().splitlines()
        if any(task_id in line for task_id, _, _ in too_soon[:3])
    ]
    assert too_soon == [], f"polled faster than the cadence allows: {too_soon[:10]}\n" + "\n".join(
        said
    )


def _assert_archived(
    feeder: PostgresFeeder, s3_client: Any, bucket: str, plan: dict[str, tuple[str, str, int]]
) -> None:
    rows = feeder.rows()
    for task_id, (_, outcome, size) in plan.items():
        row = rows[task_id]
        if outcome == "failed":
            assert row["state"] == "failed", (task_id, row["state"])
            continue
        assert row["state"] == "archived", (task_id, row["state"], row["error"])
        assert row["archive_sha256"] == simulator.video_sha256(task_id, size)
        head = s3_client.head_object(Bucket=bucket, Key=f"replicas/{task_id}.mp4")
        assert head["ContentLength"] == size
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def _finished(feeder: PostgresFeeder, ids: list[str]) -> bool:
    rows = feeder.rows()
    return all(rows[i]["state"] in ("archived", "failed") for i in ids if i in rows)


@pytest.mark.postgres
class TestReplicas:
    """Three `seedance-archiver run` processes sharing one PostgreSQL."""

    def test_three_replicas_archive_each_video_once_and_keep_the_cadence(
        self,
        pg_url: str,
        s3_client: Any,
        s3_bucket: str,
        sim: simulator.SimulatorThread,
        start_daemon: Any,
    ) -> None:
        plan = _plan(sim.simulator, 150, seed=1)
        # Every replica lives here: leases long enough that no stall of a busy machine loses one
        # (see LEASE_SECONDS). On failure the replicas' lines about the task say what happened.
        env = _replica_env(sim.url, pg_url, s3_bucket, lease_seconds=30)
        cli(env, "migrate")
        feeder = PostgresFeeder(pg_url)
        replicas: list[Daemon] = [start_daemon(env) for _ in range(3)]
        # Feed only once all three tick, so they compete from the first claim (a busy machine may
        # take seconds to start one; the first to tick would otherwise take every row).
        wait_for(lambda: _ticking(pg_url) == 3, timeout=60, what="three replicas to tick")
        for task_id, (mode, _, _) in plan.items():
            feeder.insert(task_id, mode)
        wait_for(lambda: _finished(feeder, list(plan)), timeout=120, what="every task to finish")
        assert [r.terminate() for r in replicas] == [0, 0, 0]

        _assert_archived(feeder, s3_client, s3_bucket, plan)
        completed = sim.simulator.stats.downloads_completed
        started = sim.simulator.stats.downloads_started
        for task_id, (_, outcome, _) in plan.items():
            expected = 1 if outcome == "completed" else 0
            assert (started[task_id], completed[task_id]) == (expected, expected), task_id
        _assert_cadence_kept(sim.simulator, plan, replicas=replicas)
        # They really shared the work: more than one replica archived videos.
        workers = [r for r in replicas if '"event": "video_archived"' in r.log()]
        assert len(workers) >= 2

    def test_a_replica_killed_mid_run_loses_nothing(
        self,
        pg_url: str,
        s3_client: Any,
        s3_bucket: str,
        sim: simulator.SimulatorThread,
        start_daemon: Any,
    ) -> None:
        plan = _plan(sim.simulator, 150, seed=2)
        env = _replica_env(sim.url, pg_url, s3_bucket)
        cli(env, "migrate")
        feeder = PostgresFeeder(pg_url)
        victim = start_daemon(env)
        wait_for(lambda: "daemon_started" in victim.log(), timeout=30, what="the first replica")
        for task_id, (mode, _, _) in plan.items():
            feeder.insert(task_id, mode)
        survivors = [start_daemon(env) for _ in range(2)]

        def victim_holds_leases() -> list[str]:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT task_id FROM video_tasks WHERE lease_owner LIKE %s",
                    (f"%:{victim.process.pid}:%",),
                ).fetchall()
            return [r[0] for r in rows]

        wait_for(victim_holds_leases, timeout=30, what="the victim to hold leases")
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=10)
        orphaned = set(victim_holds_leases())

        wait_for(lambda: _finished(feeder, list(plan)), timeout=120, what="every task to finish")
        assert [r.terminate() for r in survivors] == [0, 0]
        _assert_archived(feeder, s3_client, s3_bucket, plan)
        # A second download happens only for a row the victim held when it died.
        completed = sim.simulator.stats.downloads_completed
        twice = {t for t, n in completed.items() if n > 1}
        assert twice <= orphaned
        assert collections.Counter(completed.values()).keys() <= {1, 2}
        _assert_cadence_kept(sim.simulator, plan, frozenset(orphaned), [victim, *survivors])
