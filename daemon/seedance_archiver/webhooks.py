"""Webhooks to the feeding application: signed by Standard Webhooks, delivered from the outbox.

The only module that sends webhooks. Events are written by the database (the trigger of migration
0006, and ``task.at_risk`` by the outbox) in the transaction that changed the row; this module
claims due events (a lease, SKIP LOCKED on PostgreSQL), posts each one, and records the outcome.
Delivery is at least once: an event whose lease runs out (a killed daemon) is sent again, under the
same ``webhook-id``, so receivers deduplicate on it.

The retry schedule is the specification's, with jitter; a 429 or 503 with ``Retry-After`` waits at
least that long; only 2xx counts as delivered. A 410 Gone switches the endpoint off, as Standard
Webhooks readers expect: the URL is paused (``webhook_endpoints``), nothing more is sent to it, and
its events stay pending until an operator runs ``seedance-archiver webhooks resume``. A receiver
that hangs costs one of ``concurrency`` connections for ``timeout_seconds``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import json
import math
import random
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import aiohttp
import standardwebhooks
import structlog

import seedance_archiver
from seedance_archiver import errors, metrics, models, netguard, outbox, utils

log = structlog.get_logger(__name__)
R = TypeVar("R")

# Standard Webhooks' schedule: the delay before attempt n+1 after attempt n failed; the first is
# immediate, and after the tenth the event is given up on (about 3 days in all).
RETRY_SCHEDULE_SECONDS: tuple[float, ...] = (
    0,
    5,
    300,
    1800,
    7200,
    18000,
    36000,
    50400,
    72000,
    86400,
)
JITTER_FRACTION = 0.1  # each delay is drawn within +-10%, so a burst of failures spreads out
TIMEOUT_SECONDS = 10.0
CONCURRENCY = 8
# A claim takes this many rounds of ``concurrency`` events: fewer claims and one commit for all
# their outcomes. The lease must outlast them: BATCH_ROUNDS x the timeout, at worst.
BATCH_ROUNDS = 4
LEASE_SECONDS = 60.0
POLL_SECONDS = 0.5
AT_RISK_SECONDS = 60.0
AT_RISK_BATCH = 1000  # task.at_risk events written at most per run
ERROR_CHARS = 300
MAX_ANSWER_BYTES = 64 * 1024
USER_AGENT = f"seedance-archiver/{seedance_archiver.__version__}"
GONE = 410
# What a paused endpoint's row and its held events say.
PAUSED_REASON = "the receiver answered 410 Gone"
PAUSED_ERROR = "HTTP 410 Gone: the endpoint is paused until `seedance-archiver webhooks resume`"


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the receiver said: its status and Retry-After (seconds), or why there was no answer."""

    status: int | None
    retry_after: float | None = None
    error: str | None = None


def next_attempt_at(
    attempts: int,
    now: dt.datetime,
    answer: Answer,
    schedule: Sequence[float] = RETRY_SCHEDULE_SECONDS,
    draw: Callable[[float, float], float] = random.uniform,
) -> dt.datetime | None:
    """When to try again after ``attempts`` failed attempts, or None when the schedule ran out.

    The schedule's delay with jitter; a 429 or 503 with Retry-After waits at least that long.
    """
    if attempts >= len(schedule):
        return None
    base = schedule[attempts]
    delay = draw(base * (1 - JITTER_FRACTION), base * (1 + JITTER_FRACTION))
    if answer.status in (429, 503) and answer.retry_after is not None:
        delay = max(delay, answer.retry_after)
    return now + dt.timedelta(seconds=delay)


def outcome(
    event: models.OutboxEvent,
    answer: Answer,
    now: dt.datetime,
    schedule: Sequence[float] = RETRY_SCHEDULE_SECONDS,
    draw: Callable[[float, float], float] = random.uniform,
) -> models.OutboxEvent:
    """The event after one attempt that got ``answer``: delivered, retried or failed; after a 410
    Gone it waits, due, for its endpoint to be resumed (the attempt does not count against the
    retry schedule: the endpoint refused it, not the event)."""
    if answer.status == GONE:
        return dataclasses.replace(
            event, last_status=GONE, last_error=PAUSED_ERROR, next_attempt_at=now
        )
    attempts = event.attempts + 1
    error = answer.error if answer.status is None else f"HTTP {answer.status}"
    tried = dataclasses.replace(
        event, attempts=attempts, last_status=answer.status, last_error=error
    )
    if answer.status is not None and 200 <= answer.status < 300:
        return dataclasses.replace(
            tried, state=models.Delivery.DELIVERED.value, delivered_at=now, last_error=None
        )
    retry_at = next_attempt_at(attempts, now, answer, schedule, draw)
    if retry_at is None:
        return dataclasses.replace(tried, state=models.Delivery.FAILED.value)
    return dataclasses.replace(tried, next_attempt_at=retry_at)


def body(event: models.OutboxEvent) -> str:
    """The JSON body of ``event``: Standard Webhooks' envelope (type, timestamp, data)."""
    envelope = {
        "type": event.event,
        "timestamp": models.event_time(event.created_at),
        "data": json.loads(event.payload),
    }
    return json.dumps(envelope, separators=(",", ":"))


class Signer:
    """Signs with every configured ``whsec_`` secret (the first is current; the rest rotate out)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise errors.ConfigError("a webhook needs at least one secret")
        try:
            self._webhooks = [standardwebhooks.Webhook(secret) for secret in secrets]
        except Exception as exc:  # the library raises bare errors for bad base64
            raise errors.ConfigError(
                "invalid setting SEEDANCE_WEBHOOK_SECRET: expected whsec_ and base64"
            ) from exc

    def headers(self, webhook_id: str, timestamp: dt.datetime, payload: str) -> dict[str, str]:
        signatures = " ".join(w.sign(webhook_id, timestamp, payload) for w in self._webhooks)
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(math.floor(timestamp.timestamp())),
            "webhook-signature": signatures,
        }


def check_url(url: str, allow_private_hosts: bool) -> None:
    """Raise ConfigError unless ``url`` is http(s) with a host that may receive our webhooks.

    An IP literal is checked here; a name is checked where it resolves, on every connection
    (netguard.PublicResolver), as for video links.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.ConfigError(
            "invalid setting SEEDANCE_WEBHOOK_URL: expected an http(s) URL with a host"
        )
    if not allow_private_hosts and netguard.is_private_literal(parts.hostname):
        raise errors.ConfigError(
            "invalid setting SEEDANCE_WEBHOOK_URL: a loopback, private or link-local address "
            "(set SEEDANCE_ALLOW_PRIVATE_WEBHOOK_HOSTS=true to allow)"
        )


class Sender(Protocol):
    """Posts one signed body and says what the receiver answered (never raises for the network)."""

    async def post(self, url: str, headers: dict[str, str], payload: str) -> Answer: ...

    async def aclose(self) -> None: ...


class HttpSender:
    """aiohttp, at most ``concurrency`` connections, each exchange bounded by ``timeout_seconds``."""

    def __init__(
        self,
        *,
        timeout_seconds: float = TIMEOUT_SECONDS,
        concurrency: int = CONCURRENCY,
        allow_private_hosts: bool = False,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._concurrency = concurrency
        self._allow_private = allow_private_hosts
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Built on first use, inside the running loop (aiohttp's resolver needs one).
        if self._session is None:
            inner = aiohttp.ThreadedResolver()
            resolver = inner if self._allow_private else netguard.PublicResolver(inner)
            connector = aiohttp.TCPConnector(resolver=resolver, limit=self._concurrency)
            # No cookie jar: a receiver that sets a cookie would get it back on every later
            # delivery to its host. A webhook is authenticated by its signature, nothing else.
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def post(self, url: str, headers: dict[str, str], payload: str) -> Answer:
        sent = headers | {"content-type": "application/json", "user-agent": USER_AGENT}
        try:
            async with self._open().post(
                url, data=payload.encode(), headers=sent, allow_redirects=False
            ) as response:
                # The answer's body means nothing to us: read a little (a connection whose answer
                # was read whole is reused), never an unbounded amount.
                await response.content.read(MAX_ANSWER_BYTES)
                retry_after = utils.parse_retry_after(
                    response.headers.get("Retry-After"), utils.utcnow()
                )
                return Answer(response.status, retry_after)
        except TimeoutError:
            return Answer(None, error="no answer within the timeout")
        except (aiohttp.ClientError, OSError) as exc:
            return Answer(None, error=f"{type(exc).__name__}: {exc}"[:ERROR_CHARS])

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class Deliverer:
    """Claims due outbox events, posts them concurrently, records each outcome.

    Its database calls run on its own thread, and it runs as its own scheduler job, so a slow
    receiver or a long backlog never delays the polling tick or an archive.
    """

    def __init__(
        self,
        task_store: outbox.OutboxStore,
        url: str,
        signer: Signer,
        sender: Sender,
        *,
        owner: str,
        meters: metrics.Metrics | None = None,
        concurrency: int = CONCURRENCY,
        lease_seconds: float = LEASE_SECONDS,
        schedule: Sequence[float] = RETRY_SCHEDULE_SECONDS,
        clock: Callable[[], dt.datetime] = utils.utcnow,
        draw: Callable[[float, float], float] = random.uniform,
        executor: concurrent.futures.Executor | None = None,
        at_risk: models.AtRisk = models.AT_RISK_HOUR,
    ) -> None:
        self.store = task_store
        self.at_risk = at_risk
        self.url = url
        self.signer = signer
        self.sender = sender
        self.owner = owner
        self.meters = meters
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.schedule = tuple(schedule)
        self.clock = clock
        self.draw = draw
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="webhooks-db"
        )
        self._gone = False  # a 410 Gone came in the batch under way: send nothing more of it

    async def _db(self, call: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)

    async def deliver_due(self) -> int:
        """Deliver every due event, a batch of ``concurrency`` at a time; return how many tried."""
        tried = 0
        while True:
            limit = self.concurrency * BATCH_ROUNDS
            batch = await self._db(
                self.store.claim_webhooks,
                self.owner,
                self.clock(),
                self.lease_seconds,
                limit,
                self.url,
            )
            if not batch:
                return tried
            self._gone = False
            slots = asyncio.Semaphore(self.concurrency)
            done = await asyncio.gather(*(self._deliver(event, slots) for event in batch))
            try:
                await self._db(self.store.record_webhooks, done, self.owner)
            except errors.StoreError as exc:
                # Left leased: sent again when the leases run out (at least once).
                log.warning("webhook_outcomes_not_saved", events=len(done), error=str(exc))
            tried += len(batch)
            if len(batch) < limit or self._gone:
                return tried

    async def _deliver(
        self, event: models.OutboxEvent, slots: asyncio.Semaphore
    ) -> models.OutboxEvent:
        payload = body(event)
        async with slots:
            if self._gone:
                return event  # unchanged: recorded as it was, its lease released
            headers = self.signer.headers(event.webhook_id, self.clock(), payload)
            answer = await self.sender.post(self.url, headers, payload)
        after = outcome(event, answer, self.clock(), self.schedule, self.draw)
        if answer.status == GONE:
            self._gone = True
            await self._pause(event)
        fields = {
            "webhook_id": event.webhook_id,
            "webhook_event": event.event,
            "task_id": event.task_id,
            "attempt": after.attempts,
            "status": answer.status,
        }
        if after.state == models.Delivery.DELIVERED:
            label = "delivered"
            log.info("webhook_delivered", **fields)
        elif answer.status == GONE:
            label = "paused"
        elif after.state == models.Delivery.FAILED:
            label = "failed"
            log.error("webhook_given_up", **fields, error=after.last_error)
        else:
            label = "retry"
            retry_at = after.next_attempt_at
            log.warning(
                "webhook_attempt_failed",
                **fields,
                error=after.last_error,
                retry_at=retry_at.isoformat() if retry_at else None,
            )
        if self.meters is not None:
            self.meters.webhook_deliveries.labels(outcome=label).inc()
        return after

    async def _pause(self, event: models.OutboxEvent) -> None:
        """Switch our endpoint off for every replica: no claim returns an event for it until an
        operator resumes it. Events of this batch not yet sent go back untouched."""
        try:
            paused = await self._db(
                self.store.pause_webhook_endpoint, self.url, PAUSED_REASON, self.clock()
            )
        except errors.StoreError as exc:
            # Not written: the next claim sends again, and the next 410 pauses.
            log.warning("webhook_pause_not_saved", error=str(exc))
            return
        if paused:
            log.error(
                "webhook_endpoint_paused",
                url=utils.redact_url(self.url),
                webhook_id=event.webhook_id,
                reason=PAUSED_REASON,
                action="no event is sent to it until `seedance-archiver webhooks resume`",
            )

    async def warn_at_risk(self) -> int:
        """Write task.at_risk for tasks whose deadline is near (once per task, by the outbox)."""
        written = await self._db(
            self.store.add_at_risk_events, self.clock(), AT_RISK_BATCH, self.at_risk
        )
        if written:
            log.info("at_risk_events_written", tasks=written)
        return written

    async def refresh_gauges(self) -> outbox.WebhookBacklog:
        backlog = await self._db(self.store.webhook_backlog)
        if self.meters is not None:
            self.meters.webhook_backlog.set(backlog.pending)
            self.meters.webhook_given_up.set(backlog.given_up)
            self.meters.webhook_endpoints_paused.set(backlog.paused_endpoints)
            oldest = backlog.oldest_pending_at
            age = (self.clock() - oldest).total_seconds() if oldest is not None else 0.0
            self.meters.webhook_oldest_age.set(max(0.0, age))
        return backlog

    async def aclose(self) -> None:
        """Close the connections and give back the events this daemon still holds (attempts cut
        short by the stop: sent again at once by the next claim, under the same webhook-id)."""
        await self.sender.aclose()
        try:
            released = await self._db(self.store.release_webhooks, self.owner)
        except errors.StoreError as exc:
            log.warning("webhook_leases_not_released", error=str(exc))
        else:
            if released:
                log.info("webhook_leases_released", events=released)
        self._executor.shutdown(wait=False)
