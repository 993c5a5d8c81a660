"""The shared HTTP client (providers/http.py, wire.py) against the simulator and small local
servers over real HTTP on loopback: its transport, its limits, its network rules, and the reseller's
and Ark's own details.

What every provider answers (each status, a wrong key, an unknown task, a 404 not its own, a
refused link) is written once in tests/contract/test_provider_contract.py, over every provider
and the fake.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import gzip
import json
import socket
import time
import tracemalloc
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp.abc
import httpx
import pytest
from aiohttp import web
from seedance_archiver import errors, models, netguard, provider, simulator, wire
from seedance_archiver.providers import ark, reseller
from seedance_archiver.providers import http as provider_http
from seedance_archiver.providers import http as providers_http

from tests.helpers import SIM_KEY, free_port, serving

LOCAL_HTTP = netguard.UrlRules(schemes=frozenset({"http"}), allow_private_hosts=True)


@pytest.fixture
async def client(sim: simulator.SimulatorThread) -> AsyncIterator[providers_http.HttpProvider]:
    http = new_client(sim.url, SIM_KEY, url_rules=LOCAL_HTTP)
    try:
        yield http
    finally:
        await http.aclose()


def add_completed(sim: simulator.SimulatorThread, task_id: str, **fields: Any) -> None:
    """A task that completed a minute ago."""
    sim.simulator.add_task(
        task_id, queued_seconds=1, ready_seconds=2, created=time.time() - 60, **fields
    )


async def video_url(http: providers_http.HttpProvider, task_id: str) -> str:
    answer = await http.fetch(task_id)
    assert answer.status is models.Status.COMPLETED
    assert answer.video_url is not None
    return answer.video_url


def new_client(base_url: str, api_key: str, **options: Any) -> providers_http.HttpProvider:
    """The client on the reseller's dialect, unless ``dialect=`` names another."""
    options.setdefault("dialect", reseller.DIALECT)
    return providers_http.HttpProvider(base_url, api_key, **options)


def linked(url: str) -> models.Task:
    """A task whose answer gave the video link ``url``."""
    return models.Task(task_id="video_linked", video_url=url)


async def download(http: providers_http.HttpProvider, url: str) -> tuple[int | None, bytes]:
    async with http.open_video(linked(url)) as video:
        data = bytearray()
        async for chunk in video.chunks:
            data += chunk
    return video.length, bytes(data)


# A small video as a host serves one: an ftyp box first.
MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isommp41" + b"\x00\x00\x00\x10mdat" + b"v" * 8


# What a private host must never hand a download.
SECRET_VIDEO = MP4 + b"internal secrets"


def expected_video(task_id: str, size: int) -> bytes:
    return b"".join(simulator.video_chunks(task_id, size))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LocalServer:
    """A tiny aiohttp server on 127.0.0.1 (a port of its own) for the given GET routes."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.app = web.Application()
        for path, handler in routes.items():
            self.app.router.add_get(path, handler)
        self.runner = web.AppRunner(self.app, access_log=None)

    async def __aenter__(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


class TestFetchErrors:
    """How the HTTP client reads a failed poll: codes, Retry-After dates, bodies, timeouts, paths."""

    async def test_sends_the_bearer_key(self) -> None:
        seen: list[tuple[str, str | None]] = []

        async def result(request: web.Request) -> web.Response:
            seen.append((request.path, request.headers.get("Authorization")))
            return web.json_response({"id": "video_abc", "status": "queued"})

        async with LocalServer({"/api/v1/result/{id}": result}) as base:
            http = new_client(f"{base}/api/", SIM_KEY, url_rules=LOCAL_HTTP)
            try:
                answer = await http.fetch("video_abc")
            finally:
                await http.aclose()
        assert answer.status is models.Status.QUEUED
        assert seen == [("/api/v1/result/video_abc", f"Bearer {SIM_KEY}")]

    async def test_403_is_auth_rejected(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        add_completed(sim, "video_abc")
        sim.simulator.add_fault("video_abc", on="poll", status=403)
        with pytest.raises(errors.AuthRejected, match="403"):
            await client.fetch("video_abc")

    async def test_429_with_retry_after_http_date(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        add_completed(sim, "video_abc")
        when = email.utils.formatdate(time.time() + 30, usegmt=True)
        sim.simulator.add_fault("video_abc", on="poll", status=429, retry_after=when)
        with pytest.raises(errors.RateLimited) as caught:
            await client.fetch("video_abc")
        assert caught.value.retry_after is not None
        # An HTTP date has whole seconds; allow for that and a slow machine.
        assert 25.0 <= caught.value.retry_after <= 31.0

    async def test_body_that_is_not_json_is_malformed(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        add_completed(sim, "video_abc")
        sim.simulator.add_fault("video_abc", on="poll", body="not json")
        with pytest.raises(errors.MalformedAnswer):
            await client.fetch("video_abc")

    async def test_answer_about_another_task_is_malformed(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        add_completed(sim, "video_abc")
        sim.simulator.add_fault(
            "video_abc", on="poll", body='{"id": "video_other", "status": "completed"}'
        )
        with pytest.raises(errors.MalformedAnswer, match="not the one asked for"):
            await client.fetch("video_abc")

    async def test_slow_answer_times_out(self, sim: simulator.SimulatorThread) -> None:
        add_completed(sim, "video_abc")
        sim.simulator.add_fault("video_abc", on="poll", delay=1.5)
        http = new_client(sim.url, SIM_KEY, timeout_seconds=0.3, url_rules=LOCAL_HTTP)
        try:
            # "timed out": our 0.3 s cut the 1.5 s answer short (no clock read needed to say so).
            with pytest.raises(errors.ProviderUnavailable, match="timed out"):
                await http.fetch("video_abc")
        finally:
            await http.aclose()

    async def test_connection_refused_is_provider_unavailable(self) -> None:
        http = new_client(f"http://127.0.0.1:{free_port()}", SIM_KEY)
        try:
            with pytest.raises(errors.ProviderUnavailable, match="cannot reach"):
                await http.fetch("video_abc")
        finally:
            await http.aclose()

    async def test_task_id_is_percent_encoded_in_the_path(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        # Were the id pasted raw, /v1/result/a/../b?x#y would become /v1/result/b.
        add_completed(sim, "b")
        weird = "a/../b?x#y"
        with pytest.raises(errors.TaskNotFound):
            await client.fetch(weird)
        assert sim.simulator.stats.polls[weird] == 1
        assert sim.simulator.stats.polls["b"] == 0

    async def test_task_id_with_spaces_and_unicode(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        task_id = "样片 1%2F+x"
        add_completed(sim, task_id)
        answer = await client.fetch(task_id)
        assert answer.id == task_id
        assert answer.status is models.Status.COMPLETED


class TestOpenVideo:
    """What the HTTP client takes for a video, what it refuses, and its size limits."""

    async def test_sends_no_api_key_to_the_video_host(self, sim: simulator.SimulatorThread) -> None:
        seen: list[str | None] = []

        async def handler(request: web.Request) -> web.Response:
            seen.append(request.headers.get("Authorization"))
            return web.Response(body=MP4, content_type="video/mp4")

        async with LocalServer({"/v.mp4": handler}) as base:
            http = new_client(sim.url, SIM_KEY, url_rules=LOCAL_HTTP)
            try:
                assert await download(http, f"{base}/v.mp4") == (len(MP4), MP4)
            finally:
                await http.aclose()
        assert seen == [None]

    async def test_no_cookie_goes_from_one_download_to_the_next(
        self, sim: simulator.SimulatorThread
    ) -> None:
        """Downloads keep no cookie jar: what a video host set for one task's link is not sent
        with another's (as httpx's Client did)."""
        seen: list[str | None] = []

        async def handler(request: web.Request) -> web.Response:
            seen.append(request.headers.get("Cookie"))
            response = web.Response(body=MP4, content_type="video/mp4")
            response.set_cookie("session", f"for-{request.match_info.get('name', 'v')}")
            return response

        async with LocalServer({"/v.mp4": handler}) as base:
            http = new_client(sim.url, SIM_KEY, url_rules=LOCAL_HTTP)
            try:
                for _ in range(2):
                    assert await download(http, f"{base}/v.mp4") == (len(MP4), MP4)
            finally:
                await http.aclose()
        assert seen == [None, None]

    @pytest.mark.parametrize(
        ("fault", "why"),
        [
            ({"body": "", "content_type": "video/mp4"}, "with an empty body"),
            (
                {
                    "body": "<html><body>This link has expired</body></html>",
                    "content_type": "text/html",
                },
                "of type text/html",
            ),
            (
                {"body": '{"error": "expired"}', "content_type": "application/json"},
                "of type application/json",
            ),
            (
                {
                    "body": "<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>",
                    "content_type": "application/xml",
                },
                "of type application/xml",
            ),
            (
                {"body": '{"title": "gone"}', "content_type": "application/problem+json"},
                "problem+json",
            ),
            ({"body": "<a/>", "content_type": "image/svg+xml"}, "svg+xml"),
            (
                {"body": "\x00" * 64, "content_type": "application/octet-stream"},
                "no video container",
            ),
        ],
        ids=["empty", "html", "json", "xml", "problem+json", "svg+xml", "no container"],
    )
    async def test_a_200_that_is_not_a_video_is_refused(
        self,
        sim: simulator.SimulatorThread,
        client: providers_http.HttpProvider,
        fault: dict[str, str],
        why: str,
    ) -> None:
        add_completed(sim, "video_abc")
        url = await video_url(client, "video_abc")
        sim.simulator.add_fault("video_abc", on="download", **fault)
        with pytest.raises(errors.NotAVideo) as caught:
            await download(client, url)
        message = str(caught.value)
        assert why in message and "Content-Type" in message and "first bytes b" in message
        assert "sig=" not in message and "files/" not in message  # never the link
        assert "\n" not in message and len(message) < 400
        # Not a verdict: the next download of the same link is the video.
        assert (await download(client, url))[1] == expected_video("video_abc", 256 * 1024)

    @pytest.mark.parametrize(
        ("content_type", "body"),
        [
            ("video/mp4", MP4),
            ("application/octet-stream", MP4),
            ("binary/octet-stream", MP4),
            (None, MP4),
            ("video/webm", provider.EBML_MAGIC + b"\x9f\x42\x86\x81\x01" * 8),
            ("video/quicktime", b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + b"\x00" * 40),
        ],
        ids=["mp4", "octet-stream", "binary-octet-stream", "no type", "webm", "mov"],
    )
    async def test_what_a_video_is_served_as(self, content_type: str | None, body: bytes) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Length": str(len(body))})
            if content_type is not None:
                response.headers["Content-Type"] = content_type
            await response.prepare(request)
            # In pieces smaller than the head the check reads: it gathers them.
            for start in range(0, len(body), 7):
                await response.write(body[start : start + 7])
            await response.write_eof()
            return response

        async with LocalServer({"/v": handler}) as base:
            http = new_client(base, SIM_KEY, url_rules=LOCAL_HTTP)
            try:
                assert await download(http, f"{base}/v") == (len(body), body)
            finally:
                await http.aclose()

    async def test_tampered_signature_is_link_expired(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        add_completed(sim, "video_abc")
        url = await video_url(client, "video_abc")
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        query["sig"] = "0" * len(query["sig"])
        forged = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
        with pytest.raises(errors.LinkExpired):
            await download(client, forged)
        # The genuine link still works: only the forgery was refused.
        assert (await download(client, url))[1] == expected_video("video_abc", 256 * 1024)

    async def test_server_error_is_download_error(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        add_completed(sim, "video_abc")
        url = await video_url(client, "video_abc")
        sim.simulator.add_fault("video_abc", on="download", status=503)
        with pytest.raises(errors.DownloadError, match="503") as caught:
            await download(client, url)
        assert not isinstance(caught.value, errors.LinkExpired)

    async def test_short_body_is_a_download_error(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        size = 1024 * 1024 + 10
        add_completed(sim, "video_abc", size=size)
        url = await video_url(client, "video_abc")
        sim.simulator.add_fault("video_abc", on="download", claim_length=size + 5000)
        received = 0
        with pytest.raises(errors.DownloadError):
            async with client.open_video(linked(url)) as video:
                assert video.length == size + 5000
                async for chunk in video.chunks:
                    received += len(chunk)
        assert received <= size

    async def test_cut_connection_is_a_download_error(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        size = 2 * 1024 * 1024
        add_completed(sim, "video_abc", size=size)
        url = await video_url(client, "video_abc")
        sim.simulator.add_fault("video_abc", on="download", truncate_at=1024 * 1024)
        with pytest.raises(errors.DownloadError):
            await download(client, url)

    async def test_content_length_above_the_limit_is_refused_before_the_body(
        self, sim: simulator.SimulatorThread
    ) -> None:
        add_completed(sim, "video_abc", size=256 * 1024)
        http = new_client(sim.url, SIM_KEY, url_rules=LOCAL_HTTP, max_video_bytes=100 * 1024)
        entered = False
        try:
            url = await video_url(http, "video_abc")
            with pytest.raises(errors.VideoTooLarge, match="SEEDANCE_MAX_VIDEO_BYTES"):
                async with http.open_video(linked(url)):
                    entered = True
        finally:
            await http.aclose()
        assert not entered

    async def test_body_above_the_limit_without_content_length(
        self, sim: simulator.SimulatorThread
    ) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(MP4)
            for _ in range(8):
                await response.write(b"x" * 64 * 1024)
            await response.write_eof()
            return response

        async with LocalServer({"/v.mp4": handler}) as base:
            http = new_client(sim.url, SIM_KEY, url_rules=LOCAL_HTTP, max_video_bytes=100 * 1024)
            try:
                with pytest.raises(errors.VideoTooLarge):
                    await download(http, f"{base}/v.mp4")
            finally:
                await http.aclose()


class TestUrlRules:
    """Video links must use an allowed scheme and, by default, a public host."""

    async def test_default_rules_refuse_http(self, sim: simulator.SimulatorThread) -> None:
        add_completed(sim, "video_abc")
        http = new_client(sim.url, SIM_KEY)
        try:
            url = await video_url(http, "video_abc")
            with pytest.raises(errors.UnsafeVideoUrl, match="SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES"):
                await download(http, url)
        finally:
            await http.aclose()
        assert sim.simulator.stats.downloads_started["video_abc"] == 0

    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
    async def test_private_hosts_refused_by_default(
        self, sim: simulator.SimulatorThread, host: str
    ) -> None:
        add_completed(sim, "video_abc")
        rules = netguard.UrlRules(schemes=frozenset({"http"}), allow_private_hosts=False)
        http = new_client(sim.url, SIM_KEY, url_rules=rules)
        try:
            url = (await video_url(http, "video_abc")).replace("127.0.0.1", host, 1)
            with pytest.raises(errors.UnsafeVideoUrl, match="SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS"):
                await download(http, url)
        finally:
            await http.aclose()
        assert sim.simulator.stats.downloads_started["video_abc"] == 0


class TestRedirects:
    """Redirects are followed only to links that pass the same rules, and only so far."""

    async def test_redirect_to_the_video_is_followed(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        add_completed(sim, "video_abc")
        target = await video_url(client, "video_abc")

        async def hop(request: web.Request) -> web.Response:
            raise web.HTTPFound(target)

        async with LocalServer({"/hop": hop}) as base:
            length, data = await download(client, f"{base}/hop")
        assert length == 256 * 1024
        assert data == expected_video("video_abc", 256 * 1024)

    async def test_relative_redirect_is_resolved(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        async def hop(request: web.Request) -> web.Response:
            raise web.HTTPFound("/files/v.mp4")

        async def file(request: web.Request) -> web.Response:
            return web.Response(body=MP4 + b"relative", content_type="video/mp4")

        async with LocalServer({"/a/hop": hop, "/files/v.mp4": file}) as base:
            assert await download(client, f"{base}/a/hop") == (len(MP4) + 8, MP4 + b"relative")

    async def test_too_many_redirects(self, client: providers_http.HttpProvider) -> None:
        hits: collections.Counter[int] = collections.Counter()

        async def loop(request: web.Request) -> web.Response:
            n = int(request.match_info["n"])
            hits[n] += 1
            raise web.HTTPFound(f"/loop/{n + 1}")

        async with LocalServer({"/loop/{n}": loop}) as base:
            with pytest.raises(errors.DownloadError, match="redirects"):
                await download(client, f"{base}/loop/0")
        assert sum(hits.values()) == providers_http.MAX_REDIRECTS + 1

    async def test_redirects_up_to_the_limit_are_followed(
        self, client: providers_http.HttpProvider
    ) -> None:
        async def loop(request: web.Request) -> web.Response:
            n = int(request.match_info["n"])
            if n == providers_http.MAX_REDIRECTS:
                return web.Response(body=MP4 + b"arrived", content_type="video/mp4")
            raise web.HTTPFound(f"/loop/{n + 1}")

        async with LocalServer({"/loop/{n}": loop}) as base:
            assert await download(client, f"{base}/loop/0") == (len(MP4) + 7, MP4 + b"arrived")

    async def test_redirect_to_a_loopback_host_is_refused(
        self,
        sim: simulator.SimulatorThread,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        hits: list[str] = []

        async def hop(request: web.Request) -> web.Response:
            hits.append("hop")
            raise web.HTTPFound(f"http://127.0.0.1:{request.url.port}/x")

        async def inner(request: web.Request) -> web.Response:
            hits.append("x")
            return web.Response(body=SECRET_VIDEO)

        real_check = netguard.check_video_url

        async with LocalServer({"/hop": hop, "/x": inner}) as base:
            first = f"{base}/hop"

            # Without network there is no public first hop to use, so treat the first URL as one
            # (as if it resolved publicly); every later hop gets the real check.
            async def check(url: str, rules: netguard.UrlRules, *parsed: httpx.URL) -> None:
                if url == first:
                    return
                await real_check(url, rules, *parsed)

            monkeypatch.setattr(netguard, "check_video_url", check)
            rules = netguard.UrlRules(schemes=frozenset({"http"}), allow_private_hosts=False)
            http = new_client(sim.url, SIM_KEY, url_rules=rules)
            try:
                with pytest.raises(errors.UnsafeVideoUrl, match="loopback"):
                    await download(http, first)
            finally:
                await http.aclose()
        assert hits == ["hop"]


class ScriptedResolver(aiohttp.abc.AbstractResolver):
    """A DNS server under the test's control: the n-th query gets the n-th answer (then the last)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = answers
        self.queries: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        self.queries.append(host)
        addresses = self.answers[min(len(self.queries), len(self.answers)) - 1]
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        pass


class TestDnsRebinding:
    """The address checked is the address the download connects to, on every hop."""

    RULES = netguard.UrlRules(schemes=frozenset({"http"}), allow_private_hosts=False)

    @staticmethod
    def _counting_server() -> tuple[LocalServer, list[str]]:
        hits: list[str] = []

        async def secret(request: web.Request) -> web.Response:
            hits.append(request.path)
            return web.Response(body=SECRET_VIDEO, content_type="video/mp4")

        return LocalServer({"/x": secret}), hits

    async def test_the_resolver_refuses_the_second_answer_of_a_rebinding_server(self) -> None:
        """Answered public first and loopback second, the connector gets only the public answer."""
        dns = ScriptedResolver(["8.8.8.8"], ["127.0.0.1"])
        resolver = netguard.PublicResolver(dns)
        first = await resolver.resolve("rebind.test", 80)
        assert [a["host"] for a in first] == ["8.8.8.8"]
        with pytest.raises(OSError, match="SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS"):
            await resolver.resolve("rebind.test", 80)

    async def test_no_byte_from_loopback_when_the_check_saw_a_public_address(
        self, sim: simulator.SimulatorThread, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Whatever the system resolver said before, the connection's own answer is what is checked."""

        async def public_getaddrinfo(host: object, port: object, **kwargs: object) -> list[Any]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 80))]

        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", public_getaddrinfo)
        dns = ScriptedResolver(["127.0.0.1"])
        server, hits = self._counting_server()
        http = new_client(sim.url, SIM_KEY, url_rules=self.RULES, resolver=lambda: dns)
        try:
            async with server as base:
                url = base.replace("127.0.0.1", "rebind.test") + "/x"
                with pytest.raises(
                    errors.UnsafeVideoUrl, match="SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS"
                ):
                    await download(http, url)
        finally:
            await http.aclose()
        assert dns.queries == ["rebind.test"]
        assert hits == []

    async def test_an_answer_mixing_public_and_loopback_is_refused_whole(
        self, sim: simulator.SimulatorThread
    ) -> None:
        """The connector would fall back from the public address to the loopback one: no connection."""
        dns = ScriptedResolver(["8.8.8.8", "127.0.0.1"])
        server, hits = self._counting_server()
        http = new_client(sim.url, SIM_KEY, url_rules=self.RULES, resolver=lambda: dns)
        try:
            async with server as base:
                url = base.replace("127.0.0.1", "rebind.test") + "/x"
                with pytest.raises(errors.UnsafeVideoUrl):
                    await download(http, url)
        finally:
            await http.aclose()
        assert hits == []

    async def test_a_redirect_to_a_name_that_resolves_to_loopback_is_refused(
        self, sim: simulator.SimulatorThread, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every hop's connection goes through the same check, not only the first."""
        hits: list[str] = []

        async def hop(request: web.Request) -> web.Response:
            hits.append("hop")
            raise web.HTTPFound(f"http://rebind.test:{request.url.port}/x")

        async def inner(request: web.Request) -> web.Response:
            hits.append("x")
            return web.Response(body=SECRET_VIDEO)

        dns = ScriptedResolver(["127.0.0.1"])
        real_check = netguard.check_video_url
        async with LocalServer({"/hop": hop, "/x": inner}) as base:
            first = f"{base}/hop"

            async def check(url: str, rules: netguard.UrlRules, *parsed: httpx.URL) -> None:
                if url != first:  # the first hop stands in for a public host
                    await real_check(url, rules, *parsed)

            monkeypatch.setattr(netguard, "check_video_url", check)
            http = new_client(sim.url, SIM_KEY, url_rules=self.RULES, resolver=lambda: dns)
            try:
                with pytest.raises(errors.UnsafeVideoUrl):
                    await download(http, first)
            finally:
                await http.aclose()
        assert hits == ["hop"]
        assert dns.queries == ["rebind.test"]

    async def test_private_hosts_allowed_when_configured(
        self, sim: simulator.SimulatorThread
    ) -> None:
        """SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS=true lets a name resolve to loopback."""
        dns = ScriptedResolver(["127.0.0.1"])
        server, hits = self._counting_server()
        rules = netguard.UrlRules(schemes=frozenset({"http"}), allow_private_hosts=True)
        http = new_client(sim.url, SIM_KEY, url_rules=rules, resolver=lambda: dns)
        try:
            async with server as base:
                url = base.replace("127.0.0.1", "rebind.test") + "/x"
                assert await download(http, url) == (len(SECRET_VIDEO), SECRET_VIDEO)
        finally:
            await http.aclose()
        assert hits == ["/x"]


class TestInvalidRedirects:
    """A redirect to a link no request can use is a DownloadError, never an httpx exception."""

    @pytest.mark.parametrize(
        "location",
        [
            "http://xn--a.com/x",
            "http://[::1/x",
            "http://a..b/x",
            "http://exa mple.com/x",
            f"http://{'a' * 64}.com/x",
            "http://127.0.0.1:99999/x",
            "http://☃.net/x",
        ],
        ids=["bad punycode", "unclosed ipv6", "empty label", "space", "long label", "port", "idna"],
    )
    async def test_invalid_location(
        self, client: providers_http.HttpProvider, location: str
    ) -> None:
        async def hop(request: web.Request) -> web.Response:
            return web.Response(status=302, headers={"Location": location})

        async with LocalServer({"/hop": hop}) as base:
            with pytest.raises(errors.DownloadError, match="redirect is not a valid URL") as caught:
                await download(client, f"{base}/hop")
        assert not isinstance(caught.value, errors.UnsafeVideoUrl)


class TestCheckKey:
    """check_key over HTTP: True, False or None whatever the transport meets, never an error."""

    async def test_403_is_rejected(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        sim.simulator.add_fault(provider_http.KEY_CHECK_TASK_ID, on="poll", status=403)
        assert await client.check_key() is False

    @pytest.mark.parametrize("status", [500, 503, 429, 400])
    async def test_other_answers_cannot_tell(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider, status: int
    ) -> None:
        sim.simulator.add_fault(provider_http.KEY_CHECK_TASK_ID, on="poll", status=status)
        assert await client.check_key() is None
        # The fault was consumed: the next check can tell again.
        assert await client.check_key() is True

    async def test_a_provider_that_makes_up_tasks_cannot_tell(
        self, sim: simulator.SimulatorThread, client: providers_http.HttpProvider
    ) -> None:
        sim.simulator.add_task(provider_http.KEY_CHECK_TASK_ID)
        assert await client.check_key() is None

    async def test_a_stopped_provider_cannot_tell(self) -> None:
        server = simulator.SimulatorThread(simulator.Simulator(api_key=SIM_KEY)).start()
        http = new_client(server.url, SIM_KEY, url_rules=LOCAL_HTTP)
        try:
            assert await http.check_key() is True
            server.stop()
            assert await http.check_key() is None
        finally:
            await http.aclose()

    async def test_a_timeout_cannot_tell(self, sim: simulator.SimulatorThread) -> None:
        sim.simulator.add_fault(provider_http.KEY_CHECK_TASK_ID, on="poll", delay=1.5)
        http = new_client(sim.url, SIM_KEY, timeout_seconds=0.3, url_rules=LOCAL_HTTP)
        try:
            assert await http.check_key() is None
        finally:
            await http.aclose()

    async def test_it_sends_what_a_poll_sends(self) -> None:
        seen: list[tuple[str, str | None, str | None]] = []

        async def result(request: web.Request) -> web.Response:
            seen.append(
                (request.path, request.headers.get("Authorization"), request.headers.get("Accept"))
            )
            return web.json_response({"error": "task not found"}, status=404)

        async with LocalServer({"/api/v1/result/{id}": result}) as base:
            http = new_client(f"{base}/api", SIM_KEY, url_rules=LOCAL_HTTP)
            try:
                assert await http.check_key() is True
            finally:
                await http.aclose()
        assert seen == [
            (
                f"/api/v1/result/{provider_http.KEY_CHECK_TASK_ID}",
                f"Bearer {SIM_KEY}",
                "application/json",
            )
        ]

    def test_the_id_is_one_the_provider_never_issues(self) -> None:
        assert not provider_http.KEY_CHECK_TASK_ID.startswith("video_")
        assert (
            urllib.parse.quote(provider_http.KEY_CHECK_TASK_ID, safe="")
            == provider_http.KEY_CHECK_TASK_ID
        )


class TestArkDialect:
    """What Ark alone says: a 24 h link, a resolution, an error code, "expired", drifted fields."""

    @pytest.fixture
    def ark_sim(self) -> Iterator[simulator.SimulatorThread]:
        with serving("ark") as server:
            yield server

    @pytest.fixture
    async def ark_client(
        self, ark_sim: simulator.SimulatorThread
    ) -> AsyncIterator[providers_http.HttpProvider]:
        http = new_client(ark_sim.url, SIM_KEY, url_rules=LOCAL_HTTP, dialect=ark.DIALECT)
        try:
            yield http
        finally:
            await http.aclose()

    async def test_a_succeeded_task_and_its_24_h_link(
        self, ark_sim: simulator.SimulatorThread, ark_client: providers_http.HttpProvider
    ) -> None:
        add_completed(ark_sim, "cgt-1", size=1000, resolution="1080p")
        answer = await ark_client.fetch("cgt-1")
        assert (answer.status, answer.resolution, answer.actual_duration) == (
            models.Status.COMPLETED,
            "1080p",
            5.0,
        )
        assert answer.video_url is not None and "X-Tos-Expires=86400" in answer.video_url
        assert await download(ark_client, answer.video_url) == (1000, expected_video("cgt-1", 1000))
        assert ark_client.name == "ark"

    @pytest.mark.parametrize(
        ("age", "outcome", "status", "error"),
        [
            (
                60,
                "failed",
                models.Status.FAILED,
                "content policy violation (OutputVideoSensitiveContentDetected)",
            ),
            (60, "expired", models.Status.FAILED, "expired at the provider before it ran"),
        ],
    )
    async def test_the_error_code_and_the_expired_status(
        self,
        ark_sim: simulator.SimulatorThread,
        ark_client: providers_http.HttpProvider,
        age: float,
        outcome: str,
        status: models.Status,
        error: str | None,
    ) -> None:
        ark_sim.simulator.add_task(
            "cgt-2", outcome=outcome, queued_seconds=1, ready_seconds=2, created=time.time() - age
        )
        answer = await ark_client.fetch("cgt-2")
        assert (answer.status, answer.error) == (status, error)

    async def test_drifted_side_fields_still_give_the_link(
        self, ark_sim: simulator.SimulatorThread, ark_client: providers_http.HttpProvider
    ) -> None:
        drift = {"updated_at": int(time.time() * 1000), "seed": "42", "duration": "5"}
        add_completed(ark_sim, "cgt-3", size=1000, overrides=drift)
        answer = await ark_client.fetch("cgt-3")
        assert (answer.status, answer.actual_duration, answer.ignored) == (
            models.Status.COMPLETED,
            5.0,
            (),
        )
        assert answer.video_url is not None and answer.expires_at is not None


class TestApiTransport:
    """wire.ApiTransport, the polls' transport over aiohttp, bodies read whole: each case through
    its ``get`` (the polls' wire.Api) and through httpx's transport interface."""

    @pytest.fixture(params=["get", "httpx"])
    def via(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @staticmethod
    async def send(
        base: str,
        path: str = "/answer",
        *,
        via: str,
        max_body_bytes: int = 1024,
        read_seconds: float = 5.0,
    ) -> wire.Reply:
        headers = {"Authorization": "Bearer k", "Accept": "application/json"}
        if via == "get":
            api = wire.ApiTransport(
                max_connections=4, max_body_bytes=max_body_bytes, total_seconds=read_seconds
            )
            try:
                return await api.get(base + path, headers)
            finally:
                await api.aclose()
        api = wire.ApiTransport(max_connections=4, max_body_bytes=max_body_bytes)
        request = httpx.Request(
            "GET",
            base + path,
            headers=headers,
            extensions={"timeout": httpx.Timeout(read_seconds).as_dict()},
        )
        try:
            response = await api.handle_async_request(request)
        finally:
            await api.aclose()
        assert response.extensions["http_version"] == b"HTTP/1.1"
        return wire.Reply(response.status_code, response.headers, response.read())

    async def test_answer_status_headers_body_and_request_headers(self, via: str) -> None:
        seen: list[tuple[str, str | None, str | None]] = []

        async def answer(request: web.Request) -> web.Response:
            seen.append(
                (request.path_qs, request.headers.get("Authorization"), request.headers["Host"])
            )
            return web.json_response({"ok": True}, status=202, headers={"X-Thing": "1"})

        async with LocalServer({"/answer/{id}": answer}) as base:
            response = await self.send(base, "/answer/a%2Fb%20c", via=via)
        assert response.status == 202
        assert response.headers["x-thing"] == "1"
        assert json.loads(response.body) == {"ok": True}
        # The path goes out as httpx encoded it: an escaped slash stays one segment.
        assert seen == [("/answer/a%2Fb%20c", "Bearer k", base.removeprefix("http://"))]

    async def test_a_compressed_answer_is_decoded_once(self, via: str) -> None:
        async def answer(request: web.Request) -> web.Response:
            body = gzip.compress(b'{"status": "queued"}')
            return web.Response(body=body, headers={"Content-Encoding": "gzip"})

        async with LocalServer({"/answer": answer}) as base:
            response = await self.send(base, via=via)
        assert json.loads(response.body) == {"status": "queued"}
        assert "content-encoding" not in response.headers

    async def test_a_gzip_bomb_is_too_large_and_costs_no_memory(self, via: str) -> None:
        """512 MiB of zeros in about half a MiB of gzip: refused once 1 KiB is decoded."""
        bomb = simulator._gzip_bomb(512 * 1024 * 1024)
        assert len(bomb) < 1024 * 1024

        async def answer(request: web.Request) -> web.Response:
            return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

        async with LocalServer({"/answer": answer}) as base:
            tracemalloc.start()
            try:
                for _ in range(3):
                    with pytest.raises(wire.AnswerTooLarge, match="once decoded"):
                        await self.send(base, via=via, max_body_bytes=1024 * 1024)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        # The compressed body (0.5 MiB) and at most the cap decoded; never the 512 MiB.
        assert peak < 8 * 1024 * 1024

    @pytest.mark.parametrize(
        ("encoding", "body", "error"),
        [
            ("deflate", zlib.compress(b'{"status": "queued"}'), None),
            ("gzip, identity", gzip.compress(b'{"status": "queued"}'), None),
            ("br", b"\x0b\x02\x80{}\x03", "which we did not ask for"),
            ("gzip", b"not gzip at all", "does not decode"),
        ],
        ids=["deflate", "gzip-identity", "brotli", "corrupt"],
    )
    async def test_other_encodings(
        self, encoding: str, body: bytes, error: str | None, via: str
    ) -> None:
        async def answer(request: web.Request) -> web.Response:
            return web.Response(body=body, headers={"Content-Encoding": encoding})

        async with LocalServer({"/answer": answer}) as base:
            if error is None:
                response = await self.send(base, via=via)
                assert json.loads(response.body) == {"status": "queued"}
                assert "content-encoding" not in response.headers
            else:
                with pytest.raises(httpx.DecodingError, match=error):
                    await self.send(base, via=via)

    async def test_the_provider_asks_for_identity_and_says_why_it_refused(self) -> None:
        asked: list[str | None] = []
        bomb = simulator._gzip_bomb(64 * 1024 * 1024)

        async def answer(request: web.Request) -> web.Response:
            asked.append(request.headers.get("Accept-Encoding"))
            return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

        async with LocalServer({"/v1/result/{id}": answer}) as base:
            http = new_client(base, "k", url_rules=LOCAL_HTTP)
            try:
                with pytest.raises(errors.ProviderUnavailable, match="once decoded"):
                    await http.fetch("video_bomb")
            finally:
                await http.aclose()
        assert asked == ["identity"]

    async def test_an_answer_declared_too_long_is_refused(self, via: str) -> None:
        async def answer(request: web.Request) -> web.Response:
            return web.Response(body=b"x" * 2000)

        async with LocalServer({"/answer": answer}) as base:
            with pytest.raises(wire.AnswerTooLarge, match="longer than 1024 bytes"):
                await self.send(base, via=via)

    async def test_a_cookie_one_answer_sets_is_not_sent_on_the_next_request(self, via: str) -> None:
        """The transport keeps no cookies of its own: httpx's client keeps a client's, and sends
        them as headers; the polls authenticate with the key."""
        sent: list[str | None] = []

        async def answer(request: web.Request) -> web.Response:
            sent.append(request.headers.get("Cookie"))
            response = web.json_response({"ok": True})
            response.set_cookie("session", "from-the-server", path="/")
            return response

        async with LocalServer({"/answer": answer}) as served:
            # By name: aiohttp's own jar keeps no cookie from a bare IP address.
            base = served.replace("127.0.0.1", "localhost")
            api = wire.ApiTransport(max_connections=4, max_body_bytes=1024, total_seconds=5.0)
            try:
                for _ in range(2):
                    if via == "get":
                        reply = await api.get(base + "/answer", {"Accept": "application/json"})
                        assert "session=from-the-server" in reply.headers["set-cookie"]
                    else:
                        response = await api.handle_async_request(
                            httpx.Request("GET", base + "/answer")
                        )
                        assert "session=from-the-server" in response.headers["set-cookie"]
            finally:
                await api.aclose()
        assert sent == [None, None]

    async def test_a_chunked_answer_too_long_is_refused(self, via: str) -> None:
        async def answer(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(8):
                await response.write(b"y" * 200)
            await response.write_eof()
            return response

        async with LocalServer({"/answer": answer}) as base:
            with pytest.raises(wire.AnswerTooLarge):
                await self.send(base, via=via)
            # The same answer within the bound arrives whole, from its chunks.
            response = await self.send(base, via=via, max_body_bytes=1600)
        assert response.body == b"y" * 1600

    async def test_a_refused_connection_is_a_connect_error(self, via: str) -> None:
        with pytest.raises(httpx.ConnectError) as caught:
            await self.send(f"http://127.0.0.1:{free_port()}", via=via)
        assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)

    async def test_a_silent_server_is_a_read_timeout(self, via: str) -> None:
        release = asyncio.Event()

        async def answer(request: web.Request) -> web.Response:
            await release.wait()
            return web.Response(body=b"{}")

        async with LocalServer({"/answer": answer}) as base:
            try:
                with pytest.raises(httpx.ReadTimeout):
                    await self.send(base, via=via, read_seconds=0.2)
            finally:
                release.set()

    async def test_a_connection_cut_mid_body_is_an_httpx_error(self, via: str) -> None:
        async def answer(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Length": "500"})
            await response.prepare(request)
            await response.write(b"z" * 100)
            assert request.transport is not None
            request.transport.close()
            return response

        async with LocalServer({"/answer": answer}) as base:
            with pytest.raises(httpx.TransportError):
                await self.send(base, via=via)

    async def test_it_is_the_default_poll_transport(self, sim: simulator.SimulatorThread) -> None:
        # Read off what the daemon sends: no test double in between.
        add_completed(sim, "video_abc")
        http = new_client(sim.url, SIM_KEY, url_rules=LOCAL_HTTP)
        try:
            assert isinstance(http._api, wire.ApiTransport)
            assert (await http.fetch("video_abc")).status is models.Status.COMPLETED
        finally:
            await http.aclose()

    async def test_any_httpx_transport_can_stand_in(self) -> None:
        """What the benchmarks' what-ifs give (httpx-aiohttp's transport): the same request, and
        the same reading of the answer, its headers included."""
        seen: list[httpx.Request] = []

        def answer(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            if request.url.path.endswith("video_slow"):
                return httpx.Response(429, headers={"Retry-After": "7"})
            return httpx.Response(200, json={"id": "video_1", "status": "queued"})

        http = new_client(
            "http://127.0.0.1:9/api", "k", transport=httpx.MockTransport(answer), timeout_seconds=3
        )
        try:
            assert (await http.fetch("video_1")).status is models.Status.QUEUED
            with pytest.raises(errors.RateLimited) as limited:
                await http.fetch("video_slow")
        finally:
            await http.aclose()
        assert limited.value.retry_after == 7.0
        assert str(seen[0].url) == "http://127.0.0.1:9/api/v1/result/video_1"
        assert seen[0].headers["Authorization"] == "Bearer k"
        assert seen[0].headers["Accept-Encoding"] == "identity"
        assert seen[0].extensions["timeout"]["read"] == 3


class KeyedLinks(reseller.Reseller):
    """A dialect whose video links need the API key, and whose host refuses a dead one with 404 only."""

    video_needs_key = True
    refused_link_statuses = frozenset({404})


class TestDialectDecidesTheDownload:
    """The dialect says whether a download carries the key and which refusals mean a dead link."""

    async def test_the_key_goes_to_the_apis_own_host_only(self) -> None:
        seen: list[str | None] = []

        async def video(request: web.Request) -> web.StreamResponse:
            seen.append(request.headers.get("Authorization"))
            return web.Response(body=MP4, content_type="video/mp4")

        async with LocalServer({"/v.mp4": video}) as base:
            keyed = new_client(base, SIM_KEY, url_rules=LOCAL_HTTP, dialect=KeyedLinks())
            plain = new_client(base, SIM_KEY, url_rules=LOCAL_HTTP)
            elsewhere = new_client(
                "http://localhost:9", SIM_KEY, url_rules=LOCAL_HTTP, dialect=KeyedLinks()
            )
            try:
                for http in (keyed, plain, elsewhere):
                    assert await download(http, f"{base}/v.mp4") == (len(MP4), MP4)
            finally:
                for http in (keyed, plain, elsewhere):
                    await http.aclose()
        assert seen == [f"Bearer {SIM_KEY}", None, None]

    async def test_only_the_dialects_refusals_mean_a_dead_link(self) -> None:
        async def gone(request: web.Request) -> web.StreamResponse:
            return web.Response(status=404)

        async def forbidden(request: web.Request) -> web.StreamResponse:
            return web.Response(status=403)

        async with LocalServer({"/gone.mp4": gone, "/forbidden.mp4": forbidden}) as base:
            http = new_client(base, SIM_KEY, url_rules=LOCAL_HTTP, dialect=KeyedLinks())
            try:
                with pytest.raises(errors.LinkExpired):
                    await download(http, f"{base}/gone.mp4")
                with pytest.raises(errors.DownloadError) as refused:
                    await download(http, f"{base}/forbidden.mp4")
                assert not isinstance(refused.value, errors.LinkExpired)
            finally:
                await http.aclose()
