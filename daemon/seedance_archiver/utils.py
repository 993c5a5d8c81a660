"""Small helpers shared by every layer: the one clock, URL redaction, and Retry-After."""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import re
import time
import urllib.parse
from typing import Protocol

# Any scheme (RFC 3986: a letter, then letters, digits, "+", "-", "."): postgresql://, s3://, redis://...
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC. All code reads time through here (or an injected clock)."""
    return dt.datetime.now(dt.UTC)


class Clock(Protocol):
    """The time as a service reads it: called, the wall time (UTC, for rows and deadlines);
    :meth:`monotonic`, seconds that never jump (for waits and durations). One injected object
    gives both, so a test that moves it moves every wait too."""

    def __call__(self) -> dt.datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real :class:`Clock`: :func:`utcnow` and :func:`time.monotonic`."""

    def __call__(self) -> dt.datetime:
        return utcnow()

    def monotonic(self) -> float:
        return time.monotonic()


CLOCK = SystemClock()


REDACTED = "<redacted>"

# Signatures that CDNs and signing schemes put in a link's path rather than its query string. Each
# row: what it is, where it is documented, and the rule below that catches it.
#
# | shape                                            | source                                  | rule |
# |--------------------------------------------------|-----------------------------------------|------|
# | /hdnts=exp=..~acl=..~hmac=HEX/ (also hdnea, hdntl)| Akamai Token Auth 2.0 (EdgeAuth-Token)  | KEYED |
# | /bcdn_token=..&expires=..&token_path=../          | bunny.net token authentication, path    | KEYED |
# | /token=VALUE/, /sig=, /signature=, /auth_key=     | generic path tokens (Wowza, nginx, ...) | KEYED |
# | /X-Amz-Signature=HEX/, /Policy=, /Key-Pair-Id=    | AWS SigV4 / CloudFront fields in a path | KEYED |
# | /token/VALUE/, /sig/VALUE/, /signature/VALUE/     | key segment then value segment          | AFTER_KEY |
# | /eyJ...header.payload.signature/                  | a JWT (RFC 7519) as a path segment      | JWT   |
# | /{unix or YYYYMMDDHHMM time}/{32 hex md5}/path    | URL auth type B: Volcengine, Alibaba    | CDN_B |
# |                                                  | Cloud and Tencent Cloud CDN             |       |
# | /{32 hex md5}/{8 hex unix time}/path              | URL auth type C: the same CDNs          | CDN_C |
#
# Volcengine's CDN is where ByteDance's own API (providers/ark.py) serves its videos from. Query
# string forms (type A's auth_key=, type D's sign=, CloudFront's Signature=) go with the query.
_SIGNATURE_KEYS = frozenset(
    {
        "hdnts",
        "hdnea",
        "hdntl",
        "__hdnea__",
        "hmac",
        "token",
        "bcdn_token",
        "auth_key",
        "sig",
        "sign",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "policy",
        "key-pair-id",
        "expires",
        "wowzatokenhash",
    }
)
# KEYED: a segment holding key=value pairs (split on ~ & ; ,) one of whose keys is a signature key.
_KEYED = re.compile(r"(?:^|[~&;,])([A-Za-z0-9_.-]+)=")
# AFTER_KEY: a value of 16 or more token characters right after a segment that names a signature key.
_AFTER_KEY = re.compile(r"[A-Za-z0-9_~+=.-]{16,}")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_MD5 = re.compile(r"[0-9A-Fa-f]{32}")
_CDN_B_TIME = re.compile(r"\d{10}|\d{12}|\d{14}")  # Unix seconds, YYYYMMDDHHMM[SS]
_CDN_C_TIME = re.compile(r"[0-9A-Fa-f]{8}")  # Unix seconds in hex


def _secret_segment(segments: list[str], i: int) -> bool:
    """Whether path segment ``i`` is a signature (see the table above)."""
    segment = urllib.parse.unquote(segments[i])
    if "=" in segment and any(key.lower() in _SIGNATURE_KEYS for key in _KEYED.findall(segment)):
        return True
    if _JWT.fullmatch(segment):
        return True
    before = urllib.parse.unquote(segments[i - 1]).lower() if i > 0 else ""
    if before in _SIGNATURE_KEYS and _AFTER_KEY.fullmatch(segment):
        return True
    if _MD5.fullmatch(segment):
        after = segments[i + 1] if i + 1 < len(segments) else ""
        return bool(_CDN_B_TIME.fullmatch(before) or _CDN_C_TIME.fullmatch(after))
    return False


def _redact_path(path: str) -> str:
    if "/" not in path:
        return path
    segments = path.split("/")
    return "/".join(
        REDACTED if _secret_segment(segments, i) else segment for i, segment in enumerate(segments)
    )


def redact_url(url: str) -> str:
    """The URL without its query string, fragment, credentials or a signature in its path (the
    shapes of the table above): signed links must never reach a log."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    # Everything up to the last "@" is userinfo (user:password); the rest is host[:port], kept as written.
    host = parts.netloc.rpartition("@")[2]
    query = f"?{REDACTED}" if parts.query else ""
    path = _redact_path(parts.path)
    # Put together by hand: urlunsplit drops an empty authority's "//" for a scheme it does not
    # know: an absolute SQLite path (sqlite:////var/x.db) read sqlite://var/x.db, "var" a host.
    authority = f"//{host}" if parts.netloc or url.partition(":")[2].startswith("//") else ""
    scheme = f"{parts.scheme}:" if parts.scheme else ""
    return f"{scheme}{authority}{path}{query}"


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (see :func:`redact_url`)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


# The longest wait a Retry-After header is taken at its word for (the provider's, a webhook receiver's).
RETRY_AFTER_MAX_SECONDS = 3600.0


def parse_retry_after(value: str | None, now: dt.datetime) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_SECONDS)
