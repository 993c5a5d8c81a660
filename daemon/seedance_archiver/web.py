"""The operator's HTTP endpoints: ``/healthz``, ``/readyz`` and ``/metrics``; 404 everywhere else.

- ``/healthz``: the process and its event loop are alive and ticks complete: the last one
  completed recently and fewer than ``Service.MAX_TICK_FAILURES`` crashed in a row.
- ``/readyz``: the database answers, the archive storage answers, the provider accepts the API
  key and is not in an outage (``outage.py``); 503 with the failing checks otherwise.
- ``/metrics``: Prometheus text format (see ``metrics.py``).
- ``POST /callbacks/{provider}`` (only with SEEDANCE_CALLBACKS=true, for a provider that sends
  callbacks): the task the body names becomes due now. Callbacks are not signed, so that is all one
  can do; the poll that follows is the truth. Every callback is answered 204, a malformed or unknown
  one too (a provider that gets errors retries), and counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from seedance_archiver import errors, metrics, policy, service, store, utils

log = structlog.get_logger(__name__)

HEALTHY_TICK_AGE_SECONDS = 30.0
CHECK_TIMEOUT_SECONDS = 5.0
CALLBACK_MAX_BYTES = 64 * 1024  # a task's state is a few hundred bytes; more is not a callback

# Reads the task id out of a provider's callback body; None when it is not one.
CallbackReader = Callable[[bytes], str | None]


class WebServer:
    """Serves the endpoints for one :class:`service.Service` on ``host:port``."""

    def __init__(
        self,
        svc: service.Service,
        task_store: store.Store,
        host: str,
        port: int,
        callback: CallbackReader | None = None,
    ) -> None:
        self.svc = svc
        self.store = task_store
        self.host = host
        self.port = port
        self.callback = callback
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=CALLBACK_MAX_BYTES)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        if self.callback is not None:
            app.router.add_post(f"/callbacks/{self.svc.provider.name}", self.on_callback)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if server is not None and self.port == 0:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("http_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

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
        api_key = "rejected by the provider" if self.svc.auth_blocked else "ok"
        provider = self.svc.provider_trouble() or "ok"
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
        """Make the row a callback names due now; 204 whatever the body (see the module doc)."""
        assert self.callback is not None
        outcome = "ignored"
        try:
            task_id = self.callback(await request.read())
            if task_id is not None and policy.task_id_problem(task_id) is not None:
                task_id = None  # no row can hold it; and it is not logged, whatever it is
            if task_id is not None:
                hastened = await self.svc.db(
                    self.store.hasten, task_id, self.svc.clock(), self.svc.provider.name
                )
                outcome = "hastened" if hastened else "ignored"
                log.info("callback_received", task_id=task_id, hastened=hastened)
            else:
                log.info("callback_ignored", reason="not a task's state")
        except web.HTTPRequestEntityTooLarge:
            log.info("callback_ignored", reason="body too large")
        except errors.StoreError as exc:
            # The row's own cadence still finds it; the provider need not retry.
            log.warning("callback_not_applied", error=str(exc))
        self.svc.metrics.callbacks.labels(outcome=outcome).inc()
        return web.Response(status=204)

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
