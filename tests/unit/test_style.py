"""The house rules of STYLE.md that a machine can check: where each library may be imported, a pure
policy layer, no name that hides a module, the seams' Protocols covered by real and fake alike."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import subprocess
import sys
from collections.abc import Callable

import pytest
from seedance_archiver import archive, db, outbox, provider, store, testing
from seedance_archiver.archive import folder, s3
from seedance_archiver.providers import ark, reseller
from seedance_archiver.providers import http as providers_http

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "daemon" / "seedance_archiver"
# Top-level modules by name, a subpackage's as ``providers.ark`` (its __init__ as ``providers``):
# the rules hold for them alike. Not the migrations (the top-level migrations/, shipped in the
# package through a symlink): Alembic's scripts, with rules of their own (schema.py).
MODULES = {
    ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
    for p in [*PACKAGE.glob("*.py"), *PACKAGE.glob("*/*.py")]
    if p.relative_to(PACKAGE).parts[0] != "migrations"
}

# Each I/O library belongs to the one module that is the seam for it (STYLE.md, "Layout").
OWNERS = {
    # providers/http is the client; providers/__init__ names httpx's transport type only
    # (from_settings' transport), at type-check time; wire is the polls' own transport, under it;
    # netguard parses a link as httpx will request it, so the host it checks is the host connected
    # to. provider.py, the seam, has none: the service sees no HTTP library.
    "httpx": {"providers", "providers.http", "wire", "netguard"},
    # The daemon no longer uses it (wire.py is its transport); only the benchmarks compare with it.
    "httpx_aiohttp": set(),
    "boto3": {"archive.s3"},
    "botocore": {"archive.s3"},
    "psycopg": {"db", "store", "listener"},  # db translates its errors; see SQL_MODULES
    "apscheduler": {"scheduler"},
    "alembic": {"schema"},
    "prometheus_client": {"metrics"},
    # Ours signed (webhooks), Replicate's checked (its provider module), Replicate's played (the
    # simulator signs as Replicate does).
    "standardwebhooks": {"webhooks", "providers.replicate", "simulator"},
}
# Only these speak SQL (STYLE.md): the engine and its errors, the task rows, the outbox, LISTEN.
SQL_MODULES = {"db", "store", "outbox", "listener"}
# Others that import SQLAlchemy and send no statement of the daemon's: the table mapping, Alembic's
# migrations and their helpers, the database URL's validation, and the feeders' one INSERT (on the
# application's own connection, which the daemon never sees).
SQL_DESCRIBERS = {"models", "schema", "config", "feeding"}
# Libraries that do I/O, or read the environment, or bring either: the pure layer may not load them.
IO_LIBRARIES = (*OWNERS, "aiohttp", "pydantic_settings", "structlog")


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_each_library_is_imported_by_its_seam_only(library: str) -> None:
    importers = {name for name, path in MODULES.items() if library in _imports(path)}
    assert importers <= OWNERS[library], f"{library} imported outside its seam: {importers}"


def test_only_the_store_modules_speak_sql() -> None:
    importers = {
        name for name, path in MODULES.items() if {"sqlalchemy", "psycopg"} & _imports(path)
    }
    assert importers == SQL_MODULES | SQL_DESCRIBERS


def test_the_policy_loads_no_io_library() -> None:
    """Importing ``policy`` (and what it needs: ``models``) loads nothing that talks to the world."""
    code = "import sys, seedance_archiver.policy; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    )
    assert "seedance_archiver.policy" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in IO_LIBRARIES) == []
    assert {"seedance_archiver.provider", "seedance_archiver.config"}.isdisjoint(loaded)


def _shadowing_parameters(source: str) -> list[str]:
    module_names = {name.split(".")[-1] for name in MODULES} | {"migrations"}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            found += [f"line {node.lineno}: {a.arg}" for a in every if a and a.arg in module_names]
    return found


# Public keywords that name a column of the table (``track(..., provider=...)``, ``list(provider=...)``).
COLUMN_KEYWORDS = {name: {"provider"} for name in ("feeding", "store", "testing", "ui")}


def test_no_parameter_shadows_a_module_of_the_package() -> None:
    shadows = {
        name: [
            found
            for found in _shadowing_parameters(path.read_text())
            if found.split(": ")[1] not in COLUMN_KEYWORDS.get(name, set())
        ]
        for name, path in MODULES.items()
    }
    assert {name: found for name, found in shadows.items() if found} == {}


def test_the_shadowing_check_finds_one() -> None:
    source = "def f(x: int, *, store: store.Store) -> None: ...\nasync def g(metrics): ..."
    assert _shadowing_parameters(source) == ["line 1: store", "line 2: metrics"]


def _members(protocol: type) -> set[str]:
    """The methods a Protocol asks for, those of the Protocols it extends included."""
    return {
        name
        for cls in protocol.__mro__
        if cls.__module__.startswith("seedance_archiver")
        for name, value in vars(cls).items()
        if not name.startswith("_") and callable(value)
    }


@pytest.mark.parametrize(
    ("protocol", "real", "fake"),
    [
        (store.TaskStore, store.Tasks, testing.FakeStore),
        (store.CallbackStore, store.Tasks, testing.FakeStore),
        (store.DaemonStore, store.SqlStore, testing.FakeStore),
        (store.OperatorStore, store.SqlStore, testing.FakeStore),
        (outbox.OutboxStore, outbox.Outbox, testing.FakeStore),
        (outbox.OutboxAdmin, outbox.Outbox, testing.FakeStore),
        (db.Reachable, db.Database, testing.FakeStore),
        (store.Store, store.SqlStore, testing.FakeStore),
        (provider.Provider, providers_http.HttpProvider, testing.FakeProvider),
        (providers_http.Dialect, reseller.Reseller, ark.Ark),
        (archive.Archive, s3.S3Archive, testing.FakeArchive),
        (archive.Archive, folder.FileArchive, testing.FakeArchive),
    ],
)
def test_real_and_fake_take_the_same_parameters_as_the_protocol(
    protocol: type, real: type, fake: type
) -> None:
    """mypy checks the types (testing._FAKES); this checks the names, so keywords work on both."""
    for name in _members(protocol):
        wanted = list(inspect.signature(getattr(protocol, name)).parameters)
        for implementation in (real, fake):
            got = list(inspect.signature(getattr(implementation, name)).parameters)
            assert got == wanted, f"{implementation.__name__}.{name}{got} vs {wanted}"


# Each consumer of the store and the Protocol its type hints name (the scheduler hands them out).
CONSUMERS: dict[str, type] = {
    "service": store.TaskStore,
    "maintenance": store.TaskStore,
    "callbacks": store.CallbackStore,
    "webhooks": outbox.OutboxStore,
    "web": db.Reachable,
    "scheduler": store.DaemonStore,
    "cli": store.OperatorStore,
    "demo": store.OperatorStore,
}


@pytest.mark.parametrize(("consumer", "protocol"), sorted(CONSUMERS.items()))
def test_each_consumer_calls_only_its_protocol(consumer: str, protocol: type) -> None:
    """Every store method a module calls is in the small Protocol it names."""
    called: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[consumer].read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name | ast.Attribute)
            and ast.unparse(node.value).split(".")[-1] in {"store", "task_store", "sql_store"}
        ):
            called.add(node.attr)
    called -= {name for name in vars(store) if not name.startswith("_")}  # the module's own names
    called -= {"from_url"}  # SqlStore's constructor
    assert called <= _members(protocol), called - _members(protocol)
    assert called or consumer == "scheduler", "found no call: is the store named otherwise?"


def test_modules_are_imported_not_names() -> None:
    """``from x import y`` names a module (``from aiohttp import web``), never a class or function,
    so a reader sees where each name comes from (``errors.StoreError``). Typing helpers, and
    type stubs imported for type checking only, excepted."""
    exempt = {"__future__", "typing", "collections.abc"}
    names = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module not in exempt:
                for alias in node.names:
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ModuleNotFoundError:
                        names.append(f"{name}.py: from {node.module} import {alias.name}")
    assert names == []


TESTS = pathlib.Path(__file__).resolve().parents[1]


def _findings(pattern: str, check: Callable[[str], list[str]]) -> dict[str, list[str]]:
    """What ``check`` finds in each file under tests/ whose name matches ``pattern``."""
    return {
        str(path.relative_to(TESTS)): found
        for path in sorted(TESTS.rglob(pattern))
        if (found := check(path.read_text()))
    }


def _imports_reaching(source: str, is_target: Callable[[str], bool]) -> list[str]:
    """The imports in ``source`` of a module under ``tests`` whose last dotted part ``is_target``
    holds for, in any form and at any depth."""

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                a.name for a in node.names if a.name.startswith("tests.") and is_target(a.name)
            ]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if node.level == 0 and not module.startswith("tests."):
                continue
            if is_target(module):
                found.append(module)
            found += [f"{module}.{a.name}" for a in node.names if is_target(a.name)]
    return found


def _test_module_imports(source: str) -> list[str]:
    """The imports in ``source`` that reach a test module (``tests.<dir>.test_*``)."""
    return _imports_reaching(source, lambda dotted: dotted.split(".")[-1].startswith("test_"))


def test_no_test_module_imports_another() -> None:
    """Shared pieces live in tests/helpers.py, fixtures in a conftest.py (STYLE.md, "Tests"): a test
    module imported by another runs its tests' module code twice and ties two behaviours together."""
    assert _findings("test_*.py", _test_module_imports) == {}


def test_the_test_import_check_finds_each_form() -> None:
    source = (
        "from tests.integration.test_daemon import wait_until\n"
        "import tests.acceptance.test_end_to_end\n"
        "from tests.integration import test_leases\n"
        "def f():\n    from .test_archive import video\n"
        "from tests.helpers import wait_until\nfrom tests.integration import faultproxy\n"
    )
    assert _test_module_imports(source) == [
        "tests.integration.test_daemon",
        "tests.acceptance.test_end_to_end",
        "tests.integration.test_leases",
        ".test_archive",
    ]


def _conftest_imports(source: str) -> list[str]:
    """The imports in ``source`` that reach a conftest module (``tests.conftest``,
    ``tests.acceptance.conftest``, ``from tests.acceptance import conftest``)."""
    return _imports_reaching(source, lambda dotted: dotted.split(".")[-1] == "conftest")


def test_shared_pieces_come_from_helpers_never_from_a_conftest() -> None:
    """A conftest.py is pytest's: it hands out fixtures by name. A function or constant two test
    modules share lives in tests/helpers.py (STYLE.md, "Tests"), so no module imports a conftest."""
    assert _findings("*.py", _conftest_imports) == {}


def _not_fixtures(source: str) -> list[str]:
    """The public top-level names of a conftest.py that are neither fixtures nor pytest hooks."""
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names = [node.name]
            decorators = [ast.unparse(d) for d in getattr(node, "decorator_list", [])]
            if any(d.startswith(("pytest.fixture", "fixture")) for d in decorators):
                continue
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        else:
            continue
        found += [n for n in names if not n.startswith(("_", "pytest_"))]
    return found


def test_a_conftest_holds_only_fixtures_and_hooks() -> None:
    assert _findings("conftest.py", _not_fixtures) == {}


def test_the_conftest_checks_find_each_form() -> None:
    source = (
        "from tests.conftest import SIM_KEY\n"
        "import tests.acceptance.conftest\n"
        "from tests.acceptance import conftest as acceptance\n"
        "def f():\n    from .conftest import base_env\n"
        "from tests.helpers import SIM_KEY\nfrom tests.integration import faultproxy\n"
    )
    assert _conftest_imports(source) == [
        "tests.conftest",
        "tests.acceptance.conftest",
        "tests.acceptance.conftest",
        ".conftest",
    ]
    source = (
        "import pytest\nSIM_KEY = 'k'\n_PRIVATE = 1\n"
        "@pytest.fixture\ndef sim() -> None: ...\n"
        "def free_port() -> int: ...\n"
        "def pytest_terminal_summary(terminalreporter) -> None: ...\n"
        "class Daemon: ...\n"
    )
    assert _not_fixtures(source) == ["SIM_KEY", "free_port", "Daemon"]
