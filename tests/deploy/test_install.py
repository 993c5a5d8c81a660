"""Installing the project: one copy of each module, a lock that pins everything, a wheel that lives
beside python-daemon (whose import name is ``daemon`` too).

The wheel and the venvs here are built offline, from uv's cache that ``make`` filled from uv.lock.
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator

import pytest
import seedance_archiver
import yaml
from seedance_archiver import simulator

from tests.helpers import Daemon, base_env, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
UV = pathlib.Path(sys.executable).parent / "uv"
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
IMAGE_LOCK = ROOT / "deploy" / "requirements.lock"
# What `make lock` exports for the image: the runtime dependencies only, with hashes.
EXPORT = ["export", "--frozen", "--no-emit-project", "--no-header", "--format", "requirements-txt"]


def _uv(*args: str | pathlib.Path, cwd: pathlib.Path = ROOT) -> str:
    result = subprocess.run(
        [str(UV), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"uv {args[0]} failed: {result.stderr[-2000:]}"
    return result.stdout


def _locked_version(name: str) -> str:
    (package,) = [p for p in LOCK["package"] if p["name"] == name]
    return str(package["version"])


def _requirement_blocks(export: str, names: set[str]) -> str:
    """The blocks (a pin and its hashes) of ``names`` in a requirements export."""
    blocks = re.split(r"\n(?=\S)", export)
    return "\n".join(b for b in blocks if re.split(r"[=\s\\]", b, maxsplit=1)[0] in names) + "\n"


# The revisions and env.py under seedance_archiver.migrations (its __init__ imports alone).
MIGRATION_SCRIPTS = ("seedance_archiver.migrations.env", "seedance_archiver.migrations.versions.")


class TestOneCopy:
    def test_every_module_is_imported_once_under_its_own_name(self) -> None:
        """Nothing under daemon/ is importable as a second module (``daemon.seedance_archiver.x``)."""
        for info in pkgutil.walk_packages(seedance_archiver.__path__, "seedance_archiver."):
            # __main__ would run the CLI; Alembic's scripts run only inside Alembic (its context).
            if not info.name.endswith("__main__") and not info.name.startswith(MIGRATION_SCRIPTS):
                importlib.import_module(info.name)
        ours = {
            name: path
            for name, module in list(sys.modules.items())
            if (file := getattr(module, "__file__", None))
            and (path := pathlib.Path(file).resolve()).is_relative_to(ROOT / "daemon")
        }
        assert "seedance_archiver.store" in ours
        assert all(name.startswith("seedance_archiver") for name in ours), sorted(ours)
        assert len(set(ours.values())) == len(ours), "a file is loaded under two module names"
        # The installed package is the source tree itself (editable), not a stale copy.
        assert ours["seedance_archiver"] == ROOT / "daemon" / "seedance_archiver" / "__init__.py"

    def test_the_source_root_is_not_a_package(self) -> None:
        """daemon/ has no __init__.py, so `import daemon` can never mean our code."""
        assert not (ROOT / "daemon" / "__init__.py").exists()
        assert [p.name for p in (ROOT / "daemon").iterdir() if p.suffix == ".py"] == []


class TestLock:
    def test_the_lock_matches_pyproject(self) -> None:
        """`uv lock --check` fails when pyproject.toml changed and the lock did not (run `make lock`)."""
        _uv("lock", "--check", "--offline")

    def test_the_image_installs_the_export_of_the_same_lock(self) -> None:
        assert IMAGE_LOCK.read_text() == _uv(*EXPORT), "deploy/requirements.lock is stale"
        pins = re.findall(r"^([\w.-]+)==", IMAGE_LOCK.read_text(), re.MULTILINE)
        assert "sqlalchemy" in pins and "pytest" not in pins and "moto" not in pins

    def test_every_pin_carries_a_hash(self) -> None:
        blocks = re.split(r"\n(?=\S)", IMAGE_LOCK.read_text().strip())
        assert blocks and all("--hash=sha256:" in b for b in blocks if not b.startswith("#"))

    def test_make_bootstraps_the_uv_the_lock_pins(self) -> None:
        (pinned,) = re.findall(r"^UV_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
        assert pinned == _locked_version("uv")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The project's wheel, built offline with the locked setuptools, from a copy of the sources
    (setuptools leaves a build/ folder behind wherever it builds)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("daemon", "migrations"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    _uv("build", "--quiet", "--wheel", "--offline", "--no-build-isolation",
        "--python", sys.executable, "--out-dir", out, source)  # fmt: skip
    (built,) = out.glob("seedance_archiver-*.whl")
    return built


class TestWheel:
    """The wheel holds every module of the source tree, so a new subpackage cannot drop out of it."""

    def test_the_wheel_holds_every_module(self, wheel: pathlib.Path) -> None:
        package = ROOT / "daemon" / "seedance_archiver"
        sources = {
            f"seedance_archiver/{path.relative_to(package).as_posix()}"
            for path in package.rglob("*.py")
        } | {
            f"seedance_archiver/migrations/{path.relative_to(ROOT / 'migrations').as_posix()}"
            for path in (ROOT / "migrations").rglob("*.py")
        }
        with zipfile.ZipFile(wheel) as built:
            held = {name for name in built.namelist() if name.endswith(".py")}
        assert "seedance_archiver/store.py" in sources
        assert sources - held == set(), "not in the wheel: is its folder a package (__init__.py)?"
        assert held - sources == set(), "in the wheel, but not in the source tree"


@pytest.fixture(scope="module")
def beside_python_daemon(
    wheel: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[pathlib.Path]:
    """A venv holding the image's lock, our wheel and python-daemon: what an Airflow host has."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    python = venv / "bin" / "python"
    _uv("venv", "--quiet", "--python", sys.executable, venv)
    _uv("pip", "install", "--quiet", "--offline", "--python", python, "-r", IMAGE_LOCK)
    neighbour = root / "python-daemon.txt"
    dev_export = _uv(*EXPORT, "--extra", "dev")
    neighbour.write_text(_requirement_blocks(dev_export, {"python-daemon", "lockfile"}))
    assert "python-daemon==" in neighbour.read_text()
    _uv("pip", "install", "--quiet", "--offline", "--python", python, "-r", neighbour)
    _uv("pip", "install", "--quiet", "--offline", "--no-deps", "--python", python, wheel)
    yield venv


class TestBesidePythonDaemon:
    def test_both_import_under_their_own_names(self, beside_python_daemon: pathlib.Path) -> None:
        code = (
            "import daemon, daemon.daemon, seedance_archiver, seedance_archiver.migrations as m; "
            "print(daemon.__file__); print(hasattr(daemon, 'DaemonContext')); "
            "print(seedance_archiver.__version__); print(m.__file__)"
        )
        result = subprocess.run(
            [str(beside_python_daemon / "bin" / "python"), "-c", code],
            cwd=beside_python_daemon,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        daemon_file, has_context, version, migrations = result.stdout.split()
        site = beside_python_daemon / "lib"
        assert pathlib.Path(daemon_file).is_relative_to(site) and has_context == "True"
        assert version == seedance_archiver.__version__
        assert pathlib.Path(migrations).is_relative_to(site)

    def test_the_daemon_runs_and_check_finds_it(
        self,
        beside_python_daemon: pathlib.Path,
        tmp_path: pathlib.Path,
        sim: simulator.SimulatorThread,
    ) -> None:
        """The heartbeat (which reads the package's version) is written, so `check` sees a daemon."""
        cli = beside_python_daemon / "bin" / "seedance-archiver"
        env = base_env(sim.url, f"sqlite:///{tmp_path}/tasks.db", (tmp_path / "archive").as_uri())

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(cli), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
            )

        assert run("migrate").returncode == 0
        assert run("check").returncode == 1  # no daemon yet: `check` can fail
        daemon = Daemon.start(env, tmp_path / "daemon.log", argv=[str(cli), "run"], cwd=tmp_path)
        try:
            checked = wait_for(lambda: (r := run("check")).returncode == 0 and r, timeout=60,
                               interval=0.5, what="`seedance-archiver check` to find the daemon")  # fmt: skip
        finally:
            try:
                code = daemon.terminate(timeout=30)
            finally:
                daemon.kill()
        assert isinstance(checked, subprocess.CompletedProcess)
        assert "daemon: ok (1 running)" in checked.stdout and "api key: ok" in checked.stdout
        assert code == 0, daemon.log()[-3000:]
        assert "job_failed" not in daemon.log() and "job_crashed" not in daemon.log()


class TestPreCommit:
    def test_the_hooks_are_make_lint(self) -> None:
        """.pre-commit-config.yaml runs exactly the commands of `make lint`, nothing fetched."""
        config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
        assert [repo["repo"] for repo in config["repos"]] == ["local"]
        entries = [hook["entry"] for repo in config["repos"] for hook in repo["hooks"]]
        makefile = (ROOT / "Makefile").read_text()
        lint = makefile[makefile.index("\nlint:") :].strip().split("\n\n")[0].splitlines()[1:]
        assert entries == [line.strip().replace("$(BIN)", ".venv/bin") for line in lint]


class TestPythons:
    """The Pythons users have are the ones CI tests, and the classifiers name exactly those."""

    def _pythons(self) -> list[str]:
        listed = re.search(r"^PYTHONS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
        assert listed is not None, "the Makefile names no PYTHONS"
        return listed.group(1).split()

    def test_ci_runs_the_other_pythons(self) -> None:
        steps = re.findall(r"^make (\S+)", (ROOT / ".ci" / "run").read_text(), re.M)
        assert steps.index("pythons") > steps.index("test")
        assert {"3.12", "3.13"} <= {version.rsplit(".", 1)[0] for version in self._pythons()}

    def test_the_classifiers_name_the_pythons_ci_tests(self) -> None:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        lowest = project["requires-python"].removeprefix(">=")
        # make test runs on .venv's Python, the lowest allowed; make pythons on the others.
        assert f"{sys.version_info.major}.{sys.version_info.minor}" == lowest
        tested = {lowest} | {version.rsplit(".", 1)[0] for version in self._pythons()}
        prefix = "Programming Language :: Python :: "
        named = {c.removeprefix(prefix) for c in project["classifiers"] if c.startswith(prefix)}
        assert named == tested

    def test_a_missing_python_is_named(self, tmp_path: pathlib.Path) -> None:
        """On a machine without one of the Pythons, make pythons says which and how to get it."""
        result = subprocess.run(
            ["make", "-s", "-o", ".venv/.installed", "pythons", f"PYENV_ROOT={tmp_path}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        first = self._pythons()[0]
        assert result.returncode != 0
        assert f"CPython {first} is missing" in result.stderr
        assert f"pyenv install {first}" in result.stderr
