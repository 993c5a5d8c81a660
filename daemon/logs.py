"""structlog set-up: JSON lines when not on a TTY, readable console output on one.

A last processor strips query strings from anything that looks like a URL, so a signed video link
never reaches a log line even if someone logs it by mistake.
"""

from __future__ import annotations

import collections.abc
import logging
import re
import sys
from typing import Any

import structlog

from daemon import utils

_URL = re.compile(r"https?://[^\s\"'<>]+")


def _redact(value: Any) -> Any:
    if isinstance(value, str) and "://" in value:
        return _URL.sub(lambda m: utils.redact_url(m.group(0)), value)
    return value


def redact_urls(
    _logger: Any, _name: str, event: collections.abc.MutableMapping[str, Any]
) -> collections.abc.MutableMapping[str, Any]:
    return {key: _redact(value) for key, value in event.items()}


def configure(log_format: str | None = None, level: int = logging.INFO) -> None:
    """Configure structlog (and stdlib logging, for libraries) once, at start."""
    if log_format is None:
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    # APScheduler reports every skipped run at WARNING; our own tick logs what matters.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)
