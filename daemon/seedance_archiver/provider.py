"""The Seedance client's HTTP machinery: one request in, one typed result or one typed error out.

``fetch`` polls a task at the URL its :class:`Dialect` names and has the dialect read the answer;
``open_video`` streams a finished video from its ``video_url``; ``check_key`` asks, for free, whether
the API key is accepted. The dialects (``providers/reseller.py``, ``providers/ark.py``) are pure
parsers built from the field readers here; only this module imports httpx, and its exceptions become
``errors.*`` here. The strings of an answer are made storable here too (:func:`storable`), so what
reaches the database is text every database accepts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import re
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import aiohttp
import aiohttp.abc
import httpx

from seedance_archiver import errors, models, netguard, utils, wire

CHUNK_BYTES = 1024 * 1024
MAX_REDIRECTS = 5
# Caps on the provider's free-text fields: a name or a reason, never a 200 KB blob in every row.
MODEL_MAX_CHARS = 200
ERROR_MAX_CHARS = 2000
# Signed links run long, but a longer one is garbage; a cut link would be useless, so it is refused.
VIDEO_URL_MAX_CHARS = 8192


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# NUL (PostgreSQL's text refuses it) and lone surrogates (no UTF-8 encoding has them, so psycopg and
# SQLite refuse them; json.loads makes one of "\ud800").
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def truncation_marker(total_chars: int) -> str:
    """What :func:`storable` appends to a text it cut, saying how long the text was."""
    return f"…[truncated, {total_chars} chars in all]"


def storable(text: str, limit: int) -> str:
    """``text`` as any database stores it: NUL and lone surrogates become U+FFFD, and beyond ``limit``
    characters it is cut and ends with :func:`truncation_marker`.

    Pure, and cheap for text that needs nothing; at most ``limit + len(truncation_marker(len(text)))``
    characters come out, and they always encode to UTF-8.
    """
    if limit < 0:
        raise ValueError("limit must not be negative")
    if len(text) > limit:
        text = text[:limit] + truncation_marker(len(text))
    return _UNSTORABLE.sub("\ufffd", text)


def json_object(body: bytes) -> dict[str, Any]:
    """The answer's body as a JSON object, or MalformedAnswer."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise errors.MalformedAnswer("malformed answer: the body is not JSON") from None
    if not isinstance(payload, dict):
        raise errors.MalformedAnswer(
            f"malformed answer: expected a JSON object, got {type(payload).__name__}"
        )
    return payload


NOT_OWN_404 = "the provider answered 404 without its own JSON error (an outage, not a verdict)"


def json_error(body: bytes) -> bool:
    """Whether ``body`` is a JSON object with an ``error`` member: how both APIs answer a 404.

    A gateway's 404 (nginx, a load balancer, a CDN) is an HTML page or empty; API gateways that
    answer JSON say ``message``. Only the provider's own error counts as its word on a task.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(payload, dict) and payload.get("error") not in (None, "", {})


def _body_kind(response: httpx.Response, body: bytes) -> str:
    """What a body was, for a log line: its type and size, never its text."""
    media = response.headers.get("Content-Type") or "no Content-Type"
    return (
        f"{netguard.printable(media, 60)}, {len(body)} bytes"
        if body
        else f"{netguard.printable(media, 60)}, empty"
    )


def answer_id(payload: dict[str, Any], task_id: str) -> str:
    """The answer's ``id``, which must be the asked-for one, or MalformedAnswer."""
    value = payload.get("id")
    if not isinstance(value, str):
        raise errors.MalformedAnswer("malformed answer: field 'id' is missing or not a string")
    if value != task_id:
        raise errors.MalformedAnswer(
            f"malformed answer: it is about task {_short(value)}, not the one asked for"
        )
    return value


def status_text(payload: dict[str, Any]) -> str:
    """The answer's ``status`` as given (each dialect maps it), or MalformedAnswer."""
    raw = payload.get("status")
    if not isinstance(raw, str):
        raise errors.MalformedAnswer("malformed answer: field 'status' is missing or not a string")
    return raw


def unknown_status(raw: str) -> errors.MalformedAnswer:
    return errors.MalformedAnswer(f"malformed answer: unknown status {_short(raw)}")


def link(payload: dict[str, Any], key: str) -> str | None:
    """A link field, whole and usable, or MalformedAnswer."""
    url: str | None = field(payload, key, (str,), "a string")
    if not url:
        return url  # "" is no link, as null is (the policy treats both alike)
    if len(url) > VIDEO_URL_MAX_CHARS:
        raise errors.MalformedAnswer(
            f"malformed answer: {key} is {len(url)} characters long, "
            f"more than {VIDEO_URL_MAX_CHARS}"
        )
    try:
        netguard.parse_url(url)
    except ValueError as exc:
        raise errors.MalformedAnswer(
            f"malformed answer: {key} is not a valid URL ({exc})"
        ) from None
    return url


def field(payload: dict[str, Any], key: str, kinds: tuple[type, ...], what: str) -> Any:
    """A field of one of ``kinds`` (never a JSON boolean), None if absent or null; else malformed.

    For the fields a video depends on (its link); the rest are read by :class:`Lenient`.
    """
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise errors.MalformedAnswer(
            f"malformed answer: field {key!r} should be {what}, got {type(value).__name__}"
        )
    return value


# A time in milliseconds: from this on (2001-09-09 in ms, year 33658 in s) a number is read as ms.
MILLISECONDS_FROM = 1e12
LATEST_SECONDS = 1e11  # year 5138: a later time in seconds is no time at all


class Lenient:
    """Reads an answer's side fields where they make sense, and notes the ones it ignores.

    Only ``id``, ``status`` and, when completed, the video link must be right to archive a video;
    a provider whose other fields drift from their documented types (a number in a string, a time
    in milliseconds or as ISO text) still gets its video archived. What cannot be read is None and
    noted in :attr:`ignored` as (field, why), for a counted warning: never a reason not to archive.
    """

    def __init__(self) -> None:
        self.ignored: list[tuple[str, str]] = []

    def _ignore(self, name: str, why: str) -> None:
        self.ignored.append((name, why))

    def object(self, payload: dict[str, Any], key: str) -> dict[str, Any]:
        """An object field; {} if absent, null or not an object."""
        value = payload.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self._ignore(key, f"not an object ({type(value).__name__})")
            return {}
        return value

    def number(self, payload: dict[str, Any], key: str) -> float | None:
        """A finite number, also written as a string (``"5.04"``); None otherwise."""
        value = payload.get(key)
        if value is None:
            return None
        number = _as_number(value)
        if number is None:
            self._ignore(key, f"not a finite number ({_short(value)})")
        return number

    def time(self, payload: dict[str, Any], key: str) -> dt.datetime | None:
        """A time as Unix seconds, milliseconds (from 10^12 on) or ISO 8601 text, aware UTC."""
        value = payload.get(key)
        if value is None:
            return None
        when = _as_time(value)
        if when is None:
            self._ignore(key, f"not a time ({_short(value)})")
        return when

    def text(self, payload: dict[str, Any], key: str, limit: int) -> str | None:
        """A string made :func:`storable` within ``limit``; None otherwise."""
        value = payload.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self._ignore(key, f"not a string ({type(value).__name__})")
            return None
        return storable(value, limit)

    def reason(self, payload: dict[str, Any], key: str) -> str | None:
        """A failure's reason as one readable line: text as given; an error object as
        ``message (code)``; any other value as compact JSON. None when absent, null or empty."""
        value = payload.get(key)
        if value is None or value == {} or value == "":
            return None
        if isinstance(value, str):
            return storable(value, ERROR_MAX_CHARS)
        if isinstance(value, dict):
            code = value.get("code")
            message = value.get("message")
            message = message if isinstance(message, str) and message else None
            if code is not None and (isinstance(code, bool) or not isinstance(code, str | int)):
                code = json.dumps(code, ensure_ascii=False)
            if message is not None or code is not None:
                line = message or "no message"
                if code is not None:
                    line = f"{line} ({code})"
                return storable(line, ERROR_MAX_CHARS)
        try:
            shown = json.dumps(value, ensure_ascii=False)
        except (RecursionError, ValueError):
            shown = f"an error of type {type(value).__name__} nested too deep to show"
        return storable(shown, ERROR_MAX_CHARS)


def _as_number(value: object) -> float | None:
    """``value`` as a finite float: a JSON number (never a boolean) or a numeric string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _as_time(value: object) -> dt.datetime | None:
    """``value`` as an aware UTC time: Unix seconds or milliseconds (a number or a numeric
    string), or ISO 8601 text (without an offset: UTC); None when it is none of these."""
    seconds = _as_number(value)
    if seconds is None and isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
    if seconds is None:
        return None
    if seconds >= MILLISECONDS_FROM:
        seconds /= 1000
    if not 0 < seconds < LATEST_SECONDS:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


@dataclasses.dataclass
class Video:
    """An open video download: its announced size and its bytes, streamed."""

    length: int | None
    chunks: AsyncIterator[bytes]


class Provider(Protocol):
    """What the service needs from the provider.

    ``name`` (``reseller``, ``ark``) is all the service learns of which API it talks to: it stamps
    the rows it polls with it and claims only rows unstamped or stamped so.
    """

    name: str

    async def fetch(self, task_id: str) -> models.Answer: ...

    def open_video(self, url: str) -> contextlib.AbstractAsyncContextManager[Video]: ...

    async def check_key(self) -> bool | None: ...

    async def aclose(self) -> None: ...


class Dialect(Protocol):
    """One provider's task API: where a task is asked about and how its answer reads.

    Implementations are pure (``providers/reseller.py``, ``providers/ark.py``); :class:`HttpProvider`
    does the HTTP for all of them.
    """

    name: str
    # An id the provider can never issue: asked about by ``check_key``, a 404 means the key passed.
    key_check_task_id: str

    def task_path(self, task_id: str) -> str:
        """The task's path under the base URL, ``task_id`` already URL-quoted."""
        ...

    def parse(self, task_id: str, body: bytes) -> models.Answer:
        """The 200 answer about ``task_id`` as our typed result; MalformedAnswer off the contract."""
        ...

    def is_own_not_found(self, body: bytes) -> bool:
        """Whether a 404's body is the provider's own error (so evidence about the task), not a
        gateway's page."""
        ...


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


_NO_BODY = httpx.ByteStream(b"")  # a poll's: immutable, so one serves every request


class TaskUrls:
    """The URL each task is polled at: the base URL, the dialect's path, the id percent-encoded.

    httpx parses and checks every URL it is handed, character by character: in the scale run that
    was 35 us of CPU per poll, more than anything else of ours (bench/README.md, issue 14). A task's
    URL differs from every other only in its path, and that path is already percent-encoded, so
    :meth:`of` copies the base URL's parsed form (httpx's ``URL._uri_reference``) with the task's
    path instead of parsing the whole again. That form is httpx's own, not its API: at start the
    shortcut is checked against httpx's parse for a few awkward ids, and where any differs (another
    httpx, a base URL with a query) every URL is parsed, as before.
    """

    PROBES = ("video_0123abc", "a/../b?x#y", "样片 1%2F+x", "seedance-archiver-key-check-0")

    def __init__(self, base: str, dialect: Dialect) -> None:
        self._base = base
        self._dialect = dialect
        self._parsed: Any = None  # the base URL as httpx parsed it, while the shortcut holds
        self._prefix = ""
        try:
            parsed = httpx.URL(base)._uri_reference
        except (AttributeError, httpx.InvalidURL):
            return  # every URL parsed (an invalid base fails at the first poll, as before)
        if parsed.query is None and parsed.fragment is None:
            self._parsed, self._prefix = parsed, parsed.path
            if not all(self._agrees(task_id) for task_id in self.PROBES):
                self._parsed = None

    @property
    def shortcut(self) -> bool:
        """Whether URLs are copied from the parsed base (else httpx parses each)."""
        return self._parsed is not None

    def of(self, task_id: str) -> httpx.URL:
        path = self._path(task_id)
        if self._parsed is None or task_id in (".", ".."):
            # httpx resolves a "." or ".." segment away (no valid id is one: policy.task_id_problem)
            return httpx.URL(self._base + path)
        url = httpx.URL.__new__(httpx.URL)
        url._uri_reference = self._parsed._replace(path=self._prefix + path)
        return url

    def _path(self, task_id: str) -> str:
        return self._dialect.task_path(urllib.parse.quote(task_id, safe=""))

    def _agrees(self, task_id: str) -> bool:
        try:
            made = self.of(task_id)
        except (TypeError, ValueError):  # another httpx's parse result has other fields
            return False
        return bool(
            made._uri_reference == httpx.URL(self._base + self._path(task_id))._uri_reference
        )


class HttpProvider:
    """The real provider client over httpx's API.

    Polls are ``httpx.Request`` objects handed straight to our own aiohttp-backed transport
    (:class:`wire.ApiTransport`), chosen by measurement (bench/README.md): httpx's default transport
    costs 20x the CPU of a bare aiohttp client per poll, httpx's Client 1.2x more on top of any
    transport (its cookie jar and URL merging run on every request; we need neither), and
    httpx-aiohttp's transport, which streams every body, about 2x ours. Video downloads are few and
    long, so they keep httpx's plain Client, on :class:`wire.StreamTransport`.
    """

    MAX_CONNECTIONS = 200
    MAX_ANSWER_BYTES = 1024 * 1024  # a poll's answer is about 1 KB; a longer one is not an answer

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_seconds: float = 30.0,
        url_rules: netguard.UrlRules | None = None,
        max_video_bytes: int = 2 * 1024**3,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Callable[[], aiohttp.abc.AbstractResolver] | None = None,
        dialect: Dialect | None = None,
    ) -> None:
        if dialect is None:
            # The reseller is the default API; imported here because it is built on this module.
            from seedance_archiver.providers import reseller

            dialect = reseller.DIALECT
        self._dialect = dialect
        self.name = dialect.name
        self._base = base_url.rstrip("/")
        self._url_rules = url_rules or netguard.UrlRules()
        self._max_video_bytes = max_video_bytes
        limits = httpx.Limits(
            max_connections=self.MAX_CONNECTIONS, max_keepalive_connections=self.MAX_CONNECTIONS
        )
        timeout = httpx.Timeout(timeout_seconds)
        ssl_context = httpx.create_ssl_context()
        # A transport given here bounds each exchange as a whole itself (ours: total_seconds).
        self._api: httpx.AsyncBaseTransport = transport or wire.ApiTransport(
            max_connections=self.MAX_CONNECTIONS,
            max_body_bytes=self.MAX_ANSWER_BYTES,
            total_seconds=timeout_seconds,
            ssl_context=ssl_context,
        )
        self._task_urls = TaskUrls(self._base, dialect)
        self._api_headers = httpx.Headers(
            {
                # What httpx would add to each request (its Headers rebuilt each time): set once.
                "Host": httpx.URL(self._base).netloc.decode("ascii"),
                "Authorization": f"Bearer {api_key}",
                "Accept": "application/json",
                # An answer is a few hundred bytes: nothing to gain from compression, and a
                # compressed one could inflate far past MAX_ANSWER_BYTES (wire.decode_bounded).
                "Accept-Encoding": "identity",
            }
        )
        self._api_extensions = {"timeout": timeout.as_dict()}
        make_resolver = resolver or aiohttp.ThreadedResolver
        allow_private = self._url_rules.allow_private_hosts

        def files_session() -> aiohttp.ClientSession:
            # Called on first use, inside the running loop (aiohttp's resolvers need one).
            inner = make_resolver()
            connector = aiohttp.TCPConnector(
                resolver=inner if allow_private else netguard.PublicResolver(inner),
                limit=self.MAX_CONNECTIONS,
                ssl=ssl_context,
            )
            # httpx reads the body as sent (aiter_raw), as httpx-aiohttp's transport did.
            return aiohttp.ClientSession(connector=connector, auto_decompress=False)

        # Video hosts get no API key: a signed link carries its own authorisation. The connector's
        # resolver checks every address a download connects to (see PublicResolver).
        self._files = httpx.AsyncClient(
            transport=wire.StreamTransport(files_session, chunk_bytes=CHUNK_BYTES),
            headers={"Accept-Encoding": "identity"},
            timeout=timeout,
            limits=limits,
            follow_redirects=False,
            event_hooks={"response": [netguard.check_redirect]},
        )

    async def aclose(self) -> None:
        await self._api.aclose()
        await self._files.aclose()

    async def _get_result(self, task_id: str) -> tuple[httpx.Response, bytes]:
        """One GET of the task with our key: the response and its body, or ProviderUnavailable."""
        # Given a stream, httpx takes the request as it stands: no body to encode and read, no
        # headers to add and the whole set rebuilt (5 us per poll; ours are set once, Host too).
        request = httpx.Request(
            "GET",
            self._task_urls.of(task_id),
            headers=self._api_headers,
            extensions=self._api_extensions,
            stream=_NO_BODY,
        )
        try:
            response = await self._api.handle_async_request(request)
            try:
                body = await response.aread()
            finally:
                await response.aclose()
        except (TimeoutError, httpx.HTTPError) as exc:
            raise errors.ProviderUnavailable(_unreachable(exc)) from exc
        return response, body

    async def fetch(self, task_id: str) -> models.Answer:
        response, body = await self._get_result(task_id)
        code = response.status_code
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
                f"{NOT_OWN_404}: {_body_kind(response, body)}", status_code=code
            )
        if code == 429:
            retry_after = utils.parse_retry_after(
                response.headers.get("Retry-After"), utils.utcnow()
            )
            raise errors.RateLimited("the provider rate-limited us (HTTP 429)", retry_after)
        raise errors.ProviderUnavailable(f"the provider answered HTTP {code}", status_code=code)

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
            response, body = await self._get_result(self._dialect.key_check_task_id)
        except errors.ProviderUnavailable:
            return None
        code = response.status_code
        if code == 404:
            return True if self._dialect.is_own_not_found(body) else None
        if code in (401, 403):
            return False
        return None

    @contextlib.asynccontextmanager
    async def open_video(self, url: str) -> AsyncIterator[Video]:
        """Stream the video at ``url``, following redirects only to links that pass the same rules.

        The whole download's deadline is the caller's (``service.Service._copy``), since it bounds
        the upload to storage as well.
        """
        for hop in range(MAX_REDIRECTS + 1):
            which = "the video_url" if hop == 0 else "the video host's redirect"
            if hop > 0:
                netguard.check_scheme(
                    url, self._url_rules
                )  # a redirect to file:// is unsafe, not malformed
            try:
                netguard.parse_url(url)
            except ValueError as exc:
                raise errors.DownloadError(f"{which} is not a valid URL ({exc})") from None
            await netguard.check_video_url(url, self._url_rules)
            response = await self._send(url)
            try:
                if response.has_redirect_location:
                    url = netguard.redirect_target(url, response.headers["location"])
                    continue
                yield await self._video(response)
                return
            finally:
                await response.aclose()
        raise errors.DownloadError(f"more than {MAX_REDIRECTS} redirects from the video host")

    async def _send(self, url: str) -> httpx.Response:
        """GET ``url`` as a stream; DownloadError for anything httpx raises, a bad URL included."""
        try:
            request = self._files.build_request("GET", url)
            return await self._files.send(request, stream=True)
        except httpx.HTTPError as exc:
            if netguard.private_answer(exc):
                raise errors.UnsafeVideoUrl(netguard.PRIVATE_HOST_MESSAGE) from exc
            raise errors.DownloadError(
                f"cannot reach the video host: {type(exc).__name__}"
            ) from exc
        except (httpx.InvalidURL, ValueError) as exc:  # UnicodeError (IDNA) is a ValueError
            raise errors.DownloadError(
                f"cannot request the video link ({netguard.printable(str(exc))})"
            ) from exc

    async def _video(self, response: httpx.Response) -> Video:
        """The answer as a Video, once its status, size and first bytes say it is one."""
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
                    f"({self._max_video_bytes})",
                    length=length,
                )
        pieces = response.aiter_raw()
        head = b""
        try:
            # Pieces of up to CHUNK_BYTES as the transport reads them, not copied into equal ones.
            async for piece in pieces:
                head += piece
                if len(head) >= VIDEO_HEAD_BYTES:
                    break
        except httpx.HTTPError as exc:
            raise _broke_off(len(head), exc) from exc
        check_video(response.headers.get("Content-Type"), head)
        return Video(length=length, chunks=self._chunks(head, pieces))

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
        except httpx.HTTPError as exc:
            raise _broke_off(received, exc) from exc

    def _within_limit(self, received: int) -> None:
        if received > self._max_video_bytes:
            raise errors.VideoTooLarge(
                f"video is larger than SEEDANCE_MAX_VIDEO_BYTES ({self._max_video_bytes})"
            )


def _broke_off(received: int, exc: BaseException) -> errors.DownloadError:
    return errors.DownloadError(
        f"the download broke off after {received} bytes: {type(exc).__name__}"
    )


# The first bytes of a video: enough for a container's signature and a readable log line.
VIDEO_HEAD_BYTES = 32
# Types an error page is served as (a host's "link expired" page, a JSON or XML error); a video is
# video/*, application/octet-stream, binary/octet-stream, or has no type at all.
_NOT_VIDEO_TYPES = ("application/json", "application/xml")
_NOT_VIDEO_SUFFIXES = ("+json", "+xml")
EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # WebM and Matroska


def check_video(content_type: str | None, head: bytes) -> None:
    """Raise NotAVideo unless a body of ``content_type`` starting with ``head`` can be a video.

    Three checks and no more, so that no real video is refused by an encoder we have not seen: the
    body is not empty; its type is not text, JSON or XML; it starts like a video container, an ISO
    BMFF box whose type is ``ftyp`` (MP4, MOV) or the EBML magic (WebM).
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not head:
        why = "an empty body"
    elif (
        media.startswith("text/")
        or media in _NOT_VIDEO_TYPES
        or media.endswith(_NOT_VIDEO_SUFFIXES)
    ):
        why = f"a body of type {media}"
    elif head[4:8] != b"ftyp" and not head.startswith(EBML_MAGIC):
        why = "a body that starts like no video container (no ftyp box, no WebM header)"
    else:
        return
    shown = netguard.printable(content_type, 80) if content_type is not None else "none"
    raise errors.NotAVideo(
        f"{errors.NotAVideo.PREFIX} with {why}, not a video: Content-Type {shown}, "
        f"first bytes {head[:VIDEO_HEAD_BYTES]!r}"
    )
