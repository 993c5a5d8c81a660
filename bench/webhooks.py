"""Webhook latency: from a video being archived (its row's archived_at) to the receiver having it.

One daemon (`seedance-archiver run`) on PostgreSQL, the simulator in its own process, a receiver
on loopback that verifies every signature. N tasks are inserted at once; each completes about a
second after creation. The latency of a task is the receiver's clock when the task.archived
request arrived minus the row's archived_at (one host, one clock).

    .venv/bin/python -m bench.webhooks --tasks 1000
"""

from __future__ import annotations

import argparse
import base64
import http.server
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import psycopg
import standardwebhooks
from seedance_archiver import schema

from bench import common

SECRET = "whsec_" + base64.b64encode(b"bench-webhook-secret-32-bytes!!!").decode()
DEADLINE_SECONDS = 600.0


class Receiver:
    """Records when each task's task.archived first arrived (epoch seconds)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.bad = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                now = time.time()
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                try:
                    data: Any = standardwebhooks.Webhook(SECRET).verify(raw, dict(self.headers))
                except standardwebhooks.WebhookVerificationError:
                    receiver.bad += 1
                    data = None
                if data is not None and data["type"] == "task.archived":
                    with receiver.lock:
                        receiver.arrived.setdefault(data["data"]["task_id"], now)
                self.send_response(204 if data is not None else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((common.HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{common.HOST}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def run(tasks: int) -> dict[str, float]:
    auto = json.dumps({"queued_seconds": 0.2, "ready_seconds": 1.0, "size": 4096})
    with (
        common.simulator(auto=auto) as (sim_url, _),
        common.database("bench_webhooks") as (name, url),
        tempfile.TemporaryDirectory() as archive_dir,
    ):
        schema.upgrade(url)
        receiver = Receiver()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE_")}
        env.update(
            {
                "SEEDANCE_API_KEY": common.API_KEY,
                "SEEDANCE_API_BASE_URL": sim_url,
                "SEEDANCE_DATABASE_URL": url,
                "SEEDANCE_ARCHIVE_URL": f"file://{archive_dir}",
                "SEEDANCE_POLL_DRAFT": "0.5-1",
                "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES": "http",
                "SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS": "true",
                "SEEDANCE_MAX_REQUESTS_PER_SECOND": "500",
                "SEEDANCE_HTTP_PORT": "0",
                "SEEDANCE_LOG_FORMAT": "json",
                "SEEDANCE_WEBHOOK_URL": receiver.url,
                "SEEDANCE_WEBHOOK_SECRET": SECRET,
                "SEEDANCE_ALLOW_PRIVATE_WEBHOOK_HOSTS": "true",
            }
        )
        cli = pathlib.Path(sys.executable).parent / "seedance-archiver"
        daemon = subprocess.Popen(
            [str(cli), "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            with psycopg.connect(common.pg_dsn(name), autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO video_tasks (task_id, mode) "
                    "SELECT 'video_bench_' || i, 'draft' FROM generate_series(1, %s) i",
                    (tasks,),
                )
                deadline = time.monotonic() + DEADLINE_SECONDS
                while len(receiver.arrived) < tasks:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"only {len(receiver.arrived)} of {tasks} arrived")
                    time.sleep(0.5)
                rows = conn.execute(
                    "SELECT task_id, extract(epoch FROM archived_at) FROM video_tasks"
                ).fetchall()
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
        latencies = [receiver.arrived[task_id] - float(at) for task_id, at in rows]
        return {
            "tasks": tasks,
            "p50_s": common.percentile(latencies, 50),
            "p99_s": common.percentile(latencies, 99),
            "max_s": max(latencies),
            "bad_signatures": receiver.bad,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    result = run(parser.parse_args(argv).tasks)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
