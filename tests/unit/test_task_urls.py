"""http.TaskUrls: each task's poll URL copied from the parsed base must be the URL httpx parses."""

from __future__ import annotations

import random
import urllib.parse

import httpx
import pytest
from seedance_archiver.providers import ark, reseller
from seedance_archiver.providers import http as providers_http

ALPHABET = "abcXYZ019-_.~/?#%+ &=:@!$'()*,;[]\\\"<>^`{|}\t\n\x00é样🎬"


def parsed(base: str, dialect: providers_http.Dialect, task_id: str) -> httpx.URL:
    return httpx.URL(base + dialect.task_path(urllib.parse.quote(task_id, safe="")))


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
def test_every_url_is_the_one_httpx_parses(base: str, dialect: providers_http.Dialect) -> None:
    urls = providers_http.TaskUrls(base, dialect)
    assert urls.shortcut
    draw = random.Random(14)
    ids = ["video_0123abc", "", "%", "%2F", ".", "..", "a/../b", *dialect.key_check_task_id.split()]
    ids += ["".join(draw.choices(ALPHABET, k=draw.randint(1, 40))) for _ in range(500)]
    for task_id in ids:
        made, expected = urls.of(task_id), parsed(base, dialect, task_id)
        parts = ("scheme", "host", "port", "path", "query", "fragment", "raw_path")
        assert str(made) == str(expected), task_id
        assert [getattr(made, p) for p in parts] == [getattr(expected, p) for p in parts], task_id


@pytest.mark.parametrize("base", ["http://127.0.0.1:8000/?q=1", "http://127.0.0.1:8000/#f"])
def test_a_base_with_a_query_or_fragment_is_parsed_whole_each_time(base: str) -> None:
    urls = providers_http.TaskUrls(base, reseller.DIALECT)
    assert not urls.shortcut
    assert str(urls.of("video_1")) == str(parsed(base, reseller.DIALECT, "video_1"))


class QueryDialect(reseller.Reseller):
    """A path with a query in it: httpx's parse splits it off, a copied path would not."""

    def task_path(self, task_id: str) -> str:
        return f"/v1/result?id={task_id}"


def test_where_the_copy_and_the_parse_differ_every_url_is_parsed() -> None:
    urls = providers_http.TaskUrls("http://127.0.0.1:8000", QueryDialect())
    assert not urls.shortcut
    made = urls.of("video_1")
    assert (made.path, made.query) == ("/v1/result", b"id=video_1")
