"""The README documents every setting and every command: the docs cannot drift from the code."""

from __future__ import annotations

import argparse
import pathlib

from seedance_archiver import cli, config

README = (pathlib.Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


class TestReadme:
    """Every setting and command-line verb the code has appears in README.md."""

    def test_every_setting_is_documented(self) -> None:
        names = [f"{config.ENV_PREFIX}{field.upper()}" for field in config.Settings.model_fields]
        missing = [name for name in names if name not in README]
        assert missing == []

    def test_every_command_is_documented(self) -> None:
        parser = cli._parser()
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        verbs = list(subparsers.choices)
        assert {"run", "migrate", "add", "status", "list", "retry", "demo", "check"} <= set(verbs)
        missing = [verb for verb in verbs if f"`seedance-archiver {verb}" not in README]
        assert missing == []

    def test_the_quick_start_is_the_two_make_targets(self) -> None:
        quick_start = README.split("## Quick start", 1)[1].split("##", 1)[0]
        assert "make demo" in quick_start and "make test" in quick_start
