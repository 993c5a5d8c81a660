"""A webhook receiver on loopback for acceptance tests: verifies every signature, records every
request with its start and end, and can hold requests open (a receiver that hangs)."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import itertools
import threading
import time
from typing import Any

import standardwebhooks

SECRET = "whsec_" + base64.b64encode(b"acceptance-receiver-secret-32by").decode()


@dataclasses.dataclass
class Request:
    webhook_id: str
    event: str
    task_id: str
    started: float
    ended: float | None = None
    status: int | None = None


class Receiver:
    """Answers 204 to every verified request, unless ``hold`` is set: then it hangs until cleared."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        self.hold = threading.Event()
        self.released = threading.Event()
        self.released.set()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                try:
                    data: Any = standardwebhooks.Webhook(SECRET).verify(raw, dict(self.headers))
                except standardwebhooks.WebhookVerificationError:
                    with receiver.lock:
                        receiver.bad_signatures += 1
                    self._answer(400)
                    return
                request = Request(
                    self.headers["webhook-id"], data["type"], data["data"]["task_id"], time.time()
                )
                with receiver.lock:
                    receiver.requests.append(request)
                if receiver.hold.is_set():
                    receiver.released.wait(timeout=60)
                request.status = 204
                request.ended = time.time()
                self._answer(204)

            def _answer(self, status: int) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender is gone (killed): nothing to answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def hang(self) -> None:
        self.released.clear()
        self.hold.set()

    def answer(self) -> None:
        self.hold.clear()
        self.released.set()

    def snapshot(self) -> list[Request]:
        with self.lock:
            return list(self.requests)

    def delivered(self) -> dict[str, set[str]]:
        """task_id -> the webhook-ids answered 204 for it."""
        out: dict[str, set[str]] = {}
        for r in self.snapshot():
            if r.status == 204:
                out.setdefault(r.task_id, set()).add(r.webhook_id)
        return out

    def overlapping(self) -> list[str]:
        """webhook-ids that were being received twice at the same moment."""
        by_id: dict[str, list[Request]] = {}
        for r in self.snapshot():
            by_id.setdefault(r.webhook_id, []).append(r)
        twice = []
        for webhook_id, requests in by_id.items():
            spans = sorted((r.started, r.ended or float("inf")) for r in requests)
            if any(b[0] < a[1] for a, b in itertools.pairwise(spans)):
                twice.append(webhook_id)
        return twice
