"""The HTTP client every provider API shares: one request in, one typed result or one typed error out.

``fetch`` polls a task at the URL its :class:`Dialect` names and has the dialect read the answer;
``open_video`` streams a finished video from its link; ``check_key`` asks, for free, whether the API
key is accepted. What differs between the APIs is the dialect's (``providers/<name>.py``): the path
and key of a poll, its answer, its 404, whether a download carries the key and which refusals of a
link mean "poll again". Only ``providers/`` (and :mod:`wire`, :mod:`netguard`) import httpx and
aiohttp, and their exceptions become ``errors.*`` here; the network rules are :mod:`netguard`'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import aiohttp
import aiohttp.abc
import httpx

from seedance_archiver import errors, models, netguard, provider, utils, wire
from seedance_archiver.providers import fields

CHUNK_BYTES = 1024 * 1024
MAX_REDIRECTS = 5


def _body_kind(reply: wire.Reply) -> str:
    """What a body was, for a log line: its type and size, never its text."""
    media = reply.headers.get("Content-Type") or "no Content-Type"
    return (
        f"{netguard.printable(media, 60)}, {len(reply.body)} bytes"
        if reply.body
        else f"{netguard.printable(media, 60)}, empty"
    )


# The task id ``check_key`` asks about: hyphens and this prefix, so no provider ever issued it
# (reseller: ``video_<hex>``; Ark: ``cgt-…``; Replicate: lowercase letters and digits). The provider
# answers its own 404 when it accepts the key and 401/403 when it does not; no task is read or
# created. Only unreserved URL characters, so it reaches the provider as written.
KEY_CHECK_TASK_ID = "seedance-archiver-key-check-0"

NOT_OWN_404 = "the provider answered 404 without its own JSON error (an outage, not a verdict)"
# What a video host's refusal of a signed link means by default: it ran out, poll for a fresh one.
REFUSED_LINK_STATUSES = frozenset({403, 404, 410})
# A video host's answers that send us on: to their Location, when they have one.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class Dialect(Protocol):
    """One provider's API as :class:`HttpProvider` speaks it: how a task is asked about, what its
    answers and its 404 mean, how a video is fetched and what a refused link means.

    Implementations are pure (``providers/reseller.py``, ``providers/ark.py``) and subclass this:
    what they leave alone is the common contract (a GET with a Bearer key; a 404 with the
    provider's JSON error is its word, so the key passed; an open signed link, refused with 403,
    404 or 410 once it ran out).
    """

    name: str
    # Where its tasks are asked about: ``tasks_path`` + the quoted id, under the base URL.
    tasks_path: str
    # An id the provider can never issue: asked about by ``check_key``, a 404 means the key passed.
    key_check_task_id: str = KEY_CHECK_TASK_ID
    # The video host's statuses that mean the link was refused: LinkExpired, poll again for a fresh one.
    refused_link_statuses: frozenset[int] = REFUSED_LINK_STATUSES
    # Whether a download carries the API key (a link behind the provider's own authorisation) or
    # not (a signed link carries its own). The key only ever goes to the API's own host.
    video_needs_key: bool = False

    def task_path(self, task_id: str) -> str:
        """The task's path under the base URL, ``task_id`` already URL-quoted."""
        return self.tasks_path + task_id

    def authorization(self, api_key: str) -> str:
        """The ``Authorization`` header of a poll."""
        return f"Bearer {api_key}"

    def parse(self, task_id: str, body: bytes) -> models.Answer:
        """The 200 answer about ``task_id`` as our typed result, with the deadline its facts give
        (``expires_at``); MalformedAnswer off the contract."""
        ...

    def is_own_not_found(self, body: bytes) -> bool:
        """Whether a 404's body is the provider's own error (so evidence about the task, and a sign
        that the key passed), not a gateway's page."""
        return fields.json_error(body)

    def retry_after(self, header: str | None, body: bytes, now: dt.datetime) -> float | None:
        """Seconds a 429 asks us to wait: its ``Retry-After`` header, else None (the back-off)."""
        return utils.parse_retry_after(header, now)

    def task_id_problem(self, task_id: str) -> str | None:
        """Why ``task_id`` can never be this provider's id; None (the common rule is enough)."""
        return None


def _unreachable(exc: BaseException) -> str:
    """Why a poll got no answer.

    httpx-aiohttp maps every aiohttp connection error, refused or dropped, to ConnectTimeout, so the
    aiohttp error it wraps decides, and only a real timeout is called one.
    """
    if isinstance(exc, wire.AnswerTooLarge | httpx.DecodingError):
        return f"answer refused: {exc}"
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


def task_url(base: str, dialect: Dialect, task_id: str) -> str:
    """The URL a task is polled at: the base URL, the dialect's path, the id percent-encoded (every
    character but letters, digits and ``_.-~``, so an id is one path segment and nothing else)."""
    return base + dialect.task_path(urllib.parse.quote(task_id, safe=""))


class HttpProvider:
    """The real provider client over httpx's API.

    Polls go to our own aiohttp-backed transport (:class:`wire.ApiTransport`), chosen by
    measurement (bench/README.md): httpx's default transport costs 20x the CPU of a bare aiohttp
    client per poll, httpx's Client 1.2x more on top of any transport (its cookie jar and URL
    merging run on every request; we need neither), and httpx-aiohttp's transport, which streams
    every body, about 2x ours. Each poll is a URL and headers given to its :meth:`wire.Api.get`,
    without an ``httpx.Request`` or ``httpx.Response`` (half the poll's CPU above aiohttp); any
    httpx transport can stand in (:class:`wire.HttpxApi`).

    Video downloads go on an aiohttp session of their own, to the URL as httpx parses it
    (:func:`netguard.parse_url`, the form every network rule is checked on). They went through
    httpx's Client too, over a streaming transport: in a burst of finished videos its request
    building, cookie jar and URL parsing were 9% of the daemon's Python time (bench/burst.py).
    """

    MAX_CONNECTIONS = 200
    MAX_ANSWER_BYTES = 1024 * 1024  # a poll's answer is about 1 KB; a longer one is not an answer

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_seconds: float = provider.TIMEOUT_SECONDS,
        url_rules: netguard.UrlRules | None = None,
        max_video_bytes: int = provider.MAX_VIDEO_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Callable[[], aiohttp.abc.AbstractResolver] | None = None,
        dialect: Dialect,
    ) -> None:
        self._dialect = dialect
        self.name = dialect.name
        self._base = base_url.rstrip("/")
        self._url_rules = url_rules or netguard.UrlRules()
        self._max_video_bytes = max_video_bytes
        ssl_context = httpx.create_ssl_context()
        # A transport given here bounds each exchange as a whole itself (ours: total_seconds).
        self._api: wire.Api = (
            wire.HttpxApi(transport, timeout_seconds)
            if transport is not None
            else wire.ApiTransport(
                max_connections=self.MAX_CONNECTIONS,
                max_body_bytes=self.MAX_ANSWER_BYTES,
                total_seconds=timeout_seconds,
                ssl_context=ssl_context,
            )
        )
        self._api_headers = {
            "Host": httpx.URL(self._base).netloc.decode("ascii"),
            "Authorization": dialect.authorization(api_key),
            "Accept": "application/json",
            # An answer is a few hundred bytes: nothing to gain from compression, and a
            # compressed one could inflate far past MAX_ANSWER_BYTES (wire.decode_bounded).
            "Accept-Encoding": "identity",
        }
        # Where a download carries the key: the API's own host only, never a redirect elsewhere.
        self._api_host = httpx.URL(self._base).host
        self._video_auth = (
            {"Authorization": dialect.authorization(api_key)} if dialect.video_needs_key else {}
        )
        make_resolver = resolver or aiohttp.ThreadedResolver
        allow_private = self._url_rules.allow_private_hosts

        def files_session() -> aiohttp.ClientSession:
            # Called on first use, inside the running loop (aiohttp's resolvers need one). The
            # connector's resolver checks every address a download connects to (PublicResolver).
            inner = make_resolver()
            connector = aiohttp.TCPConnector(
                resolver=inner if allow_private else netguard.PublicResolver(inner),
                limit=self.MAX_CONNECTIONS,
                ssl=ssl_context,
            )
            return aiohttp.ClientSession(
                connector=connector,
                # The body as sent: a video is not compressed, and we ask for it as it is.
                auto_decompress=False,
                headers={"Accept-Encoding": "identity"},
                # No cookie from one video host goes with another task's download.
                cookie_jar=aiohttp.DummyCookieJar(),
            )

        self._files_session = files_session
        self._files: aiohttp.ClientSession | None = None
        # Each connect and each socket read within the timeout; the whole download is bounded by
        # the caller (SEEDANCE_MAX_DOWNLOAD_SECONDS).
        self._files_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeout_seconds,
            sock_connect=timeout_seconds,
            sock_read=timeout_seconds,
        )

    async def aclose(self) -> None:
        await self._api.aclose()
        if self._files is not None:
            await self._files.close()
            self._files = None

    async def _get_result(self, task_id: str) -> wire.Reply:
        """One GET of the task with our key: the whole answer, or ProviderUnavailable."""
        try:
            return await self._api.get(
                task_url(self._base, self._dialect, task_id), self._api_headers
            )
        except (TimeoutError, httpx.HTTPError) as exc:
            raise errors.ProviderUnavailable(_unreachable(exc)) from exc

    async def fetch(self, task_id: str) -> models.Answer:
        reply = await self._get_result(task_id)
        code, body = reply.status, reply.body
        if code == 200:
            try:
                return self._dialect.parse(task_id, body)
            except errors.MalformedAnswer as exc:
                exc.status_code = code
                raise
        if code in (401, 403):
            raise errors.AuthRejected(
                f"the provider rejected the API key (HTTP {code})", status_code=code
            )
        if code == 404:
            if self._dialect.is_own_not_found(body):
                raise errors.TaskNotFound(
                    "the provider does not know this task (HTTP 404)", status_code=code
                )
            # An HTML page or an empty body: a gateway, a misrouted deploy or a wrong base path
            # answers so for every path. That is an outage, not the provider's word on a task.
            raise errors.ProviderUnavailable(
                f"{NOT_OWN_404}: {_body_kind(reply)}", status_code=code
            )
        if code == 429:
            retry_after = self._dialect.retry_after(
                reply.headers.get("Retry-After"), body, utils.utcnow()
            )
            raise errors.RateLimited("the provider rate-limited us (HTTP 429)", retry_after)
        raise errors.ProviderUnavailable(f"the provider answered HTTP {code}", status_code=code)

    def task_id_problem(self, task_id: str) -> str | None:
        return self._dialect.task_id_problem(task_id)

    async def check_key(self) -> bool | None:
        """Whether the provider accepts our API key: True, False, or None when its answer cannot tell.

        One poll of the dialect's ``key_check_task_id``, a task that cannot exist, so it costs
        nothing; it goes with the same key, headers and timeout as :meth:`fetch` (the caller paces
        it like a poll).
        The provider's own 404 (its JSON error) means the key passed (the provider checks it
        before looking the task up) and 401/403 that it was refused; anything else (5xx, 429, a
        404 that is not the provider's, a timeout, no connection, a 200 from a provider that makes
        up tasks) is None. It never raises ProviderError.
        """
        try:
            reply = await self._get_result(self._dialect.key_check_task_id)
        except errors.ProviderUnavailable:
            return None
        code = reply.status
        if code == 404:
            return True if self._dialect.is_own_not_found(reply.body) else None
        if code in (401, 403):
            return False
        return None

    @contextlib.asynccontextmanager
    async def open_video(self, task: models.Task) -> AsyncIterator[provider.Video]:
        """Stream the video at ``task.video_url``, following redirects only to links that pass the
        same rules.

        The whole download's deadline is the caller's (``service.Service._copy``), since it bounds
        the upload to storage as well.
        """
        if task.video_url is None:
            raise errors.DownloadError("the task has no video_url")
        url = task.video_url
        for hop in range(MAX_REDIRECTS + 1):
            which = "the video_url" if hop == 0 else "the video host's redirect"
            if hop > 0:
                netguard.check_scheme(
                    url, self._url_rules
                )  # a redirect to file:// is unsafe, not malformed
            try:
                parsed = netguard.parse_url(url)
            except ValueError as exc:
                raise errors.DownloadError(f"{which} is not a valid URL ({exc})") from None
            await netguard.check_video_url(url, self._url_rules, parsed)
            response = await self._send(parsed)
            try:
                if response.status in REDIRECT_STATUSES and "Location" in response.headers:
                    url = netguard.redirect_target(url, response.headers["Location"])
                    continue
                yield await self._video(response)
                return
            finally:
                # Back to the pool when the body was read to its end; closed when it was not.
                response.release()
        raise errors.DownloadError(f"more than {MAX_REDIRECTS} redirects from the video host")

    async def _send(self, url: httpx.URL) -> aiohttp.ClientResponse:
        """GET ``url`` (as :func:`netguard.parse_url` gave it), its body left to stream;
        DownloadError for anything the request raises."""
        session = self._files or self._open_files()
        # Video hosts get no API key unless the dialect says a link needs it, and then only the
        # API's own host.
        headers = self._video_auth if self._video_auth and url.host == self._api_host else None
        try:
            return await session.get(
                str(url),
                headers=headers,
                allow_redirects=False,
                timeout=self._files_timeout,
                # Pieces of up to CHUNK_BYTES as the socket gives them, not 64 KiB.
                read_bufsize=CHUNK_BYTES,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            if netguard.private_answer(exc):
                raise errors.UnsafeVideoUrl(netguard.PRIVATE_HOST_MESSAGE) from exc
            raise errors.DownloadError(
                f"cannot reach the video host: {wire.error_name(exc)}"
            ) from exc
        except ValueError as exc:  # UnicodeError (IDNA) is a ValueError
            raise errors.DownloadError(
                f"cannot request the video link ({netguard.printable(str(exc))})"
            ) from exc

    def _open_files(self) -> aiohttp.ClientSession:
        self._files = self._files_session()
        return self._files

    async def _video(self, response: aiohttp.ClientResponse) -> provider.Video:
        """The answer as a Video, once its status, size and first bytes say it is one."""
        code = response.status
        if code in self._dialect.refused_link_statuses:
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
                    f"({self._max_video_bytes})",
                    length=length,
                )
        pieces = aiter(response.content.iter_chunked(CHUNK_BYTES))
        head = b""
        try:
            # Pieces of up to CHUNK_BYTES as the socket gives them, not copied into equal ones.
            async for piece in pieces:
                head += piece
                if len(head) >= provider.VIDEO_HEAD_BYTES:
                    break
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _broke_off(len(head), exc) from exc
        provider.check_video(response.headers.get("Content-Type"), head)
        return provider.Video(length=length, chunks=self._chunks(head, pieces))

    async def _chunks(self, head: bytes, pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The head already read, then the rest as it comes, within SEEDANCE_MAX_VIDEO_BYTES."""
        received = 0
        try:
            if head:
                received = len(head)
                self._within_limit(received)
                yield head
            async for piece in pieces:
                received += len(piece)
                self._within_limit(received)
                yield piece
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _broke_off(received, exc) from exc

    def _within_limit(self, received: int) -> None:
        if received > self._max_video_bytes:
            raise errors.VideoTooLarge(
                f"video is larger than SEEDANCE_MAX_VIDEO_BYTES ({self._max_video_bytes})"
            )


def _broke_off(received: int, exc: aiohttp.ClientError | TimeoutError) -> errors.DownloadError:
    return errors.DownloadError(
        f"the download broke off after {received} bytes: {wire.error_name(exc)}"
    )


def factory(dialect: Dialect) -> Callable[[str, str, provider.Options], provider.Provider]:
    """What a provider module's ``PROVIDER.build`` is when its API is ``dialect`` over this client."""

    def build(base_url: str, api_key: str, options: provider.Options) -> provider.Provider:
        return HttpProvider(
            base_url,
            api_key,
            timeout_seconds=options.timeout_seconds,
            url_rules=options.url_rules,
            max_video_bytes=options.max_video_bytes,
            transport=options.transport,
            dialect=dialect,
        )

    return build
