"""Settings: every knob of the daemon, read from the environment and validated once, at start.

Names follow DESIGN.md: prefix ``SEEDANCE_``; S3 endpoint and credentials come from boto3's own chain
(``AWS_*``), so there is no setting of ours for them. A bad value stops start-up with one line that names
the variable and never repeats the value (it may be a secret).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import pathlib
import re
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import pydantic
import pydantic_settings
import sqlalchemy.engine

from seedance_archiver import archive, errors, models, policy, providers

# Named apart: in Settings, `provider` is the field SEEDANCE_PROVIDER sets.
from seedance_archiver import provider as provider_seam

ENV_PREFIX = "SEEDANCE_"
# SEEDANCE_PROVIDER names the API spoken, one of the registry's (providers/); each has its own
# default base URL.
if TYPE_CHECKING:
    ProviderName = str
else:
    ProviderName = Literal[providers.NAMES]
DEFAULT_API_BASE_URLS = {spec.name: spec.default_base_url for spec in providers.SPECS}
DEFAULT_API_BASE_URL = DEFAULT_API_BASE_URLS[providers.DEFAULT]
CALLBACK_PROVIDERS = tuple(providers.CALLBACKS)  # those that POST a task's state to us
# The secret settings the providers' callbacks declare (provider.Secret), by setting name.
CALLBACK_SECRETS: dict[str, provider_seam.Secret] = {
    rule.secret.name: rule.secret for rule in providers.CALLBACKS.values()
}
# Name of the systemd credential (LoadCredential=seedance-api-key:...) holding the API key.
API_KEY_CREDENTIAL = "seedance-api-key"
# Name of the systemd credential (LoadCredential=seedance-database-url:...) holding the database URL.
DATABASE_URL_CREDENTIAL = "seedance-database-url"
DEFAULT_DATABASE_URL = "sqlite:///seedance-archiver.db"
# Name of the systemd credential holding SEEDANCE_UI_TOKEN, and the token's shortest length.
UI_TOKEN_CREDENTIAL = "seedance-ui-token"
UI_TOKEN_MIN_CHARS = 16
# Name of the systemd credential (LoadCredential=seedance-webhook-secret:...) holding the secrets.
WEBHOOK_SECRET_CREDENTIAL = "seedance-webhook-secret"
# NoDecode: the value is "min-max" text, not JSON (pydantic-settings JSON-decodes complex types).
CadenceSetting = Annotated[
    models.Cadence, pydantic_settings.NoDecode, pydantic.BeforeValidator(models.Cadence.parse)
]

GenerationTimeSetting = Annotated[
    models.GenerationTime | None,
    pydantic_settings.NoDecode,
    pydantic.BeforeValidator(models.GenerationTime.parse),
]
# Overrides that turn the skip off: for runs whose cadences are scaled down while the simulator's
# tasks take seconds, not the seed's minutes (the demo, tests and benchmarks).
SKIP_OFF: dict[str, str] = {f"expected_seconds_{r}": "off" for r in models.SEED_GENERATION_TIMES}


def _split_schemes(value: object) -> object:
    if isinstance(value, str):
        return {part.strip().lower() for part in value.split(",") if part.strip()}
    return value


class DatabaseSettings(pydantic_settings.BaseSettings):
    """What the commands that only read or write rows need (``list``, ``status``, ``add``,
    ``retry``, ``webhooks``, ``url``): where the database is, and how to log. A bad setting that
    only the daemon uses never blocks them. Build it with :func:`load_database`."""

    model_config = pydantic_settings.SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", hide_input_in_errors=True
    )

    # Use resolve_database_url(): the URL may come from a file or a systemd credential instead.
    database_url: str = DEFAULT_DATABASE_URL
    database_url_file: pathlib.Path | None = None
    log_format: Literal["json", "console"] | None = None
    # The longest a database statement may take (server side), and the deadline after which the
    # daemon cuts a connection that does not answer at all (a hung server or proxy).
    database_statement_timeout_seconds: float = pydantic.Field(default=15.0, gt=0, le=3600)

    @pydantic.field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        return _check_database_url(value)

    def resolve_database_url(self) -> str:
        """The database URL: SEEDANCE_DATABASE_URL if set, else SEEDANCE_DATABASE_URL_FILE, else the
        systemd credential seedance-database-url, else the default SQLite file.

        A file keeps the password out of the environment (which /proc and ``systemctl show`` expose).
        Its content is checked like the variable; an error names the source, never the content.
        """
        if "database_url" in self.model_fields_set:
            return self.database_url
        if self.database_url_file is not None:
            return _read_database_url(self.database_url_file, f"{ENV_PREFIX}DATABASE_URL_FILE")
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (pathlib.Path(cred_dir) / DATABASE_URL_CREDENTIAL).exists():
            return _read_database_url(
                pathlib.Path(cred_dir) / DATABASE_URL_CREDENTIAL,
                f"credential {DATABASE_URL_CREDENTIAL}",
            )
        return self.database_url


if TYPE_CHECKING:
    _WithCallbackSecrets = DatabaseSettings
else:
    # Each provider's callback secret is a setting its module declares (provider.Secret): the
    # secret and a file holding it, as fields of their own, so that the environment, the check for
    # misspelt names and `config` see them like any other; read them with resolve_callback_secret().
    _WithCallbackSecrets = pydantic.create_model(
        "_WithCallbackSecrets",
        __base__=DatabaseSettings,
        **{
            field: (kind, None)
            for name in CALLBACK_SECRETS
            for field, kind in (
                (name, pydantic.SecretStr | None),
                (f"{name}_file", pathlib.Path | None),
            )
        },
    )


# The defaults of three settings below, declared once here: the service and the web server take
# them too when they are built without settings (tests, benchmarks).
LEASE_SECONDS = 120.0
MAX_DOWNLOAD_SECONDS = 3600.0
HTTP_MAX_CONNECTIONS = 100


class Settings(_WithCallbackSecrets):
    """Every setting of the daemon. Build it with :func:`load` to get readable errors."""

    api_key: pydantic.SecretStr | None = None
    api_key_file: pathlib.Path | None = None
    provider: ProviderName = providers.DEFAULT
    # Defaults to the provider's own (DEFAULT_API_BASE_URLS); see _default_base_url.
    api_base_url: str = DEFAULT_API_BASE_URL
    archive_url: str = "file://./archive"
    poll_draft: CadenceSetting = models.Cadence(10, 20)
    poll_standard: CadenceSetting = models.Cadence(30, 60)
    poll_flex: CadenceSetting = models.Cadence(60, 120)
    retention_seconds: int = pydantic.Field(default=86_400, gt=0)
    # How long the provider takes per resolution (the seed's numbers); no poll of a queued or
    # processing task before created + the shortest. "off" polls that resolution on the cadence.
    expected_seconds_480p: GenerationTimeSetting = models.SEED_GENERATION_TIMES["480p"]
    expected_seconds_720p: GenerationTimeSetting = models.SEED_GENERATION_TIMES["720p"]
    expected_seconds_1080p: GenerationTimeSetting = models.SEED_GENERATION_TIMES["1080p"]
    # Once a model has this many observed generation times, its skip is their learn_quantile-th
    # percentile instead of the seed's shortest time; 0 never learns.
    learn_min_samples: int = pydantic.Field(default=policy.LEARN_MIN_SAMPLES, ge=0, le=100_000)
    learn_quantile: float = pydantic.Field(default=policy.LEARN_QUANTILE, ge=0, le=50)
    # Tasks with a skip (known resolution) wait from the top of their cadence range after it.
    patient_polling: bool = True
    max_requests_per_second: float = pydantic.Field(default=20.0, gt=0)
    allowed_video_url_schemes: Annotated[
        frozenset[str], pydantic_settings.NoDecode, pydantic.BeforeValidator(_split_schemes)
    ] = frozenset({"https"})
    allow_private_video_hosts: bool = False
    # Send the API key over plain http:// to a host that is not loopback (a private network only).
    allow_insecure_api_url: bool = False
    max_video_bytes: int = pydantic.Field(default=provider_seam.MAX_VIDEO_BYTES, gt=0)
    http_host: str = "127.0.0.1"
    http_port: int = pydantic.Field(default=9710, ge=0, le=65535)
    request_timeout_seconds: float = pydantic.Field(default=provider_seam.TIMEOUT_SECONDS, gt=0)
    shutdown_grace_seconds: float = pydantic.Field(default=30.0, ge=0)
    # How long a claimed row stays ours without renewal. A dead replica's rows wait this long before
    # another replica takes them, so it should exceed the longest cadence floor (flex: 60 s).
    lease_seconds: float = pydantic.Field(default=LEASE_SECONDS, ge=1)
    # A task the provider keeps unfinished (queued, processing) this many days after its creation
    # ends expired: Ark keeps a task 7 days. The deadline alone never ends a task.
    give_up_after_days: float = pydantic.Field(default=policy.GIVE_UP_AFTER_DAYS, gt=0, le=3650)
    # Delete finished rows this many days after they finished; 0 keeps them forever.
    prune_after_days: float = pydantic.Field(default=0.0, ge=0)
    # A whole video download ends by then, and is retried; the task's deadline never cuts one.
    max_download_seconds: float = pydantic.Field(default=MAX_DOWNLOAD_SECONDS, gt=0)
    # Webhooks to the feeding application (off while no URL is set).
    webhook_url: str | None = None
    # One or more whsec_ secrets, separated by spaces or commas: every one signs (rotation).
    webhook_secret: pydantic.SecretStr | None = None
    webhook_secret_file: pathlib.Path | None = None
    allow_private_webhook_hosts: bool = False
    webhook_timeout_seconds: float = pydantic.Field(default=10.0, gt=0, le=300)
    webhook_concurrency: int = pydantic.Field(default=8, ge=1, le=256)

    # Serve POST /callbacks/{provider}[/{token}] on the HTTP port: a provider's callback makes its
    # row due sooner (never sooner than its mode's shortest interval after its last poll). Each
    # provider's secret (Ark: SEEDANCE_CALLBACK_TOKEN) is declared by its module: CALLBACK_SECRETS.
    callbacks: bool = False
    # The page under /ui/ may retry tasks and redeliver webhooks only with this token (use
    # resolve_ui_token()); without it the page is read-only.
    ui_token: pydantic.SecretStr | None = None
    ui_token_file: pathlib.Path | None = None
    # Connections the HTTP port holds at once (callbacks, /metrics, /readyz); beyond it, 503.
    http_max_connections: int = pydantic.Field(default=HTTP_MAX_CONNECTIONS, ge=1, le=1000)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _default_base_url(cls, data: Any) -> Any:
        """An unset (or empty) SEEDANCE_API_BASE_URL is the chosen provider's own."""
        if isinstance(data, dict) and not data.get("api_base_url"):
            chosen = str(data.get("provider") or providers.DEFAULT)
            default = DEFAULT_API_BASE_URLS.get(chosen, DEFAULT_API_BASE_URL)
            data = {**data, "api_base_url": default}
        return data

    @pydantic.model_validator(mode="after")
    def _check_callbacks(self) -> Settings:
        if self.callbacks and self.provider not in CALLBACK_PROVIDERS:
            raise ValueError(
                f"{ENV_PREFIX}CALLBACKS: {self.provider} sends no callbacks; those that do: "
                f"{', '.join(CALLBACK_PROVIDERS)} (or set {ENV_PREFIX}CALLBACKS=false)"
            )
        if self.callbacks and self.http_port == 0:
            raise ValueError(
                f"{ENV_PREFIX}CALLBACKS: callbacks are served on {ENV_PREFIX}HTTP_PORT, which is 0 (off)"
            )
        return self

    @pydantic.field_validator("api_base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http(s) URL such as " + DEFAULT_API_BASE_URL)
        return value.rstrip("/")

    @pydantic.field_validator("archive_url")
    @classmethod
    def _check_archive_url(cls, value: str) -> str:
        return archive.check_url(value)

    @pydantic.field_validator("allowed_video_url_schemes")
    @classmethod
    def _check_schemes(cls, value: frozenset[str]) -> frozenset[str]:
        if not value or not value <= {"http", "https"}:
            raise ValueError("expected a comma-separated list of http and/or https")
        return value

    @pydantic.field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: pydantic.SecretStr | None) -> pydantic.SecretStr | None:
        if value is None:
            return None
        text = value.get_secret_value().strip()
        if not text or any(ch.isspace() for ch in text):
            raise ValueError("must be one token without spaces")
        return pydantic.SecretStr(text)

    def cadences(self) -> dict[str, models.Cadence]:
        """The polling cadence of each mode."""
        return {"draft": self.poll_draft, "standard": self.poll_standard, "flex": self.poll_flex}

    def generation_times(self) -> dict[str, models.GenerationTime]:
        """The expected generation time of each resolution whose skip is on."""
        ranges = {
            "480p": self.expected_seconds_480p,
            "720p": self.expected_seconds_720p,
            "1080p": self.expected_seconds_1080p,
        }
        return {res: r for res, r in ranges.items() if r is not None}

    def check_api_transport(self) -> None:
        """Raise ConfigError if the key would travel in clear: http:// to a host that is not loopback.

        SEEDANCE_ALLOW_INSECURE_API_URL=true allows it, for a provider reached over a private network.
        """
        parts = urllib.parse.urlsplit(self.api_base_url)
        if parts.scheme == "https" or self.allow_insecure_api_url or _is_loopback(parts.hostname):
            return
        raise errors.ConfigError(
            f"invalid setting {ENV_PREFIX}API_BASE_URL: http:// would send the API key in clear to a "
            f"host that is not loopback; use https:// (or set {ENV_PREFIX}ALLOW_INSECURE_API_URL=true "
            "for a private network)"
        )

    def resolve_api_key(self) -> str:
        """The API key from SEEDANCE_API_KEY, SEEDANCE_API_KEY_FILE or the systemd credential.

        Refused (ConfigError) when the base URL would carry it in clear: see :meth:`check_api_transport`.
        """
        self.check_api_transport()
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            return _read_key_file(self.api_key_file, f"{ENV_PREFIX}API_KEY_FILE")
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (pathlib.Path(cred_dir) / API_KEY_CREDENTIAL).exists():
            return _read_key_file(
                pathlib.Path(cred_dir) / API_KEY_CREDENTIAL, f"credential {API_KEY_CREDENTIAL}"
            )
        raise errors.ConfigError(
            f"missing setting {ENV_PREFIX}API_KEY (or {ENV_PREFIX}API_KEY_FILE, "
            f"or the systemd credential {API_KEY_CREDENTIAL})"
        )

    def resolve_webhook_secrets(self) -> list[str]:
        """The webhook secrets from SEEDANCE_WEBHOOK_SECRET, its _FILE, or the systemd credential.

        Several secrets (space- or comma-separated) all sign each webhook, so a receiver can move
        to a new one before the old one is dropped.
        """
        if self.webhook_secret is not None:
            text = self.webhook_secret.get_secret_value()
        elif self.webhook_secret_file is not None:
            text = _read_secret_file(self.webhook_secret_file, f"{ENV_PREFIX}WEBHOOK_SECRET_FILE")
        elif (cred := _credential(WEBHOOK_SECRET_CREDENTIAL)) is not None:
            text = _read_secret_file(cred, f"credential {WEBHOOK_SECRET_CREDENTIAL}")
        else:
            raise errors.ConfigError(
                f"missing setting {ENV_PREFIX}WEBHOOK_SECRET (or {ENV_PREFIX}WEBHOOK_SECRET_FILE, "
                f"or the systemd credential {WEBHOOK_SECRET_CREDENTIAL}): "
                f"{ENV_PREFIX}WEBHOOK_URL is set"
            )
        secrets = [part for part in re.split(r"[\s,]+", text) if part]
        if not secrets:
            raise errors.ConfigError(f"invalid setting {ENV_PREFIX}WEBHOOK_SECRET: it is empty")
        return secrets

    def resolve_callback_secret(self) -> str:
        """The secret the chosen provider's callbacks are checked with (its module's
        :class:`provider.Secret`: Ark's SEEDANCE_CALLBACK_TOKEN, Replicate's signing secret), from
        its variable, its _FILE, or its systemd credential; checked by the provider's own rule.
        """
        rule = providers.CALLBACKS[self.provider]
        secret = rule.secret
        name = f"{ENV_PREFIX}{secret.name.upper()}"
        value: pydantic.SecretStr | None = getattr(self, secret.name)
        path: pathlib.Path | None = getattr(self, f"{secret.name}_file")
        if value is not None:
            text = value.get_secret_value().strip()
        elif path is not None:
            name = f"{name}_FILE"
            text = _read_secret_file(path, name)
        elif (cred := _credential(secret.credential)) is not None:
            name = f"credential {secret.credential}"
            text = _read_secret_file(cred, name)
        else:
            raise errors.ConfigError(
                f"missing setting {name} (or {name}_FILE, or the systemd credential "
                f"{secret.credential}): {ENV_PREFIX}CALLBACKS is true, and {secret.what}"
            )
        problem = secret.problem(text)
        if problem is not None:
            raise errors.ConfigError(f"invalid setting {name}: {problem}")
        return text

    def resolve_ui_token(self) -> str | None:
        """SEEDANCE_UI_TOKEN, its _FILE or the systemd credential, or None (the page is read-only).

        At least 16 characters, none of them a space or a control character: it is typed into a
        form and compared whole.
        """
        name = f"{ENV_PREFIX}UI_TOKEN"
        if self.ui_token is not None:
            text = self.ui_token.get_secret_value().strip()
        elif self.ui_token_file is not None:
            name = f"{name}_FILE"
            text = _read_secret_file(self.ui_token_file, name)
        elif (cred := _credential(UI_TOKEN_CREDENTIAL)) is not None:
            name = f"credential {UI_TOKEN_CREDENTIAL}"
            text = _read_secret_file(cred, name)
        else:
            return None
        if len(text) < UI_TOKEN_MIN_CHARS or not text.isprintable() or " " in text:
            raise errors.ConfigError(
                f"invalid setting {name}: expected at least {UI_TOKEN_MIN_CHARS} characters, "
                "no spaces (`openssl rand -hex 16` makes one)"
            )
        return text

    def at_risk(self) -> models.AtRisk:
        """When a row is at risk, by the window of the provider that serves it (the registry's)."""
        return providers.AT_RISK

    def public_summary(self) -> dict[str, Any]:
        """The settings worth logging at start, with every secret left out or masked."""
        return {
            "provider": self.provider,
            "api_base_url": self.api_base_url,
            "database_url": database_where(self.resolve_database_url()),
            "archive_url": archive_where(self.archive_url),
            "poll": {mode: str(c) for mode, c in self.cadences().items()},
            "expected_seconds": {res: str(r) for res, r in self.generation_times().items()},
            "max_requests_per_second": self.max_requests_per_second,
            "webhook_url": _without_credentials(self.webhook_url),
        }


def _credential(name: str) -> pathlib.Path | None:
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    path = pathlib.Path(cred_dir) / name if cred_dir else None
    return path if path is not None and path.exists() else None


def _read_secret_file(path: pathlib.Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise errors.ConfigError(
            f"invalid setting {name}: cannot read the file ({exc.strerror})"
        ) from None
    except UnicodeDecodeError:
        raise errors.ConfigError(f"invalid setting {name}: the file is not UTF-8 text") from None


def _without_credentials(url: str | None) -> str | None:
    """A URL fit for a log: no user, password, query or fragment (any may carry a token)."""
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _is_loopback(host: str | None) -> bool:
    """Whether ``host`` is localhost, 127.0.0.0/8 or ::1 (also as ::ffff:127.x.y.z)."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _check_database_url(value: str) -> str:
    try:
        url = sqlalchemy.engine.make_url(value)
    except sqlalchemy.exc.ArgumentError:
        raise ValueError(
            "expected a SQLAlchemy URL: sqlite:///file.db or postgresql://..."
        ) from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError("only sqlite:// and postgresql:// databases are supported")
    return value


def _read_database_url(path: pathlib.Path, name: str) -> str:
    text = _read_key_file(path, name)
    try:
        return _check_database_url(text)
    except ValueError as exc:
        raise errors.ConfigError(f"invalid setting {name}: {exc}") from None


def _read_key_file(path: pathlib.Path, name: str) -> str:
    text = _read_secret_file(path, name)
    if not text or any(ch.isspace() for ch in text):
        raise errors.ConfigError(f"invalid setting {name}: the file must hold one token")
    return text


def load(**overrides: Any) -> Settings:
    """Read the settings from the environment, raising ConfigError with one readable line."""
    return _load(Settings, overrides)


def load_database(**overrides: Any) -> DatabaseSettings:
    """Only the database's settings, for the commands that need no more (see DatabaseSettings)."""
    return _load(DatabaseSettings, overrides)


_S = TypeVar("_S", bound=DatabaseSettings)


def _load(kind: type[_S], overrides: dict[str, Any]) -> _S:
    try:
        return kind(**overrides)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            message = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a check across settings: its message names them
                problems.append(message)
                continue
            field = str(err["loc"][0])
            problems.append(f"{ENV_PREFIX}{field.upper()}: {message}")
        raise errors.ConfigError("invalid setting " + "; ".join(problems)) from None
    except pydantic_settings.SettingsError as exc:
        # Raised while decoding a value from the environment: name the field, never its value.
        match = re.search(r'field "([a-z_]+)"', str(exc))
        field = match.group(1).upper() if match else "?"
        raise errors.ConfigError(f"invalid setting {ENV_PREFIX}{field}: cannot be parsed") from None


# --- saying what a command uses, and what was meant --------------------------------------------


def database_where(url: str) -> str:
    """The database ``url`` for a person: the password hidden, and a SQLite file's absolute path
    beside a relative one (``sqlite:///x.db`` is ./x.db, not /x.db)."""
    parsed = sqlalchemy.engine.make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    database = parsed.database
    if parsed.get_backend_name() == "sqlite" and database and database != ":memory:":
        absolute = pathlib.Path(database).absolute()
        if str(absolute) != database:
            shown = f"{shown} ({absolute})"
    return shown


def archive_where(url: str) -> str:
    """The archive ``url`` for a person: a folder's absolute path beside a relative one."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        folder = parts.netloc + parts.path
        absolute = pathlib.Path(folder).absolute()
        if str(absolute) != folder:
            return f"{url} ({absolute})"
    return url


def unknown_settings(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """Every ``SEEDANCE_*`` variable that names no setting, with the nearest known name (or None):
    a misspelt setting is otherwise silently the default."""
    environ = os.environ if environ is None else environ
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        found.append((name, close[0] if close else None))
    return found


# Settings whose value is a secret: shown masked, never in clear.
SECRET_SETTINGS = frozenset({"api_key", "webhook_secret", "ui_token", *CALLBACK_SECRETS})


@dataclasses.dataclass(frozen=True)
class Effective:
    """One setting as the daemon would use it: its variable, value (secrets masked) and source."""

    variable: str
    value: str
    source: str  # environment, file (which), systemd credential, default


def effective(settings: Settings, environ: Mapping[str, str] | None = None) -> list[Effective]:
    """Every setting, its value as used (secrets masked, passwords hidden) and where it came from:
    the environment, a file, a systemd credential, or the default."""
    environ = os.environ if environ is None else environ
    present = {name.upper() for name in environ}
    out = []
    for name in Settings.model_fields:
        variable = f"{ENV_PREFIX}{name.upper()}"
        source = "environment" if variable in present else "default"
        value: object = getattr(settings, name)
        if name in ("api_key", "webhook_secret", "ui_token", "database_url", *CALLBACK_SECRETS):
            value, source = _resolved(settings, name, source)
        elif name == "api_base_url" and source == "default":
            source = f"default (for SEEDANCE_PROVIDER={settings.provider})"
        out.append(Effective(variable, _shown(name, value), source))
    return out


def _resolved(settings: Settings, name: str, source: str) -> tuple[object, str]:
    """A setting that may come from its variable, a ``_FILE``, or a systemd credential."""
    file_name = f"{name}_file"
    credential = {
        "api_key": API_KEY_CREDENTIAL,
        "webhook_secret": WEBHOOK_SECRET_CREDENTIAL,
        "database_url": DATABASE_URL_CREDENTIAL,
        "ui_token": UI_TOKEN_CREDENTIAL,
        **{name: secret.credential for name, secret in CALLBACK_SECRETS.items()},
    }[name]
    if source == "environment":
        return getattr(settings, name), source
    path = getattr(settings, file_name)
    if path is not None:
        kind = f"file {ENV_PREFIX}{file_name.upper()}"
    elif (cred := _credential(credential)) is not None:
        path, kind = cred, f"systemd credential {credential}"
    else:
        return getattr(settings, name), source
    if name == "database_url":
        try:
            return settings.resolve_database_url(), kind
        except errors.ConfigError:
            return "(unreadable)", kind
    return "(set)", kind


def _shown(name: str, value: object) -> str:
    if value is None:
        return "(not set)"
    if name in SECRET_SETTINGS:
        return "*****"
    if name == "database_url":
        return database_where(str(value))
    if name == "webhook_url":
        return _without_credentials(str(value)) or ""
    if name == "archive_url":
        return archive_where(str(value))
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
