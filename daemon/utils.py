"""Small helpers shared by every layer: the one clock, and URL redaction."""

from __future__ import annotations

import datetime as dt
import urllib.parse


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC. All code reads time through here (or an injected clock)."""
    return dt.datetime.now(dt.UTC)


def redact_url(url: str) -> str:
    """The URL without its query string, fragment or credentials: signed links must never reach a log."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    query = "?<redacted>" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")) + query
