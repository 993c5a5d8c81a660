"""The page under ``/ui/``, in a real browser: Debian's chromium, headless, driven by its
chromedriver through selenium, against the installed daemon, the simulator and a folder archive.

One test per page: it loads the page, checks what a user looks for there, and (on a task's page)
plays the archived video, a real one (``sample.mp4``, made by the command in ``make-sample.sh``),
until the ``<video>`` element has data to show. A task whose failure reason holds a script, an
attribute breaker and control characters shows that text, and nothing of it runs. Each page's
screenshot is saved under ``.screenshots/`` (printed at the end of the run) for a person to look at.

``make ui-check`` installs chromium and chromium-driver (Debian's) when they are missing and runs
these tests (marked ``browser``); elsewhere they skip, naming what is missing, unless CI=true.
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import (
    IN_CI,
    Daemon,
    SqliteFeeder,
    base_env,
    cli,
    free_port,
    serving,
    wait_for,
)

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SAMPLE = pathlib.Path(__file__).with_name("sample.mp4")
SCREENSHOTS = pathlib.Path(__file__).resolve().parents[2] / ".screenshots"
TOKEN = "ui-token-for-browser-tests-0123"
ARCHIVED = "video_ui_archived_0001"
FAILED = "video_ui_hostile_0001"
WAITING = "video_ui_waiting_0001"
AT_RISK = "video_ui_at_risk_0001"
# What a provider might write into a task's error: a script, an attribute breaker that would add an
# event handler, and control characters (a bell, an escape, a right-to-left override).
HOSTILE = (
    "<script>window.__pwned = 1</script> "
    '"><img src=x onerror="window.__pwned = 2"> '
    "bell\x07 escape\x1b[31m rtl\u202e end"
)


def _need(path: str, package: str) -> None:
    if pathlib.Path(path).exists():
        return
    message = f"{path} is missing: install Debian's {package} package (make ui-check does)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless chromium, with the flags this closed network needs (no background connections)."""
    _need(CHROMIUM, "chromium")
    _need(CHROMEDRIVER, "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Site:
    """The daemon's HTTP port, with the tasks the pages show."""

    def __init__(self, port: int, feeder: SqliteFeeder) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.feeder = feeder

    def url(self, path: str) -> str:
        return self.base + path

    def row(self, task_id: str) -> dict[str, Any]:
        return self.feeder.rows()[task_id]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The installed daemon (SEEDANCE_UI_TOKEN set) on SQLite and a folder, against the simulator:
    a task archived with a real video, one failed for a hostile reason, one still generating, one
    at risk (created 23.5 h ago: half an hour before the reseller's day is over)."""
    tmp = tmp_path_factory.mktemp("ui")
    db = tmp / "tasks.db"
    port = free_port()
    with serving("reseller") as server:
        sim = server.simulator
        now = time.time()
        sim.add_task(ARCHIVED, queued_seconds=0.2, ready_seconds=0.5, content=SAMPLE.read_bytes())
        sim.add_task(FAILED, outcome="failed", queued_seconds=0.2, ready_seconds=0.5, error=HOSTILE)
        sim.add_task(WAITING, queued_seconds=0, ready_seconds=1e9)
        sim.add_task(AT_RISK, created=now - 23.5 * 3600, queued_seconds=0, ready_seconds=1e9)
        env = {
            **base_env(server.url, f"sqlite:///{db}", f"file://{tmp}/archive"),
            "SEEDANCE_HTTP_PORT": str(port),
            "SEEDANCE_UI_TOKEN": TOKEN,
            "SEEDANCE_POLL_STANDARD": "30-60",  # few polls: the rows hold still while looked at
        }
        cli(env, "migrate")
        feeder = SqliteFeeder(db)
        for task_id in (ARCHIVED, FAILED, WAITING, AT_RISK):
            feeder.insert(task_id)
        daemon = Daemon.start(env, tmp / "daemon.log")
        try:
            site = Site(port, feeder)
            wait_for(
                lambda: (
                    site.row(ARCHIVED)["state"] == "archived"
                    and site.row(FAILED)["state"] == "failed"
                    and site.row(AT_RISK)["expires_at"] is not None
                    and site.row(WAITING)["provider_status"] == "processing"
                ),
                timeout=60,
                what="the four tasks where the pages show them",
            )
            yield site
        finally:
            daemon.terminate()


def shot(browser: Any, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    print(f"screenshot: {SCREENSHOTS / name}.png")


def nothing_ran(browser: Any) -> None:
    assert browser.execute_script("return window.__pwned === undefined") is True
    assert browser.find_elements("css selector", "img[src='x']") == []


def by_id(browser: Any, element_id: str) -> Any:
    return browser.find_element("id", element_id)


class TestOverview:
    def test_counts_risk_failures_backlog_and_key(self, browser: Any, site: Site) -> None:
        browser.get(site.url("/ui/"))
        counts = by_id(browser, "counts").text
        assert "archived\n1" in counts and "failed\n1" in counts and "polling\n2" in counts
        at_risk = by_id(browser, "at-risk").text
        assert AT_RISK in at_risk and WAITING not in at_risk
        assert "in 2" in at_risk or "in 3" in at_risk  # about half an hour left, in minutes
        ended = by_id(browser, "ended").text
        assert FAILED in ended and "<script>window.__pwned = 1</script>" in ended
        assert "\\x07" in ended and "\\u202e" in ended  # control characters shown, not obeyed
        assert "waiting to be delivered" in by_id(browser, "webhooks").text
        assert by_id(browser, "api-key").text == "accepted"
        assert "2xx" in by_id(browser, "provider").text
        assert browser.find_element("css selector", "meta[http-equiv='refresh']")
        nothing_ran(browser)
        shot(browser, "overview")


class TestTasks:
    def test_filter_search_and_why_each_waits(self, browser: Any, site: Site) -> None:
        from selenium.webdriver.support.ui import Select

        browser.get(site.url("/ui/tasks"))
        rows = browser.find_elements("css selector", "tbody tr")
        assert len(rows) == 4
        table = browser.find_element("css selector", "table").text
        assert "the standard cadence" in table  # why the generating task waits
        shot(browser, "tasks")
        Select(by_id(browser, "filter-state")).select_by_value("failed")
        by_id(browser, "filters").submit()
        wait_for(lambda: "state=failed" in browser.current_url, timeout=10, what="the filter")
        rows = browser.find_elements("css selector", "tbody tr")
        assert [r.find_element("css selector", "code").text for r in rows] == [FAILED]
        nothing_ran(browser)
        by_id(browser, "search").clear()
        Select(by_id(browser, "filter-state")).select_by_value("")
        by_id(browser, "search").send_keys(WAITING)
        by_id(browser, "filters").submit()
        wait_for(lambda: "id=" in browser.current_url, timeout=10, what="the search")
        rows = browser.find_elements("css selector", "tbody tr")
        assert [r.find_element("css selector", "code").text for r in rows] == [WAITING]


class TestTask:
    def test_the_archived_video_plays_with_its_facts_and_timeline(
        self, browser: Any, site: Site
    ) -> None:
        browser.get(site.url(f"/ui/tasks/{ARCHIVED}"))
        page = browser.find_element("tag name", "main").text
        assert hashlib.sha256(SAMPLE.read_bytes()).hexdigest() in page
        assert f"{SAMPLE.stat().st_size:,} bytes" in page
        timeline = by_id(browser, "timeline").text
        assert "inserted" in timeline and "the video is safe" in timeline
        # The outbox writes the event with the move, whether webhooks are on or not.
        assert "webhook task.archived" in timeline
        ready = browser.execute_script(
            "const v = document.getElementById('archived'); v.muted = true; v.play();"
            "return v.readyState;"
        )
        assert ready is not None
        wait_for(
            lambda: (
                browser.execute_script("return document.getElementById('archived').readyState") >= 2
            ),
            timeout=20,
            what="the archived video to have data to show (readyState >= 2)",
        )
        assert browser.execute_script("return document.getElementById('archived').error") is None
        assert browser.execute_script("return document.getElementById('archived').duration") > 0
        # No provider link, signed, in the page.
        assert "sig=" not in browser.page_source and "expires=" not in browser.page_source
        shot(browser, "task")

    def test_a_hostile_reason_is_shown_and_nothing_runs(self, browser: Any, site: Site) -> None:
        browser.get(site.url(f"/ui/tasks/{urllib.parse.quote(FAILED)}"))
        page = browser.find_element("tag name", "main").text
        assert '"><img src=x onerror="window.__pwned = 2">' in page
        nothing_ran(browser)
        shot(browser, "task-failed")

    def test_retry_needs_the_token(self, browser: Any, site: Site) -> None:
        browser.get(site.url(f"/ui/tasks/{FAILED}"))
        by_id(browser, "retry").submit()  # no token typed
        wait_for(lambda: "refused" in browser.page_source, timeout=10, what="the refusal")
        assert site.row(FAILED)["state"] == "failed"
        browser.get(site.url(f"/ui/tasks/{FAILED}"))
        form = by_id(browser, "retry")
        form.find_element("name", "token").send_keys(TOKEN)
        form.submit()
        wait_for(lambda: "retried" in browser.page_source, timeout=10, what="the retry")
        assert "retried" in by_id(browser, "notice").text
        assert site.row(FAILED)["state"] == "polling"
        shot(browser, "task-retried")


class TestRedeliver:
    def test_a_webhook_event_is_sent_again_with_the_token(self, browser: Any, site: Site) -> None:
        browser.get(site.url(f"/ui/tasks/{ARCHIVED}"))
        (form,) = browser.find_elements("css selector", "form[id^='redeliver-']")
        event_id = form.get_attribute("id").removeprefix("redeliver-")
        form.find_element("name", "token").send_keys("not-" + TOKEN)
        form.submit()
        wait_for(lambda: "refused" in browser.page_source, timeout=10, what="the refusal")
        browser.get(site.url(f"/ui/tasks/{ARCHIVED}"))
        form = by_id(browser, f"redeliver-{event_id}")
        form.find_element("name", "token").send_keys(TOKEN)
        form.submit()
        wait_for(lambda: "sent again" in browser.page_source, timeout=10, what="the redelivery")
        assert (
            f"webhook #{event_id} (task.archived) will be sent again now"
            in by_id(browser, "notice").text
        )


class TestForgedActions:
    """Outside the browser: a POST without the page's CSRF value, or from another origin, is
    refused even with the token."""

    def test_no_csrf_value_no_action(self, site: Site) -> None:
        data = urllib.parse.urlencode({"token": TOKEN}).encode()
        request = urllib.request.Request(
            site.url(f"/ui/tasks/{WAITING}/retry"), data=data, method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403

    def test_another_origin_is_refused(self, site: Site) -> None:
        data = urllib.parse.urlencode({"token": TOKEN, "csrf": "c" * 32}).encode()
        request = urllib.request.Request(
            site.url(f"/ui/tasks/{WAITING}/retry"),
            data=data,
            method="POST",
            headers={"Origin": "https://evil.example", "Cookie": "seedance_ui_csrf=" + "c" * 32},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403

    def test_a_row_naming_a_file_elsewhere_gets_no_video(self, site: Site) -> None:
        """A row's archive_uri is anybody's text: only files in the daemon's archive folder play."""
        with sqlite3.connect(site.feeder.path, timeout=10) as conn:
            conn.execute(
                "UPDATE video_tasks SET archive_uri = 'file:///etc/passwd' WHERE task_id = ?",
                (AT_RISK,),
            )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(site.url(f"/ui/tasks/{AT_RISK}/video"), timeout=10)
        assert refused.value.code == 404
