"""Every command-line verb, with each of its flags, on an empty table and on a full one (SQLite).

Each exits as it should (0 unless it is asked about something that is not there, or a check fails)
with a sensible message and never a traceback. ``cli.main`` runs in-process, reading the settings
from the environment as the installed command does; the installed command itself, the daemon verbs
(``run``, ``try``, ``demo``) and what takes a real S3 server are in ``tests/acceptance``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import re
import sqlite3
from collections.abc import Iterator

import pytest
from seedance_archiver import cli

NOT_THERE = "video_not_there"


def _verbs() -> dict[str, argparse.ArgumentParser]:
    """The CLI's verbs and the parser of each."""
    (verbs,) = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return verbs.choices


@dataclasses.dataclass
class Ran:
    code: int
    out: str
    err: str


@dataclasses.dataclass
class Table:
    """A migrated SQLite file and the environment that points the commands at it."""

    path: pathlib.Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    def run(self, *argv: str, stdin: str = "") -> Ran:
        self.monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        self.capsys.readouterr()
        code = cli.main(list(argv))
        captured = self.capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    def sql(self, statement: str, *params: object) -> None:
        with sqlite3.connect(self.path) as conn:
            conn.execute(statement, params)


@pytest.fixture
def table(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Table]:
    for name in [n for n in os.environ if n.upper().startswith("SEEDANCE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SEEDANCE_DATABASE_URL", f"sqlite:///{tmp_path}/tasks.db")
    monkeypatch.setenv("SEEDANCE_ARCHIVE_URL", f"file://{tmp_path}/archive")
    monkeypatch.setenv("SEEDANCE_LOG_FORMAT", "json")
    made = Table(tmp_path / "tasks.db", monkeypatch, capsys)
    assert made.run("migrate").code == 0
    yield made


def fill(table: Table) -> None:
    """One row in every state, the finished ones moved there (so their webhook events exist)."""
    video = table.path.parent / "archive" / "video_archived.mp4"
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(b"\x00\x00\x00\x18ftypisom")
    for state in ("pending", "polling", "downloading"):
        table.sql("INSERT INTO video_tasks (task_id, state) VALUES (?, ?)", f"video_{state}", state)
    for state in ("archived", "failed", "cancelled", "expired", "rejected"):
        table.sql("INSERT INTO video_tasks (task_id) VALUES (?)", f"video_{state}")
        table.sql(
            "UPDATE video_tasks SET state = ?, error = ?, archive_uri = ? WHERE task_id = ?",
            state,
            None if state == "archived" else f"the reason it is {state}",
            video.as_uri() if state == "archived" else None,
            f"video_{state}",
        )


# (argv, exit code and what the output says on an empty table, the same on a full one)
EVERY_VERB: list[tuple[tuple[str, ...], int, str, int, str]] = [
    (("migrate",), 0, "latest schema", 0, "latest schema"),
    (("add", "video_new"), 0, "added: video_new", 0, "added: video_new"),
    (("add", "video_new", "--mode", "draft"), 0, "added: video_new", 0, "added: video_new"),
    (("add", "-"), 0, "added: video_from_stdin", 0, "added: video_from_stdin"),
    (("add",), 0, "added: video_from_stdin", 0, "added: video_from_stdin"),
    (("status",), 0, "total        0", 0, "total        8"),
    (("status", "--json"), 0, '"total": 0', 0, '"total": 8'),
    (("status", "--show-secrets"), 0, "total        0", 0, "total        8"),
    (("status", "video_polling"), 1, "no such task", 0, "the standard cadence"),
    (("status", "video_polling", "--json"), 1, "no such task", 0, '"why": "the standard'),
    (("status", "video_archived", "--follow"), 1, "no such task", 0, "archive_uri"),
    (("status", NOT_THERE, "--show-secrets"), 1, "no such task", 1, "no such task"),
    (("list",), 0, "no tasks match", 0, "video_rejected"),
    (("list", "--state", "failed"), 0, "no tasks match (state failed)", 0, "reason it is failed"),
    (("list", "--limit", "2"), 0, "no tasks match", 0, "the newest 2"),
    (("list", "--all"), 0, "no tasks match", 0, "video_pending"),
    (("list", "--json"), 0, "[]", 0, '"task_id": "video_pending"'),
    (("list", "--show-secrets"), 0, "no tasks match", 0, "video_pending"),
    (("list", "--state", "archived", "--watch"), 0, "no tasks match", 0, "video_archived.mp4"),
    (("retry", "video_failed"), 1, "no such task", 0, "polled again now"),
    (("retry", "video_archived", "--force"), 1, "no such task", 0, "polled again now"),
    (("retry", NOT_THERE), 1, "no such task", 1, "no such task"),
    (("url", "video_archived"), 1, "no such task", 0, "video_archived.mp4"),
    (("url", "video_archived", "--expires", "60"), 1, "no such task", 0, "video_archived.mp4"),
    (("url", NOT_THERE), 1, "no such task", 1, "no such task"),
    (("webhooks",), 0, "no webhook events match", 0, "task.rejected"),
    (("webhooks", "--failed"), 0, "no webhook events match (given up on)", 0, "(given up on)"),
    (("webhooks", "--limit", "1"), 0, "no webhook events match", 0, "task.rejected"),
    (("webhooks", "--json"), 0, "[]", 0, '"event": "task.archived"'),
    (("webhooks", "redeliver", "1"), 1, "no such webhook event", 0, "sent again now"),
    (("webhooks", "discard", "--before", "now"), 0, "0 undelivered", 0, "5 undelivered"),
    (("webhooks", "resume"), 0, "no webhook URL is paused", 0, "no webhook URL is paused"),
    (("webhooks", "resume", "https://hooks.example/x"), 1, "not paused", 1, "not paused"),
    (("config",), 0, "SEEDANCE_DATABASE_URL", 0, "SEEDANCE_DATABASE_URL"),
    (("config", "--json"), 0, '"SEEDANCE_POLL_DRAFT"', 0, '"SEEDANCE_POLL_DRAFT"'),
    (("check",), 1, "daemon: no daemon has ticked", 1, "daemon: no daemon has ticked"),
    (("--strict", "list"), 0, "no tasks match", 0, "video_pending"),
]


def _id(case: tuple[tuple[str, ...], int, str, int, str]) -> str:
    return " ".join(case[0])


class TestEveryVerb:
    """Each verb and flag: the right exit code, a sensible message, never a traceback."""

    @pytest.mark.parametrize(
        ("argv", "code", "says", "_code", "_says"), EVERY_VERB, ids=map(_id, EVERY_VERB)
    )
    def test_on_an_empty_table(
        self, table: Table, argv: tuple[str, ...], code: int, says: str, _code: int, _says: str
    ) -> None:
        ran = table.run(*argv, stdin="video_from_stdin\n")
        assert ran.code == code, (ran.out, ran.err)
        assert says in ran.out + ran.err, (ran.out, ran.err)
        assert "Traceback" not in ran.out + ran.err

    @pytest.mark.parametrize(
        ("argv", "_code", "_says", "code", "says"), EVERY_VERB, ids=map(_id, EVERY_VERB)
    )
    def test_on_a_full_table(
        self, table: Table, argv: tuple[str, ...], _code: int, _says: str, code: int, says: str
    ) -> None:
        fill(table)
        ran = table.run(*argv, stdin="video_from_stdin\n")
        assert ran.code == code, (ran.out, ran.err)
        assert says in ran.out + ran.err, (ran.out, ran.err)
        assert "Traceback" not in ran.out + ran.err

    def test_every_verb_and_flag_is_in_the_table(self) -> None:
        """A verb or flag added later gets a row here, or this fails."""
        words = {word for argv, *_ in EVERY_VERB for word in argv}
        verbs = _verbs()
        for name, sub in verbs.items():
            if name in ("run", "demo", "try"):  # the daemons: tests/acceptance
                continue
            assert name in words, name
            for action in sub._actions:
                for flag in action.option_strings:
                    if flag not in ("-h", "--help"):
                        assert flag in words, f"{name} {flag}"
            for action in sub._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for sub_name in action.choices:
                        assert sub_name in words, f"{name} {sub_name}"


class TestWhatACommandSays:
    """Commands say what they work on, what was probably meant, and where each setting came from."""

    def test_each_names_its_database(self, table: Table) -> None:
        for argv in (("list",), ("status",), ("add", "video_x"), ("webhooks",)):
            ran = table.run(*argv)
            first = ran.err.splitlines()[0]
            assert first.startswith("seedance-archiver: database sqlite:///"), argv
            assert str(table.path) in first

    def test_a_relative_sqlite_path_is_shown_absolute(
        self, table: Table, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("SEEDANCE_DATABASE_URL", "sqlite:///tasks.db")
        ran = table.run("list")
        assert f"sqlite:///tasks.db ({tmp_path}/tasks.db)" in ran.err

    def test_a_misspelt_setting_is_named_with_the_nearest(
        self, table: Table, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SEEDANCE_DATABSE_URL", "sqlite:////tmp/elsewhere.db")
        warned = table.run("list")
        assert warned.code == 0
        assert (
            "warning: SEEDANCE_DATABSE_URL is not a setting (did you mean SEEDANCE_DATABASE_URL?)"
            in warned.err
        )
        strict = table.run("--strict", "list")
        assert strict.code == 2 and "error: SEEDANCE_DATABSE_URL" in strict.err
        assert strict.out == ""

    def test_config_says_where_each_setting_came_from(
        self, table: Table, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
    ) -> None:
        key_file = tmp_path / "key"
        key_file.write_text("file-held-key-value\n")
        credentials = tmp_path / "credentials"
        credentials.mkdir()
        (credentials / "seedance-webhook-secret").write_text("whsec_Y3JlZGVudGlhbA==\n")
        monkeypatch.setenv("SEEDANCE_API_KEY_FILE", str(key_file))
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
        monkeypatch.setenv("SEEDANCE_POLL_DRAFT", "5-10")
        monkeypatch.setenv(
            "SEEDANCE_DATABASE_URL", f"sqlite:///{table.path}"
        )  # as the fixture, set
        ran = table.run("config", "--json")
        assert ran.code == 0
        shown = json.loads(ran.out)
        assert shown["SEEDANCE_POLL_DRAFT"] == {"value": "5-10", "source": "environment"}
        assert shown["SEEDANCE_POLL_FLEX"] == {"value": "60-120", "source": "default"}
        assert shown["SEEDANCE_API_KEY"] == {
            "value": "*****",
            "source": "file SEEDANCE_API_KEY_FILE",
        }
        assert shown["SEEDANCE_WEBHOOK_SECRET"]["source"] == (
            "systemd credential seedance-webhook-secret"
        )
        assert "file-held-key-value" not in ran.out + ran.err
        assert "Y3JlZGVudGlhbA" not in ran.out + ran.err

    def test_config_never_shows_a_password(
        self, table: Table, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SEEDANCE_DATABASE_URL", "postgresql://feeder:pa55word@127.0.0.1/v")
        monkeypatch.setenv("SEEDANCE_API_KEY", "sk-this-is-the-key")
        ran = table.run("config")
        assert ran.code == 0
        assert "pa55word" not in ran.out + ran.err and "sk-this-is-the-key" not in ran.out
        assert "postgresql://feeder:***@127.0.0.1/v" in ran.out


class TestOnlyTheDatabase:
    """A bad daemon setting never blocks the commands that only read or write rows."""

    def test_list_and_status_work_and_say_so(
        self, table: Table, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        fill(table)
        monkeypatch.setenv("SEEDANCE_POLL_DRAFT", "fast")
        listed = table.run("list")
        assert listed.code == 0 and "video_polling" in listed.out
        assert "SEEDANCE_POLL_DRAFT" in listed.err and "defaults" in listed.err
        assert table.run("status").code == 0
        assert table.run("add", "video_more").code == 0
        assert table.run("retry", "video_failed").code == 0

    def test_the_daemon_and_check_refuse_it_naming_it(
        self, table: Table, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SEEDANCE_POLL_DRAFT", "fast")
        monkeypatch.setenv("SEEDANCE_API_KEY", "k")
        ran = table.run("run")
        assert ran.code == 2 and "SEEDANCE_POLL_DRAFT" in ran.err
        checked = table.run("check")
        assert checked.code == 1 and "settings: invalid setting SEEDANCE_POLL_DRAFT" in checked.out


class TestListing:
    """list: newest first, 50 by default, --limit and --all."""

    def test_newest_first_and_limited(self, table: Table) -> None:
        for n in range(60):
            table.sql(
                "INSERT INTO video_tasks (task_id, inserted_at) VALUES (?, ?)",
                f"video_{n:02}",
                f"2026-12-01 00:{n:02}:00.000000",
            )
        ran = table.run("list", "--json")
        ids = [row["task_id"] for row in json.loads(ran.out)]
        assert ids == [f"video_{n:02}" for n in range(59, 9, -1)]
        text = table.run("list").out
        assert "the newest 50" in text
        assert len(json.loads(table.run("list", "--json", "--limit", "3").out)) == 3
        assert len(json.loads(table.run("list", "--json", "--all").out)) == 60
        assert table.run("list", "--limit", "0").code == 2

    def test_each_active_row_says_when_and_why(self, table: Table) -> None:
        table.sql(
            "INSERT INTO video_tasks (task_id, state, polls, attempts, error, next_attempt_at) "
            "VALUES ('video_backing_off', 'polling', 3, 2, 'the provider answered HTTP 502', "
            "'2999-01-01 00:00:00.000000')"
        )
        line = next(x for x in table.run("list").out.splitlines() if "video_backing_off" in x)
        assert "back-off after 2 failures in a row: the provider answered HTTP 502" in line
        assert re.search(r"  in \d+d  ", line)  # the next poll column
        detail = json.loads(table.run("status", "video_backing_off", "--json").out)
        assert detail["why"].startswith("back-off after 2 failures")


class TestTerminalSafety:
    """What a provider answered or a feeder inserted reaches the terminal as visible escapes."""

    ERROR = "moderation\x1b[2J\rfake: archived\u202eexe.4pm"

    def test_status_list_and_webhooks_escape_controls(self, table: Table) -> None:
        task_id = "video_\x1b[31mred"
        table.sql("INSERT INTO video_tasks (task_id) VALUES (?)", task_id)
        table.sql(
            "UPDATE video_tasks SET state = 'failed', error = ?, model = ? WHERE task_id = ?",
            self.ERROR,
            "café 日本",
            task_id,
        )
        shown = [
            table.run("list").out,
            table.run("list", "--state", "failed").out,
            table.run("status", task_id).out,
            table.run("webhooks").out,
        ]
        for out in shown:
            assert not any(ch in out for ch in ("\x1b", "\r", "\u202e")), repr(out)
            assert "video_\\x1b[31mred" in out, out
        for out in shown[:3]:
            assert "moderation\\x1b[2J\\rfake: archived\\u202eexe.4pm" in out, out
        assert "café 日本" in shown[2]  # ordinary non-ASCII is kept as it is
        data = json.loads(table.run("status", task_id, "--json").out)
        assert data["error"] == self.ERROR  # scripts get the exact text, JSON-escaped


class TestFeedingFromTheCommandLine:
    """add takes ids as arguments or one per line on standard input."""

    def test_ids_from_standard_input(self, table: Table) -> None:
        ran = table.run("add", "--mode", "flex", stdin="video_a\n\n# a comment\nvideo_b\nvideo_a\n")
        assert ran.code == 0
        assert ran.out.splitlines() == [
            "seedance-archiver: added: video_a",
            "seedance-archiver: added: video_b",
            "seedance-archiver: already tracked: video_a",
        ]
        rows = json.loads(table.run("list", "--json").out)
        assert {(r["task_id"], r["mode"]) for r in rows} == {
            ("video_a", "flex"),
            ("video_b", "flex"),
        }

    def test_a_bad_id_among_good_ones(self, table: Table) -> None:
        ran = table.run("add", "video_good", "../etc/passwd", "video_also_good")
        assert ran.code == 2 and "invalid task id" in ran.err
        assert {r["task_id"] for r in json.loads(table.run("list", "--json").out)} == {
            "video_good",
            "video_also_good",
        }


class TestDiscardingTheBacklog:
    """webhooks discard --before: a backlog from before webhooks were on is not sent, and does
    not count as given up (no alert)."""

    def test_old_events_are_discarded_new_ones_kept(self, table: Table) -> None:
        fill(table)
        table.sql(
            "UPDATE webhook_outbox SET created_at = '2026-01-01 00:00:00.000000' WHERE id <= 2"
        )
        ran = table.run("webhooks", "discard", "--before", "2026-06-01T00:00:00Z")
        assert ran.code == 0 and "2 undelivered webhook event(s)" in ran.out
        events = json.loads(table.run("webhooks", "--json").out)
        states = {e["id"]: (e["state"], e["last_error"]) for e in events}
        assert states[1][0] == states[2][0] == "disabled"
        assert "discarded by an operator" in (states[1][1] or "")
        assert {s for i, (s, _) in states.items() if i > 2} == {"pending"}
        summary = json.loads(table.run("status", "--json").out)
        assert summary["webhooks"]["given_up"] == 0
        assert summary["webhooks"]["backlog"] == len(events) - 2
        assert table.run("webhooks", "redeliver", "1").code == 0


class TestPausedWebhooks:
    """webhooks lists the URLs a 410 Gone paused (their secrets redacted); resume takes the URL
    as stored or as listed."""

    URL = "https://hooks.example/in?token=s3cr3t-hook-token"

    def test_listed_redacted_resumed_by_the_listed_form(self, table: Table) -> None:
        fill(table)
        table.sql(
            "INSERT INTO webhook_endpoints (url, paused_at, reason) VALUES (?, ?, ?)",
            self.URL,
            "2026-12-01 10:00:00.000000",
            "the receiver answered 410 Gone",
        )
        listed = table.run("webhooks").out
        assert "PAUSED since 2026-12-01T10:00:00+00:00: https://hooks.example/in?<redacted>" in (
            listed
        )
        assert "s3cr3t" not in listed and "task.rejected" in listed
        status = table.run("status")
        assert "webhooks PAUSED: 1 URL(s)" in status.out
        assert json.loads(table.run("status", "--json").out)["webhooks"]["paused_endpoints"] == 1
        ran = table.run("webhooks", "resume", "https://hooks.example/in?<redacted>")
        assert ran.code == 0 and "resumed" in ran.out and "s3cr3t" not in ran.out
        assert "PAUSED" not in table.run("webhooks").out
        assert table.run("webhooks", "resume", self.URL).code == 1  # not paused any more


class TestCheck:
    """check validates the settings and writes to the archive, as /readyz does."""

    def test_an_archive_that_cannot_be_written_fails_the_check(
        self, table: Table, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SEEDANCE_ARCHIVE_URL", "file:///dev/null/archive")
        ran = table.run("check")
        assert ran.code == 1
        assert ran.out.splitlines()[:3] == ["settings: ok", "database: ok", ran.out.splitlines()[2]]
        assert ran.out.splitlines()[2].startswith("archive: archive folder")
        assert "daemon:" not in ran.out


class TestHelp:
    """Each verb's --help says which settings it reads."""

    def test_every_verb_names_what_it_reads(self, capsys: pytest.CaptureFixture[str]) -> None:
        verbs = _verbs()
        for name, sub in verbs.items():
            text = sub.format_help()
            assert "Reads" in text and "SEEDANCE_" in text, name
        with pytest.raises(SystemExit) as caught:
            cli.main(["--version"])
        assert caught.value.code == 0
        assert capsys.readouterr().out.startswith("seedance-archiver 0.")
