"""POST /callbacks/ark/{token} on the daemon's HTTP port, over real HTTP on loopback.

The endpoint's behaviour runs on the fake store (its web side); the rule that keeps a flood of
callbacks to the mode's cadence runs on every store. tests/acceptance/test_callback_flood.py floods
a whole daemon on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import json
import re
import threading
from collections.abc import AsyncIterator, Iterable, Mapping

import aiohttp
import pytest
import structlog
from seedance_archiver import (
    callbacks,
    config,
    errors,
    models,
    policy,
    ratelimit,
    service,
    store,
    testing,
    utils,
    web,
)
from seedance_archiver.providers import ark

from tests.helpers import wait_until

EPOCH = testing.EPOCH
TOKEN = "t" * 40  # a test's token: 40 unreserved characters, as the setting asks
CADENCES = config.Settings().cadences()
RULES = policy.Rules(cadences=CADENCES, retention=dt.timedelta(days=1))
# Never polled, due in 45 s: a callback makes it due now.
WAITING = models.Task("cgt-1", state="polling", next_attempt_at=EPOCH + dt.timedelta(seconds=45))


class DownStore(testing.FakeStore):
    def hasten(
        self,
        task_ids: Iterable[str],
        now: dt.datetime,
        provider_name: str,
        cadences: Mapping[str, models.Cadence],
    ) -> int:
        raise errors.StoreError("database unreachable")


class HeldStore(testing.FakeStore):
    """A store whose ``hasten`` waits until the test lets it go (a slow or locked database)."""

    def __init__(self, tasks: Iterable[models.Task]) -> None:
        super().__init__(tasks)
        self.entered = threading.Event()
        self.go_on = threading.Event()

    def hasten(
        self,
        task_ids: Iterable[str],
        now: dt.datetime,
        provider_name: str,
        cadences: Mapping[str, models.Cadence],
    ) -> int:
        self.entered.set()
        assert self.go_on.wait(30), "the test never let hasten go on"
        return super().hasten(task_ids, now, provider_name, cadences)


@contextlib.asynccontextmanager
async def serving(
    task_store: testing.FakeStore,
    *,
    queue_limit: int = callbacks.QUEUE_LIMIT,
    max_connections: int = config.HTTP_MAX_CONNECTIONS,
    with_callbacks: bool = True,
) -> AsyncIterator[tuple[str, service.Service]]:
    """The daemon's HTTP server for a service on ``task_store``, on a loopback port: its base URL.

    The service's database calls run on a pool of their own, as in the daemon; the callbacks'
    batches on theirs.
    """
    svc = service.Service(
        task_store,
        testing.FakeProvider("ark"),
        testing.FakeArchive(),
        RULES,
        ratelimit.RateLimiter(100),
        owner="test",
        clock=testing.MovableClock(),
        db_executor=concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="db"),
    )
    endpoint = None
    if with_callbacks:
        hastener = callbacks.Hastener(
            task_store,
            "ark",
            CADENCES,
            svc.clock,
            svc.metrics,
            queue_limit=queue_limit,
            batch_seconds=0.0,
        )
        endpoint = web.Callbacks(ark.CALLBACKS, TOKEN, hastener)
    server = web.WebServer(
        svc, task_store, "127.0.0.1", 0, endpoint, max_connections=max_connections
    )
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", svc
    finally:
        await server.stop()
        svc.db_executor.shutdown(wait=False)


async def post(base: str, path: str, body: bytes) -> tuple[int, Mapping[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(base + path, data=body) as response,
    ):
        await response.read()
        return response.status, dict(response.headers)


def counted(svc: service.Service, outcome: str) -> float:
    text = svc.metrics.render().decode()
    found = re.search(rf'^seedance_callbacks_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def settled(svc: service.Service, outcome: str, expected: float) -> None:
    """Wait (with a deadline) until ``expected`` callbacks are counted as ``outcome``."""
    await wait_until(
        lambda: counted(svc, outcome) >= expected, 20, f"{expected:g} callbacks counted {outcome}"
    )
    assert counted(svc, outcome) == expected


ARK = f"/callbacks/ark/{TOKEN}"
CALLBACK = json.dumps({"id": "cgt-1", "status": "succeeded"}).encode()


@pytest.fixture
def fake_store() -> testing.FakeStore:
    return testing.FakeStore([WAITING])


class TestCallbackEndpoint:
    """A callback with the token is answered 204 and makes the row due sooner; without it, 404."""

    async def test_a_callback_makes_the_row_due_now(self, fake_store: testing.FakeStore) -> None:
        async with serving(fake_store) as (base, svc):
            assert (await post(base, ARK, CALLBACK))[0] == 204
            await settled(svc, "hastened", 1)
        assert fake_store.rows["cgt-1"].next_attempt_at == EPOCH

    @pytest.mark.parametrize(
        "body",
        [b"", b"not json", b'{"id": "../../etc"}', b'{"id": "cgt-unknown"}', b"x" * (65 * 1024)],
        ids=["empty", "not json", "not an id", "unknown", "too large"],
    )
    async def test_anything_else_is_answered_and_ignored(
        self, fake_store: testing.FakeStore, body: bytes
    ) -> None:
        async with serving(fake_store) as (base, svc):
            assert (await post(base, ARK, body))[0] == 204
            await settled(svc, "ignored", 1)
        assert fake_store.rows["cgt-1"] == WAITING

    @pytest.mark.parametrize(
        "path",
        [
            "/callbacks/ark",
            "/callbacks/ark/",
            f"/callbacks/ark/{TOKEN[:-1]}",
            f"/callbacks/ark/{TOKEN}x",
        ],
        ids=["no token", "empty token", "token cut short", "token too long"],
    )
    async def test_without_the_token_nothing_moves_and_the_answer_is_404(
        self, fake_store: testing.FakeStore, path: str
    ) -> None:
        with structlog.testing.capture_logs() as logged:
            async with serving(fake_store) as (base, svc):
                for _ in range(50):
                    assert (await post(base, path, CALLBACK))[0] == 404
                assert counted(svc, "refused") == 50.0
                assert counted(svc, "hastened") == counted(svc, "ignored") == 0.0
        assert fake_store.rows["cgt-1"] == WAITING
        # Counted each time, logged once a minute, never with what was sent.
        refused = [line for line in logged if line["event"] == "callbacks_refused"]
        assert len(refused) == 1 and refused[0]["refused"] == 1
        assert TOKEN[:-1] not in repr(logged)
        assert not [line for line in logged if line["event"].startswith("callback_")]

    async def test_a_database_down_is_answered_too(self) -> None:
        async with serving(DownStore([WAITING])) as (base, svc):
            assert (await post(base, ARK, CALLBACK))[0] == 204
            await settled(svc, "ignored", 1)

    async def test_off_unless_enabled(self, fake_store: testing.FakeStore) -> None:
        async with serving(fake_store, with_callbacks=False) as (base, _):
            assert (await post(base, ARK, CALLBACK))[0] == 404


class TestBounded:
    """Callbacks have a thread and a queue of their own: they never hold up the daemon's work."""

    async def test_a_stuck_batch_holds_up_neither_the_daemons_database_work_nor_the_port(
        self,
    ) -> None:
        rows = [WAITING.replace(task_id=f"cgt-{n}") for n in range(1, 6)]
        held = HeldStore(rows)
        async with serving(held, queue_limit=3) as (base, svc):
            assert (await post(base, ARK, b'{"id": "cgt-1"}'))[0] == 204
            assert await asyncio.to_thread(held.entered.wait, 20), "the batch never started"
            # The batch is stuck in the database: the daemon's own database calls still run.
            assert await asyncio.wait_for(svc.db(held.claim_due, "x", EPOCH, 60, 0), 20) == []
            # Callbacks queue up to the limit (a task already queued takes no more room) ...
            for n in (2, 3, 4, 4, 4):
                assert (await post(base, ARK, json.dumps({"id": f"cgt-{n}"}).encode()))[0] == 204
            # ... then the answer is 503 with Retry-After, and the provider retries later.
            status, headers = await post(base, ARK, b'{"id": "cgt-5"}')
            assert (status, headers["Retry-After"]) == (503, str(callbacks.RETRY_AFTER_SECONDS))
            assert counted(svc, "busy") == 1.0
            held.go_on.set()
            await settled(svc, "hastened", 4)
            await settled(svc, "ignored", 2)  # the second and third callback for cgt-4
        assert {t for t, row in held.rows.items() if row.next_attempt_at == EPOCH} == {
            "cgt-1",
            "cgt-2",
            "cgt-3",
            "cgt-4",
        }

    async def test_connections_beyond_the_cap_are_answered_503_and_closed(
        self, fake_store: testing.FakeStore
    ) -> None:
        async with serving(fake_store, max_connections=3) as (base, svc):
            port = int(base.rsplit(":", 1)[1])
            # Three keep-alive connections, each seen by the server (it answered on each).
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            for idle_reader, idle_writer in idle:
                idle_writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
                assert (await asyncio.wait_for(idle_reader.readline(), 20)).startswith(b"HTTP/1.1")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answer = await asyncio.wait_for(reader.read(), 20)  # read to the end: it is closed
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert _healthz_refused(svc) == 1.0
            writer.close()
            # One idle connection goes: the port serves again.
            for _, idle_writer in idle[:1]:
                idle_writer.close()
                await idle_writer.wait_closed()

            async def served() -> bool:
                try:
                    status, _ = await post(base, "/metrics", b"")
                except aiohttp.ClientError:
                    return False
                return status != 503

            await wait_until(served, 20, "the port to serve again")
            for _, idle_writer in idle[1:]:
                idle_writer.close()


def _healthz_refused(svc: service.Service) -> float:
    text = svc.metrics.render().decode()
    found = re.search(r"^seedance_http_connections_refused_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


OWNER = "test-daemon"


def tracked(
    s: store.Store,
    task_id: str,
    *,
    mode: str = "standard",
    polled_ago: float | None = None,
    due_in: float = 45.0,
    save: bool = True,
    **changes: object,
) -> None:
    """A row as the daemon leaves it after a poll ``polled_ago`` seconds ago (or none)."""
    s.add(task_id, mode)
    now = utils.utcnow()
    [task] = [t for t in s.claim_due(OWNER, now, 60, 100) if t.task_id == task_id]
    if not save:
        return  # leased: a daemon is working on it
    polled = None if polled_ago is None else now - dt.timedelta(seconds=polled_ago)
    fields: dict[str, object] = {
        "state": "polling",
        "last_polled_at": polled,
        "next_attempt_at": now + dt.timedelta(seconds=due_in),
        "updated_at": now,
    }
    done = task.replace(**{**fields, **changes})
    assert s.save([done], OWNER) == 1


class TestHastenKeepsTheCadence:
    """No callback makes a row due sooner than its mode's shortest interval after its last poll."""

    def test_on_every_store(self, any_store: store.Store) -> None:
        tracked(any_store, "cgt-never-polled")
        tracked(any_store, "cgt-polled-long-ago", polled_ago=40)
        tracked(any_store, "cgt-standard-just-polled", polled_ago=5)  # low is 30 s
        tracked(any_store, "cgt-draft-just-polled", mode="draft", polled_ago=5)  # low is 10 s
        tracked(any_store, "cgt-due-sooner-already", polled_ago=5, due_in=20)
        tracked(any_store, "cgt-leased", save=False)
        tracked(any_store, "cgt-finished", state="cancelled")
        tracked(any_store, "cgt-other-provider", provider="reseller")
        before = {t: any_store.get(t) for t in _ids(any_store)}
        now = utils.utcnow()

        moved = any_store.hasten([*before, "cgt-untracked"], now, "ark", CADENCES)

        after = {t: any_store.get(t) for t in before}
        changed = {t for t in before if after[t] != before[t]}
        assert moved == 4
        assert changed == {
            "cgt-never-polled",
            "cgt-polled-long-ago",
            "cgt-standard-just-polled",
            "cgt-draft-just-polled",
        }

        def due(task_id: str) -> dt.datetime:
            row = after[task_id]
            assert row is not None and row.next_attempt_at is not None
            return row.next_attempt_at

        def polled(task_id: str, seconds: float) -> dt.datetime:
            row = before[task_id]
            assert row is not None and row.last_polled_at is not None
            return row.last_polled_at + dt.timedelta(seconds=seconds)

        assert due("cgt-never-polled") == due("cgt-polled-long-ago") == now
        assert due("cgt-standard-just-polled") == polled("cgt-standard-just-polled", 30)
        assert due("cgt-draft-just-polled") == polled("cgt-draft-just-polled", 10)
        # A second flood of the same callbacks moves nothing: they are all due as soon as allowed.
        assert any_store.hasten(list(before), now, "ark", CADENCES) == 0


def _ids(s: store.Store) -> list[str]:
    return sorted(task.task_id for task in s.list())
