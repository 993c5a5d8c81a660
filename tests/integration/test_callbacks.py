"""POST /callbacks/ark on the daemon's HTTP port, over real HTTP on loopback, with fake seams."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import test_utils
from seedance_archiver import config, errors, models, policy, ratelimit, service, testing, web
from seedance_archiver.providers import ark

EPOCH = testing.EPOCH
WAITING = models.Task("cgt-1", state="polling", next_attempt_at=EPOCH + dt.timedelta(seconds=45))
RULES = policy.Rules(cadences=config.Settings().cadences(), retention=dt.timedelta(days=1))


class DownStore(testing.FakeStore):
    def hasten(self, task_id: str, now: dt.datetime, provider_name: str) -> bool:
        raise errors.StoreError("database unreachable")


def make_service(task_store: testing.FakeStore) -> service.Service:
    return service.Service(
        task_store,
        testing.FakeProvider("ark"),
        testing.FakeArchive(),
        RULES,
        ratelimit.RateLimiter(100),
        owner="test",
        clock=testing.MovableClock(),
        db_executor=testing.InlineExecutor(),
    )


Client = test_utils.TestClient[test_utils.Request, test_utils.Application]


@contextlib.asynccontextmanager
async def serving(
    task_store: testing.FakeStore, callback: web.CallbackReader | None = ark.callback_task_id
) -> AsyncIterator[tuple[Client, service.Service]]:
    """The daemon's web app for a service on ``task_store``, on a loopback port."""
    svc = make_service(task_store)
    server = web.WebServer(svc, task_store, "127.0.0.1", 0, callback)
    client: Client = test_utils.TestClient(test_utils.TestServer(server.app(), host="127.0.0.1"))
    await client.start_server()
    try:
        yield client, svc
    finally:
        await client.close()


def counted(svc: service.Service, outcome: str) -> float:
    text = svc.metrics.render().decode()
    found = re.search(rf'^seedance_callbacks_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def store() -> testing.FakeStore:
    return testing.FakeStore([WAITING])


class TestCallbackEndpoint:
    """Every callback is answered 204; only a tracked task's row is made due now."""

    async def test_a_callback_makes_the_row_due_now(self, store: testing.FakeStore) -> None:
        async with serving(store) as (client, svc):
            body = json.dumps({"id": "cgt-1", "status": "succeeded"})
            assert (await client.post("/callbacks/ark", data=body)).status == 204
            assert counted(svc, "hastened") == 1.0
        assert store.rows["cgt-1"].next_attempt_at == EPOCH

    @pytest.mark.parametrize(
        "body",
        [b"", b"not json", b'{"id": "../../etc"}', b'{"id": "cgt-unknown"}', b"x" * (65 * 1024)],
        ids=["empty", "not json", "not an id", "unknown", "too large"],
    )
    async def test_anything_else_is_answered_and_ignored(
        self, store: testing.FakeStore, body: bytes
    ) -> None:
        async with serving(store) as (client, svc):
            assert (await client.post("/callbacks/ark", data=body)).status == 204
            assert counted(svc, "ignored") == 1.0
        assert store.rows["cgt-1"] == WAITING

    async def test_a_database_down_is_answered_too(self) -> None:
        async with serving(DownStore([WAITING])) as (client, svc):
            assert (await client.post("/callbacks/ark", data=b'{"id": "cgt-1"}')).status == 204
            assert counted(svc, "ignored") == 1.0

    async def test_off_unless_enabled(self, store: testing.FakeStore) -> None:
        async with serving(store, callback=None) as (client, _):
            assert (await client.post("/callbacks/ark", data=b'{"id": "cgt-1"}')).status == 404
