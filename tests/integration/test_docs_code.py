"""Every code block of README.md and docs/pages/ is real: checked here, or marked as an example.

A block's language says how it is checked: ``sql`` runs on PostgreSQL and (but for LISTEN) SQLite,
each on a migrated database; ``sh`` holds only commands this checks (``make`` targets that exist,
``seedance-archiver`` and simulator command lines their parsers accept, ``export`` of settings the
daemon accepts, ``pip install .``); ``python`` compiles and its imports exist, and the feeding example
runs; ``json`` and ``yaml`` parse. ``text`` is a diagram or a transcript. Anything else, or a block
that cannot be checked, is marked ``title="example"`` in its fence. ``make docs`` builds the site
with MkDocs' warnings (a broken link, a missing anchor) as errors.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys

import psycopg
import pytest
import yaml
from seedance_archiver import cli, config, schema, simulator

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "pages").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)(.*)$")
CHECKED = {"sql", "sh", "python", "json", "yaml", "text"}


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    example: bool
    code: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.language})"


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        start = None
        for number, line in enumerate(lines, 1):
            match = FENCE.match(line)
            if match is None:
                continue
            if start is None:
                start, language, rest = number, match.group(1), match.group(2)
            else:
                code = "\n".join(lines[start : number - 1])
                example = 'title="example"' in rest
                name = str(page.relative_to(ROOT))
                found.append(Block(name, start, language, example, code))
                start = None
    return found


BLOCKS = blocks()


def of(language: str) -> list[Block]:
    return [b for b in BLOCKS if b.language == language and not b.example]


class TestEveryBlock:
    """Every block has a language, and one this checks unless it is marked an example."""

    def test_there_are_blocks(self) -> None:
        assert len(BLOCKS) > 20

    @pytest.mark.parametrize("block", BLOCKS, ids=str)
    def test_checked_or_an_example(self, block: Block) -> None:
        assert block.language, f"{block}: a fence without a language"
        assert block.example or block.language in CHECKED, f'{block}: mark it title="example"'


def _statements(code: str) -> list[str]:
    without_comments = "\n".join(line.split("--", 1)[0] for line in code.splitlines())
    return [s.strip() for s in without_comments.split(";") if s.strip()]


class TestSql:
    """Each SQL block runs, in order, on a migrated database of each kind."""

    @pytest.mark.parametrize("block", of("sql"), ids=str)
    def test_on_postgresql(self, block: Block, pg_url: str) -> None:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for statement in _statements(block.code):
                conn.execute(statement)

    @pytest.mark.parametrize("block", [b for b in of("sql") if "LISTEN" not in b.code], ids=str)
    def test_on_sqlite(self, block: Block, sqlite_url: str) -> None:
        with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:
            for statement in _statements(block.code):
                conn.execute(statement)


def _commands(code: str) -> list[list[str]]:
    """The block's commands, continuation lines joined, comments dropped, pipelines split."""
    joined = code.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, "|"]:
            if word == "|":
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, flags=re.M))


class TestShell:
    """Each shell block holds only commands that work as written."""

    @pytest.mark.parametrize("block", of("sh"), ids=str)
    def test_every_command(self, block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
        settings: dict[str, str] = {}
        for argv in _commands(block.code):
            program, args = pathlib.Path(argv[0]).name, argv[1:]
            if program == "make":
                assert set(args) <= _makefile_targets(), f"{block}: {argv}"
            elif program == "seedance-archiver":
                cli._parser().parse_args(args)  # SystemExit on anything it does not take
            elif program == "python" and args[:2] == ["-m", "seedance_archiver.simulator"]:
                simulator.parser().parse_args(args[2:])
            elif program == "export":
                for assignment in args:
                    name, _, value = assignment.partition("=")
                    assert name.startswith(("SEEDANCE_", "AWS_")), f"{block}: {name}"
                    settings[name] = value
            elif program == "pip" and args == ["install", "."]:
                assert (ROOT / "pyproject.toml").exists()
            elif program == "printf":
                pass  # the input of the command after it
            else:
                pytest.fail(f"{block}: {argv[0]!r} is not a command this checks: mark the block")
        for name in [n for n in os.environ if n.upper().startswith("SEEDANCE_")]:
            monkeypatch.delenv(name)
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        assert config.unknown_settings() == []
        config.load()  # every setting the block exports is one the daemon takes


class TestPython:
    """Each Python block compiles and imports only what exists; the feeding example runs."""

    @pytest.mark.parametrize("block", of("python"), ids=str)
    def test_compiles_and_imports_exist(self, block: Block) -> None:
        tree = ast.parse(block.code)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert importlib.util.find_spec(name.split(".")[0]) is not None, f"{block}: {name}"
        compile(block.code, str(block), "exec")

    def test_the_feeding_example_runs(self, tmp_path: pathlib.Path) -> None:
        [block] = [b for b in of("python") if "seedance_archiver.track" in b.code]
        schema.upgrade(f"sqlite:///{tmp_path}/seedance-archiver.db")
        result = subprocess.run(
            [sys.executable, "-c", block.code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        with sqlite3.connect(tmp_path / "seedance-archiver.db") as conn:
            rows = conn.execute("SELECT task_id, mode, provider FROM video_tasks").fetchall()
        assert sorted(rows) == [
            ("cgt-20250101123456-abcde", "standard", "ark"),
            ("video_abc123def456", "draft", None),
        ]


class TestData:
    """JSON and YAML blocks parse."""

    @pytest.mark.parametrize("block", of("json"), ids=str)
    def test_json(self, block: Block) -> None:
        json.loads(block.code)

    @pytest.mark.parametrize("block", of("yaml"), ids=str)
    def test_yaml(self, block: Block) -> None:
        assert yaml.safe_load(block.code)


def _build(docs: pathlib.Path) -> subprocess.CompletedProcess[str]:
    mkdocs = pathlib.Path(sys.executable).parent / "mkdocs"
    site = str(docs / "site")
    return subprocess.run(
        [str(mkdocs), "build", "--strict", "-f", str(docs / "mkdocs.yml"), "--site-dir", site],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
    )


class TestSite:
    """The site builds with warnings as errors, and a broken link is one (as `make docs`)."""

    def test_it_builds_and_a_broken_anchor_fails_it(self, tmp_path: pathlib.Path) -> None:
        docs = tmp_path / "docs"
        shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("site"))
        built = _build(docs)
        assert built.returncode == 0, built.stderr
        assert (docs / "site" / "runbook" / "index.html").exists()
        page = docs / "pages" / "trying.md"
        page.write_text(page.read_text() + "\nSee [the settings](settings.md#no-such-heading).\n")
        broken = _build(docs)
        assert broken.returncode != 0
        assert "no-such-heading" in broken.stdout + broken.stderr
