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


HMAC = "0123456789abcdef0123456789abcdef"  # an MD5 / HMAC's hex digest: the secret in each link
B64 = "Zm9vYmFyYmF6cXV4cXV1eDEyMzQ1Njc4OTAtXw"  # a base64url signature


class TestSignaturesInThePath:
    """Signing tokens some CDNs put in a link's path (not its query) are redacted too."""

    @pytest.mark.parametrize(
        ("url", "redacted"),
        [
            (  # Akamai Token Auth 2.0 as a path segment (its acl holds a slash)
                f"https://a.akamaihd.net/hdnts=exp=1700000000~acl=/*~hmac={HMAC}/v/a.mp4",
                "https://a.akamaihd.net/<redacted>/<redacted>/v/a.mp4",
            ),
            (
                f"https://a.akamaihd.net/__hdnea__=st=1~exp=2~hmac={HMAC}/v/a.mp4",
                "https://a.akamaihd.net/<redacted>/v/a.mp4",
            ),
            (  # bunny.net token authentication, path form
                f"https://x.b-cdn.net/bcdn_token={B64}&expires=1700000000&token_path=%2F/v.mp4",
                "https://x.b-cdn.net/<redacted>/v.mp4",
            ),
            (f"https://cdn.example/token={B64}/v.mp4", "https://cdn.example/<redacted>/v.mp4"),
            (
                f"https://cdn.example/v/X-Amz-Signature={HMAC}/a.mp4",
                "https://cdn.example/v/<redacted>/a.mp4",
            ),
            (
                f"https://cdn.example/v/token%3D{B64}/a.mp4",  # percent-encoded "="
                "https://cdn.example/v/<redacted>/a.mp4",
            ),
            (  # a key segment, then its value
                f"https://cdn.example/sig/{B64}/v.mp4",
                "https://cdn.example/sig/<redacted>/v.mp4",
            ),
            (
                f"https://cdn.example/Signature/{HMAC}/expires/1700000000/v.mp4",
                "https://cdn.example/Signature/<redacted>/expires/1700000000/v.mp4",
            ),
            (  # a JWT as a segment
                f"https://cdn.example/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.{B64}/v.mp4",
                "https://cdn.example/<redacted>/v.mp4",
            ),
            (  # URL auth type B (Volcengine, Alibaba Cloud, Tencent Cloud CDN)
                f"https://v.cdn.example/1700000000/{HMAC}/tos/video.mp4",
                "https://v.cdn.example/1700000000/<redacted>/tos/video.mp4",
            ),
            (
                f"https://v.cdn.example/202612011200/{HMAC}/tos/video.mp4",
                "https://v.cdn.example/202612011200/<redacted>/tos/video.mp4",
            ),
            (  # URL auth type C
                f"https://v.cdn.example/{HMAC}/6553f100/tos/video.mp4",
                "https://v.cdn.example/<redacted>/6553f100/tos/video.mp4",
            ),
            (  # path and query both signed
                f"https://cdn.example/token={B64}/v.mp4?Expires=1&Signature={B64}",
                "https://cdn.example/<redacted>/v.mp4?<redacted>",
            ),
        ],
    )
    def test_known_shapes_are_redacted(self, url: str, redacted: str) -> None:
        assert utils.redact_url(url) == redacted
        text = logs.redact_text(f"download of {url} failed: HTTP 403")
        assert text == f"download of {redacted} failed: HTTP 403"
        assert HMAC not in text and B64 not in text

    @pytest.mark.parametrize(
        "url",
        [
            "https://api.example/v1/result/video_abc123def456",
            f"https://api.example/v1/result/video_{HMAC}",  # a long task id is not a signature
            f"https://api.example/v1/result/{HMAC}",  # nor a bare hex id without a time beside it
            "https://ark.example/api/v3/contents/generations/tasks/cgt-20250331175019-4k8zt",
            "s3://bucket/prefix/video_abc.mp4",
            "https://cdn.example/expires/1700000000/v.mp4",  # a time is not a secret
            "https://cdn.example/tokens/list",
            "file:///var/lib/seedance/archive/video_a.mp4",
            # an absolute SQLite path keeps its four slashes (it read sqlite://var/..., a host)
            "sqlite:////var/lib/seedance/tasks.db",
            "sqlite:///tasks.db",  # and a relative one
        ],
    )
    def test_ordinary_paths_are_kept(self, url: str) -> None:
        assert utils.redact_url(url) == url


PASSWORD = "hunter2-not-a-real-password"
SIGNATURE = "fake-signature-0123456789abcdef"
DSN = f"postgresql://archiver:{PASSWORD}@db.internal:5432/videos"
SIGNED = f"https://cdn.example/v/abc.mp4?X-Amz-Signature={SIGNATURE}&X-Amz-Expires=3600"
# One URL of each scheme, each with a secret in its userinfo, its query string or its path.
SECRET_URLS = [
    DSN,
    SIGNED,
    f"postgresql+psycopg://archiver:{PASSWORD}@[::1]:5432/videos",
    f"redis://:{PASSWORD}@cache.internal:6379/0",
    f"s3://bucket/key.mp4?X-Amz-Signature={SIGNATURE}",
    f"amqp://guest:{PASSWORD}@mq.internal/vhost",
    f"http://user:{PASSWORD}@host:8080/x.mp4?sig={SIGNATURE}",
    f"https://a.akamaihd.net/hdnts=exp=1700000000~acl=%2F*~hmac={SIGNATURE}/v/abc.mp4",
    f"https://cdn.example/token/{SIGNATURE}/v/abc.mp4",
]
SECRETS = (PASSWORD, SIGNATURE)


class LeakyError(Exception):
    """An exception whose message carries a DSN with a password and a signed link."""


@pytest.fixture
def rendered(request: pytest.FixtureRequest) -> Iterator[Callable[[str], io.StringIO]]:
    """Configure the real pipeline into a captured stream; undo it afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level

    def configure(log_format: str, stream: io.StringIO | None = None) -> io.StringIO:
        stream = io.StringIO() if stream is None else stream
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


class _Writes(io.StringIO):
    """A stream that records each write it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


class TestOneWritePerLine:
    """Each line reaches the stream in one write, its newline included: the processes of
    ``run --processes N`` share one stderr, and a line written in two (its text, then its newline)
    can have another process's line land between the two (tests/integration/test_log_lines.py)."""

    @pytest.mark.parametrize("log_format", ["json", "console"])
    def test_a_line_is_one_write_that_ends_it(
        self, rendered: Callable[..., io.StringIO], log_format: str
    ) -> None:
        stream = _Writes()
        rendered(log_format, stream)
        log = structlog.get_logger("test").bind(task_id="video_a")
        log.info("video_archived", bytes=12)
        log.warning("task_state_changed", from_state="pending", to_state="archived")
        assert len(stream.writes) == 2
        assert all(w.endswith("\n") and w.count("\n") == 1 for w in stream.writes)
        if log_format == "json":
            assert [json.loads(w)["event"] for w in stream.writes] == [
                "video_archived",
                "task_state_changed",
            ]
