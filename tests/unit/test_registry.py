"""The provider registry: one list of APIs that config, the command line and the simulator read, and
a seam that imports no provider of its own."""

from __future__ import annotations

import ast
import datetime as dt
import pathlib
import subprocess
import sys

import pydantic
import pytest
from seedance_archiver import config, errors, netguard, provider, providers, simulator, webhooks

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "daemon" / "seedance_archiver"


class TestRegistry:
    """providers.NAMES, get() and CALLBACKS come from the modules' own specs."""

    def test_the_registry_lists_the_providers(self) -> None:
        assert providers.NAMES == ("reseller", "ark", "replicate")
        assert providers.DEFAULT == "reseller"

    def test_each_spec_is_its_modules_own(self) -> None:
        for name in providers.NAMES:
            spec = providers.get(name)
            assert isinstance(spec, provider.Spec)
            assert (PACKAGE / "providers" / f"{name}.py").exists()

    def test_an_unknown_name_is_refused_naming_the_known_ones(self) -> None:
        with pytest.raises(KeyError, match="reseller, ark, replicate"):
            providers.get("runway")

    def test_callbacks_are_those_the_specs_read(self) -> None:
        assert set(providers.CALLBACKS) == {"ark", "replicate"}
        assert config.CALLBACK_PROVIDERS == tuple(providers.CALLBACKS)

    def test_each_callback_secret_is_a_setting_of_its_own(self) -> None:
        """A provider's callback secret is declared by its module and read like any setting."""
        assert set(config.CALLBACK_SECRETS) == {"callback_token", "replicate_webhook_secret"}
        for name in config.CALLBACK_SECRETS:
            assert name in config.Settings.model_fields
            assert f"{name}_file" in config.Settings.model_fields
            assert name in config.SECRET_SETTINGS

    def test_a_short_window_is_at_risk_sooner(self) -> None:
        """At risk in the last quarter of the provider's window, at most the last hour."""
        assert providers.AT_RISK.span("replicate") == dt.timedelta(minutes=15)
        assert providers.AT_RISK.span("reseller") == providers.AT_RISK.span("ark")
        assert providers.AT_RISK.span(None) == dt.timedelta(hours=1)


class TestReaders:
    """config and the simulator offer exactly the registry's providers."""

    @pytest.mark.parametrize("name", providers.NAMES)
    def test_settings_accept_each_and_default_to_its_base_url(self, name: str) -> None:
        settings = config.Settings(provider=name)
        assert settings.provider == name
        assert settings.api_base_url == providers.get(name).default_base_url
        assert config.DEFAULT_API_BASE_URLS[name] == providers.get(name).default_base_url

    def test_settings_refuse_any_other(self) -> None:
        with pytest.raises(pydantic.ValidationError):
            config.Settings(provider="runway")

    def test_the_default_is_the_registrys(self) -> None:
        assert config.Settings().provider == providers.DEFAULT
        assert config.DEFAULT_API_BASE_URL == providers.get(providers.DEFAULT).default_base_url

    def test_the_simulator_plays_each(self) -> None:
        assert tuple(simulator.DIALECTS) == providers.NAMES
        for name in providers.NAMES:
            assert simulator.Simulator(dialect=name).dialect == name


def _package_imports(path: pathlib.Path) -> set[str]:
    """The seedance_archiver modules ``path`` imports, as ``providers.ark`` or ``provider``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "seedance_archiver":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("seedance_archiver."):
                inner = node.module.removeprefix("seedance_archiver.")
                found |= {f"{inner}.{alias.name}" for alias in node.names}
    return found


class TestNoCycle:
    """The seam and the shared parts import no provider: a provider is built on them, not in them."""

    @pytest.mark.parametrize(
        "module", ["provider.py", "providers/http.py", "providers/fields.py", "netguard.py"]
    )
    def test_the_shared_parts_import_no_provider_module(self, module: str) -> None:
        named = {f"providers.{name}" for name in providers.NAMES}
        imported = _package_imports(PACKAGE / module)
        assert imported & named == set()
        assert "providers" not in imported

    @pytest.mark.parametrize(
        "module",
        [
            "provider",
            "netguard",
            "providers.fields",
            "providers.http",
            "providers.reseller",
            "providers.ark",
            "providers.replicate",
            "providers",
            "config",
        ],
    )
    def test_each_module_imports_alone(self, module: str) -> None:
        """In a fresh interpreter, so an order that only works after another import is caught."""
        code = (
            f"import sys, seedance_archiver.{module}; "
            "print(' '.join(m for m in sys.modules if m.startswith('seedance_archiver.')))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        loaded = set(done.stdout.split())
        if module in ("provider", "netguard"):  # a providers.* module loads the package first
            assert {f"seedance_archiver.providers.{n}" for n in providers.NAMES}.isdisjoint(loaded)


class TestWebhooksUseNetguard:
    """webhooks.py takes its address rules from netguard, as the downloads do."""

    def test_webhooks_import_netguard_not_the_provider_client(self) -> None:
        imported = _package_imports(PACKAGE / "webhooks.py")
        assert "netguard" in imported
        assert not any(name.startswith(("provider", "addresses")) for name in imported)

    def test_a_private_literal_is_refused_by_netguards_rule(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with pytest.raises(errors.ConfigError, match="private"):
            webhooks.check_url("https://10.0.0.1/hook", allow_private_hosts=False)
        monkeypatch.setattr(netguard, "is_public_address", lambda address: True)
        webhooks.check_url("https://10.0.0.1/hook", allow_private_hosts=False)
