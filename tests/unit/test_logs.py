"""Logs never carry a signed link's query string or credentials in a URL."""

from __future__ import annotations

from daemon import logs, utils


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
