"""The operator's HTTP endpoints: ``/healthz``, ``/readyz`` and ``/metrics``; 404 everywhere else.

- ``/healthz``: the process and its event loop are alive and ticks complete: the last one
  completed recently and fewer than ``Service.MAX_TICK_FAILURES`` crashed in a row.
- ``/readyz``: the database answers, the archive storage answers, the provider accepts the API
  key and is not in an outage (``outage.py``); 503 with the failing checks otherwise.
- ``/metrics``: Prometheus text format (see ``metrics.py``).
- ``/ui/``: the pages to look at (``ui.py``): tasks, what is at risk, the archived video.
- ``POST /callbacks/{provider}[/{token}]`` (only with SEEDANCE_CALLBACKS=true, for a provider that
  sends callbacks): the task the body names becomes due sooner (``callbacks.py``). A callback that
  is not the provider's by its rule (Ark: a wrong or missing token in the path; Replicate: a
  missing or bad signature) is answered 404, as any unknown path, counted, and logged at most once
  a minute.
  Every other callback is answered 204, a malformed or unknown one too (a provider that gets errors
  retries), and counted; 503 with ``Retry-After`` when the queue of callbacks is full.

At most SEEDANCE_HTTP_MAX_CONNECTIONS connections are open at once: one more is answered 503 and
closed, so no flood of connections can use up the process's file descriptors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from aiohttp import web

from seedance_archiver import (
    callbacks,
    config,
    db,
    errors,
    metrics,
    policy,
    provider,
    service,
    ui,
    utils,
)

log = structlog.get_logger(__name__)

HEALTHY_TICK_AGE_SECONDS = 30.0
CHECK_TIMEOUT_SECONDS = 5.0
CALLBACK_MAX_BYTES = 64 * 1024  # a task's state is a few hundred bytes; more is not a callback
REFUSED_LOG_SECONDS = 60.0  # refused callbacks are logged at most this often (and always counted)
# An idle keep-alive connection is closed after this long: idle ones must not hold the cap.
KEEPALIVE_SECONDS = 15.0
OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)


@dataclasses.dataclass(frozen=True)
class Callbacks:
    """What ``POST /callbacks/{provider}[/{token}]`` needs: the provider's rule (how a callback is
    told from anybody's POST, and what task it names), its secret, and the hastener that writes
    what callbacks ask for."""

    rule: provider.Callbacks
    secret: str
    hastener: callbacks.Hastener

    def accepts(self, token: str, headers: Mapping[str, str], body: bytes) -> bool:
        """Whether the POST is the provider's (its path token or its signature, as the rule says)."""
        return self.rule.authentic(self.secret, token, headers, body)


class _Refuse(asyncio.Protocol):
    """A connection beyond the cap: answered 503 and closed before any request is read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(OVER_CAPACITY)
        transport.close()


class _Capped:
    """aiohttp's protocol factory, with at most ``limit`` connections open at once."""

    def __init__(self, server: web.Server, limit: int, refused: Callable[[], None]) -> None:
        self.server = server
        self.limit = limit
        self.refused = refused

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) >= self.limit:
            self.refused()
            return _Refuse()
        return self.server()


class WebServer:
    """Serves the endpoints for one :class:`service.Service` on ``host:port``."""

    def __init__(
        self,
        svc: service.Service,
        task_store: db.Reachable,
        host: str,
        port: int,
        endpoint: Callbacks | None = None,
        max_connections: int = config.HTTP_MAX_CONNECTIONS,
        pages: ui.Pages | None = None,
    ) -> None:
        self.svc = svc
        self.store = task_store
        self.host = host
        self.port = port
        self.callbacks = endpoint
        self.max_connections = max_connections
        self.pages = pages
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._hastening: asyncio.Task[None] | None = None
        self._refused_unlogged = 0
        self._refused_logged_at: float | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=CALLBACK_MAX_BYTES)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        if self.callbacks is not None:
            path = f"/callbacks/{self.svc.provider.name}"
            app.router.add_post(path, self.on_callback)  # no token: refused, and counted
            app.router.add_post(path + "/{token:.*}", self.on_callback)
        if self.pages is not None:
            self.pages.routes(app)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app(), access_log=None, keepalive_timeout=KEEPALIVE_SECONDS
        )
        await self._runner.setup()
        assert self._runner.server is not None
        factory = _Capped(self._runner.server, self.max_connections, self._over_capacity)
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(factory, self.host, self.port, reuse_address=True)
        if self.port == 0:
            self.port = self._listener.sockets[0].getsockname()[1]
        if self.callbacks is not None:
            self._hastening = loop.create_task(self.callbacks.hastener.run())
        log.info("http_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._hastening is not None:
            self._hastening.cancel()
            await asyncio.gather(self._hastening, return_exceptions=True)
            assert self.callbacks is not None
            self.callbacks.hastener.close()
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._listener is not None:
            await self._listener.wait_closed()
        if self.pages is not None:
            self.pages.close()

    def _over_capacity(self) -> None:
        self.svc.metrics.http_connections_refused.inc()

    async def healthz(self, request: web.Request) -> web.Response:
        last = self.svc.last_tick_at
        age = None if last is None else (utils.utcnow() - last).total_seconds()
        fresh = age is not None and age <= HEALTHY_TICK_AGE_SECONDS
        healthy = fresh and self.svc.healthy
        status = "ok" if healthy else ("stalled" if not fresh else "ticks failing")
        body = {
            "status": status,
            "last_tick_age_s": age,
            "tick_failures_in_a_row": self.svc.tick_failures,
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        database, storage = await asyncio.gather(
            self._check(self.svc.db(self.store.ping)),
            self._check(self.svc.archive.check()),
        )
        api_key = "rejected by the provider" if self.svc.keygate.blocked else "ok"
        provider = self.svc.worker.provider_trouble() or "ok"
        if database == "ok" and self.svc.writes_refused is not None:
            database = self.svc.writes_refused
        checks = {
            "database": database,
            "storage": storage,
            "api_key": api_key,
            "provider": provider,
        }
        ready = all(value == "ok" for value in checks.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status=200 if ready else 503,
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.svc.metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE}
        )

    async def on_callback(self, request: web.Request) -> web.Response:
        """Queue the task a callback names for a sooner poll (see the module doc)."""
        assert self.callbacks is not None
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            body = b""  # not a callback: a signed one fails its check, a token's is ignored
        token = request.match_info.get("token", "")
        if not self.callbacks.accepts(token, request.headers, body):
            self._refused(request)
            raise web.HTTPNotFound()
        task_id = self.callbacks.rule.task_id(body)
        if task_id is not None and (
            policy.task_id_problem(task_id) or self.svc.provider.task_id_problem(task_id)
        ):
            task_id = None  # no row can hold it; and it is not logged, whatever it is
        if task_id is None:
            self.svc.metrics.callbacks.labels(outcome="ignored").inc()
            return web.Response(status=204)
        if self.callbacks.hastener.offer(task_id) is callbacks.Offer.BUSY:
            return web.Response(
                status=503, headers={"Retry-After": str(callbacks.RETRY_AFTER_SECONDS)}
            )
        return web.Response(status=204)

    def _refused(self, request: web.Request) -> None:
        """Count a callback without the token; log it at most once per REFUSED_LOG_SECONDS."""
        self.svc.metrics.callbacks.labels(outcome="refused").inc()
        self._refused_unlogged += 1
        now = time.monotonic()
        last = self._refused_logged_at
        if last is not None and now - last < REFUSED_LOG_SECONDS:
            return
        log.warning(
            "callbacks_refused",
            reason="not the provider's: no or a wrong token in the URL, or no or a bad signature",
            refused=self._refused_unlogged,
            last_peer=request.remote,
            logged_at_most_every_s=REFUSED_LOG_SECONDS,
        )
        self._refused_unlogged = 0
        self._refused_logged_at = now

    @staticmethod
    async def _check(awaitable: Any) -> str:
        started = time.monotonic()
        try:
            await asyncio.wait_for(awaitable, CHECK_TIMEOUT_SECONDS)
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT_SECONDS:.0f}s"
        except errors.ArchiverError as exc:
            return str(exc)
        log.debug("ready_check", seconds=round(time.monotonic() - started, 3))
        return "ok"
