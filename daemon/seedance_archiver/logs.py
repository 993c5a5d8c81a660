"""structlog set-up: JSON lines when not on a TTY, readable console output on one.

A last processor redacts every URL it finds, of any scheme and at any depth (nested dicts, lists,
tuples, exception objects and the rendered traceback): a signed link loses its query string and any
signature in its path (``utils.redact_url``'s table of shapes), and a DSN its password, even if
someone logs it by mistake. Library log lines through stdlib logging get the
same treatment.
"""

from __future__ import annotations

import collections.abc
import logging
import sys
from typing import Any, TextIO

import structlog

from seedance_archiver import utils

# Values rendered as they are; anything else is rendered through its repr, which may hold a URL.
_PLAIN = (int, float, bool, type(None))
_MAX_DEPTH = 20


redact_text = utils.redact_text


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, _PLAIN):
        return value
    if depth >= _MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, collections.abc.Mapping):
        return {_redact(k, depth + 1): _redact(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_redact(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    text = repr(value)
    return redact_text(text) if "://" in text else value


def redact_urls(
    _logger: Any, _name: str, event: collections.abc.MutableMapping[str, Any]
) -> collections.abc.MutableMapping[str, Any]:
    """structlog processor: every value of the event, redacted (see the module docstring)."""
    return {key: _redact(value) for key, value in event.items()}


class _RedactingFormatter(logging.Formatter):
    """A stdlib formatter whose whole output (message and traceback) is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def configure(
    log_format: str | None = None,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    *,
    cache: bool = True,
) -> str:
    """Configure structlog (and stdlib logging, for libraries) once, at start, to ``stream`` (stderr):
    the format it chose, ``json`` or ``console`` (on a terminal, unless ``log_format`` says).

    ``cache`` keeps each logger as first used (structlog's cache_logger_on_first_use): the
    daemon's choice, for speed; tests that configure and reset logging turn it off.
    """
    if stream is None:
        stream = sys.stderr
    if log_format is None:
        log_format = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_urls,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per line, its newline included (print() makes two, and with PYTHONUNBUFFERED,
        # as in our image, two system calls): processes sharing stderr (run --processes N) never
        # split each other's lines, which a pipe keeps whole up to PIPE_BUF.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=cache,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_RedactingFormatter("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # APScheduler reports every skipped run at WARNING; our own tick logs what matters.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return log_format
