"""A provider simulator: a real HTTP server that plays Seedance's query endpoint by the seed's contract.

- ``GET /v1/result/{id}`` with ``Authorization: Bearer <key>``: the task's status moves
  ``queued -> processing -> completed | failed | cancelled`` with time; a completed task carries a
  signed ``video_url`` and ``actualDuration``. A task is deleted (404) ``retention`` after creation.
- ``GET /files/{id}.mp4?expires=..&sig=..``: the video bytes, deterministic per task id, so a test can
  compute the expected SHA-256 with :func:`video_sha256`; an expired or forged link answers 403.
- Faults, per task or for every task (``"*"``), consumed in order: an HTTP status (with Retry-After),
  a malformed body, a delay, a dropped connection, a redirect, and for downloads a truncated,
  mis-sized or throttled body.
- ``POST /_sim/tasks``, ``POST /_sim/faults``, ``GET /_sim/stats``: control and counters for tests.
- ``dialect="ark"`` (``--dialect ark``): ByteDance's Ark API instead, ``GET
  /api/v3/contents/generations/tasks/{id}`` with Ark's shape: statuses ``queued -> running ->
  succeeded | failed | cancelled``, or ``expired`` (a SimTask outcome), an error object
  ``{code, message}``, ``content.video_url`` signed with ``X-Tos-Expires=86400`` (24 h), JSON error
  bodies for 401/404. :meth:`Simulator.send_callback` POSTs a task's state as Ark's callbacks do.
- ``dialect="replicate"``: Replicate's predictions, ``GET /v1/predictions/{id}``: statuses
  ``starting -> processing -> succeeded | failed | canceled`` (or ``aborted``), ``output`` a link,
  ISO 8601 times, problem-details errors. A prediction is never deleted: ``retention`` after it
  finished (an hour by default) its data is removed (``data_removed: true``, no output, its file
  404). :meth:`Simulator.send_callback` POSTs the prediction signed by the Standard Webhooks scheme
  with :attr:`Simulator.webhook_secret`.
- ``rate_limit``: the provider's own limit on polls per second; beyond it a poll gets 429 with
  ``Retry-After: 1`` (counted in the stats), as the seed warns it does.

Run it alone with ``python -m seedance_archiver.simulator --port 8080``: tests and ``demo`` start it
with :class:`SimulatorThread`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import calendar
import collections
import dataclasses
import datetime as dt
import functools
import gzip
import hashlib
import hmac
import io
import json
import random
import struct
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import standardwebhooks
from aiohttp import web

VIDEO_BLOCK_BYTES = 1024 * 1024
DEFAULT_RETENTION_SECONDS = 86_400.0
DEFAULT_LINK_TTL_SECONDS = 3600.0
ARK_TASKS_PATH = "/api/v3/contents/generations/tasks/"
ARK_LINK_TTL_SECONDS = 86_400.0  # Ark's links carry X-Tos-Expires=86400
# Our statuses as Ark names them (its own ``expired`` is an outcome of its own).
ARK_STATUSES = {"queued": "queued", "processing": "running", "completed": "succeeded"}
REPLICATE_PATH = "/v1/predictions/"
# Our statuses as Replicate names them (its own ``aborted`` is an outcome of its own).
REPLICATE_STATUSES = {
    "queued": "starting",
    "processing": "processing",
    "completed": "succeeded",
    "cancelled": "canceled",
}
REPLICATE_RETENTION_SECONDS = 3600.0  # an API prediction's data, from when it finished


def _iso(seconds: float) -> str:
    """A Unix time as Replicate writes times: ISO 8601 in UTC, with microseconds."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@functools.cache
def _random_block() -> bytes:
    """The random bytes every simulated video is made of, made once: made per task, they cost the
    simulator 3.5 ms of CPU per MiB, more than a bare downloader spends fetching and storing it
    (bench/burst.py)."""
    return random.Random(0).randbytes(VIDEO_BLOCK_BYTES)


# An MP4 begins with its ``ftyp`` box (size, type, major brand, minor version, compatible brands).
_FTYP = struct.pack(">I4s4sI4s4s", 24, b"ftyp", b"isom", 0x200, b"isom", b"mp41")
MP4_HEADER_BYTES = len(_FTYP) + 8  # then the header of the ``mdat`` box that holds the rest


def _mp4_header(size: int) -> bytes:
    """The first boxes of a ``size``-byte MP4: ``ftyp``, then ``mdat`` reaching to the end (its
    size field, or 0, "to the end of the file", where the size does not fit 32 bits)."""
    rest = size - len(_FTYP)
    return _FTYP + struct.pack(">I4s", rest if 0 <= rest < 2**32 else 0, b"mdat")


def video_chunks(task_id: str, size: int) -> Iterator[bytes]:
    """The simulated video of ``task_id``: ``size`` deterministic bytes, one block at a time.

    MP4-shaped, as every provider's video is: an ``ftyp`` box, then an ``mdat`` box of random bytes
    (the daemon checks that a download starts like a video). Each block begins with its index and
    the SHA-256 of ``task_id``, so no two tasks' videos, and no two blocks, are alike.
    """
    block = _random_block()
    mark = hashlib.sha256(task_id.encode()).digest()
    index = 0
    sent = 0
    while sent < size:
        head = (_mp4_header(size) if index == 0 else index.to_bytes(8, "big")) + mark
        chunk = head + block[len(head) :]
        chunk = chunk[: size - sent]
        yield chunk
        sent += len(chunk)
        index += 1


def video_sha256(task_id: str, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in video_chunks(task_id, size):
        digest.update(chunk)
    return digest.hexdigest()


THROTTLE_PIECE_BYTES = 64 * 1024
# Ids never created on first sight: the daemon's key check asks about one it knows cannot exist.
NEVER_AUTO = "seedance-archiver-"
# What ``python -m seedance_archiver.simulator`` creates on first sight, unless --no-auto.
TRIAL_AUTO = '{"queued_seconds": 3, "ready_seconds": 15}'


@functools.lru_cache(maxsize=4)
def _gzip_bomb(size: int) -> bytes:
    """``size`` zero bytes, gzip-compressed (512 MiB make about 0.5 MiB), compressed once."""
    out = io.BytesIO()
    zeros = bytes(VIDEO_BLOCK_BYTES)
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as packed:
        for start in range(0, size, len(zeros)):
            packed.write(zeros[: size - start])
    return out.getvalue()


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@dataclasses.dataclass
class SimTask:
    """One simulated provider task and how it will play out."""

    id: str
    created: float
    # completed | failed | cancelled | expired (Ark only) | aborted (Replicate only)
    outcome: str = "completed"
    queued_seconds: float = 0.5
    ready_seconds: float = 2.0  # when it reaches its outcome, from creation
    size: int = 256 * 1024
    model: str = "seedance_1_5_pro_720p"
    duration: float = 5.0
    error: str = "content policy violation"
    error_code: str = "OutputVideoSensitiveContentDetected"  # Ark's error object only
    resolution: str = "720p"  # Ark's answer, Replicate's input
    # The first this many links the task is answered with are already expired (a real 403).
    stale_links: int = 0
    # The video's bytes, where a test needs a real one (a browser plays it); else ``size``
    # deterministic bytes (:func:`video_chunks`).
    content: bytes | None = dataclasses.field(default=None, repr=False)
    # Fields of every answer replaced (or added) as given: a provider whose answers drifted from
    # its documented types (``{"actualDuration": "5.04"}``).
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The reseller's answer per status, encoded on first use (all but ``completed``, whose link is
    # signed anew): change the timings of a polled task, not what its answers say.
    answers: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def status(self, now: float) -> str:
        age = now - self.created
        if age < self.queued_seconds:
            return "queued"
        if age < self.ready_seconds:
            return "processing"
        return self.outcome


@dataclasses.dataclass
class Stats:
    polls: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    poll_times: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )
    downloads_started: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    downloads_completed: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    unauthorized: int = 0
    rate_limited: int = 0


class Simulator:
    """The simulated provider's state; :meth:`app` serves it over HTTP."""

    def __init__(
        self,
        api_key: str = "sim-key",
        *,
        retention_seconds: float | None = None,
        link_ttl_seconds: float | None = None,
        auto: dict[str, Any] | None = None,
        record_poll_times: bool = True,
        dialect: str = "reseller",
        rate_limit: float | None = None,
        webhook_secret: str | None = None,
    ) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; expected one of {tuple(DIALECTS)}")
        self.api_key = api_key
        self.dialect = dialect
        self._dialect = DIALECTS[dialect]
        # Reseller and Ark delete a task this long after its creation; Replicate removes a
        # prediction's data this long after it finished.
        if retention_seconds is None:
            retention_seconds = self._dialect.retention_seconds
        self.retention_seconds = retention_seconds
        # What Replicate's webhooks are signed with (a fresh one unless given).
        self.webhook_secret = webhook_secret or "whsec_" + base64.b64encode(
            random.randbytes(24)
        ).decode("ascii")
        if link_ttl_seconds is None:
            link_ttl_seconds = self._dialect.link_ttl_seconds
        self.link_ttl_seconds = link_ttl_seconds
        # With ``auto``, an unknown id is created on first sight with these SimTask fields.
        self.auto = auto
        self.record_poll_times = record_poll_times
        # The provider's own limit on polls (a token bucket holding one second's worth, and at
        # least one poll): beyond it, 429.
        self.rate_limit = rate_limit
        self._burst = max(1.0, rate_limit or 0.0)
        self._tokens = self._burst
        self._tokens_at = time.monotonic()
        self.tasks: dict[str, SimTask] = {}
        self.faults: dict[str, collections.deque[dict[str, Any]]] = collections.defaultdict(
            collections.deque
        )
        self.stats = Stats()
        self._secret = random.randbytes(16)
        self._lock = threading.Lock()
        self.base_url = ""

    # --- control (in-process or over /_sim) --------------------------------------------------------

    def add_task(self, task_id: str, **task_fields: Any) -> SimTask:
        task_fields.setdefault("created", time.time())
        task = SimTask(id=task_id, **task_fields)
        with self._lock:
            self.tasks[task_id] = task
        return task

    def add_fault(self, task_id: str, **fault: Any) -> None:
        """Queue a fault for ``task_id`` (or ``"*"``), used once (or ``times=N``, or every time
        until the Unix time ``until=T``: an outage of a given length).

        ``on="poll"|"download"``, plus: ``status=CODE`` [``retry_after=..``], ``body=TEXT``,
        ``delay=SECONDS`` (alone: a slow answer), ``drop=True`` (close the connection unanswered),
        ``redirect=URL``, ``body=TEXT`` [``status=CODE``, ``content_type=TYPE``] (a 200 of JSON
        unless told: an HTML 404, a video host's error page), ``gzip_bomb=BYTES`` (a gzip body that
        inflates to BYTES); for downloads also ``truncate_at=BYTES``, ``claim_length=BYTES``,
        ``throttle=BYTES_PER_SECOND``.
        """
        fault.setdefault("on", "poll")
        with self._lock:
            self.faults[task_id].append(fault)

    def end_faults(self, task_id: str) -> None:
        """Drop every fault queued for ``task_id`` (or ``"*"``): an outage ends when told."""
        with self._lock:
            self.faults.pop(task_id, None)

    def _take_fault(self, task_id: str, on: str) -> dict[str, Any] | None:
        with self._lock:
            for key in (task_id, "*"):
                queue = self.faults.get(key)
                while queue and "until" in queue[0] and time.time() >= queue[0]["until"]:
                    queue.popleft()  # its time is over
                if queue and queue[0]["on"] == on:
                    fault = queue[0]
                    if "until" in fault:
                        return fault  # lasts until then, however often it is met
                    if fault.get("times", 1) <= 1:
                        queue.popleft()
                    else:
                        fault["times"] -= 1
                    return fault
        return None

    def _task(self, task_id: str) -> SimTask | None:
        task = self.tasks.get(task_id)
        if task is None and self.auto is not None and not task_id.startswith(NEVER_AUTO):
            task = self.add_task(task_id, **self.auto)
        if (
            task is not None
            and self._dialect.deletes_tasks
            and time.time() - task.created >= self.retention_seconds
        ):
            return None
        return task

    def data_removed(self, task: SimTask, now: float) -> bool:
        """Whether Replicate has removed a finished prediction's data (never, in the others)."""
        if self._dialect.deletes_tasks or task.status(now) != task.outcome:
            return False
        return now >= task.created + task.ready_seconds + self.retention_seconds

    def sign(self, task_id: str, expires: int) -> str:
        message = f"{task_id}:{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def video_url(self, task_id: str, now: float) -> str:
        task = self.tasks.get(task_id)
        if task is not None and task.stale_links > 0:
            task.stale_links -= 1
            now -= self.link_ttl_seconds + 5  # signed long enough ago to have expired
        return self._dialect.link(self, task_id, now)

    def _signed_link(self, task_id: str, now: float) -> str:
        """The reseller's link: its end and a signature in the query."""
        expires = int(now + self.link_ttl_seconds)
        signature = self.sign(task_id, expires)
        return f"{self.base_url}/files/{task_id}.mp4?expires={expires}&sig={signature}"

    def _tos_link(self, task_id: str, now: float) -> str:
        """Ark's TOS-style link: the signing time and the lifetime, the end being their sum."""
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        ttl = int(self.link_ttl_seconds)
        signature = self.sign(task_id, int(now) + ttl)
        return (
            f"{self.base_url}/files/{task_id}.mp4?X-Tos-Algorithm=TOS4-HMAC-SHA256"
            f"&X-Tos-Date={date}&X-Tos-Expires={ttl}&X-Tos-Signature={signature}"
        )

    @staticmethod
    def _link_expires(query: Any) -> tuple[int, str]:
        """A link's end (Unix seconds) and signature, from either dialect's query."""
        try:
            if "X-Tos-Date" in query:
                start = time.strptime(query["X-Tos-Date"], "%Y%m%dT%H%M%SZ")
                expires = calendar.timegm(start) + int(query.get("X-Tos-Expires", "0"))
                return expires, query.get("X-Tos-Signature", "")
            return int(query.get("expires", "0")), query.get("sig", "")
        except ValueError:
            return 0, ""

    def ark_body(self, task: SimTask, now: float) -> dict[str, Any]:
        """The task as Ark's query (and its callbacks) shows it at ``now``."""
        status = task.status(now)
        if task.outcome == "expired" and status == "processing":
            status = "queued"  # an expired task never ran
        status = ARK_STATUSES.get(status, status)
        body: dict[str, Any] = {
            "id": task.id,
            "model": task.model,
            "status": status,
            "error": None,
            "created_at": int(task.created),
            "updated_at": int(now),
            "seed": 58_423,
            "resolution": task.resolution,
            "ratio": "16:9",
            "duration": task.duration,
            "framespersecond": 24,
            "service_tier": "default",
            "execution_expires_after": 172_800,
            "draft": False,
            "usage": {"completion_tokens": 108_900, "total_tokens": 108_900},
        }
        if status == "succeeded":
            body["content"] = {"video_url": self.video_url(task.id, now)}
        elif status == "failed":
            body["error"] = {"code": task.error_code, "message": task.error}
        body.update(task.overrides)
        return body

    def replicate_body(self, task: SimTask, now: float) -> dict[str, Any]:
        """The prediction as Replicate's API (and its webhooks) shows it at ``now``."""
        status = task.status(now)
        status = REPLICATE_STATUSES.get(status, status)
        finished = status in ("succeeded", "failed", "canceled", "aborted")
        removed = self.data_removed(task, now)
        body: dict[str, Any] = {
            "id": task.id,
            "model": task.model,
            "version": "dp-" + hashlib.sha256(task.model.encode()).hexdigest()[:29],
            "input": {}
            if removed
            else {
                "prompt": "a cat walking on a beach",
                "duration": task.duration,
                "resolution": task.resolution,
            },
            "logs": "" if removed else "Generating video...",
            "output": None,
            "error": None,
            "status": status,
            "source": "api",
            "data_removed": removed,
            "created_at": _iso(task.created),
            "started_at": _iso(task.created + task.queued_seconds)
            if status != "starting"
            else None,
            "completed_at": _iso(task.created + task.ready_seconds) if finished else None,
            "urls": {
                "get": f"{self.base_url}{REPLICATE_PATH}{task.id}",
                "cancel": f"{self.base_url}{REPLICATE_PATH}{task.id}/cancel",
            },
            "metrics": {"predict_time": task.ready_seconds - task.queued_seconds}
            if finished
            else {},
        }
        if status == "succeeded" and not removed:
            body["output"] = self.video_url(task.id, now)
        elif status == "failed":
            body["error"] = task.error
        body.update(task.overrides)
        return body

    def send_callback(
        self, task_id: str, url: str, timeout: float = 10.0, *, secret: str | None = None
    ) -> int:
        """POST ``task_id``'s state to ``url`` as the provider's callback does; the HTTP status
        answered. Replicate's is signed with ``secret`` (by default :attr:`webhook_secret`).

        Called from the test's thread (never the server's loop), with the standard library.
        """
        task = self.tasks[task_id]
        data = json.dumps(self._dialect.body(self, task, time.time())).encode()
        headers = {"Content-Type": "application/json"}
        if self._dialect.signs_callbacks:
            message_id = f"msg_{random.randbytes(12).hex()}"
            signed_at = dt.datetime.now(dt.UTC)
            signer = standardwebhooks.Webhook(secret or self.webhook_secret)
            headers.update(
                {
                    "webhook-id": message_id,
                    "webhook-timestamp": str(int(signed_at.timestamp())),
                    "webhook-signature": signer.sign(message_id, signed_at, data.decode()),
                }
            )
        request = urllib.request.Request(url, data=data, method="POST", headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)

    # --- HTTP -------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(self._dialect.task_route, self._poll)
        app.router.add_get("/files/{name}", self._file)
        app.router.add_post("/_sim/tasks", self._post_tasks)
        app.router.add_post("/_sim/faults", self._post_faults)
        app.router.add_get("/_sim/stats", self._get_stats)
        return app

    async def _apply_fault(
        self, fault: dict[str, Any] | None, request: web.Request
    ) -> web.StreamResponse | None:
        if fault is None:
            return None
        if "delay" in fault:
            await asyncio.sleep(float(fault["delay"]))
        if fault.get("drop"):
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never reaches the client: the connection is gone
        if "redirect" in fault:
            raise web.HTTPFound(location=str(fault["redirect"]))
        if "gzip_bomb" in fault:
            # A small gzip body that inflates to ``gzip_bomb`` bytes, sent whatever was asked for.
            return web.Response(
                body=_gzip_bomb(int(fault["gzip_bomb"])),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        if "status" in fault or "body" in fault:
            headers = {}
            if fault.get("retry_after") is not None:
                headers["Retry-After"] = str(fault["retry_after"])
            # A status alone answers plain text; a body alone is a 200 of JSON, unless told.
            default_type = "text/plain" if "body" not in fault else "application/json"
            headers["Content-Type"] = str(fault.get("content_type", default_type))
            return web.Response(
                status=int(fault.get("status", 200)),
                headers=headers,
                body=str(fault.get("body", "simulated fault")).encode(),
            )
        return None

    async def _polled(
        self, request: web.Request, unauthorized: Any, not_found: Any
    ) -> tuple[SimTask, float] | web.StreamResponse:
        """What both dialects do with a poll before their shapes differ: count it, check the key,
        play a queued fault, find the task. The task and the time asked, or the answer to give."""
        task_id = request.match_info["id"]
        now = time.time()
        self.stats.polls[task_id] += 1
        if self.record_poll_times:
            self.stats.poll_times[task_id].append(now)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            self.stats.unauthorized += 1
            return web.json_response(unauthorized, status=401)
        if not self._take_token():
            self.stats.rate_limited += 1
            return web.Response(status=429, headers={"Retry-After": "1"}, text="rate limited")
        faulty = await self._apply_fault(self._take_fault(task_id, "poll"), request)
        if faulty is not None:
            return faulty
        task = self._task(task_id)
        if task is None:
            return web.json_response(not_found, status=404)
        return task, now

    async def _poll(self, request: web.Request) -> web.StreamResponse:
        return await self._dialect.answer(self, request)

    async def _result(self, request: web.Request) -> web.StreamResponse:
        polled = await self._polled(
            request, {"error": "invalid api key"}, {"error": "task not found"}
        )
        if isinstance(polled, web.StreamResponse):
            return polled
        task, now = polled
        status = task.status(now)
        if status != "completed":
            # Nothing but the status changes such an answer, so each is encoded once per task: the
            # scale run's 2,000+ polls a second leave the simulator's CPU to its HTTP.
            answer = task.answers.get(status)
            if answer is None:
                answer = task.answers[status] = json.dumps(self._reseller_body(task, status, now))
            return web.Response(text=answer, content_type="application/json")
        return web.json_response(self._reseller_body(task, status, now))

    def _reseller_body(self, task: SimTask, status: str, now: float) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": task.id,
            "object": "video",
            "created": int(task.created),
            "model": task.model,
            "status": status,
            "video_url": None,
            "error": None,
        }
        if status == "completed":
            body["video_url"] = self.video_url(task.id, now)
            body["actualDuration"] = task.duration
        elif status == "failed":
            body["error"] = task.error
        body.update(task.overrides)
        return body

    async def _ark_result(self, request: web.Request) -> web.StreamResponse:
        # The error bodies' shape is Ark's documented one; the codes and messages are unverified.
        polled = await self._polled(
            request,
            {"error": {"code": "AuthenticationError", "message": "the API key is invalid"}},
            {"error": {"code": "ResourceNotFound", "message": "the specified task is not found"}},
        )
        if isinstance(polled, web.StreamResponse):
            return polled
        task, now = polled
        return web.json_response(self.ark_body(task, now))

    async def _replicate_result(self, request: web.Request) -> web.StreamResponse:
        polled = await self._polled(
            request,
            {
                "title": "Unauthenticated",
                "detail": "You did not pass a valid authentication token",
                "status": 401,
            },
            {"title": "Not found", "detail": "Not found.", "status": 404},
        )
        if isinstance(polled, web.StreamResponse):
            return polled
        task, now = polled
        return web.json_response(self.replicate_body(task, now))

    def _take_token(self) -> bool:
        """Whether a poll fits the simulated provider's rate limit (always, without one)."""
        if self.rate_limit is None:
            return True
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self.rate_limit)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        task_id = name.removesuffix(".mp4")
        task = self._task(task_id)
        if task is None or self.data_removed(task, time.time()):
            return web.Response(status=404, text="no such video")
        expires, signature = self._link_expires(request.query)
        valid = hmac.compare_digest(signature, self.sign(task_id, expires))
        if not valid or expires < time.time():
            return web.Response(status=403, text="link expired or invalid")
        fault = self._take_fault(task_id, "download")
        faulty = await self._apply_fault(fault, request)
        if faulty is not None:
            return faulty
        self.stats.downloads_started[task_id] += 1
        size = task.size if task.content is None else len(task.content)
        length = int(fault["claim_length"]) if fault and "claim_length" in fault else size
        stop_at = int(fault["truncate_at"]) if fault and "truncate_at" in fault else size
        response = web.StreamResponse(
            headers={"Content-Type": "video/mp4", "Content-Length": str(length)}
        )
        await response.prepare(request)
        throttle = float(fault["throttle"]) if fault and "throttle" in fault else None
        sent = 0
        chunks = (
            video_chunks(task_id, min(size, stop_at))
            if task.content is None
            else [task.content[:stop_at]]
        )
        for chunk in chunks:
            pieces = [chunk] if throttle is None else _split(chunk, THROTTLE_PIECE_BYTES)
            for piece in pieces:
                if throttle is not None:
                    # Paced before each piece, not after: once the last byte is out, nothing waits
                    # before the count below (a client with its whole body may hang up at once).
                    await asyncio.sleep(len(piece) / throttle)
                await response.write(piece)
                sent += len(piece)
        if sent < length:
            # Cut the connection so the client sees a short body, as a broken download would.
            if request.transport is not None:
                request.transport.close()
            return response
        # Counted once every byte is handed over, before write_eof, which fails when the client
        # has already closed the connection.
        self.stats.downloads_completed[task_id] += 1
        await response.write_eof()
        return response

    async def _post_tasks(self, request: web.Request) -> web.Response:
        payload = await request.json()
        for spec in payload:
            spec = dict(spec)
            self.add_task(spec.pop("id"), **spec)
        return web.json_response({"added": len(payload)})

    async def _post_faults(self, request: web.Request) -> web.Response:
        payload = await request.json()
        for task_id, faults in payload.items():
            for fault in faults:
                self.add_fault(task_id, **fault)
        return web.json_response({"ok": True})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "polls": dict(self.stats.polls),
                "downloads_started": dict(self.stats.downloads_started),
                "downloads_completed": dict(self.stats.downloads_completed),
                "unauthorized": self.stats.unauthorized,
                "rate_limited": self.stats.rate_limited,
            }
        )


@dataclasses.dataclass(frozen=True)
class Dialect:
    """One provider API the simulator plays: where a poll goes, how a poll is answered, and how
    its video links look and how long they live. Tasks, faults, keys and files are shared."""

    name: str
    task_route: str
    answer: Callable[[Simulator, web.Request], Awaitable[web.StreamResponse]]
    link: Callable[[Simulator, str, float], str]
    # A task's state as its callbacks carry it.
    body: Callable[[Simulator, SimTask, float], dict[str, Any]]
    link_ttl_seconds: float = DEFAULT_LINK_TTL_SECONDS
    retention_seconds: float = DEFAULT_RETENTION_SECONDS
    # Whether a task is deleted (404) ``retention`` after creation, or kept with its data removed
    # ``retention`` after it finished (Replicate).
    deletes_tasks: bool = True
    # Whether its callbacks are signed (Standard Webhooks), or carry a secret in the URL instead.
    signs_callbacks: bool = False


# The APIs played, by the names of the daemon's own registry (providers.NAMES): a new one is one
# more row here.
DIALECTS: dict[str, Dialect] = {
    dialect.name: dialect
    for dialect in (
        Dialect(
            "reseller",
            "/v1/result/{id}",
            Simulator._result,
            Simulator._signed_link,
            lambda sim, task, now: sim._reseller_body(task, task.status(now), now),
        ),
        Dialect(
            "ark",
            ARK_TASKS_PATH + "{id}",
            Simulator._ark_result,
            Simulator._tos_link,
            Simulator.ark_body,
            ARK_LINK_TTL_SECONDS,
        ),
        Dialect(
            "replicate",
            REPLICATE_PATH + "{id}",
            Simulator._replicate_result,
            Simulator._signed_link,
            Simulator.replicate_body,
            retention_seconds=REPLICATE_RETENTION_SECONDS,
            deletes_tasks=False,
            signs_callbacks=True,
        ),
    )
}


class SimulatorThread:
    """Serve a :class:`Simulator` on loopback from a background thread (for tests and ``demo``)."""

    def __init__(self, sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.simulator = sim
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="simulator", daemon=True
        )
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> SimulatorThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        self.simulator.base_url = self.url
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.simulator.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    simulator = Simulator(
        args.api_key,
        dialect=args.dialect,
        auto=None if args.no_auto else json.loads(args.auto),
        record_poll_times=not args.no_poll_times,
        rate_limit=args.rate_limit,
    )
    simulator.base_url = f"http://{args.host}:{args.port}"
    print(banner(simulator), flush=True)
    web.run_app(simulator.app(), host=args.host, port=args.port, access_log=None, print=None)


def parser() -> argparse.ArgumentParser:
    """``python -m seedance_archiver.simulator``'s options."""
    parser = argparse.ArgumentParser(
        description="Serve the Seedance provider simulator (for a trial: `seedance-archiver try` "
        "starts it with the daemon).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default="sim-key", help="the Bearer key it accepts")
    parser.add_argument(
        "--auto",
        default=TRIAL_AUTO,
        help="JSON SimTask fields for ids it does not know: each is created on first sight",
    )
    parser.add_argument(
        "--no-auto", action="store_true", help="answer 404 for ids it does not know"
    )
    parser.add_argument("--no-poll-times", action="store_true", help="do not record poll times")
    parser.add_argument(
        "--dialect", choices=tuple(DIALECTS), default="reseller", help="which provider API to play"
    )
    parser.add_argument(
        "--rate-limit", type=float, default=None, help="answer 429 to polls beyond this many per s"
    )
    return parser


def banner(sim: Simulator) -> str:
    """What the simulator says when it starts: where it is, its key, and the daemon's settings for
    a trial against it (the URL rules loosened for loopback, short cadences, no skip)."""
    auto = (
        "ids it does not know answer 404"
        if sim.auto is None
        else "every task id it is asked about is created on first sight"
    )
    return "\n".join(
        [
            f"simulator: the {sim.dialect} API at {sim.base_url}, API key {sim.api_key}; {auto}",
            "For a daemon against it (`seedance-archiver try` sets all this itself):",
            f"  export SEEDANCE_PROVIDER={sim.dialect}",
            f"  export SEEDANCE_API_BASE_URL={sim.base_url}",
            f"  export SEEDANCE_API_KEY={sim.api_key}",
            "  export SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES=http,https",
            "  export SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS=true",
            "  export SEEDANCE_POLL_DRAFT=2-4 SEEDANCE_POLL_STANDARD=3-6 SEEDANCE_POLL_FLEX=5-10",
            "  export SEEDANCE_EXPECTED_SECONDS_480P=off SEEDANCE_EXPECTED_SECONDS_720P=off "
            "SEEDANCE_EXPECTED_SECONDS_1080P=off",
        ]
    )


if __name__ == "__main__":
    main()
