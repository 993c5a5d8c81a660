"""Settings from the environment (DESIGN.md's table), the API key's sources, and the CLI's errors."""

from __future__ import annotations

import base64
import dataclasses
import os
import pathlib

import pytest
from seedance_archiver import cli, config, errors, logs, models

SECRET = "fake-test-key-not-a-secret-0001"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """No SEEDANCE_* setting or systemd credential leaks in from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.chdir(tmp_path)


class TestDefaults:
    """With nothing set, the settings are DESIGN.md's defaults."""

    def test_defaults_match_the_design_table(self) -> None:
        settings = config.load()
        assert settings.api_base_url == "https://zcbservice.aizfw.cn/kyyReactApiServer"
        assert settings.database_url == "sqlite:///seedance-archiver.db"
        assert settings.archive_url == "file://./archive"
        assert settings.cadences() == {
            "draft": models.Cadence(10, 20),
            "standard": models.Cadence(30, 60),
            "flex": models.Cadence(60, 120),
        }
        assert settings.retention_seconds == 86_400
        assert settings.max_requests_per_second == 20
        assert settings.allowed_video_url_schemes == {"https"}
        assert settings.allow_private_video_hosts is False
        assert settings.max_video_bytes == 2 * 1024**3
        assert (settings.http_host, settings.http_port) == ("127.0.0.1", 9710)
        assert settings.log_format is None
        assert settings.api_key is None
        assert settings.api_key_file is None


class TestEnvironment:
    """Variables are read with the SEEDANCE_ prefix."""

    def test_values_are_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        env = {
            "SEEDANCE_API_BASE_URL": "https://api.example.com/base/",
            "SEEDANCE_DATABASE_URL": "postgresql://app@db.internal/tasks",
            "SEEDANCE_ARCHIVE_URL": "s3://videos/seedance",
            "SEEDANCE_POLL_DRAFT": "5-8",
            "SEEDANCE_POLL_STANDARD": "45",
            "SEEDANCE_POLL_FLEX": " 90-180 ",
            "SEEDANCE_RETENTION_SECONDS": "3600",
            "SEEDANCE_MAX_REQUESTS_PER_SECOND": "2.5",
            "SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES": "https, HTTP",
            "SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS": "true",
            "SEEDANCE_MAX_VIDEO_BYTES": "1048576",
            "SEEDANCE_HTTP_HOST": "0.0.0.0",
            "SEEDANCE_HTTP_PORT": "0",
            "SEEDANCE_LOG_FORMAT": "console",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = config.load()
        assert settings.api_base_url == "https://api.example.com/base"
        assert settings.database_url == "postgresql://app@db.internal/tasks"
        assert settings.archive_url == "s3://videos/seedance"
        assert settings.cadences() == {
            "draft": models.Cadence(5, 8),
            "standard": models.Cadence(45, 45),
            "flex": models.Cadence(90, 180),
        }
        assert settings.retention_seconds == 3600
        assert settings.max_requests_per_second == 2.5
        assert settings.allowed_video_url_schemes == {"http", "https"}
        assert settings.allow_private_video_hosts is True
        assert settings.max_video_bytes == 1_048_576
        assert (settings.http_host, settings.http_port) == ("0.0.0.0", 0)
        assert settings.log_format == "console"

    def test_names_without_the_prefix_are_ignored(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("POLL_DRAFT", "1-2")
        monkeypatch.setenv("DATABASE_URL", "mysql://elsewhere")
        settings = config.load()
        assert settings.poll_draft == models.Cadence(10, 20)
        assert settings.database_url == "sqlite:///seedance-archiver.db"


BAD_VALUES = [
    ("SEEDANCE_POLL_DRAFT", "abc"),
    ("SEEDANCE_POLL_DRAFT", "20-10"),
    ("SEEDANCE_POLL_STANDARD", "0-5"),
    ("SEEDANCE_POLL_FLEX", "-"),
    ("SEEDANCE_POLL_FLEX", "nan"),
    ("SEEDANCE_RETENTION_SECONDS", "0"),
    ("SEEDANCE_RETENTION_SECONDS", "-86400"),
    ("SEEDANCE_RETENTION_SECONDS", "one day"),
    ("SEEDANCE_MAX_REQUESTS_PER_SECOND", "0"),
    ("SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES", "ftp"),
    ("SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES", ""),
    ("SEEDANCE_ALLOWED_VIDEO_URL_SCHEMES", "https,file"),
    ("SEEDANCE_ALLOW_PRIVATE_VIDEO_HOSTS", "maybe"),
    ("SEEDANCE_MAX_VIDEO_BYTES", "0"),
    ("SEEDANCE_HTTP_PORT", "70000"),
    ("SEEDANCE_HTTP_PORT", "-1"),
    ("SEEDANCE_DATABASE_URL", "mysql://x"),
    ("SEEDANCE_DATABASE_URL", "not a url"),
    ("SEEDANCE_ARCHIVE_URL", "ftp://x"),
    ("SEEDANCE_ARCHIVE_URL", "bucket"),
    ("SEEDANCE_API_BASE_URL", "zcb"),
    ("SEEDANCE_API_BASE_URL", "ftp://zcbservice.aizfw.cn"),
    ("SEEDANCE_LOG_FORMAT", "xml"),
]


class TestBadValues:
    """A bad value stops start-up with one line that names the variable."""

    @pytest.mark.parametrize(("name", "value"), BAD_VALUES)
    def test_error_names_the_variable(
        self, monkeypatch: pytest.MonkeyPatch, name: str, value: str
    ) -> None:
        monkeypatch.setenv(name, value)
        with pytest.raises(errors.ConfigError) as caught:
            config.load()
        message = str(caught.value)
        assert name in message
        assert "\n" not in message

    def test_only_the_bad_variables_are_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SEEDANCE_POLL_DRAFT", "abc")
        monkeypatch.setenv("SEEDANCE_HTTP_PORT", "70000")
        with pytest.raises(errors.ConfigError) as caught:
            config.load()
        message = str(caught.value)
        assert "SEEDANCE_POLL_DRAFT" in message
        assert "SEEDANCE_HTTP_PORT" in message
        assert "SEEDANCE_POLL_STANDARD" not in message

    @pytest.mark.parametrize(
        ("key", "secret"),
        [
            ("bad key with spaces", "bad key with spaces"),
            (f"{SECRET}\tsecond-half", SECRET),
            (f"{SECRET} {SECRET}", SECRET),
        ],
    )
    def test_bad_api_key_is_named_but_never_shown(
        self, monkeypatch: pytest.MonkeyPatch, key: str, secret: str
    ) -> None:
        monkeypatch.setenv("SEEDANCE_API_KEY", key)
        with pytest.raises(errors.ConfigError) as caught:
            config.load()
        message = str(caught.value)
        assert "SEEDANCE_API_KEY" in message
        assert secret not in message

    def test_blank_api_key_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SEEDANCE_API_KEY", "   ")
        with pytest.raises(errors.ConfigError, match="SEEDANCE_API_KEY"):
            config.load()

    def test_bad_database_url_does_not_show_its_password(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SEEDANCE_DATABASE_URL", "mysql://app:hunter2@db/tasks")
        with pytest.raises(errors.ConfigError) as caught:
            config.load()
        assert "SEEDANCE_DATABASE_URL" in str(caught.value)
        assert "hunter2" not in str(caught.value)

    def test_infinite_poll_range_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SEEDANCE_POLL_DRAFT", "inf")
        with pytest.raises(errors.ConfigError, match="SEEDANCE_POLL_DRAFT"):
            config.load()


class TestApiKey:
    """The key comes from SEEDANCE_API_KEY, SEEDANCE_API_KEY_FILE or the systemd credential."""

    def test_from_the_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SEEDANCE_API_KEY", f"  {SECRET}\n")
        assert config.load().resolve_api_key() == SECRET

    def test_from_a_file_stripped(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        key_file = tmp_path / "api-key"
        key_file.write_text(f"{SECRET}\n", encoding="utf-8")
        monkeypatch.setenv("SEEDANCE_API_KEY_FILE", str(key_file))
        assert config.load().resolve_api_key() == SECRET

    def test_from_the_systemd_credential(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        (tmp_path / "seedance-api-key").write_text(f"{SECRET}\n", encoding="utf-8")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
        assert config.load().resolve_api_key() == SECRET

    def test_the_variable_wins_over_the_file(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        key_file = tmp_path / "api-key"
        key_file.write_text("from-the-file", encoding="utf-8")
        monkeypatch.setenv("SEEDANCE_API_KEY_FILE", str(key_file))
        monkeypatch.setenv("SEEDANCE_API_KEY", SECRET)
        assert config.load().resolve_api_key() == SECRET

    def test_missing_names_the_variable(self) -> None:
        with pytest.raises(errors.ConfigError, match="SEEDANCE_API_KEY"):
            config.load().resolve_api_key()

    def test_credential_directory_without_the_key_is_missing(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
        with pytest.raises(errors.ConfigError, match="SEEDANCE_API_KEY"):
            config.load().resolve_api_key()

    @pytest.mark.parametrize("where", ["missing", "directory"])
    def test_unreadable_file_names_the_variable(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, where: str
    ) -> None:
        path = tmp_path / "no-such-key" if where == "missing" else tmp_path
        monkeypatch.setenv("SEEDANCE_API_KEY_FILE", str(path))
        with pytest.raises(errors.ConfigError, match="SEEDANCE_API_KEY_FILE"):
            config.load().resolve_api_key()

    @pytest.mark.parametrize("contents", [f"{SECRET} {SECRET}-two", "\n \n"])
    def test_bad_file_contents_are_never_shown(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, contents: str
    ) -> None:
        key_file = tmp_path / "api-key"
        key_file.write_text(contents, encoding="utf-8")
        monkeypatch.setenv("SEEDANCE_API_KEY_FILE", str(key_file))
        with pytest.raises(errors.ConfigError) as caught:
            config.load().resolve_api_key()
        assert "SEEDANCE_API_KEY_FILE" in str(caught.value)
        assert SECRET not in str(caught.value)

    def test_key_file_not_utf8_is_a_config_error(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        key_file = tmp_path / "api-key"
        key_file.write_bytes(b"\xff\xfe" + SECRET.encode("utf-16-le"))
        monkeypatch.setenv("SEEDANCE_API_KEY_FILE", str(key_file))
        with pytest.raises(errors.ConfigError, match="SEEDANCE_API_KEY_FILE"):
            config.load().resolve_api_key()


class TestKeyOnlyOverTls:
    """The key is never handed out for a plain http:// base URL, unless it is loopback or allowed."""

    @pytest.mark.parametrize(
        "url",
        [
            "http://api.example.com/kyy",
            "http://10.0.0.5:8080",
            "http://[2001:db8::1]/kyy",
            "http://localhost.example.com",
            "http://127.0.0.1.nip.io",
        ],
    )
    def test_http_to_another_host_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, url: str
    ) -> None:
        monkeypatch.setenv("SEEDANCE_API_KEY", SECRET)
        monkeypatch.setenv("SEEDANCE_API_BASE_URL", url)
        with pytest.raises(errors.ConfigError, match="SEEDANCE_API_BASE_URL") as caught:
            config.load().resolve_api_key()
        assert "SEEDANCE_ALLOW_INSECURE_API_URL" in str(caught.value)
        assert SECRET not in str(caught.value)

    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:8080",
            "http://127.3.4.5",
            "http://[::1]:8080/kyy",
            "http://localhost:8080",
            "http://LOCALHOST.",
            "https://api.example.com/kyy",
        ],
    )
    def test_loopback_and_https_are_allowed(
        self, monkeypatch: pytest.MonkeyPatch, url: str
    ) -> None:
        monkeypatch.setenv("SEEDANCE_API_KEY", SECRET)
        monkeypatch.setenv("SEEDANCE_API_BASE_URL", url)
        assert config.load().resolve_api_key() == SECRET

    def test_the_override_allows_a_private_network(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SEEDANCE_API_KEY", SECRET)
        monkeypatch.setenv("SEEDANCE_API_BASE_URL", "http://10.0.0.5:8080")
        monkeypatch.setenv("SEEDANCE_ALLOW_INSECURE_API_URL", "true")
        assert config.load().resolve_api_key() == SECRET


DB_PASSWORD = "hunter2-not-a-real-password"
DB_URL = f"postgresql://archiver:{DB_PASSWORD}@db.internal/videos"


class TestDatabaseUrl:
    """The URL comes from SEEDANCE_DATABASE_URL, its _FILE, the systemd credential, or the default."""

    def _credential(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, text: str
    ) -> None:
        creds = tmp_path / "creds"
        creds.mkdir(exist_ok=True)
        (creds / "seedance-database-url").write_text(text, encoding="utf-8")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))

    def _file(self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, text: str) -> None:
        url_file = tmp_path / "database-url"
        url_file.write_text(text, encoding="utf-8")
        monkeypatch.setenv("SEEDANCE_DATABASE_URL_FILE", str(url_file))

    def test_default_without_any_source(self) -> None:
        assert config.load().resolve_database_url() == "sqlite:///seedance-archiver.db"

    def test_from_a_file_stripped(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        self._file(monkeypatch, tmp_path, f"{DB_URL}\n")
        assert config.load().resolve_database_url() == DB_URL

    def test_from_the_systemd_credential(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        self._credential(monkeypatch, tmp_path, DB_URL)
        assert config.load().resolve_database_url() == DB_URL

    def test_the_variable_wins_over_file_and_credential(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        self._file(monkeypatch, tmp_path, "postgresql://from-the-file@db/x")
        self._credential(monkeypatch, tmp_path, "postgresql://from-the-credential@db/x")
        monkeypatch.setenv("SEEDANCE_DATABASE_URL", "sqlite:///explicit.db")
        assert config.load().resolve_database_url() == "sqlite:///explicit.db"

    def test_an_explicit_default_still_wins(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        self._credential(monkeypatch, tmp_path, DB_URL)
        monkeypatch.setenv("SEEDANCE_DATABASE_URL", "sqlite:///seedance-archiver.db")
        assert config.load().resolve_database_url() == "sqlite:///seedance-archiver.db"

    def test_the_file_wins_over_the_credential(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        self._file(monkeypatch, tmp_path, DB_URL)
        self._credential(monkeypatch, tmp_path, "postgresql://from-the-credential@db/x")
        assert config.load().resolve_database_url() == DB_URL

    @pytest.mark.parametrize(
        "text",
        [
            f"mysql://archiver:{DB_PASSWORD}@db/x",
            f"not a url {DB_PASSWORD}",
            f"::{DB_PASSWORD}",
            "",
        ],
    )
    def test_bad_file_contents_are_named_and_never_shown(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, text: str
    ) -> None:
        self._file(monkeypatch, tmp_path, text)
        with pytest.raises(errors.ConfigError, match="SEEDANCE_DATABASE_URL_FILE") as caught:
            config.load().resolve_database_url()
        assert DB_PASSWORD not in str(caught.value)

    def test_bad_credential_is_named_and_never_shown(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        self._credential(monkeypatch, tmp_path, f"oracle://archiver:{DB_PASSWORD}@db/x")
        with pytest.raises(errors.ConfigError, match="seedance-database-url") as caught:
            config.load().resolve_database_url()
        assert DB_PASSWORD not in str(caught.value)

    def test_unreadable_file_is_named(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        monkeypatch.setenv("SEEDANCE_DATABASE_URL_FILE", str(tmp_path / "missing"))
        with pytest.raises(errors.ConfigError, match="SEEDANCE_DATABASE_URL_FILE"):
            config.load().resolve_database_url()

    def test_summary_masks_the_password_from_the_file(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        self._file(monkeypatch, tmp_path, DB_URL)
        summary = config.load().public_summary()
        assert "db.internal" in summary["database_url"]
        assert DB_PASSWORD not in repr(summary)

    def test_run_with_a_bad_file_exits_2(
        self,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: pathlib.Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
        monkeypatch.setenv("SEEDANCE_API_KEY", SECRET)
        monkeypatch.setenv("SEEDANCE_ARCHIVE_URL", f"file://{tmp_path}/archive")
        self._file(monkeypatch, tmp_path, f"mysql://archiver:{DB_PASSWORD}@db/x")
        assert cli.main(["run"]) == 2
        err = capsys.readouterr().err
        assert "SEEDANCE_DATABASE_URL_FILE" in err and DB_PASSWORD not in err


class TestPublicSummary:
    """What is logged at start leaves every secret out."""

    def test_database_password_is_hidden(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SEEDANCE_DATABASE_URL", "postgresql://app:hunter2@db.internal/tasks")
        monkeypatch.setenv("SEEDANCE_API_KEY", SECRET)
        summary = config.load().public_summary()
        assert "hunter2" not in repr(summary)
        assert SECRET not in repr(summary)
        assert "db.internal" in summary["database_url"]
        assert summary["poll"] == {"draft": "10-20", "standard": "30-60", "flex": "60-120"}


class TestCommandLine:
    """`seedance-archiver run` with bad settings exits 2 with one line on stderr."""

    @pytest.fixture(autouse=True)
    def no_global_logging(
        self, clean_environment: None, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        # logs.configure binds structlog and the root logger to this test's captured stderr;
        # keep that global state from leaking into later tests.
        monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
        monkeypatch.setenv("SEEDANCE_DATABASE_URL", f"sqlite:///{tmp_path}/tasks.db")
        monkeypatch.setenv("SEEDANCE_ARCHIVE_URL", f"file://{tmp_path}/archive")

    def test_bad_setting(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("SEEDANCE_API_KEY", SECRET)
        monkeypatch.setenv("SEEDANCE_POLL_FLEX", "nonsense")
        assert cli.main(["run"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1
        assert "SEEDANCE_POLL_FLEX" in err

    def test_missing_api_key(
        self, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert cli.main(["run"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1
        assert "SEEDANCE_API_KEY" in err
        assert not (tmp_path / "tasks.db").exists()

    def test_http_base_url_stops_run(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("SEEDANCE_API_KEY", SECRET)
        monkeypatch.setenv("SEEDANCE_API_BASE_URL", "http://api.example.com")
        assert cli.main(["run"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1
        assert "SEEDANCE_API_BASE_URL" in err and SECRET not in err

    def test_bad_api_key_is_not_printed(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("SEEDANCE_API_KEY", "bad key with spaces")
        assert cli.main(["run"]) == 2
        captured = capsys.readouterr()
        assert len(captured.err.splitlines()) == 1
        assert "SEEDANCE_API_KEY" in captured.err
        assert "bad key with spaces" not in captured.err + captured.out


class TestProvider:
    """SEEDANCE_PROVIDER picks the API, its default base URL, and whether callbacks can be served."""

    def test_the_reseller_is_the_default(self) -> None:
        settings = config.load()
        assert settings.provider == "reseller"
        assert settings.callbacks is False
        assert settings.public_summary()["provider"] == "reseller"

    def test_ark_has_its_own_default_base_url(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SEEDANCE_PROVIDER", "ark")
        assert config.load().api_base_url == "https://ark.cn-beijing.volces.com"

    @pytest.mark.parametrize("provider", ["reseller", "ark"])
    def test_a_base_url_set_wins(self, monkeypatch: pytest.MonkeyPatch, provider: str) -> None:
        monkeypatch.setenv("SEEDANCE_PROVIDER", provider)
        monkeypatch.setenv("SEEDANCE_API_BASE_URL", "https://ark.ap-southeast.bytepluses.com/")
        assert config.load().api_base_url == "https://ark.ap-southeast.bytepluses.com"

    def test_an_unknown_provider_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SEEDANCE_PROVIDER", "openai")
        with pytest.raises(errors.ConfigError, match="SEEDANCE_PROVIDER") as caught:
            config.load()
        assert "openai" not in str(caught.value)

    def test_callbacks_need_a_provider_that_sends_them(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SEEDANCE_CALLBACKS", "true")
        with pytest.raises(
            errors.ConfigError, match="reseller sends no callbacks; those that do: ark"
        ):
            config.load()

    def test_callbacks_need_the_http_port(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SEEDANCE_PROVIDER", "ark")
        monkeypatch.setenv("SEEDANCE_CALLBACKS", "true")
        monkeypatch.setenv("SEEDANCE_HTTP_PORT", "0")
        with pytest.raises(errors.ConfigError, match="SEEDANCE_HTTP_PORT"):
            config.load()

    def test_ark_with_callbacks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SEEDANCE_PROVIDER", "ark")
        monkeypatch.setenv("SEEDANCE_CALLBACKS", "true")
        assert config.load().callbacks is True


@dataclasses.dataclass(frozen=True)
class CallbackSecret:
    """One provider's callback secret, as its module declares it, with values it takes and refuses."""

    provider: str
    variable: str
    credential: str
    good: tuple[str, str, str]  # for the credential, the file and the variable
    bad: tuple[str, ...]


def _whsec(fill: int) -> str:
    """A Standard Webhooks signing secret for tests (whsec_ and base64 of 24 equal bytes)."""
    return "whsec_" + base64.b64encode(bytes([fill]) * 24).decode()


CALLBACK_SECRETS = [
    CallbackSecret(
        "ark",
        "SEEDANCE_CALLBACK_TOKEN",
        "seedance-callback-token",
        ("callback-token-for-tests-0123456789abcdef", "f" * 32, "v" * 32),
        ("short-token", "a" * 31, "has/a/slash" * 4, "with spaces " * 4, "é" * 40),
    ),
    CallbackSecret(
        "replicate",
        "SEEDANCE_REPLICATE_WEBHOOK_SECRET",
        "seedance-replicate-webhook-secret",
        (_whsec(1), _whsec(2), _whsec(3)),
        ("r8_not-a-signing-secret", "whsec_not base64!", "whsec_%%%%"),
    ),
]


@pytest.fixture(params=CALLBACK_SECRETS, ids=lambda secret: secret.provider)
def callback_secret(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> CallbackSecret:
    """A provider that sends callbacks, with them on."""
    secret: CallbackSecret = request.param
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    monkeypatch.setenv("SEEDANCE_PROVIDER", secret.provider)
    monkeypatch.setenv("SEEDANCE_CALLBACKS", "true")
    monkeypatch.setenv("SEEDANCE_API_KEY", SECRET)
    monkeypatch.setenv("SEEDANCE_DATABASE_URL", f"sqlite:///{tmp_path}/tasks.db")
    return secret


class TestCallbackSecret:
    """With callbacks on, the daemon does not start without the secret its provider's callbacks are
    checked with (Ark: a token fit for a URL path; Replicate: its webhook signing secret)."""

    def test_from_the_variable_file_or_credential(
        self,
        callback_secret: CallbackSecret,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: pathlib.Path,
    ) -> None:
        from_credential, from_file, from_variable = callback_secret.good
        (tmp_path / callback_secret.credential).write_text(from_credential + "\n", "utf-8")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
        assert config.load().resolve_callback_secret() == from_credential
        (tmp_path / "secret").write_text(from_file, encoding="utf-8")
        monkeypatch.setenv(f"{callback_secret.variable}_FILE", str(tmp_path / "secret"))
        assert config.load().resolve_callback_secret() == from_file
        monkeypatch.setenv(callback_secret.variable, from_variable)
        assert config.load().resolve_callback_secret() == from_variable

    def test_run_stops_without_one(
        self,
        callback_secret: CallbackSecret,
        tmp_path: pathlib.Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        assert cli.main(["run"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1
        assert f"missing setting {callback_secret.variable}" in err
        assert not (tmp_path / "tasks.db").exists()

    def test_run_stops_on_a_bad_one_and_never_shows_it(
        self,
        callback_secret: CallbackSecret,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        for value in callback_secret.bad:
            monkeypatch.setenv(callback_secret.variable, value)
            assert cli.main(["run"]) == 2
            captured = capsys.readouterr()
            assert len(captured.err.splitlines()) == 1
            assert f"invalid setting {callback_secret.variable}" in captured.err
            assert value.strip() not in captured.err + captured.out

    def test_config_masks_it(
        self,
        callback_secret: CallbackSecret,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.setenv(callback_secret.variable, callback_secret.good[2])
        assert cli.main(["config"]) == 0
        out = capsys.readouterr().out
        assert callback_secret.variable in out and callback_secret.good[2] not in out
