"""Webhook delivery without I/O: the retry schedule on a moved clock, signatures, the deliverer."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import pathlib
from collections.abc import Iterator

import pytest
import standardwebhooks
import structlog
from seedance_archiver import cli, config, errors, metrics, models, testing, webhooks

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
NOW = testing.EPOCH


def event(**changes: object) -> models.OutboxEvent:
    base = models.OutboxEvent(
        id=1,
        webhook_id="msg_0123",
        task_id="video_a",
        event="task.archived",
        payload=json.dumps({"task_id": "video_a", "state": "archived"}),
        created_at=NOW,
        next_attempt_at=NOW,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class TestSchedule:
    """The specification's schedule, jitter around it, Retry-After as a floor."""

    def test_each_failure_waits_the_next_delay_of_the_schedule(self) -> None:
        waits = [
            webhooks.next_attempt_at(n, NOW, webhooks.Answer(500), draw=testing.low_draw)
            for n in range(1, 10)
        ]
        seconds = [(w - NOW).total_seconds() for w in waits if w is not None]
        expected = [d * (1 - webhooks.JITTER_FRACTION) for d in webhooks.RETRY_SCHEDULE_SECONDS[1:]]
        assert seconds == pytest.approx(expected)

    def test_jitter_stays_within_its_fraction(self) -> None:
        high = webhooks.next_attempt_at(2, NOW, webhooks.Answer(500), draw=testing.high_draw)
        assert high == NOW + dt.timedelta(seconds=300 * (1 + webhooks.JITTER_FRACTION))

    def test_the_schedule_runs_out_after_ten_attempts(self) -> None:
        assert webhooks.next_attempt_at(10, NOW, webhooks.Answer(500)) is None
        tenth = webhooks.outcome(event(attempts=9), webhooks.Answer(500), NOW)
        assert tenth.state == models.Delivery.FAILED and tenth.attempts == 10

    @pytest.mark.parametrize("status", [429, 503])
    def test_retry_after_is_honoured_on_429_and_503(self, status: int) -> None:
        answer = webhooks.Answer(status, retry_after=120)
        at = webhooks.next_attempt_at(1, NOW, answer, draw=testing.low_draw)
        assert at == NOW + dt.timedelta(seconds=120)

    def test_retry_after_is_ignored_on_other_statuses(self) -> None:
        answer = webhooks.Answer(500, retry_after=120)
        at = webhooks.next_attempt_at(1, NOW, answer, draw=testing.low_draw)
        assert at == NOW + dt.timedelta(seconds=4.5)


class TestOutcome:
    """Only 2xx is delivered; 410 holds the event for its endpoint; anything else is retried."""

    @pytest.mark.parametrize("status", [200, 201, 204])
    def test_2xx_is_delivered(self, status: int) -> None:
        after = webhooks.outcome(event(), webhooks.Answer(status), NOW)
        assert (after.state, after.delivered_at, after.attempts) == ("delivered", NOW, 1)

    @pytest.mark.parametrize("status", [None, 301, 400, 404, 429, 500])
    def test_everything_else_is_retried(self, status: int | None) -> None:
        answer = webhooks.Answer(status, error="refused" if status is None else None)
        after = webhooks.outcome(event(), answer, NOW, draw=testing.low_draw)
        assert after.state == "pending" and after.next_attempt_at == NOW + dt.timedelta(seconds=4.5)
        assert after.last_error == ("refused" if status is None else f"HTTP {status}")

    def test_410_leaves_the_event_pending_and_due(self) -> None:
        """The endpoint is switched off, not the event: it waits, due, and the attempt does not
        count against the retry schedule."""
        after = webhooks.outcome(event(attempts=2), webhooks.Answer(410), NOW)
        assert (after.state, after.last_status, after.attempts) == ("pending", 410, 2)
        assert after.next_attempt_at == NOW
        assert "webhooks resume" in (after.last_error or "")


class TestSigning:
    """Receivers verify with the standardwebhooks library, with either secret during rotation."""

    def test_every_secret_verifies(self) -> None:
        signer = webhooks.Signer([SECRET, OLD_SECRET])
        body = webhooks.body(event())
        headers = signer.headers("msg_0123", dt.datetime.now(dt.UTC), body)
        for secret in (SECRET, OLD_SECRET):
            data = standardwebhooks.Webhook(secret).verify(body, headers)
            assert data["type"] == "task.archived" and data["data"]["task_id"] == "video_a"

    def test_a_bad_secret_is_a_config_error(self) -> None:
        with pytest.raises(errors.ConfigError):
            webhooks.Signer(["whsec_not base64!"])

    def test_private_hosts_are_refused_unless_allowed(self) -> None:
        with pytest.raises(errors.ConfigError, match="ALLOW_PRIVATE_WEBHOOK_HOSTS"):
            webhooks.check_url("http://127.0.0.1:9/hook", allow_private_hosts=False)
        webhooks.check_url("http://127.0.0.1:9/hook", allow_private_hosts=True)
        webhooks.check_url("https://hooks.example.com/x", allow_private_hosts=False)
        with pytest.raises(errors.ConfigError):
            webhooks.check_url("ftp://hooks.example.com/x", allow_private_hosts=False)


class ScriptedSender:
    """Answers from a script; records what it was sent."""

    def __init__(self, *answers: webhooks.Answer) -> None:
        self.answers = list(answers)
        self.sent: list[dict[str, str]] = []

    async def post(self, url: str, headers: dict[str, str], payload: str) -> webhooks.Answer:
        self.sent.append(headers)
        return self.answers.pop(0)

    async def aclose(self) -> None:
        pass


class TestDeliverer:
    """The deliverer against the fake store: claims, records, retries under the same id."""

    async def test_a_failure_is_retried_later_under_the_same_id(self) -> None:
        clock = testing.MovableClock()
        fake = testing.FakeStore(clock=clock)
        fake.add("video_a")
        [task] = fake.claim_due("o", clock(), 60, 1)
        fake.save([task.replace(state="archived")], "o")
        sender = ScriptedSender(webhooks.Answer(500), webhooks.Answer(204))
        deliverer = webhooks.Deliverer(
            fake,
            "https://hooks.example.com/x",
            webhooks.Signer([SECRET]),
            sender,
            owner="o",
            clock=clock,
            draw=testing.low_draw,
            executor=testing.InlineExecutor(),
        )
        assert await deliverer.deliver_due() == 1
        assert await deliverer.deliver_due() == 0  # not due yet
        clock.advance(5)
        assert await deliverer.deliver_due() == 1
        [delivered] = fake.webhooks()
        assert (delivered.state, delivered.attempts) == ("delivered", 2)
        assert len({h["webhook-id"] for h in sender.sent}) == 1
        backlog = await deliverer.refresh_gauges()
        assert backlog.pending == 0


class TestGone:
    """A 410 Gone pauses the endpoint: nothing more is sent to it until it is resumed."""

    URL = "https://hooks.example.com/x"

    async def test_410_pauses_the_url_and_holds_every_event(self) -> None:
        clock = testing.MovableClock()
        fake = testing.FakeStore(clock=clock)
        for task_id in ("video_a", "video_b", "video_c"):
            fake.add(task_id)
        fake.save([t.replace(state="failed") for t in fake.claim_due("o", clock(), 60, 9)], "o")
        sender = ScriptedSender(webhooks.Answer(410), webhooks.Answer(204), webhooks.Answer(204))
        meters = metrics.Metrics()
        deliverer = webhooks.Deliverer(
            fake,
            self.URL,
            webhooks.Signer([SECRET]),
            sender,
            owner="o",
            meters=meters,
            concurrency=1,
            clock=clock,
            executor=testing.InlineExecutor(),
        )
        await deliverer.deliver_due()
        assert len(sender.sent) == 1  # the rest of the batch was not sent after the 410
        assert [p.url for p in fake.paused_webhook_endpoints()] == [self.URL]
        assert {e.state for e in fake.webhooks()} == {"pending"}
        assert {e.lease_owner for e in fake.webhooks()} == {None}  # given back
        clock.advance(3600)
        assert await deliverer.deliver_due() == 0
        assert len(sender.sent) == 1
        await deliverer.refresh_gauges()
        sample = meters.registry.get_sample_value
        assert sample("seedance_webhook_endpoints_paused") == 1
        assert sample("seedance_webhook_deliveries_total", {"outcome": "paused"}) == 1

        assert fake.resume_webhook_endpoints() == [self.URL]
        sender.answers = [webhooks.Answer(204)] * 3
        assert await deliverer.deliver_due() == 3
        assert {e.state for e in fake.webhooks()} == {"delivered"}
        await deliverer.refresh_gauges()
        assert sample("seedance_webhook_endpoints_paused") == 0


class TestSecretSettings:
    """SEEDANCE_WEBHOOK_SECRET, its _FILE, or the systemd credential; several for rotation."""

    def test_from_the_variable_several_secrets(self) -> None:
        settings = config.Settings(webhook_secret=f"{SECRET}, {OLD_SECRET}")  # type: ignore[arg-type]
        assert settings.resolve_webhook_secrets() == [SECRET, OLD_SECRET]

    def test_from_a_file(self, tmp_path: pathlib.Path) -> None:
        (tmp_path / "s").write_text(f"{SECRET}\n{OLD_SECRET}\n")
        settings = config.Settings(webhook_secret_file=tmp_path / "s")
        assert settings.resolve_webhook_secrets() == [SECRET, OLD_SECRET]

    def test_from_a_systemd_credential(
        self, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (tmp_path / config.WEBHOOK_SECRET_CREDENTIAL).write_text(SECRET)
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
        assert config.Settings().resolve_webhook_secrets() == [SECRET]

    def test_missing_names_every_source(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        with pytest.raises(errors.ConfigError, match="WEBHOOK_SECRET_FILE"):
            config.Settings().resolve_webhook_secrets()

    def test_the_logged_url_carries_no_token(self) -> None:
        settings = config.Settings(webhook_url="https://u:p@hooks.example.com/x?token=t")
        assert settings.public_summary()["webhook_url"] == "https://hooks.example.com/x"


class TestStartUp:
    """`run` refuses a webhook setting it cannot use before anything starts (exit 2)."""

    @pytest.fixture(autouse=True)
    def _logs_back_to_default(self) -> Iterator[None]:
        yield  # cli.main configured structlog onto pytest's captured stream
        structlog.reset_defaults()

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"SEEDANCE_WEBHOOK_URL": "https://hooks.example.com/x"}, "WEBHOOK_SECRET"),
            (
                {"SEEDANCE_WEBHOOK_URL": "http://10.0.0.5/x", "SEEDANCE_WEBHOOK_SECRET": SECRET},
                "ALLOW_PRIVATE_WEBHOOK_HOSTS",
            ),
        ],
    )
    def test_run_exits_2(
        self,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        env: dict[str, str],
        message: str,
    ) -> None:
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        monkeypatch.setenv("SEEDANCE_API_KEY", "k")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert cli.main(["run"]) == 2
        assert message in capsys.readouterr().err


class TestAtRiskJob:
    """The deliverer's at-risk job writes task.at_risk once per task."""

    async def test_once_per_task(self) -> None:
        clock = testing.MovableClock()
        near = models.Task(
            task_id="video_near", state="polling", expires_at=NOW + dt.timedelta(minutes=30)
        )
        far = models.Task(
            task_id="video_far", state="polling", expires_at=NOW + dt.timedelta(days=1)
        )
        fake = testing.FakeStore([near, far], clock=clock)
        deliverer = webhooks.Deliverer(
            fake,
            "https://hooks.example.com/x",
            webhooks.Signer([SECRET]),
            ScriptedSender(),
            owner="o",
            clock=clock,
            executor=testing.InlineExecutor(),
        )
        assert await deliverer.warn_at_risk() == 1
        assert await deliverer.warn_at_risk() == 0
        assert [(e.task_id, e.event) for e in fake.webhooks()] == [("video_near", "task.at_risk")]
