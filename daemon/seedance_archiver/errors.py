"""The exceptions of seedance-archiver.

Library exceptions (httpx, botocore, SQLAlchemy) are translated into these at the edge that meets them,
with ``raise ... from exc``; nothing above that edge catches a library exception.
"""

from __future__ import annotations


class ArchiverError(Exception):
    """seedance-archiver failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(ArchiverError):
    """A setting is missing or invalid."""


class MissingDependencyError(ConfigError):
    """A setting needs a library that this install lacks."""


# --- provider -----------------------------------------------------------------------------------


class ProviderError(ArchiverError):
    """The provider's answer could not be used."""

    def __init__(self, message: str | None = None, *, status_code: int | None = None) -> None:
        super().__init__(message)
        #: The HTTP status of the provider's answer, or None when no answer came.
        self.status_code = status_code


class ProviderUnavailable(ProviderError):
    """The provider did not answer usefully (5xx, timeout, connection error); try again later."""


class RateLimited(ProviderError):
    """The provider asked us to slow down (HTTP 429)."""

    def __init__(self, message: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status_code=429)
        self.retry_after = retry_after


class AuthRejected(ProviderError):
    """The provider rejected the API key (HTTP 401/403): polling is paused until it is fixed."""


class TaskNotFound(ProviderError):
    """The provider does not know this task id (HTTP 404)."""


class MalformedAnswer(ProviderError):
    """The provider's answer was not the JSON its contract describes."""


# --- video download ----------------------------------------------------------------------------


class DownloadError(ArchiverError):
    """The video could not be downloaded; try again."""


class LinkExpired(DownloadError):
    """The video link was refused (403/404): poll the task again for a fresh video_url."""


class NotAVideo(DownloadError):
    """The video host answered 200, but not with a video (empty, an error page, no container)."""

    PREFIX = "the video host answered 200"


class RefusedBySetting(DownloadError):
    """Our own settings refuse this video: it waits, downloading, until they change."""


class UnsafeVideoUrl(RefusedBySetting):
    """The video_url is not allowed by SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES / _ALLOW_PRIVATE_VIDEO_HOSTS."""


class VideoTooLarge(RefusedBySetting):
    """The video is larger than SEEDANCE_MAX_VIDEO_BYTES."""

    def __init__(self, message: str | None = None, *, length: int | None = None) -> None:
        super().__init__(message)
        #: The size the video host announced (Content-Length), when it did.
        self.length = length


# --- storage and database ---------------------------------------------------------------------


class ArchiveError(ArchiverError):
    """The archive storage failed; the object was not committed."""


class StoreError(ArchiverError):
    """The database failed."""


class PermissionMissing(StoreError):
    """The database role lacks a grant the daemon's writes need."""


class AlreadyRunning(StoreError):
    """Another seedance-archiver already runs on this SQLite database."""
