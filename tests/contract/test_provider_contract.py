"""The provider's behaviour, once, over every provider: each of ``providers.NAMES`` against the
simulator in its dialect over loopback HTTP, and the scripted fake given the same situations.

A situation ("a task completed", "a wrong key") is set up by each side in its own way: the simulator
is told how the task plays out, the fake is scripted with the answer the real one gives. The tests
then ask only through the :class:`provider.Provider` seam.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Protocol

import pytest
from seedance_archiver import (
    errors,
    models,
    netguard,
    provider,
    providers,
    simulator,
    testing,
    utils,
)

from tests.helpers import SIM_KEY, serving

SIZE = 300_000  # not a whole number of the simulator's blocks nor of the fake's chunks
LOCAL_HTTP = netguard.UrlRules(schemes=frozenset({"http"}), allow_private_hosts=True)
NEVER = 1e9  # seconds: a phase the test does not wait out
REASON = "content policy violation"
# What a completed task says of its video, on every side.
MODEL = "seedance_1_5_pro_720p"
DURATION = 7.5
# Answers to a poll that are not the provider's own "no such task": a gateway or proxy in front.
NOT_OWN_404S = {
    "html": ("<html><body><h1>404 Not Found</h1>nginx</body></html>", "text/html"),
    "empty": ("", "text/plain"),
    "a gateway's json": ('{"message": "no Route matched with those values"}', "application/json"),
}


class Side(Protocol):
    """One provider and the ways to put a task of it in a given situation."""

    client: provider.Provider

    def completed(self, task_id: str, *, stale_links: int = 0) -> None:
        """Finished, its video ``video(task_id)``; the first ``stale_links`` links already refused."""

    def queued(self, task_id: str) -> None: ...

    def processing(self, task_id: str) -> None: ...

    def ended(self, task_id: str, outcome: str) -> None:
        """Ended ``failed`` (for :data:`REASON`) or ``cancelled``."""

    def with_wrong_key(self) -> provider.Provider:
        """The same provider asked with a key it does not accept."""

    def outage_404(self, task_id: str, body: str, content_type: str) -> None:
        """The next poll of ``task_id``, and the key check after it, get a 404 (``body`` of
        ``content_type``) that is not the provider's own; then it answers as itself again."""

    def requests(self) -> int:
        """How many times the provider has been asked so far."""

    def busy_once(self, task_id: str, status: int, retry_after: int | None = None) -> None:
        """The next poll of ``task_id`` is answered HTTP ``status`` (with ``Retry-After``); the
        polls after it as before."""


def video(task_id: str) -> bytes:
    return b"".join(simulator.video_chunks(task_id, SIZE))


class Simulated:
    """A provider's own client against the simulator in its dialect."""

    def __init__(self, name: str, server: simulator.SimulatorThread) -> None:
        self.name = name
        self.server = server
        self.client = self._client(SIM_KEY)
        self._clients = [self.client]

    def _client(self, key: str) -> provider.Provider:
        options = provider.Options(url_rules=LOCAL_HTTP)
        return providers.get(self.name).build(self.server.url, key, options)

    def completed(self, task_id: str, *, stale_links: int = 0) -> None:
        self.server.simulator.add_task(
            task_id,
            queued_seconds=0,
            ready_seconds=0,
            size=SIZE,
            stale_links=stale_links,
            model=MODEL,
            duration=DURATION,
        )

    def queued(self, task_id: str) -> None:
        self.server.simulator.add_task(task_id, queued_seconds=NEVER, ready_seconds=NEVER)

    def processing(self, task_id: str) -> None:
        self.server.simulator.add_task(task_id, queued_seconds=0, ready_seconds=NEVER)

    def ended(self, task_id: str, outcome: str) -> None:
        self.server.simulator.add_task(
            task_id, outcome=outcome, queued_seconds=0, ready_seconds=0, error=REASON
        )

    def with_wrong_key(self) -> provider.Provider:
        client = self._client("not-" + SIM_KEY)
        self._clients.append(client)
        return client

    def outage_404(self, task_id: str, body: str, content_type: str) -> None:
        self.server.simulator.add_fault(
            "*", on="poll", status=404, body=body, content_type=content_type, times=2
        )

    def requests(self) -> int:
        return sum(self.server.simulator.stats.polls.values())

    def busy_once(self, task_id: str, status: int, retry_after: int | None = None) -> None:
        told = {} if retry_after is None else {"retry_after": retry_after}
        self.server.simulator.add_fault(task_id, on="poll", status=status, **told)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


class Scripted:
    """The fake provider, scripted with what the real one answers in each situation."""

    def __init__(self) -> None:
        self.fake = testing.FakeProvider()
        self.client: provider.Provider = self.fake

    def completed(self, task_id: str, *, stale_links: int = 0) -> None:
        links = [f"https://videos.example/{task_id}.mp4?sig={n}" for n in range(stale_links + 1)]
        self.fake.videos[links[-1]] = video(task_id)
        self.fake.script(
            task_id,
            *(
                testing.answer(
                    task_id, "completed", video_url=link, created=utils.utcnow(), duration=DURATION
                )
                for link in links
            ),
        )

    def queued(self, task_id: str) -> None:
        self.fake.script(task_id, testing.answer(task_id, "queued"))

    def processing(self, task_id: str) -> None:
        self.fake.script(task_id, testing.answer(task_id, "processing"))

    def ended(self, task_id: str, outcome: str) -> None:
        error = REASON if outcome == "failed" else None
        self.fake.script(task_id, testing.answer(task_id, outcome, error=error))

    def with_wrong_key(self) -> provider.Provider:
        wrong = testing.FakeProvider(self.fake.name)
        wrong.key_ok = False
        for task_id in self.fake.scripts:
            refused = errors.AuthRejected(
                "the provider rejected the API key (HTTP 401)", status_code=401
            )
            wrong.script(task_id, refused)
        return wrong

    def outage_404(self, task_id: str, body: str, content_type: str) -> None:
        outage = errors.ProviderUnavailable(
            f"the provider answered 404 without its own JSON error: {content_type}", status_code=404
        )
        unknown = errors.TaskNotFound("the provider does not know this task (HTTP 404)")
        self.fake.script(task_id, outage, unknown)
        self.fake.key_ok = None

    def requests(self) -> int:
        return len(self.fake.fetches) + self.fake.key_checks

    def busy_once(self, task_id: str, status: int, retry_after: int | None = None) -> None:
        busy: errors.ProviderError = errors.ProviderUnavailable(
            f"the provider answered HTTP {status}", status_code=status
        )
        if status == 429:
            wait = None if retry_after is None else float(retry_after)
            busy = errors.RateLimited("the provider answered HTTP 429", retry_after=wait)
        self.fake.scripts[task_id].insert(0, busy)


@pytest.fixture(params=[*providers.NAMES, "fake"])
async def any_provider(request: pytest.FixtureRequest) -> AsyncIterator[Side]:
    """The same provider behaviour on every provider's client (against the simulator in its
    dialect) and on the fake."""
    if request.param == "fake":
        yield Scripted()
        return
    with serving(request.param) as server:
        side = Simulated(request.param, server)
        try:
            yield side
        finally:
            await side.aclose()


async def download(source: provider.Provider, task: models.Task) -> tuple[int | None, bytes]:
    async with source.open_video(task) as opened:
        data = bytearray()
        async for chunk in opened.chunks:
            data += chunk
    return opened.length, bytes(data)


def linked(answer: models.Answer) -> models.Task:
    """The row of a task after the answer: what open_video is given."""
    return models.Task(task_id=answer.id, video_url=answer.video_url)


class TestAnswers:
    """fetch maps the provider's states onto ours."""

    async def test_a_completed_task_links_its_video(self, any_provider: Side) -> None:
        any_provider.completed("video_done")
        answer = await any_provider.client.fetch("video_done")
        assert (answer.id, answer.status, answer.error) == ("video_done", "completed", None)
        assert answer.video_url is not None
        assert await download(any_provider.client, linked(answer)) == (SIZE, video("video_done"))

    @pytest.mark.parametrize("status", ["queued", "processing"])
    async def test_a_task_under_way_has_no_link_yet(self, any_provider: Side, status: str) -> None:
        getattr(any_provider, status)("video_waiting")
        answer = await any_provider.client.fetch("video_waiting")
        assert (answer.id, answer.status, answer.video_url) == ("video_waiting", status, None)

    async def test_a_failed_task_says_why(self, any_provider: Side) -> None:
        any_provider.ended("video_refused", "failed")
        answer = await any_provider.client.fetch("video_refused")
        assert (answer.status, answer.video_url) == ("failed", None)
        assert answer.error is not None and REASON in answer.error

    async def test_a_cancelled_task(self, any_provider: Side) -> None:
        any_provider.ended("video_cancelled", "cancelled")
        answer = await any_provider.client.fetch("video_cancelled")
        assert (answer.status, answer.video_url) == ("cancelled", None)

    async def test_an_unknown_task_is_the_providers_own_not_found(self, any_provider: Side) -> None:
        with pytest.raises(errors.TaskNotFound):
            await any_provider.client.fetch("video_nobody_made")


class TestKey:
    """A key the provider refuses is told apart from a task it does not know."""

    async def test_the_right_key_passes_its_check(self, any_provider: Side) -> None:
        assert await any_provider.client.check_key() is True

    async def test_a_wrong_key_is_rejected(self, any_provider: Side) -> None:
        any_provider.completed("video_done")
        wrong = any_provider.with_wrong_key()
        with pytest.raises(errors.AuthRejected):
            await wrong.fetch("video_done")
        assert await wrong.check_key() is False


class TestVideo:
    """open_video streams a link; a refused link means: poll again for a fresh one."""

    async def test_a_refused_link_expired_and_the_next_answer_works(
        self, any_provider: Side
    ) -> None:
        any_provider.completed("video_stale", stale_links=1)
        stale = await any_provider.client.fetch("video_stale")
        with pytest.raises(errors.LinkExpired):
            await download(any_provider.client, linked(stale))
        fresh = await any_provider.client.fetch("video_stale")
        assert fresh.video_url != stale.video_url
        assert await download(any_provider.client, linked(fresh)) == (SIZE, video("video_stale"))

    async def test_a_task_without_a_link_is_no_download(self, any_provider: Side) -> None:
        with pytest.raises(errors.DownloadError) as caught:
            await download(any_provider.client, models.Task(task_id="video_unlinked"))
        # Not LinkExpired: no host refused a link; there was none to ask.
        assert not isinstance(caught.value, errors.LinkExpired)


class TestWhatAnAnswerSays:
    """A completed answer says which model made the video, when it was asked for, how long it runs."""

    async def test_model_creation_time_and_duration(self, any_provider: Side) -> None:
        asked = utils.utcnow()
        any_provider.completed("video_told")
        answer = await any_provider.client.fetch("video_told")
        assert (answer.model, answer.actual_duration) == (MODEL, DURATION)
        assert answer.created is not None and answer.created.utcoffset() == dt.timedelta(0)
        assert abs(answer.created - asked) < dt.timedelta(minutes=1)


class TestNotItsOwn404:
    """A 404 that is not the provider's own (a gateway's) is an outage, no verdict on task or key."""

    @pytest.mark.parametrize(("body", "content_type"), NOT_OWN_404S.values(), ids=NOT_OWN_404S)
    async def test_an_outage_then_the_providers_own_answer(
        self, any_provider: Side, body: str, content_type: str
    ) -> None:
        any_provider.outage_404("video_nobody_made", body, content_type)
        with pytest.raises(errors.ProviderUnavailable) as caught:
            await any_provider.client.fetch("video_nobody_made")
        assert caught.value.status_code == 404
        assert content_type in str(caught.value)
        assert not body or body[:12] not in str(caught.value)  # what it was, not what it said
        assert await any_provider.client.check_key() is None
        # The outage over, the provider's own 404 says again that it does not know the task.
        with pytest.raises(errors.TaskNotFound):
            await any_provider.client.fetch("video_nobody_made")


class TestTheKeyCheck:
    """check_key costs one request."""

    async def test_one_request(self, any_provider: Side) -> None:
        before = any_provider.requests()
        assert await any_provider.client.check_key() is True
        assert any_provider.requests() == before + 1


class TestBusy:
    """A provider too busy to answer: an outage that passes, or a request to wait so long."""

    @pytest.mark.parametrize("status", [500, 502, 503])
    async def test_a_server_error_is_an_outage_that_passes(
        self, any_provider: Side, status: int
    ) -> None:
        any_provider.completed("video_busy")
        any_provider.busy_once("video_busy", status)
        with pytest.raises(errors.ProviderUnavailable, match=str(status)) as caught:
            await any_provider.client.fetch("video_busy")
        assert not isinstance(caught.value, errors.RateLimited)
        answer = await any_provider.client.fetch("video_busy")
        assert answer.status is models.Status.COMPLETED

    @pytest.mark.parametrize("retry_after", [7, None], ids=["retry-after", "no-retry-after"])
    async def test_a_429_says_how_long_to_wait(
        self, any_provider: Side, retry_after: int | None
    ) -> None:
        any_provider.completed("video_busy")
        any_provider.busy_once("video_busy", 429, retry_after)
        with pytest.raises(errors.RateLimited) as caught:
            await any_provider.client.fetch("video_busy")
        assert caught.value.retry_after == retry_after
        assert caught.value.status_code == 429
        answer = await any_provider.client.fetch("video_busy")
        assert answer.status is models.Status.COMPLETED
