"""The provider APIs the daemon speaks, each one module behind :class:`provider.Provider`.

- ``reseller`` (the default): the reseller of the seed page, ``GET {base}/v1/result/{id}``.
- ``ark``: ByteDance's own API, BytePlus ModelArk and Volcengine Ark.
- ``replicate``: Seedance's models on Replicate, whose predictions keep their data an hour.

Each module exports a :class:`provider.Spec` as ``PROVIDER``, built on the shared parts here
(``http.py``: the client; ``fields.py``: the answer's readers). This registry is what config, the
command line and :func:`from_settings` read: adding a provider is its module and one line in
:data:`SPECS`. Nothing above this package learns which one it talks to, beyond the name that rows
are stamped with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from seedance_archiver import models, netguard, provider
from seedance_archiver.providers import ark, replicate, reseller

if TYPE_CHECKING:  # types only
    import httpx

# The first is the default (SEEDANCE_PROVIDER unset).
SPECS: tuple[provider.Spec, ...] = (reseller.PROVIDER, ark.PROVIDER, replicate.PROVIDER)
NAMES: tuple[str, ...] = tuple(spec.name for spec in SPECS)
DEFAULT = NAMES[0]
# Providers that can POST a task's state to us (SEEDANCE_CALLBACKS): how their callbacks are told
# from anybody's POST, and what task one is about.
CALLBACKS: dict[str, provider.Callbacks] = {
    spec.name: spec.callbacks for spec in SPECS if spec.callbacks is not None
}
# When a row is at risk, by the window of the provider it is stamped with.
AT_RISK = models.AtRisk(
    {
        spec.name: models.at_risk_within(spec.video_lifetime)
        for spec in SPECS
        if models.at_risk_within(spec.video_lifetime) != models.AT_RISK
    }
)


def get(name: str) -> provider.Spec:
    """The provider called ``name``; KeyError, naming the known ones, for any other."""
    for spec in SPECS:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown provider {name!r}; expected one of {', '.join(NAMES)}")


class Settings(Protocol):
    """The settings :func:`from_settings` reads (``config.Settings`` has them): named here, so that
    config, which reads this registry, is not imported back."""

    provider: str
    api_base_url: str
    request_timeout_seconds: float
    allowed_video_url_schemes: frozenset[str]
    allow_private_video_hosts: bool
    max_video_bytes: int


def from_settings(
    settings: Settings, api_key: str, transport: httpx.AsyncBaseTransport | None = None
) -> provider.Provider:
    """The client for the provider SEEDANCE_PROVIDER names, as the settings describe it.

    ``transport`` replaces the API's (benchmarks compare transports)."""
    options = provider.Options(
        timeout_seconds=settings.request_timeout_seconds,
        url_rules=netguard.UrlRules(
            schemes=settings.allowed_video_url_schemes,
            allow_private_hosts=settings.allow_private_video_hosts,
        ),
        max_video_bytes=settings.max_video_bytes,
        transport=transport,
    )
    return get(settings.provider).build(settings.api_base_url, api_key, options)
