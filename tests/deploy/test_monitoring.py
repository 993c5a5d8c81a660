"""deploy/prometheus/alerts.yaml and deploy/grafana/seedance-archiver.json, against the daemon they watch.

- Every metric the rules, their promtool tests and the dashboard name is one the daemon exports, as
  read from a real ``Metrics()`` registry: neither file can drift from the code.
- Every alert has a summary, a description and a runbook entry that exists as a heading of
  docs/pages/runbook.md, and
  promtool tests it fired and not fired.
- promtool checks the rules, runs their tests and parses every dashboard query; a real Prometheus
  (Debian's) scrapes a real ``seedance-archiver run`` and fires two of the shipped alerts.

The tests marked ``prometheus`` need promtool and prometheus (Debian's prometheus package, which
``make prometheus-check`` installs); where either is missing they skip and name it, and with CI=true
they fail instead.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import pathlib
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from seedance_archiver import config, metrics, policy, simulator, store, utils

from tests.helpers import Daemon, base_env, free_port, need_tool, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/alerts.yaml"
RULE_TESTS = ROOT / "deploy/prometheus/alerts.test.yaml"
DASHBOARD = ROOT / "deploy/grafana/seedance-archiver.json"
RUNBOOK = ROOT / "docs/pages/runbook.md"
OPERATIONS = ROOT / "docs/pages/operations.md"
# Where the runbook is read on the web: runbook links point at its headings.
RUNBOOK_URL = (
    "https://github.com/seedance-archiver/seedance-archiver/blob/main/docs/pages/runbook.md"
)
# The scrape job the operations page tells operators to define, and absent() and up select.
JOB = "seedance-archiver"
# Series Prometheus writes itself for every target; everything else must come from the daemon.
PROMETHEUS_SERIES = {"up"}
SEVERITIES = {"critical", "warning"}
TOOL_HINT = "Debian's prometheus package: `make prometheus-check` installs it as root"


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


# --- metric names in PromQL ---------------------------------------------------------------------

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
    "group_left",
    "group_right",
}
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana query with $variables) selects.

    Strings, label matchers, range and subquery brackets, Grafana variables and grouping label
    lists are dropped first; what is left that is a name and not a call or a keyword is a metric.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\$\{\w+(?::\w+)?\}|\$\w+", "", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(_GROUPING, "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.groups()
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


# prometheus_client's exposition: the samples each metric type writes, after the family's name.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def exported_names() -> set[str]:
    """Every series name the daemon's registry can write, labelled children or not."""
    names: set[str] = set()
    for family in metrics.Metrics().registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def _template_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of each template variable that queries Prometheus (label_values(...))."""
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") != "query" or not isinstance(query, str):
            continue
        match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        yield f"variable {variable['name']}", match.group(1) if match else query


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every query the dashboard runs: panel targets and template variables."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "title" in node and "type" in node:
                where = f"panel {node['title']!r}"
            if isinstance(node.get("expr"), str):
                found.append((where, node["expr"]))
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    walk(dashboard.get("panels", []), "panels")
    return found + list(_template_queries(dashboard))


def _test_series() -> list[tuple[str, str]]:
    """(where, series name) of every input series in the promtool tests."""
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    return [
        (f"promtool test {number}", series["series"].split("{")[0].strip())
        for number, test in enumerate(tests)
        for series in test["input_series"]
    ]


def unknown_metrics(queries: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """{where: names} of the names in ``queries`` that neither the daemon nor Prometheus writes."""
    known = exported_names() | PROMETHEUS_SERIES
    unknown: dict[str, set[str]] = collections.defaultdict(set)
    for where, expr in queries:
        unknown[where] |= metric_names(expr) - known
    return {where: names for where, names in unknown.items() if names}


class TestMetricNames:
    """Every metric the rules, their tests and the dashboard use is one the daemon exports."""

    def test_the_name_reader_finds_metrics_and_nothing_else(self) -> None:
        """Calls, keywords, labels, strings, durations and Grafana variables are not metrics."""
        expr = (
            'sum by (job, le) (rate(seedance_a_bucket{reason=~"x|y", i="$instance"}[$__rate_interval]))'
            " / on (job) group_left max(seedance_b) > 0.5 and bool absent(up{job='j'} offset 1h)"
            " or histogram_quantile(0.99, seedance_c[5m:1m]) unless time() - 1e3"
        )
        assert metric_names(expr) == {"seedance_a_bucket", "seedance_b", "up", "seedance_c"}

    def test_exported_names_follow_the_clients_sample_names(self) -> None:
        """The suffix rule matches what prometheus_client really writes for each metric type."""
        written = {s.name for f in metrics.Metrics().registry.collect() for s in f.samples}
        assert written and written <= exported_names()

    def test_alert_rules_use_only_exported_metrics(self) -> None:
        queries = [(f"alert {r['alert']}", r["expr"]) for r in _rules()]
        assert queries and unknown_metrics(queries) == {}

    def test_rule_tests_feed_only_exported_metrics(self) -> None:
        """promtool's synthetic series are series the daemon really writes."""
        series = _test_series()
        assert series and unknown_metrics(series) == {}

    def test_dashboard_uses_only_exported_metrics(self) -> None:
        queries = dashboard_queries(_dashboard())
        panels = _dashboard()["panels"]
        assert len(queries) > len(panels)
        assert unknown_metrics(queries) == {}

    def test_a_misspelt_metric_is_caught(self) -> None:
        """The check has teeth: one renamed metric in the dashboard is reported where it is."""
        text = DASHBOARD.read_text().replace("seedance_tasks_at_risk", "seedance_task_at_risk")
        unknown = unknown_metrics(dashboard_queries(json.loads(text)))
        assert unknown and set().union(*unknown.values()) == {"seedance_task_at_risk"}
        assert "panel 'Tasks at risk'" in unknown


# --- the alert rules ------------------------------------------------------------------------------


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings (fenced code skipped, repeats numbered)."""
    anchors: set[str] = set()
    seen: collections.Counter[str] = collections.Counter()
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


class TestAlertRules:
    """Each alert says what it means, links a runbook entry that exists, and is unit-tested."""

    def test_the_required_alerts_exist(self) -> None:
        """The alerts an operator needs to save videos in time, found by the metric each one watches."""
        watched = {name for rule in _rules() for name in metric_names(rule["expr"])}
        assert {
            "seedance_tasks_at_risk",
            "seedance_last_tick_timestamp_seconds",
            "seedance_api_key_rejected",
            "seedance_tasks_expired_total",
            "seedance_download_failures_total",
            "seedance_provider_responses_total",
            "seedance_request_rate_limit",
        } <= watched
        assert any(rule["expr"].startswith("absent(") for rule in _rules())

    def test_every_alert_has_a_summary_description_severity_and_runbook(self) -> None:
        for rule in _rules():
            assert re.fullmatch(r"Seedance[A-Za-z]+", rule["alert"]), rule
            assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
            annotations = rule["annotations"]
            assert set(annotations) == {"summary", "description", "runbook_url"}, rule["alert"]
            assert annotations["summary"] and annotations["description"], rule["alert"]

    def test_every_runbook_url_is_a_runbook_heading(self) -> None:
        """Each alert links its own entry; the dashboard's links point at headings too."""
        anchors = heading_anchors(RUNBOOK.read_text())
        urls = [rule["annotations"]["runbook_url"] for rule in _rules()]
        urls += [link["url"] for link in _dashboard().get("links", []) if "runbook" in link["url"]]
        for url in urls:
            base, _, anchor = url.partition("#")
            assert base == RUNBOOK_URL, url
            assert anchor in anchors, f"{url}: no runbook heading has the anchor {anchor!r}"
        runbooks = [rule["annotations"]["runbook_url"] for rule in _rules()]
        assert len(set(runbooks)) == len(runbooks), "two alerts share a runbook entry"

    def test_every_alert_is_tested_fired_and_not_fired(self) -> None:
        """alerts.test.yaml has, for each alert, a case where it fires and one where it does not."""
        cases = [
            c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]
        ]
        for rule in _rules():
            mine = [c for c in cases if c["alertname"] == rule["alert"]]
            assert any(c["exp_alerts"] for c in mine), f"{rule['alert']} is never seen firing"
            assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']} is never seen quiet"

    def test_the_job_name_the_rules_select_is_the_documented_one(self) -> None:
        """absent() and up need the scrape job's name; the operations page tells which."""
        selected = {j for rule in _rules() for j in re.findall(r'job="([^"]+)"', rule["expr"])}
        assert selected == {JOB}
        assert f"job_name: {JOB}" in OPERATIONS.read_text()


# --- the dashboard --------------------------------------------------------------------------------


class TestDashboard:
    """deploy/grafana/seedance-archiver.json: importable anywhere, and shows what operators need."""

    def test_datasource_is_a_template_variable(self) -> None:
        """Every panel and query uses ${datasource}, a Prometheus datasource variable."""
        dashboard = _dashboard()
        assert dashboard["schemaVersion"] == 39
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        wanted = {"type": "prometheus", "uid": "${datasource}"}
        for panel in dashboard["panels"]:
            assert panel["datasource"] == wanted, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == wanted, panel["title"]
        assert "__inputs" not in dashboard  # provisioning does not fill them in

    def test_panels_are_laid_out_once_each(self) -> None:
        """Unique ids and titles; no two panels overlap on the 24-column grid."""
        panels = _dashboard()["panels"]
        assert len({p["id"] for p in panels}) == len(panels)
        assert len({p["title"] for p in panels}) == len(panels)
        cells: set[tuple[int, int]] = set()
        for panel in panels:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            mine = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not cells & mine, f"{panel['title']} overlaps another panel"
            cells |= mine

    def test_it_shows_what_issue_15_asks_for(self) -> None:
        """Tasks by state, at risk, polls and answers by class, latency, throughput, the rate limit."""
        shown = {n for _, expr in dashboard_queries(_dashboard()) for n in metric_names(expr)}
        assert {
            "seedance_tasks",
            "seedance_tasks_at_risk",
            "seedance_polls_total",
            "seedance_provider_responses_total",
            "seedance_completion_to_archive_seconds_bucket",
            "seedance_archived_bytes_total",
            "seedance_request_rate_limit",
        } <= shown
        by_title = {p["title"]: p for p in _dashboard()["panels"]}
        assert "by (state)" in by_title["Tasks by state"]["targets"][0]["expr"]
        assert "by (outcome)" in by_title["Polls by outcome"]["targets"][0]["expr"]
        assert "by (code_class)" in by_title["Provider answers by class"]["targets"][0]["expr"]


# --- promtool -------------------------------------------------------------------------------------


def _promtool() -> str:
    return need_tool(shutil.which("promtool"), "promtool", TOOL_HINT)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


# Grafana's variables, as Prometheus would see them once Grafana has filled them in.
GRAFANA_VALUES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "6h",
    "$instance": ".*",
}


@pytest.mark.prometheus
class TestPromtool:
    """promtool, Prometheus's own checker, on the shipped rules, their tests and the dashboard."""

    def test_check_rules_is_clean(self) -> None:
        result = _run([_promtool(), "check", "rules", str(RULES)])
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(_rules())} rules found" in result.stdout

    def test_rule_unit_tests_pass(self) -> None:
        result = _run([_promtool(), "test", "rules", str(RULE_TESTS)])
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout

    def test_rule_unit_tests_catch_a_broken_rule(self, tmp_path: pathlib.Path) -> None:
        """The tests have teeth: at-risk alerting after 1 minute instead of 5 fails them."""
        (tmp_path / RULES.name).write_text(RULES.read_text().replace("for: 5m", "for: 1m", 1))
        shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
        result = _run([_promtool(), "test", "rules", str(tmp_path / RULE_TESTS.name)])
        assert result.returncode != 0
        assert "alertname: SeedanceTasksAtRisk" in result.stdout + result.stderr

    def test_every_dashboard_query_parses(self, tmp_path: pathlib.Path) -> None:
        """Each query, with Grafana's variables filled in, is valid PromQL (as a recording rule)."""
        rules = []
        for number, (_, expr) in enumerate(dashboard_queries(_dashboard())):
            for variable in sorted(GRAFANA_VALUES, key=len, reverse=True):
                expr = expr.replace(variable, GRAFANA_VALUES[variable])
            assert "$" not in expr, expr
            rules.append({"record": f"dashboard:query_{number}", "expr": expr})
        path = tmp_path / "dashboard-queries.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        result = _run([_promtool(), "check", "rules", str(path)])
        assert result.returncode == 0, result.stdout + result.stderr


# --- a real Prometheus scraping a real daemon ----------------------------------------------------

FAST_FOR = "1s"
AT_RISK_TASKS = 3
ALERTS_EXPECTED = {"SeedanceApiKeyRejected", "SeedanceTasksAtRisk"}


def _fast_rules() -> str:
    """The shipped rules with every ``for:`` cut to FAST_FOR, so a test sees them fire in seconds.

    Nothing else changes: expressions, labels and annotations are the shipped ones. Their real
    durations (minutes) are what promtool's tests check.
    """
    fast = yaml.safe_load(RULES.read_text())
    for group in fast["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FAST_FOR
    return str(yaml.safe_dump(fast, sort_keys=False))


def _loopback_get(url: str) -> Any:
    """GET a loopback URL as JSON (no proxy from the environment), or None while it cannot answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
        return None


def _stop(process: Daemon) -> int:
    """SIGTERM, then SIGKILL after 30 s; the exit code."""
    try:
        return process.terminate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.process.wait()


def _prometheus_config(tmp_path: pathlib.Path, daemon_port: int) -> str:
    """Scrape one daemon each second under the job name the rules expect; evaluate each second."""
    prometheus_yml = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "alerts.yaml")],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{daemon_port}"]}]}
        ],
    }
    return str(yaml.safe_dump(prometheus_yml))


@pytest.mark.prometheus
class TestRealScrape:
    """Debian's Prometheus scrapes ``seedance-archiver run`` on loopback and fires the shipped alerts."""

    def test_a_wrong_key_and_tasks_at_risk_fire_their_alerts(
        self, tmp_path: pathlib.Path, sqlite_url: str, sim: simulator.SimulatorThread
    ) -> None:
        """The key is replaced by a wrong one while tasks near their deadline: both alerts fire.

        A daemon with the right key polls three tasks the provider created 23.5 hours ago, learning
        their deadline from ``created``; it stops, and one with a wrong key starts on the same
        table. Prometheus loads the shipped rules with ``for:`` cut to 1s (see _fast_rules) and is
        read through its own HTTP API.
        """
        prometheus = need_tool(shutil.which("prometheus"), "prometheus", TOOL_HINT)
        retention = dt.timedelta(seconds=config.Settings.model_fields["retention_seconds"].default)
        created = int(time.time() - retention.total_seconds() + 1800)  # deleted in 30 minutes
        ids = [f"video_atrisk{n:06d}" for n in range(AT_RISK_TASKS)]
        for task_id in ids:
            sim.simulator.add_task(
                task_id, created=created, ready_seconds=retention.total_seconds()
            )
        feeder = sa.create_engine(sqlite_url)
        with feeder.begin() as conn:
            for task_id in ids:
                conn.execute(
                    sa.text("INSERT INTO video_tasks (task_id) VALUES (:id)"), {"id": task_id}
                )
        feeder.dispose()

        daemon_port, prometheus_port = free_port(), free_port()
        (tmp_path / "alerts.yaml").write_text(_fast_rules())
        (tmp_path / "prometheus.yml").write_text(_prometheus_config(tmp_path, daemon_port))
        server = Daemon.start(
            None,
            tmp_path / "prometheus.log",
            argv=[
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
        )
        env = base_env(sim.url, sqlite_url, (tmp_path / "archive").as_uri())
        sql_store = store.SqlStore.from_url(sqlite_url)
        daemons: list[Daemon] = []
        try:
            daemons.append(Daemon.start(env, tmp_path / "right-key.log"))

            def deadlines() -> set[dt.datetime | None]:
                return {task.expires_at for task in sql_store.list()}

            wait_for(lambda: None not in deadlines(), timeout=20, what="the first polls")
            assert _stop(daemons[0]) == 0, daemons[0].log()[-3000:]
            rules = policy.Rules(cadences=config.Settings().cadences(), retention=retention)
            assert deadlines() == {
                policy.deadline(dt.datetime.fromtimestamp(created, dt.UTC), rules)
            }
            assert sql_store.summary(utils.utcnow()).at_risk == AT_RISK_TASKS

            env |= {"SEEDANCE_API_KEY": "sim-wrong-key", "SEEDANCE_HTTP_PORT": str(daemon_port)}
            daemons.append(Daemon.start(env, tmp_path / "wrong-key.log"))
            api = f"http://127.0.0.1:{prometheus_port}/api/v1/alerts"

            def firing() -> dict[str, dict[str, Any]]:
                alerts = (_loopback_get(api) or {}).get("data", {}).get("alerts", [])
                found = {a["labels"]["alertname"]: a for a in alerts if a["state"] == "firing"}
                return found if ALERTS_EXPECTED <= found.keys() else {}

            try:
                alerts = wait_for(firing, timeout=30, interval=0.25, what=f"{ALERTS_EXPECTED}")
            except AssertionError as exc:
                seen = _loopback_get(api)
                raise AssertionError(
                    f"{exc}; Prometheus has {seen}; the daemon logged:\n{daemons[1].log()[-3000:]}"
                ) from None
        finally:
            for process in [*daemons, server]:
                _stop(process)
            sql_store.close()
        assert isinstance(alerts, dict)
        shipped = {rule["alert"]: rule for rule in _rules()}
        key = alerts["SeedanceApiKeyRejected"]
        assert key["labels"]["instance"] == f"127.0.0.1:{daemon_port}"
        assert key["labels"]["job"] == JOB
        at_risk = alerts["SeedanceTasksAtRisk"]
        assert float(at_risk["value"]) == AT_RISK_TASKS
        assert at_risk["annotations"]["description"].endswith(f": {AT_RISK_TASKS}.")
        for name in ALERTS_EXPECTED:
            assert alerts[name]["labels"]["severity"] == shipped[name]["labels"]["severity"]
            runbook = shipped[name]["annotations"]["runbook_url"]
            assert alerts[name]["annotations"]["runbook_url"] == runbook
        assert "api_key_rejected" in daemons[1].log()
