"""Lenient readers of a provider's JSON answer, shared by every ``providers/<name>.py``.

Strict where a wrong reading would lose a video (:func:`answer_id`, :func:`status_text`,
:func:`link`: else MalformedAnswer), lenient elsewhere (:class:`Lenient`: a drifted side field is
ignored and noted, never a reason not to archive). The strings of an answer are made storable here
(:func:`storable`), so what reaches the database is text every database accepts.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any

from seedance_archiver import errors, netguard

# Caps on the provider's free-text fields: a name or a reason, never a 200 KB blob in every row.
MODEL_MAX_CHARS = 200
ERROR_MAX_CHARS = 2000
# Signed links run long, but a longer one is garbage; a cut link would be useless, so it is refused.
VIDEO_URL_MAX_CHARS = 8192


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# NUL (PostgreSQL's text refuses it) and lone surrogates (no UTF-8 encoding has them, so psycopg and
# SQLite refuse them; json.loads makes one of "\ud800").
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def truncation_marker(total_chars: int) -> str:
    """What :func:`storable` appends to a text it cut, saying how long the text was."""
    return f"…[truncated, {total_chars} chars in all]"


def storable(text: str, limit: int) -> str:
    """``text`` as any database stores it: NUL and lone surrogates become U+FFFD, and beyond ``limit``
    characters it is cut and ends with :func:`truncation_marker`.

    Pure, and cheap for text that needs nothing; at most ``limit + len(truncation_marker(len(text)))``
    characters come out, and they always encode to UTF-8.
    """
    if limit < 0:
        raise ValueError("limit must not be negative")
    if len(text) > limit:
        text = text[:limit] + truncation_marker(len(text))
    return _UNSTORABLE.sub("\ufffd", text)


def json_object(body: bytes) -> dict[str, Any]:
    """The answer's body as a JSON object, or MalformedAnswer."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise errors.MalformedAnswer("malformed answer: the body is not JSON") from None
    if not isinstance(payload, dict):
        raise errors.MalformedAnswer(
            f"malformed answer: expected a JSON object, got {type(payload).__name__}"
        )
    return payload


def json_error(body: bytes) -> bool:
    """Whether ``body`` is a JSON object with an ``error`` member: how both APIs answer a 404.

    A gateway's 404 (nginx, a load balancer, a CDN) is an HTML page or empty; API gateways that
    answer JSON say ``message``. Only the provider's own error counts as its word on a task.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(payload, dict) and payload.get("error") not in (None, "", {})


def callback_id(body: bytes) -> str | None:
    """The ``id`` of a callback's body (a JSON object shaped like the provider's answer), or None
    when the body is not one: only the id is read, the poll it hastens is the truth."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    task_id = payload.get("id") if isinstance(payload, dict) else None
    return task_id if isinstance(task_id, str) and task_id else None


def answer_id(payload: dict[str, Any], task_id: str) -> str:
    """The answer's ``id``, which must be the asked-for one, or MalformedAnswer."""
    value = payload.get("id")
    if not isinstance(value, str):
        raise errors.MalformedAnswer("malformed answer: field 'id' is missing or not a string")
    if value != task_id:
        raise errors.MalformedAnswer(
            f"malformed answer: it is about task {_short(value)}, not the one asked for"
        )
    return value


def status_text(payload: dict[str, Any]) -> str:
    """The answer's ``status`` as given (each dialect maps it), or MalformedAnswer."""
    raw = payload.get("status")
    if not isinstance(raw, str):
        raise errors.MalformedAnswer("malformed answer: field 'status' is missing or not a string")
    return raw


def unknown_status(raw: str) -> errors.MalformedAnswer:
    return errors.MalformedAnswer(f"malformed answer: unknown status {_short(raw)}")


def link(payload: dict[str, Any], key: str) -> str | None:
    """A link field, whole and usable, or MalformedAnswer."""
    url: str | None = field(payload, key, (str,), "a string")
    if not url:
        return url  # "" is no link, as null is (the policy treats both alike)
    if len(url) > VIDEO_URL_MAX_CHARS:
        raise errors.MalformedAnswer(
            f"malformed answer: {key} is {len(url)} characters long, "
            f"more than {VIDEO_URL_MAX_CHARS}"
        )
    try:
        netguard.parse_url(url)
    except ValueError as exc:
        raise errors.MalformedAnswer(
            f"malformed answer: {key} is not a valid URL ({exc})"
        ) from None
    return url


def field(payload: dict[str, Any], key: str, kinds: tuple[type, ...], what: str) -> Any:
    """A field of one of ``kinds`` (never a JSON boolean), None if absent or null; else malformed.

    For the fields a video depends on (its link); the rest are read by :class:`Lenient`.
    """
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise errors.MalformedAnswer(
            f"malformed answer: field {key!r} should be {what}, got {type(value).__name__}"
        )
    return value


# A time in milliseconds: from this on (2001-09-09 in ms, year 33658 in s) a number is read as ms.
MILLISECONDS_FROM = 1e12
LATEST_SECONDS = 1e11  # year 5138: a later time in seconds is no time at all


class Lenient:
    """Reads an answer's side fields where they make sense, and notes the ones it ignores.

    Only ``id``, ``status`` and, when completed, the video link must be right to archive a video;
    a provider whose other fields drift from their documented types (a number in a string, a time
    in milliseconds or as ISO text) still gets its video archived. What cannot be read is None and
    noted in :attr:`ignored` as (field, why), for a counted warning: never a reason not to archive.
    """

    def __init__(self) -> None:
        self.ignored: list[tuple[str, str]] = []

    def _ignore(self, name: str, why: str) -> None:
        self.ignored.append((name, why))

    def object(self, payload: dict[str, Any], key: str) -> dict[str, Any]:
        """An object field; {} if absent, null or not an object."""
        value = payload.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self._ignore(key, f"not an object ({type(value).__name__})")
            return {}
        return value

    def number(self, payload: dict[str, Any], key: str) -> float | None:
        """A finite number, also written as a string (``"5.04"``); None otherwise."""
        value = payload.get(key)
        if value is None:
            return None
        number = _as_number(value)
        if number is None:
            self._ignore(key, f"not a finite number ({_short(value)})")
        return number

    def time(self, payload: dict[str, Any], key: str) -> dt.datetime | None:
        """A time as Unix seconds, milliseconds (from 10^12 on) or ISO 8601 text, aware UTC."""
        value = payload.get(key)
        if value is None:
            return None
        when = _as_time(value)
        if when is None:
            self._ignore(key, f"not a time ({_short(value)})")
        return when

    def text(self, payload: dict[str, Any], key: str, limit: int) -> str | None:
        """A string made :func:`storable` within ``limit``; None otherwise."""
        value = payload.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self._ignore(key, f"not a string ({type(value).__name__})")
            return None
        return storable(value, limit)

    def reason(self, payload: dict[str, Any], key: str) -> str | None:
        """A failure's reason as one readable line: text as given; an error object as
        ``message (code)``; any other value as compact JSON. None when absent, null or empty."""
        value = payload.get(key)
        if value is None or value == {} or value == "":
            return None
        if isinstance(value, str):
            return storable(value, ERROR_MAX_CHARS)
        if isinstance(value, dict):
            code = value.get("code")
            message = value.get("message")
            message = message if isinstance(message, str) and message else None
            if code is not None and (isinstance(code, bool) or not isinstance(code, str | int)):
                code = json.dumps(code, ensure_ascii=False)
            if message is not None or code is not None:
                line = message or "no message"
                if code is not None:
                    line = f"{line} ({code})"
                return storable(line, ERROR_MAX_CHARS)
        try:
            shown = json.dumps(value, ensure_ascii=False)
        except (RecursionError, ValueError):
            shown = f"an error of type {type(value).__name__} nested too deep to show"
        return storable(shown, ERROR_MAX_CHARS)


def _as_number(value: object) -> float | None:
    """``value`` as a finite float: a JSON number (never a boolean) or a numeric string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _as_time(value: object) -> dt.datetime | None:
    """``value`` as an aware UTC time: Unix seconds or milliseconds (a number or a numeric
    string), or ISO 8601 text (without an offset: UTC); None when it is none of these."""
    seconds = _as_number(value)
    if seconds is None and isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
    if seconds is None:
        return None
    if seconds >= MILLISECONDS_FROM:
        seconds /= 1000
    if not 0 < seconds < LATEST_SECONDS:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC)
