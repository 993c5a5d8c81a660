"""The Seedance client: one request in, one typed result or one typed error out.

``fetch`` polls ``GET {base}/v1/result/{id}``; ``open_video`` streams a finished video from its
``video_url``. Only this module imports httpx; its exceptions become ``errors.*`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import email.utils
import enum
import ipaddress
import json
import math
import socket
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import httpx
import httpx_aiohttp

from daemon import errors, utils

CHUNK_BYTES = 1024 * 1024
MAX_REDIRECTS = 5
RETRY_AFTER_MAX_SECONDS = 3600.0


class Status(enum.StrEnum):
    """The provider's task statuses (seed: 状态流程)."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the provider said about one task."""

    id: str
    status: Status
    created: dt.datetime | None
    model: str | None
    video_url: str | None
    actual_duration: float | None
    error: str | None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _optional(payload: dict[str, Any], key: str, kinds: tuple[type, ...], what: str) -> Any:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise errors.MalformedAnswer(
            f"malformed answer: field {key!r} should be {what}, got {type(value).__name__}"
        )
    return value


def _number(payload: dict[str, Any], key: str, what: str) -> float | None:
    """A finite number field: JSON integers too large for a float are malformed too."""
    value = _optional(payload, key, (int, float), what)
    if value is None:
        return None
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise errors.MalformedAnswer(f"malformed answer: field {key!r} is not a finite number")
    return number


def parse_answer(task_id: str, body: bytes) -> Answer:
    """Parse the provider's JSON for ``task_id``; anything off its contract is MalformedAnswer."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise errors.MalformedAnswer("malformed answer: the body is not JSON") from None
    if not isinstance(payload, dict):
        raise errors.MalformedAnswer(
            f"malformed answer: expected a JSON object, got {type(payload).__name__}"
        )
    answer_id = payload.get("id")
    if not isinstance(answer_id, str):
        raise errors.MalformedAnswer("malformed answer: field 'id' is missing or not a string")
    if answer_id != task_id:
        raise errors.MalformedAnswer(
            f"malformed answer: it is about task {_short(answer_id)}, not the one asked for"
        )
    raw_status = payload.get("status")
    if not isinstance(raw_status, str):
        raise errors.MalformedAnswer("malformed answer: field 'status' is missing or not a string")
    try:
        status = Status(raw_status)
    except ValueError:
        raise errors.MalformedAnswer(
            f"malformed answer: unknown status {_short(raw_status)}"
        ) from None
    created_raw = _number(payload, "created", "a Unix timestamp")
    created = None
    if created_raw is not None:
        if not 0 < created_raw < 1e11:
            raise errors.MalformedAnswer("malformed answer: field 'created' is out of range")
        created = dt.datetime.fromtimestamp(created_raw, dt.UTC)
    duration = _number(payload, "actualDuration", "a number")
    return Answer(
        id=answer_id,
        status=status,
        created=created,
        model=_optional(payload, "model", (str,), "a string"),
        video_url=_optional(payload, "video_url", (str,), "a string"),
        actual_duration=duration,
        error=_optional(payload, "error", (str,), "a string"),
    )


def parse_retry_after(value: str | None, now: dt.datetime) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_SECONDS)


# --- video links ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UrlRules:
    """Which video links we may follow (SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES, ..._PRIVATE_VIDEO_HOSTS)."""

    schemes: frozenset[str] = frozenset({"https"})
    allow_private_hosts: bool = False


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_video_url(url: str, rules: UrlRules) -> None:
    """Raise UnsafeVideoUrl unless ``url`` has an allowed scheme and, by default, a public host."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise errors.UnsafeVideoUrl("unsafe video_url: it cannot be parsed") from None
    if parts.scheme.lower() not in rules.schemes:
        raise errors.UnsafeVideoUrl(
            f"unsafe video_url: scheme {parts.scheme!r} is not in SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES"
        )
    if not host:
        raise errors.UnsafeVideoUrl("unsafe video_url: no host")
    if rules.allow_private_hosts:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port or 443, type=socket.SOCK_STREAM
        )
    except OSError as exc:
        raise errors.DownloadError(f"cannot resolve the video host: {exc.strerror or exc}") from exc
    addresses = {info[4][0] for info in infos}
    if not addresses or not all(_is_public(str(a)) for a in addresses):
        raise errors.UnsafeVideoUrl(
            "unsafe video_url: its host resolves to a loopback, private or link-local address "
            "(set SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS=true to allow)"
        )


@dataclasses.dataclass
class Video:
    """An open video download: its announced size and its bytes, streamed."""

    length: int | None
    chunks: AsyncIterator[bytes]


class Provider(Protocol):
    """What the service needs from the provider."""

    async def fetch(self, task_id: str) -> Answer: ...

    def open_video(self, url: str) -> contextlib.AbstractAsyncContextManager[Video]: ...

    async def aclose(self) -> None: ...


def _unreachable(exc: BaseException) -> str:
    """Why a poll got no answer.

    httpx-aiohttp maps every aiohttp connection error, refused or dropped, to ConnectTimeout, so the
    aiohttp error it wraps decides, and only a real timeout is called one.
    """
    cause = exc.__cause__
    if isinstance(cause, TimeoutError) or (
        cause is None and isinstance(exc, (TimeoutError, httpx.TimeoutException))
    ):
        return "the provider timed out"
    if isinstance(cause, aiohttp.ClientConnectorError):
        return f"cannot reach the provider: {cause.strerror or 'connection failed'}"
    if isinstance(cause, aiohttp.ClientError):
        return f"cannot reach the provider: connection lost ({type(cause).__name__})"
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return "the provider timed out"
    return f"cannot reach the provider: {type(exc).__name__}"


class HttpProvider:
    """The real provider client over httpx's API.

    Polls are ``httpx.Request`` objects handed straight to an aiohttp-backed transport (the
    httpx-aiohttp package): chosen by measurement (bench/README.md), it costs about 1.9x the CPU of a
    bare aiohttp client per poll, where httpx's default transport costs 20x and httpx's Client on the
    same transport 4x (its cookie jar and URL merging run on every request; we need neither).
    Video downloads are few and long, so they keep httpx's plain Client.
    """

    MAX_CONNECTIONS = 200

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_seconds: float = 30.0,
        url_rules: UrlRules | None = None,
        max_video_bytes: int = 2 * 1024**3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._url_rules = url_rules or UrlRules()
        self._max_video_bytes = max_video_bytes
        self._timeout_seconds = timeout_seconds
        limits = httpx.Limits(
            max_connections=self.MAX_CONNECTIONS, max_keepalive_connections=self.MAX_CONNECTIONS
        )
        timeout = httpx.Timeout(timeout_seconds)
        self._api: httpx.AsyncBaseTransport = transport or httpx_aiohttp.AiohttpTransport(
            limits=limits
        )
        self._api_headers = httpx.Headers(
            {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        )
        self._api_extensions = {"timeout": timeout.as_dict()}
        # Video hosts get no API key: a signed link carries its own authorisation.
        self._files = httpx.AsyncClient(
            headers={"Accept-Encoding": "identity"},
            timeout=timeout,
            limits=limits,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._api.aclose()
        await self._files.aclose()

    async def fetch(self, task_id: str) -> Answer:
        url = f"{self._base}/v1/result/{urllib.parse.quote(task_id, safe='')}"
        request = httpx.Request(
            "GET", url, headers=self._api_headers, extensions=self._api_extensions
        )
        try:
            # The transport's timeouts are per socket operation; this bounds the whole exchange.
            async with asyncio.timeout(self._timeout_seconds):
                response = await self._api.handle_async_request(request)
                try:
                    body = await response.aread()
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.HTTPError) as exc:
            raise errors.ProviderUnavailable(_unreachable(exc)) from exc
        code = response.status_code
        if code == 200:
            try:
                return parse_answer(task_id, body)
            except errors.MalformedAnswer as exc:
                exc.status_code = code
                raise
        if code in (401, 403):
            raise errors.AuthRejected(
                f"the provider rejected the API key (HTTP {code})", status_code=code
            )
        if code == 404:
            raise errors.TaskNotFound(
                "the provider does not know this task (HTTP 404)", status_code=code
            )
        if code == 429:
            retry_after = parse_retry_after(response.headers.get("Retry-After"), utils.utcnow())
            raise errors.RateLimited("the provider rate-limited us (HTTP 429)", retry_after)
        raise errors.ProviderUnavailable(f"the provider answered HTTP {code}", status_code=code)

    @contextlib.asynccontextmanager
    async def open_video(self, url: str) -> AsyncIterator[Video]:
        """Stream the video at ``url``, following redirects only to links that pass the same rules."""
        for _ in range(MAX_REDIRECTS + 1):
            await check_video_url(url, self._url_rules)
            request = self._files.build_request("GET", url)
            try:
                response = await self._files.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise errors.DownloadError(
                    f"cannot reach the video host: {type(exc).__name__}"
                ) from exc
            try:
                if response.is_redirect and "location" in response.headers:
                    url = urllib.parse.urljoin(url, response.headers["location"])
                    continue
                yield self._video(response)
                return
            finally:
                await response.aclose()
        raise errors.DownloadError(f"more than {MAX_REDIRECTS} redirects from the video host")

    def _video(self, response: httpx.Response) -> Video:
        code = response.status_code
        if code in (403, 404, 410):
            raise errors.LinkExpired(f"the video link was refused (HTTP {code})")
        if code != 200:
            raise errors.DownloadError(f"the video host answered HTTP {code}")
        length: int | None = None
        raw_length = response.headers.get("Content-Length")
        if raw_length is not None:
            try:
                length = int(raw_length)
            except ValueError:
                raise errors.DownloadError(
                    "the video host sent an invalid Content-Length"
                ) from None
            if length > self._max_video_bytes:
                raise errors.VideoTooLarge(
                    f"video is {length} bytes, more than SEEDANCE_MAX_VIDEO_BYTES "
                    f"({self._max_video_bytes})"
                )
        return Video(length=length, chunks=self._chunks(response))

    async def _chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        received = 0
        try:
            async for chunk in response.aiter_raw(CHUNK_BYTES):
                received += len(chunk)
                if received > self._max_video_bytes:
                    raise errors.VideoTooLarge(
                        f"video is larger than SEEDANCE_MAX_VIDEO_BYTES ({self._max_video_bytes})"
                    )
                yield chunk
        except httpx.HTTPError as exc:
            raise errors.DownloadError(
                f"the download broke off after {received} bytes: {type(exc).__name__}"
            ) from exc
