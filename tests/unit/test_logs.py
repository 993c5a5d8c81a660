"""Logs never carry a signed link's query string or credentials in a URL."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
import structlog
from seedance_archiver import logs, utils


class TestRedaction:
    """The last log processor strips secrets out of URLs."""

    def test_query_string_of_a_signed_link_is_removed(self) -> None:
        url = "https://cdn.example/v/abc.mp4?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAEXAMPLE"
        event = logs.redact_urls(None, "info", {"event": "x", "url": url})
        assert event["url"] == "https://cdn.example/v/abc.mp4?<redacted>"

    def test_urls_inside_messages_are_redacted_too(self) -> None:
        message = "failed to fetch http://user:pw@host:8080/x.mp4?sig=123 after 3 tries"
        event = logs.redact_urls(None, "info", {"event": "x", "error": message})
        assert "sig=123" not in event["error"] and "pw@" not in event["error"]
        assert "http://host:8080/x.mp4?<redacted>" in event["error"]

    def test_values_without_urls_are_untouched(self) -> None:
        event = logs.redact_urls(None, "info", {"event": "x", "bytes": 12, "note": "a://b"})
        assert event == {"event": "x", "bytes": 12, "note": "a://b"}

    def test_redact_url_without_query_keeps_the_path(self) -> None:
        assert utils.redact_url("https://h/p/q.mp4") == "https://h/p/q.mp4"


PASSWORD = "hunter2-not-a-real-password"
SIGNATURE = "fake-signature-0123456789abcdef"
DSN = f"postgresql://archiver:{PASSWORD}@db.internal:5432/videos"
SIGNED = f"https://cdn.example/v/abc.mp4?X-Amz-Signature={SIGNATURE}&X-Amz-Expires=3600"
# One URL of each scheme, each with a secret in its userinfo or its query string.
SECRET_URLS = [
    DSN,
    SIGNED,
    f"postgresql+psycopg://archiver:{PASSWORD}@[::1]:5432/videos",
    f"redis://:{PASSWORD}@cache.internal:6379/0",
    f"s3://bucket/key.mp4?X-Amz-Signature={SIGNATURE}",
    f"amqp://guest:{PASSWORD}@mq.internal/vhost",
    f"http://user:{PASSWORD}@host:8080/x.mp4?sig={SIGNATURE}",
]
SECRETS = (PASSWORD, SIGNATURE)


class LeakyError(Exception):
    """An exception whose message carries a DSN with a password and a signed link."""


@pytest.fixture
def rendered(request: pytest.FixtureRequest) -> Iterator[Callable[[str], io.StringIO]]:
    """Configure the real pipeline into a captured stream; undo it afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level

    def configure(log_format: str) -> io.StringIO:
        stream = io.StringIO()
        root.handlers = []  # basicConfig only binds a root logger that has no handler yet
        logs.configure(log_format, stream=stream)
        return stream

    yield configure
    structlog.reset_defaults()
    root.handlers, root.level = saved_handlers, saved_level


def assert_no_secret(output: str) -> None:
    assert output.strip(), "nothing was logged"
    for secret in SECRETS:
        assert secret not in output


class TestNoSecretAnywhere:
    """No password or signature of any URL reaches a rendered line, however deep it sits."""

    @pytest.mark.parametrize("log_format", ["json", "console"])
    @pytest.mark.parametrize("url", SECRET_URLS)
    def test_top_level_nested_and_as_exception_values(
        self, rendered: Callable[[str], io.StringIO], log_format: str, url: str
    ) -> None:
        stream = rendered(log_format)
        log = structlog.get_logger("test")
        log.warning(f"fetch {url} failed", url=url)
        log.warning(
            "nested",
            config={"db": {"urls": [url, (url, {"deeper": [url]})]}},
            pair=(1, url),
            error=LeakyError(f"could not reach {url}"),
            errors=[ValueError(url)],
        )
        output = stream.getvalue()
        assert_no_secret(output)
        assert utils.redact_url(url) in output  # redacted, not dropped: the line still says where

    @pytest.mark.parametrize("log_format", ["json", "console"])
    def test_exception_message_in_the_rendered_traceback(
        self, rendered: Callable[[str], io.StringIO], log_format: str
    ) -> None:
        stream = rendered(log_format)
        log = structlog.get_logger("test")
        try:
            raise LeakyError(f"connection to {DSN} failed while fetching {SIGNED}")
        except LeakyError:
            log.exception("download_crashed", task_id="video_abc123def456")
        output = stream.getvalue()
        assert_no_secret(output)
        assert "LeakyError" in output and "db.internal:5432/videos" in output
        if log_format == "json":
            line = json.loads(output.splitlines()[-1])
            assert "LeakyError" in line["exception"]

    def test_stdlib_library_lines_are_redacted(
        self, rendered: Callable[[str], io.StringIO]
    ) -> None:
        stream = rendered("json")
        library = logging.getLogger("some.library")
        try:
            raise LeakyError(f"lost {DSN}")
        except LeakyError:
            library.exception("gave up on %s", SIGNED)
        assert_no_secret(stream.getvalue())

    def test_userinfo_dropped_and_host_kept(self) -> None:
        assert utils.redact_url(DSN) == "postgresql://db.internal:5432/videos"
        assert (
            utils.redact_url(f"postgresql://u:{PASSWORD}@[::1]:5432/db")
            == "postgresql://[::1]:5432/db"
        )
