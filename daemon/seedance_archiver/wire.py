"""The provider's HTTP on the wire: our own httpx transports, over aiohttp.

A poll is a small JSON answer, sent thousands of times a second at scale, so what each one costs on top
of the HTTP client itself is the daemon's capacity. httpx's default transport (httpcore) costs 20x the
CPU of a bare aiohttp client per poll. httpx-aiohttp's transport, the daemon's before this module, built an
``aiohttp.ClientTimeout`` per request and handed back each body as a stream that httpx then read
through three async generators and an exception-mapping context manager (bench/README.md).

:class:`ApiTransport`, the polls', reads the body whole inside aiohttp (at most ``max_body_bytes``).
The provider sends each poll with :meth:`ApiTransport.get` (the :class:`Api` interface: a URL and
headers in, a :class:`Reply` out), which builds no httpx object; the errors are httpx's
(:func:`as_httpx`). Any other ``httpx.AsyncBaseTransport`` (``httpx.MockTransport``, httpx-aiohttp's)
can stand in through :class:`HttpxApi`, and ``ApiTransport`` itself is one too, for any other
request. The video downloads use an aiohttp session directly (``providers/http.py``); their errors
are named as httpx names them (:func:`error_name`).
"""

from __future__ import annotations

import dataclasses
import ssl
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import aiohttp
import httpx

# httpx's timeout names as aiohttp's: connect is the socket's connect, read each socket read, pool
# the wait for a connection of the pool (and the connect, as aiohttp counts it).
_TIMEOUT_NAMES = (("connect", "sock_connect"), ("read", "sock_read"), ("pool", "connect"))


def _httpx_class(exc: aiohttp.ClientError | TimeoutError) -> type[httpx.TransportError]:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return httpx.ReadTimeout
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx.ReadError
    return httpx.NetworkError


def as_httpx(
    exc: aiohttp.ClientError | TimeoutError, request: httpx.Request | None
) -> httpx.TransportError:
    """aiohttp's error as the httpx error that means the same (raise it ``from exc``)."""
    message = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else "")
    return _httpx_class(exc)(message, request=request)


def error_name(exc: aiohttp.ClientError | TimeoutError) -> str:
    """The name of the httpx error that means the same as aiohttp's ``exc`` (``ReadError``, ...):
    what a download's error says, as it did when downloads went through httpx."""
    return _httpx_class(exc).__name__


def timeout_of(request: httpx.Request, total: float | None = None) -> aiohttp.ClientTimeout:
    """httpx's per-operation timeouts of ``request`` as aiohttp's, with ``total`` for the whole.

    An operation's limit no shorter than ``total`` can never end the exchange first, so it is left
    out: aiohttp re-arms the socket-read timer on every piece of data it receives, a timer set and
    cancelled per poll for nothing (the provider's polls give read = total = 30 s).
    """
    given = request.extensions.get("timeout", {})
    limits = {theirs: given.get(ours) for ours, theirs in _TIMEOUT_NAMES}
    if total is not None:
        limits = {
            name: None if limit is not None and limit >= total else limit
            for name, limit in limits.items()
        }
    return aiohttp.ClientTimeout(total=total, **limits)


def _request(
    session: aiohttp.ClientSession,
    request: httpx.Request,
    timeout: aiohttp.ClientTimeout,
) -> Any:
    """``request`` sent on ``session`` as it stands (no redirects followed: httpx's caller decides);
    awaited for the answer, or entered with ``async with`` to release it at the end."""
    return session.request(
        request.method,
        str(request.url),
        headers=request.headers.multi_items(),
        data=request.read() or None,  # a request given a stream (the provider's polls) is unread
        allow_redirects=False,
        timeout=timeout,
    )


_HTTP_11 = {"http_version": b"HTTP/1.1"}  # httpx.Response copies it
RawHeaders = Sequence[tuple[bytes, bytes]]


def _read_response(
    status: int, headers: Any, body: bytes, request: httpx.Request | None
) -> httpx.Response:
    """The response ``httpx.Response(status, headers=..., content=body)`` ends as, built directly.

    Given ``content``, httpx reads the body it was just handed through its decoders, chunkers and
    three generators: 20 us of CPU per poll inside the scale run, 8% of the daemon's (bench/scale.py,
    bench/README.md). For a body without ``Content-Encoding`` that read is a copy of ``body``, so this sets
    the state it leaves behind: the content held, the stream consumed and closed. Those attributes
    are httpx's own, not its API; ``_READ_SHORTCUT`` checks at import that they still mean this.
    """
    response = httpx.Response(
        status, headers=headers, stream=httpx.ByteStream(body), request=request, extensions=_HTTP_11
    )
    response._content = body
    response.is_stream_consumed = True
    response.is_closed = True
    return response


def _read_shortcut_holds() -> bool:
    """Whether :func:`_read_response` gives what httpx's own read does, in this httpx."""
    body = b'{"id": "t-1", "status": "succeeded"}'
    headers = [(b"Content-Type", b"application/json"), (b"Content-Length", b"36")]
    ours = _read_response(200, headers, body, None)
    theirs = httpx.Response(200, headers=headers, content=body)
    try:
        return (
            ours.read() == theirs.read() == body
            and ours.json() == theirs.json()
            and list(ours.iter_bytes()) == list(theirs.iter_bytes())
            and (ours.is_stream_consumed, ours.is_closed)
            == (theirs.is_stream_consumed, theirs.is_closed)
            and ours.num_bytes_downloaded == theirs.num_bytes_downloaded
            and ours.headers == theirs.headers
        )
    except (AttributeError, RuntimeError, httpx.StreamError):
        return False


_READ_SHORTCUT = _read_shortcut_holds()


class AnswerTooLarge(httpx.TransportError):
    """The answer's body is longer than the transport accepts: not a poll's answer."""


# A decoded answer no longer has the encoding or the length it was sent with.
_ENCODING_HEADERS = (b"content-encoding", b"content-length")
_ZLIB_WBITS = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}


def decode_bounded(body: bytes, encoding: str, limit: int, request: httpx.Request | None) -> bytes:
    """``body`` decoded as its ``Content-Encoding`` says (gzip, deflate; applied in order), never
    beyond ``limit`` bytes: AnswerTooLarge past it, httpx.DecodingError for a coding we did not ask
    for or a body that does not decode."""
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        wbits = _ZLIB_WBITS.get(coding)
        if wbits is None:
            raise httpx.DecodingError(
                f"the answer is encoded with {coding[:40]!r}, which we did not ask for",
                request=request,
            )
        decoder = zlib.decompressobj(wbits)
        try:
            decoded = decoder.decompress(body, limit + 1)
            if len(decoded) <= limit and not decoder.unconsumed_tail:
                decoded += decoder.flush()
        except zlib.error as exc:
            raise httpx.DecodingError(
                f"the answer's {coding} does not decode", request=request
            ) from exc
        if len(decoded) > limit or decoder.unconsumed_tail:
            raise AnswerTooLarge(
                f"the answer is longer than {limit} bytes once decoded ({coding})", request=request
            )
        body = decoded
    return body


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """A small answer read whole: what :meth:`Api.get` returns for each poll."""

    status: int
    headers: Mapping[str, str]  # case-insensitive, as received (less the encoding once decoded)
    body: bytes  # decoded, within the transport's cap


class Api(Protocol):
    """What the provider's polls are sent on: one GET in, one whole :class:`Reply` out, or one of
    httpx's errors (``httpx.TransportError``: no answer; ``httpx.DecodingError``, AnswerTooLarge:
    an answer refused)."""

    async def get(self, url: str, headers: Mapping[str, str]) -> Reply: ...

    async def aclose(self) -> None: ...


class HttpxApi:
    """Any httpx transport as an :class:`Api` (``httpx.MockTransport``, httpx-aiohttp's: the
    benchmarks' what-ifs): each GET as an ``httpx.Request``, each answer read whole."""

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout_seconds: float) -> None:
        self._transport = transport
        self._extensions = {"timeout": httpx.Timeout(timeout_seconds).as_dict()}

    async def get(self, url: str, headers: Mapping[str, str]) -> Reply:
        request = httpx.Request("GET", url, headers=headers, extensions=self._extensions)
        response = await self._transport.handle_async_request(request)
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        return Reply(response.status_code, response.headers, body)

    async def aclose(self) -> None:
        await self._transport.aclose()


class ApiTransport(httpx.AsyncBaseTransport):
    """One ``aiohttp.ClientSession`` for small whole answers: :meth:`get` (the polls', an
    :class:`Api`), and httpx's transport interface for any other request.

    The polls skip httpx's objects: an ``httpx.Request`` built, its headers listed again for
    aiohttp and an ``httpx.Response`` built around the body cost as much CPU per poll as the rest
    of the poll above aiohttp (bench/transport.py: 0.146 against 0.094 ms per poll, the floor's
    0.085). The errors are httpx's either way.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        max_body_bytes: int,
        total_seconds: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._max_body_bytes = max_body_bytes
        # Each exchange as a whole, on top of httpx's per-operation timeouts: a server that trickles
        # its answer byte by byte gets no longer than this. aiohttp's own timer does it for a tenth
        # of what an asyncio.timeout() around the call costs per poll.
        self._total_seconds = total_seconds
        self._ssl = ssl_context or httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None
        # The provider sends every poll with the same timeout: built once, not per request.
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}
        # A get's: the exchange as a whole (no per-operation limit could end it sooner).
        self._get_timeout = aiohttp.ClientTimeout(
            total=total_seconds, connect=None, sock_connect=None, sock_read=None
        )

    def _open(self) -> aiohttp.ClientSession:
        # On first use, inside the running loop, as aiohttp wants.
        connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._ssl)
        # httpx decodes Content-Encoding itself (Response.read), so aiohttp must not do it first.
        # No cookie jar: httpx keeps a client's cookies and sends them as headers, and the polls
        # authenticate with a key. aiohttp's own jar would send a Set-Cookie from one answer on
        # later requests no one asked it for, and looked for cookies to send on every poll.
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        return self._session

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        given = request.extensions.get("timeout", {})
        key = tuple(given.get(name) for name, _ in _TIMEOUT_NAMES)
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = self._timeouts[key] = timeout_of(request, self._total_seconds)
        return timeout

    async def get(self, url: str, headers: Mapping[str, str]) -> Reply:
        """GET ``url`` with ``headers`` (no redirect followed), within ``total_seconds``."""
        session = self._session or self._open()
        pending = session.request(
            "GET", url, headers=headers, allow_redirects=False, timeout=self._get_timeout
        )
        status, raw, parsed, body = await self._read(pending, None)
        encoding = parsed.get("Content-Encoding")
        if encoding is None:
            return Reply(status, parsed, body)
        body, raw = self._decoded(body, encoding, raw, None)
        return Reply(status, httpx.Headers(raw), body)

    async def _read(
        self, pending: Any, request: httpx.Request | None
    ) -> tuple[int, RawHeaders, Mapping[str, str], bytes]:
        """The answer to a request not yet sent (aiohttp's, sent here): its status, headers as
        received and as a mapping, and its whole body (at most the cap, else AnswerTooLarge)."""
        try:
            async with pending as answer:
                if (answer.content_length or 0) > self._max_body_bytes:
                    raise AnswerTooLarge(self._too_large())
                body = await answer.content.read(self._max_body_bytes + 1)
                while not answer.content.at_eof() and len(body) <= self._max_body_bytes:
                    body += await answer.content.read(self._max_body_bytes + 1 - len(body))
                if len(body) > self._max_body_bytes:
                    raise AnswerTooLarge(self._too_large())
                return answer.status, answer.raw_headers, answer.headers, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise as_httpx(exc, request) from exc

    def _decoded(
        self, body: bytes, encoding: str, raw: RawHeaders, request: httpx.Request | None
    ) -> tuple[bytes, RawHeaders]:
        """We ask for identity; a server that compresses anyway gets its answer decoded here,
        within the same cap, so a small gzip body cannot inflate to gigabytes in memory."""
        body = decode_bounded(body, encoding, self._max_body_bytes, request)
        return body, [(k, v) for k, v in raw if k.lower() not in _ENCODING_HEADERS]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        pending = _request(session, request, self._timeout(request))
        status, headers, parsed, body = await self._read(pending, request)
        encoding = parsed.get("Content-Encoding")
        if encoding is not None:
            body, headers = self._decoded(body, encoding, headers, request)
        if not _READ_SHORTCUT:
            return httpx.Response(
                status, headers=headers, content=body, request=request, extensions=_HTTP_11
            )
        return _read_response(status, headers, body, request)

    def _too_large(self) -> str:
        return f"the answer is longer than {self._max_body_bytes} bytes"

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
