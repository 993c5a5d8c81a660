"""An S3 reverse proxy on 127.0.0.1 that plays a plainer store: it refuses the calls a test names.

It sits between the archive and moto's server, forwards every request (method, path, query, headers,
body) and the answer back, and counts what it saw by S3 operation. A call the test chose to refuse is
answered by the proxy itself with an S3 XML error (``501 NotImplemented`` unless told otherwise) and
never reaches moto. ``hide_missing`` makes it answer like AWS to a caller without ``s3:ListBucket``: a
missing object is ``403 AccessDenied``, not ``404``. It runs aiohttp on its own event loop in a thread,
so blocking boto3 calls and the test's event loop are both served.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import urllib.parse
from collections.abc import Coroutine, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from tests.helpers import free_port

# What the proxy calls a request carrying a checksum header (x-amz-checksum-*, as
# CreateMultipartUpload and UploadPart with ChecksumAlgorithm send, and PutObjectTagging always).
CHECKSUM = "ChecksumCRC32"
# A request body may be a whole part (archive/s3.py: PART_BYTES) and a bit.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Hop-by-hop headers, and those aiohttp computes itself: never copied across.
_SKIP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
        "date",
        "server",
    }
)
_MESSAGES = {
    "NotImplemented": "A header or query you provided implies functionality that is not implemented",
    "AccessDenied": "Access Denied",
    "InvalidRequest": "The request is not supported by this store",
    "InvalidArgument": "Unsupported header",
    "MethodNotAllowed": "The specified method is not allowed against this resource",
}


def operation(method: str, raw_path: str) -> str:
    """The S3 operation of a path-style request (``/bucket[/key][?query]``)."""
    path, _, query = raw_path.partition("?")
    keys = set(urllib.parse.parse_qs(query, keep_blank_values=True))
    _bucket, _, key = path.lstrip("/").partition("/")
    if not key:
        if method == "HEAD":
            return "HeadBucket"
        if method == "GET":
            return "ListMultipartUploads" if "uploads" in keys else "ListObjects"
        return f"Bucket{method.title()}"
    if method == "HEAD":
        return "HeadObject"
    if method == "GET":
        return "GetObjectTagging" if "tagging" in keys else "GetObject"
    if method == "PUT":
        if "tagging" in keys:
            return "PutObjectTagging"
        return "UploadPart" if "partNumber" in keys else "PutObject"
    if method == "POST":
        if "uploads" in keys:
            return "CreateMultipartUpload"
        return "CompleteMultipartUpload" if "uploadId" in keys else "PostObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in keys else "DeleteObject"
    return f"Object{method.title()}"


def kinds(method: str, raw_path: str, headers: Mapping[str, str]) -> set[str]:
    """The operation of a request, and CHECKSUM too when it carries a checksum header."""
    found = {operation(method, raw_path)}
    for name, value in headers.items():
        lower = name.lower()
        if (
            lower.startswith("x-amz-checksum-")
            or lower == "x-amz-sdk-checksum-algorithm"
            or (lower == "x-amz-trailer" and value.lower().startswith("x-amz-checksum-"))
        ):
            found.add(CHECKSUM)
    return found


class S3Proxy:
    """Forwards ``127.0.0.1:{port}`` to ``upstream`` (an S3 endpoint URL), refusing chosen calls."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.seen: collections.Counter[str] = collections.Counter()  # requests by kind
        self.refused: collections.Counter[str] = collections.Counter()  # answered by the proxy
        self.hide_missing = False
        self._refusals: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s3proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- life -------------------------------------------------------------------------------------

    def start(self) -> S3Proxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> S3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- switches (from any thread) ---------------------------------------------------------------

    def refuse(self, kind: str, status: int = 501, code: str = "NotImplemented") -> None:
        """Answer every request of ``kind`` with this error: an operation name, CHECKSUM, or both
        joined by ``+`` (``"UploadPart+" + CHECKSUM``: only that operation's checksummed requests)."""
        with self._lock:
            self._refusals[kind] = (status, code)

    def allow(self, kind: str) -> None:
        """Forward requests of ``kind`` again."""
        with self._lock:
            self._refusals.pop(kind, None)

    def count(self, kind: str) -> int:
        """Requests of ``kind`` seen so far (forwarded or refused)."""
        with self._lock:
            return self.seen[kind]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.seen)

    # --- on the proxy's loop ----------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # aiohttp answers "Expect: 100-continue" itself before the body is read here.
        body = await request.read()
        found = kinds(request.method, request.raw_path, request.headers)
        with self._lock:
            self.seen.update(found)
            refusal = next(
                (
                    self._refusals[kind]
                    for kind in sorted(self._refusals)
                    if set(kind.split("+")) <= found
                ),
                None,
            )
            if refusal is not None:
                self.refused.update(found)
        if refusal is not None:
            return _error(request, *refusal)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _SKIP_HEADERS]
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.upstream + request.raw_path,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            data = await upstream.read()
            op = operation(request.method, request.raw_path)
            if self.hide_missing and upstream.status == 404 and op in ("HeadObject", "GetObject"):
                if op == "HeadObject" or b"<Code>NoSuchKey</Code>" in data:
                    with self._lock:
                        self.refused[op] += 1
                    return _error(request, 403, "AccessDenied")
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _SKIP_HEADERS:
                    response.headers.add(name, value)
            # A HEAD answer has no body but tells the object's length, which boto3 reads.
            length = upstream.headers.get("Content-Length")
            response.content_length = int(length) if length is not None else len(data)
            await response.prepare(request)
            if request.method != "HEAD":
                await response.write(data)
            await response.write_eof()
            return response


def _error(request: web.Request, status: int, code: str) -> web.Response:
    """An S3 error answer (no body for HEAD, as S3 does)."""
    if request.method == "HEAD":
        return web.Response(status=status)
    message = _MESSAGES.get(code, code)
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>s3proxy</RequestId></Error>"
    )
    return web.Response(status=status, body=body.encode(), content_type="application/xml")
