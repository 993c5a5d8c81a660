"""The provider APIs the daemon speaks, each one module behind :class:`provider.Provider`.

- ``reseller`` (the default): the reseller of the seed page, ``GET {base}/v1/result/{id}``.
- ``ark``: ByteDance's own API, BytePlus ModelArk and Volcengine Ark.

Each is a pure dialect (URL and parser) for the shared HTTP client in ``provider.py``;
:func:`from_settings` picks one. Nothing above this package learns which one it talks to, beyond the
name that rows are stamped with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from seedance_archiver import netguard, provider
from seedance_archiver.providers import ark, reseller

if TYPE_CHECKING:  # types only: httpx stays provider.py's import
    import httpx

    from seedance_archiver import config

Provider = provider.Provider

DIALECTS: dict[str, provider.Dialect] = {reseller.NAME: reseller.DIALECT, ark.NAME: ark.DIALECT}
# Providers that can POST a task's state to us (SEEDANCE_CALLBACKS): the task id a body is about.
CALLBACKS: dict[str, Callable[[bytes], str | None]] = {ark.NAME: ark.callback_task_id}


def from_settings(
    settings: config.Settings, api_key: str, transport: httpx.AsyncBaseTransport | None = None
) -> provider.HttpProvider:
    """The client for the provider SEEDANCE_PROVIDER names, as the settings describe it.

    ``transport`` replaces the API's (benchmarks compare transports)."""
    return provider.HttpProvider(
        settings.api_base_url,
        api_key,
        timeout_seconds=settings.request_timeout_seconds,
        url_rules=netguard.UrlRules(
            schemes=settings.allowed_video_url_schemes,
            allow_private_hosts=settings.allow_private_video_hosts,
        ),
        max_video_bytes=settings.max_video_bytes,
        transport=transport,
        dialect=DIALECTS[settings.provider],
    )
