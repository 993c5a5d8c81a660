"""Webhooks over real HTTP to a loopback receiver that verifies every signature."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp.web
import pytest
import standardwebhooks
from seedance_archiver import cli, models, store, utils, webhooks

from tests.helpers import wait_until

SECRET = "whsec_" + base64.b64encode(b"r" * 32).decode()
OWNER = "test-owner"
FAST_SCHEDULE = (0, 0.05, 0.05, 0.05, 0.05, 0.05)  # the specification's, compressed
TIMEOUT_S = 0.5


@dataclasses.dataclass
class Received:
    webhook_id: str
    event: str
    task_id: str
    at: float


class Receiver:
    """An HTTP receiver on 127.0.0.1: each task's requests get its scripted answers in turn."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[str]] = {}
        self.received: list[Received] = []
        self.bad_signatures = 0
        self.release = asyncio.Event()
        self.url = ""
        self._runner: aiohttp.web.AppRunner | None = None

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        raw = await request.text()
        try:
            data = standardwebhooks.Webhook(SECRET).verify(raw, dict(request.headers))
        except standardwebhooks.WebhookVerificationError:
            self.bad_signatures += 1
            return aiohttp.web.Response(status=400)
        task_id = data["data"]["task_id"]
        self.received.append(
            Received(request.headers["webhook-id"], data["type"], task_id, time.monotonic())
        )
        script = self.scripts.get(task_id, [])
        answer = script.pop(0) if script else "204"
        if answer == "hang":
            await self.release.wait()
            return aiohttp.web.Response(status=204)
        headers = {"Retry-After": "1"} if answer in ("429", "503") else {}
        return aiohttp.web.Response(status=int(answer), headers=headers)

    async def start(self) -> None:
        app = aiohttp.web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def started() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with started() as r:
        yield r


@pytest.fixture
async def other_receiver() -> AsyncIterator[Receiver]:
    """A second receiver on its own URL."""
    async with started() as r:
        yield r


@pytest.fixture
def sql_store(db_url: str) -> Any:
    s = store.SqlStore.from_url(db_url)
    try:
        yield s
    finally:
        s.close()


def finish(s: store.SqlStore, task_id: str, state: str) -> None:
    s.add(task_id)
    [task] = [t for t in s.claim_due(OWNER, utils.utcnow(), 60, 100) if t.task_id == task_id]
    assert s.save([task.replace(state=state)], OWNER) == 1


def deliverer_for(
    sql_store: store.SqlStore,
    receiver: Receiver,
    schedule: tuple[float, ...],
    concurrency: int = webhooks.CONCURRENCY,
) -> webhooks.Deliverer:
    sender = webhooks.HttpSender(timeout_seconds=TIMEOUT_S, allow_private_hosts=True)
    signer = webhooks.Signer([SECRET])
    return webhooks.Deliverer(
        sql_store,
        receiver.url,
        signer,
        sender,
        owner=OWNER,
        schedule=schedule,
        concurrency=concurrency,
    )


def stepping(
    condition: Callable[[], bool], step: Callable[[], Awaitable[object]]
) -> Callable[[], Awaitable[bool]]:
    """``condition``, for :func:`wait_until`, running ``step`` (a round of delivery) whenever it
    does not hold yet."""

    async def holds() -> bool:
        if condition():
            return True
        await step()
        return False

    return holds


class TestDelivery:
    """500, 429 with Retry-After and a hang, each answered as the specification says."""

    async def test_failures_retry_under_one_id(
        self, receiver: Receiver, sql_store: store.SqlStore
    ) -> None:
        receiver.scripts = {"video_a": ["500", "429", "hang", "200"], "video_b": ["404"] * 9}
        finish(sql_store, "video_a", "archived")
        finish(sql_store, "video_b", "failed")
        deliverer = deliverer_for(sql_store, receiver, FAST_SCHEDULE)
        try:

            def settled() -> bool:
                return all(e.state != "pending" for e in sql_store.webhooks())

            await wait_until(stepping(settled, deliverer.deliver_due), 15, "every event settled")
        finally:
            await deliverer.aclose()
        events = {e.task_id: e for e in sql_store.webhooks()}
        assert (events["video_a"].state, events["video_a"].attempts) == ("delivered", 4)
        assert (events["video_b"].state, events["video_b"].last_status) == ("failed", 404)
        assert receiver.bad_signatures == 0
        a = [r for r in receiver.received if r.task_id == "video_a"]
        assert [r.webhook_id for r in a] == [events["video_a"].webhook_id] * 4
        assert [r.event for r in a] == ["task.archived"] * 4
        assert a[2].at - a[1].at >= 1.0  # Retry-After: 1 waited out (a floor, not a window)
        b = [r for r in receiver.received if r.task_id == "video_b"]
        assert len(b) == len(FAST_SCHEDULE)  # every attempt of the schedule, then given up

    async def test_a_hanging_receiver_costs_one_timeout(
        self, receiver: Receiver, sql_store: store.SqlStore
    ) -> None:
        receiver.scripts = {"video_h": ["hang"]}
        finish(sql_store, "video_h", "expired")
        deliverer = deliverer_for(sql_store, receiver, (0, 3600))
        try:
            await asyncio.wait_for(deliverer.deliver_due(), timeout=10)
        finally:
            await deliverer.aclose()
        [event] = sql_store.webhooks()
        assert event.state == "pending" and event.attempts == 1
        assert event.last_error == "no answer within the timeout"
        assert event.next_attempt_at is not None
        assert event.next_attempt_at > utils.utcnow() + dt.timedelta(minutes=50)


class TestGone:
    """A 410 Gone switches the endpoint off (Standard Webhooks): every event to it is held until
    `seedance-archiver webhooks resume`, then sent; another URL is not affected."""

    async def test_410_pauses_the_url_and_resume_sends_what_was_held(
        self,
        receiver: Receiver,
        other_receiver: Receiver,
        sql_store: store.SqlStore,
        db_url: str,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        receiver.scripts = {"video_a": ["410"]}
        for task_id in ("video_a", "video_b", "video_c"):
            finish(sql_store, task_id, "failed")
        # One at a time: the 410 comes before the others are sent (concurrent ones in flight
        # are delivered, as they would be).
        deliverer = deliverer_for(sql_store, receiver, FAST_SCHEDULE, concurrency=1)
        try:
            await deliverer.deliver_due()
            assert [r.task_id for r in receiver.received] == ["video_a"]
            # Nothing more to that URL, old events or new, however often the deliverer looks.
            finish(sql_store, "video_d", "archived")
            for _ in range(5):
                assert await deliverer.deliver_due() == 0
            assert [r.task_id for r in receiver.received] == ["video_a"]
            events = sql_store.webhooks()
            assert {e.state for e in events} == {"pending"}  # held, not disabled
            [paused] = sql_store.paused_webhook_endpoints()
            assert paused.url == receiver.url and "410" in paused.reason

            # Another URL is not paused: its claims still return events.
            other = deliverer_for(sql_store, other_receiver, FAST_SCHEDULE)
            claimed = sql_store.claim_webhooks("other", utils.utcnow(), 60, 10, other.url)
            assert len(claimed) == 4
            sql_store.release_webhooks("other")
            await other.aclose()

            monkeypatch.setenv("SEEDANCE_DATABASE_URL", db_url)
            capsys.readouterr()
            assert cli.main(["webhooks"]) == 0
            assert "PAUSED since" in capsys.readouterr().out
            assert cli.main(["webhooks", "resume", receiver.url]) == 0
            assert "resumed" in capsys.readouterr().out
            assert sql_store.paused_webhook_endpoints() == []

            await wait_until(
                stepping(
                    lambda: {e.state for e in sql_store.webhooks()} == {"delivered"},
                    deliverer.deliver_due,
                ),
                15,
                "the held events delivered",
            )
        finally:
            await deliverer.aclose()
        got = sorted((r.task_id, r.webhook_id) for r in receiver.received)
        ids = {e.task_id: e.webhook_id for e in events}
        assert got == sorted([("video_a", ids["video_a"]), *ids.items()])  # video_a twice
        assert receiver.bad_signatures == 0

    async def test_another_url_keeps_receiving(
        self, receiver: Receiver, other_receiver: Receiver, sql_store: store.SqlStore
    ) -> None:
        receiver.scripts = {"video_a": ["410"]}
        finish(sql_store, "video_a", "failed")
        gone = deliverer_for(sql_store, receiver, FAST_SCHEDULE)
        other = deliverer_for(sql_store, other_receiver, FAST_SCHEDULE)
        try:
            await gone.deliver_due()
            finish(sql_store, "video_b", "archived")
            assert await other.deliver_due() == 2
            assert await gone.deliver_due() == 0
        finally:
            await gone.aclose()
            await other.aclose()
        assert sorted(r.task_id for r in other_receiver.received) == ["video_a", "video_b"]
        assert [r.task_id for r in receiver.received] == ["video_a"]
        assert [p.url for p in sql_store.paused_webhook_endpoints()] == [receiver.url]


def test_the_envelope_is_the_rows_public_fields() -> None:
    """The body: type, timestamp, and the row's public fields as data."""
    payload = models.event_payload(models.Task(task_id="video_a", state="archived"))
    e = models.OutboxEvent(1, "msg_1", "video_a", "task.archived", payload, utils.utcnow())
    body = json.loads(webhooks.body(e))
    assert body["type"] == "task.archived"
    assert set(body["data"]) == set(models.EVENT_FIELDS)


async def test_a_cookie_a_receiver_sets_is_not_sent_on_the_next_delivery() -> None:
    """The sender keeps no cookies: a webhook is authenticated by its signature alone, and what
    one answer set must not ride along on every later delivery to that host."""
    sent: list[str | None] = []

    async def answer(request: aiohttp.web.Request) -> aiohttp.web.Response:
        sent.append(request.headers.get("Cookie"))
        response = aiohttp.web.Response(status=204)
        response.set_cookie("session", "from-the-receiver", path="/")
        return response

    app = aiohttp.web.Application()
    app.router.add_post("/hook", answer)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sender = webhooks.HttpSender(timeout_seconds=5.0, allow_private_hosts=True)
    try:
        # By name: aiohttp's default jar keeps no cookie from a bare IP address.
        for _ in range(2):
            answered = await sender.post(f"http://localhost:{port}/hook", {}, "{}")
            assert answered.status == 204, answered
    finally:
        await sender.aclose()
        await runner.cleanup()
    assert sent == [None, None]
