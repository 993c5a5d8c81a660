"""The docs name every setting, every command and every module: they cannot drift from the code."""

from __future__ import annotations

import argparse
import pathlib
import re

from seedance_archiver import cli, config, policy

ROOT = pathlib.Path(__file__).parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = ROOT / "docs" / "pages"
SETTINGS = (PAGES / "settings.md").read_text(encoding="utf-8")
COMMANDS = (PAGES / "commands.md").read_text(encoding="utf-8")
FEEDING = (PAGES / "feeding.md").read_text(encoding="utf-8")
DEVELOPMENT = (PAGES / "development.md").read_text(encoding="utf-8")
PACKAGE = ROOT / "daemon" / "seedance_archiver"


class TestReference:
    """Every setting and command-line verb the code has is in the docs' Settings and Commands."""

    def test_every_setting_is_documented(self) -> None:
        names = [f"{config.ENV_PREFIX}{field.upper()}" for field in config.Settings.model_fields]
        rows = [line for line in SETTINGS.splitlines() if line.startswith("| `SEEDANCE_")]
        missing = [name for name in names if not any(f"`{name}`" in row for row in rows)]
        assert missing == []

    def test_every_command_is_documented(self) -> None:
        parser = cli._parser()
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        verbs = list(subparsers.choices)
        assert {"run", "migrate", "add", "status", "list", "retry", "demo", "check"} <= set(verbs)
        missing = [verb for verb in verbs if f"`seedance-archiver {verb}" not in COMMANDS]
        assert missing == []

    def test_the_quick_start_is_the_two_make_targets(self) -> None:
        quick_start = README.split("## Quick start", 1)[1].split("##", 1)[0]
        assert "make demo" in quick_start and "make test" in quick_start


class TestStates:
    """The states table says when a task ends expired or rejected in the code's words."""

    TABLE = FEEDING.split("| `state` | meaning |", 1)[1].split("\n\n", 1)[0]

    def row(self, state: str) -> str:
        return next(line for line in self.TABLE.splitlines() if line.startswith(f"| `{state}` |"))

    def test_expired_gives_each_reason_the_code_writes(self) -> None:
        row = self.row("expired")
        for reason in (policy.GONE_REASON, policy.LINK_GONE_REASON, policy.GIVE_UP_REASON):
            assert f'"{reason}"' in row
        assert f"{policy.NOT_FOUND_POLLS} polls in a row" in row
        assert f"refused {policy.LINK_REFUSALS} times in a row" in row
        assert f"{policy.GIVE_UP_AFTER.days} days" in row

    def test_rejected_gives_each_reason_the_code_writes(self) -> None:
        row = self.row("rejected")
        for reason in (policy.NOT_FOUND_REASON, policy.FORBIDDEN_REASON):
            assert f'"{reason}"' in row
        assert policy.task_id_problem("../x") is not None
        assert '"invalid task id"' in row and (policy.task_id_problem("../x") or "").startswith(
            "invalid task id"
        )

    def test_waiting_on_a_setting_is_named(self) -> None:
        assert f"`{policy.WAITING_ON_SETTING}`" in self.row("downloading")


class TestModuleMap:
    """Development's module map names every module of the package, and only those."""

    MAP = DEVELOPMENT.split("## The module map", 1)[1].split("\n## ", 1)[0]

    def mapped(self) -> list[str]:
        return re.findall(r"^\| `([\w/]+\.py)` \|", self.MAP, flags=re.MULTILINE)

    def test_every_module_is_on_the_map(self) -> None:
        modules = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")}
        assert modules - set(self.mapped()) == set(), "add a line to docs/pages/development.md"

    def test_every_module_on_the_map_exists(self) -> None:
        assert [name for name in self.mapped() if not (PACKAGE / name).is_file()] == []

    def test_each_module_is_named_once(self) -> None:
        assert len(self.mapped()) == len(set(self.mapped()))

    def test_the_readme_leads_to_the_map(self) -> None:
        assert "(docs/pages/development.md)" in README and "module map" in README
