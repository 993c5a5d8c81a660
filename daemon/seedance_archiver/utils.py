"""Small helpers shared by every layer: the one clock, and URL redaction."""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse

# Any scheme (RFC 3986: a letter, then letters, digits, "+", "-", "."): postgresql://, s3://, redis://...
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC. All code reads time through here (or an injected clock)."""
    return dt.datetime.now(dt.UTC)


def redact_url(url: str) -> str:
    """The URL without its query string, fragment or credentials: signed links must never reach a log."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    # Everything up to the last "@" is userinfo (user:password); the rest is host[:port], kept as written.
    host = parts.netloc.rpartition("@")[2]
    query = "?<redacted>" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")) + query


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (see :func:`redact_url`)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)
