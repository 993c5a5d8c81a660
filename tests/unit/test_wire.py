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


def _timed(**limits: float | None) -> httpx.Request:
    return httpx.Request(
        "GET",
        "http://127.0.0.1:9/v1/tasks/t",
        extensions={"timeout": httpx.Timeout(**limits).as_dict()},
    )


def test_limits_that_cannot_fire_before_the_total_are_left_out() -> None:
    # The provider's polls: every operation 30 s, the exchange as a whole 30 s.
    same = wire.timeout_of(_timed(timeout=30.0), total=30.0)
    assert (same.total, same.sock_read, same.sock_connect, same.connect) == (30.0, None, None, None)
    # A shorter limit still ends a stalled read or connect before the total does.
    shorter = wire.timeout_of(_timed(timeout=30.0, read=5.0, connect=2.0), total=30.0)
    assert (shorter.sock_read, shorter.sock_connect, shorter.connect) == (5.0, 2.0, None)


def test_without_a_total_every_limit_is_kept() -> None:
    # The downloads': no bound on the whole (a video takes what it takes), each read bounded.
    kept = wire.timeout_of(_timed(timeout=30.0, read=60.0))
    assert (kept.total, kept.sock_read, kept.sock_connect, kept.connect) == (None, 60.0, 30.0, 30.0)
