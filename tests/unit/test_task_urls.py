"""http.task_url: the URL a task is polled at, as aiohttp puts it on the wire.

Polls went out as ``httpx.URL`` objects until they were sent without httpx (wire.Api); these check
that every id still reaches the provider on the same request line, and as one path segment.
"""

from __future__ import annotations

import random
import urllib.parse

import httpx
import pytest
import yarl
from seedance_archiver import policy
from seedance_archiver.providers import ark, reseller
from seedance_archiver.providers import http as providers_http

ALPHABET = "abcXYZ019-_.~/?#%+ &=:@!$'()*,;[]\\\"<>^`{|}\t\n\x00é样🎬"


def on_the_wire(url: str | httpx.URL) -> tuple[str, str | None, int | None, str]:
    """What aiohttp sends for ``url`` (it parses a string with yarl): scheme, host, port and the
    request line's target."""
    parsed = yarl.URL(str(url))
    return parsed.scheme, parsed.host, parsed.port, parsed.raw_path_qs


@pytest.mark.parametrize("dialect", [reseller.DIALECT, ark.DIALECT], ids=["reseller", "ark"])
@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:8000",
        "https://api.example.test/prefix/v2",
        "http://[::1]:9",
        "HTTP://Ex.test",
    ],
)
def test_every_id_goes_out_as_it_did_through_httpx(
    base: str, dialect: providers_http.Dialect
) -> None:
    draw = random.Random(14)
    ids = ["video_0123abc", "", "%", "%2F", "a/../b", *dialect.key_check_task_id.split()]
    ids += ["".join(draw.choices(ALPHABET, k=draw.randint(1, 40))) for _ in range(500)]
    for task_id in ids:
        url = providers_http.task_url(base, dialect, task_id)
        before = httpx.URL(base + dialect.task_path(urllib.parse.quote(task_id, safe="")))
        assert on_the_wire(url) == on_the_wire(before), task_id
        if task_id:  # one segment, which decodes back to the id whole
            last = yarl.URL(url).raw_path.rsplit("/", 1)[1]
            assert urllib.parse.unquote(last) == task_id, task_id


@pytest.mark.parametrize("task_id", [".", ".."])
def test_a_dot_segment_id_is_never_polled(task_id: str) -> None:
    """httpx resolved "." and ".." away, aiohttp keeps a trailing slash: no matter, since no id
    that is one is ever sent (every id must start with a letter or digit, whatever the provider:
    policy.before_work asks this first)."""
    assert policy.task_id_problem(task_id) is not None
