"""The provider seam: what the service needs from a provider API, and what each one exports.

The implementations are ``providers/<name>.py``, each exporting a :class:`Spec` that the registry
(``providers/__init__.py``) collects; this module imports none of them, and no HTTP library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from seedance_archiver import errors, models, netguard


@dataclasses.dataclass
class Video:
    """An open video download: its announced size and its bytes, streamed."""

    length: int | None
    chunks: AsyncIterator[bytes]


class Provider(Protocol):
    """What the service needs from the provider.

    ``name`` (``reseller``, ``ark``) is all the service learns of which API it talks to: it stamps
    the rows it polls with it and claims only rows unstamped or stamped so.
    """

    name: str

    async def fetch(self, task_id: str) -> models.Answer:
        """The provider's answer about ``task_id``; a ProviderError subclass when it gives none."""
        ...

    def open_video(self, task: models.Task) -> contextlib.AbstractAsyncContextManager[Video]:
        """Stream the finished video of ``task`` as the provider last answered about it (its
        ``video_url``); LinkExpired when the link is refused: poll again for a fresh one."""
        ...

    async def check_key(self) -> bool | None:
        """Whether the provider accepts the API key: True, False, or None when it cannot tell."""
        ...

    def task_id_problem(self, task_id: str) -> str | None:
        """Why ``task_id`` can never be one of this provider's ids (the row is ``rejected``, nobody
        is asked), or None. Only beyond the rule every id keeps (``policy.task_id_problem``)."""
        ...

    async def aclose(self) -> None: ...


# Any provider client's defaults, and so SEEDANCE_REQUEST_TIMEOUT_SECONDS's and
# SEEDANCE_MAX_VIDEO_BYTES's (config reads them here): one exchange with the API, one video.
TIMEOUT_SECONDS = 30.0
MAX_VIDEO_BYTES = 2 * 1024**3


@dataclasses.dataclass(frozen=True)
class Options:
    """How the settings shape any provider's client (SEEDANCE_REQUEST_TIMEOUT_SECONDS, ...)."""

    timeout_seconds: float = TIMEOUT_SECONDS
    url_rules: netguard.UrlRules = dataclasses.field(default_factory=netguard.UrlRules)
    max_video_bytes: int = MAX_VIDEO_BYTES
    # An httpx transport for the API in place of the client's own (benchmarks compare them); typed
    # loosely so that this module needs no HTTP library.
    transport: Any = None


@dataclasses.dataclass(frozen=True)
class Secret:
    """A secret setting a provider's module declares: ``SEEDANCE_<NAME>``, ``SEEDANCE_<NAME>_FILE``
    or the systemd credential ``credential`` (config reads it; the value is never shown)."""

    # The setting's name in lower case, without SEEDANCE_ (``callback_token``).
    name: str
    credential: str
    # Why a value cannot be the secret, without repeating it; None when it can.
    problem: Callable[[str], str | None]
    # Said when it is missing: what it is and where the operator finds it.
    what: str


@dataclasses.dataclass(frozen=True)
class Callbacks:
    """How a provider's callbacks reach us (``POST /callbacks/<name>[/<token>]``, SEEDANCE_CALLBACKS)
    and how one is told from anybody's POST. A callback only makes its task's row due sooner: the
    poll that follows is the truth."""

    secret: Secret
    # Whether a POST is the provider's: the secret, the path segment after /callbacks/<name>/ ("" if
    # none), the request's headers and body. Never raises.
    authentic: Callable[[str, str, Mapping[str, str], bytes], bool]
    # The task id a body is about; None when it is not one.
    task_id: Callable[[bytes], str | None]


# A secret path segment: unreserved characters only, and long enough not to guess.
PATH_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{32,256}")


def path_token_problem(value: str) -> str | None:
    """Why ``value`` cannot be a secret path segment (a callback URL's last part), or None."""
    if PATH_TOKEN_PATTERN.fullmatch(value):
        return None
    return (
        "expected 32 to 256 of the characters A-Z a-z 0-9 . _ ~ - (it is part of the callback "
        "URL's path; `openssl rand -hex 32` makes one)"
    )


def path_token_matches(secret: str, token: str, headers: Mapping[str, str], body: bytes) -> bool:
    """For a provider whose callbacks are unsigned: the URL's last segment is the secret, compared
    in constant time (their SHA-256 digests, so that the length is not told either)."""
    digest = hashlib.sha256
    return hmac.compare_digest(digest(token.encode()).digest(), digest(secret.encode()).digest())


# What a provider keeps a finished video for, unless its module says otherwise: a day.
VIDEO_LIFETIME = dt.timedelta(days=1)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One provider API, as its module (``providers/<name>.py``) exports it as ``PROVIDER``.

    The registry (``providers/__init__.py``) collects them; SEEDANCE_PROVIDER's choices, each
    one's default SEEDANCE_API_BASE_URL and which ones serve callbacks all come from here.
    """

    name: str
    default_base_url: str
    # The client: base URL, API key and options in, a whole Provider out.
    build: Callable[[str, str, Options], Provider]
    # How its callbacks are received; None for an API that sends none (SEEDANCE_CALLBACKS is
    # refused for it).
    callbacks: Callbacks | None = None
    # How long it keeps a finished video: a task is at risk in the last quarter of it (at most
    # the last hour; models.at_risk_within).
    video_lifetime: dt.timedelta = VIDEO_LIFETIME


# The first bytes of a video: enough for a container's signature and a readable log line.
VIDEO_HEAD_BYTES = 32
# Types an error page is served as (a host's "link expired" page, a JSON or XML error); a video is
# video/*, application/octet-stream, binary/octet-stream, or has no type at all.
_NOT_VIDEO_TYPES = ("application/json", "application/xml")
_NOT_VIDEO_SUFFIXES = ("+json", "+xml")
EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # WebM and Matroska


def check_video(content_type: str | None, head: bytes) -> None:
    """Raise NotAVideo unless a body of ``content_type`` starting with ``head`` can be a video.

    Three checks and no more, so that no real video is refused by an encoder we have not seen: the
    body is not empty; its type is not text, JSON or XML; it starts like a video container, an ISO
    BMFF box whose type is ``ftyp`` (MP4, MOV) or the EBML magic (WebM).
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not head:
        why = "an empty body"
    elif (
        media.startswith("text/")
        or media in _NOT_VIDEO_TYPES
        or media.endswith(_NOT_VIDEO_SUFFIXES)
    ):
        why = f"a body of type {media}"
    elif head[4:8] != b"ftyp" and not head.startswith(EBML_MAGIC):
        why = "a body that starts like no video container (no ftyp box, no WebM header)"
    else:
        return
    shown = netguard.printable(content_type, 80) if content_type is not None else "none"
    raise errors.NotAVideo(
        f"{errors.NotAVideo.PREFIX} with {why}, not a video: Content-Type {shown}, "
        f"first bytes {head[:VIDEO_HEAD_BYTES]!r}"
    )
