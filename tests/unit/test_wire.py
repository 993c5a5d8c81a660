"""wire._read_response: a poll's answer built in the state httpx's own read leaves it in."""

from __future__ import annotations

import httpx
import pytest
from seedance_archiver import wire

HEADERS = [(b"Content-Type", b"application/json; charset=utf-8"), (b"X-Request-Id", b"r-1")]
BODIES = [b"", b'{"status": "queued"}', '{"prompt": "样"}'.encode(), b"x" * 70_000]


def test_the_shortcut_holds_for_the_httpx_we_pin() -> None:
    # If an httpx upgrade changes what these attributes mean, polls fall back to httpx's read
    # (correct, slower): this test is the one that says so.
    assert wire._READ_SHORTCUT


@pytest.mark.parametrize("body", BODIES, ids=["empty", "json", "utf-8", "large"])
async def test_it_reads_as_httpx_reads_a_given_content(body: bytes) -> None:
    request = httpx.Request("GET", "http://127.0.0.1:9/v1/tasks/t")
    ours = wire._read_response(200, HEADERS, body, request)
    theirs = httpx.Response(200, headers=HEADERS, content=body, request=request)
    assert await ours.aread() == await theirs.aread() == body
    assert ours.text == theirs.text
    assert [piece async for piece in ours.aiter_bytes(1000)] == [
        piece async for piece in theirs.aiter_bytes(1000)
    ]
    assert (ours.is_stream_consumed, ours.is_closed) == (True, True)
    with pytest.raises(httpx.StreamConsumed):
        _ = [piece async for piece in ours.aiter_raw()]
    await ours.aclose()  # closing again is harmless, as for httpx's own
    assert ours.request is request
    assert ours.headers["x-request-id"] == "r-1"
    assert ours.http_version == "HTTP/1.1"
