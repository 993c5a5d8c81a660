"""Replicate's predictions read by the daemon: its statuses, its output, its hour, its word that the
data is gone, its 429 and its signed webhooks (``providers/replicate.py``)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from typing import Any

import pytest
import standardwebhooks
from seedance_archiver import config, errors, models, policy, providers, testing
from seedance_archiver.providers import replicate

from tests.helpers import RULES

RULES_WITH_SEED_TIMES = dataclasses.replace(
    RULES, generation_times=config.Settings().generation_times()
)

ID = "gm3qorzdhgbfurvjtvhg6dckhu"  # 26 lowercase letters and digits, as Replicate's are
LINK = "https://replicate.delivery/xezq/abc/tmp1a2b3c.mp4"
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)


def prediction(status: str = "succeeded", **fields: Any) -> bytes:
    body: dict[str, Any] = {
        "id": ID,
        "model": "bytedance/seedance-1-pro",
        "version": "dp-0123",
        "input": {"prompt": "a cat"},
        "logs": "",
        "output": LINK if status == "succeeded" else None,
        "error": None,
        "status": status,
        "source": "api",
        "data_removed": False,
        "created_at": "2026-12-06T11:58:00.000000Z",
        "started_at": "2026-12-06T11:58:03.120000Z",
        "completed_at": "2026-12-06T11:59:30.500000Z" if status == "succeeded" else None,
        "urls": {"get": f"https://api.replicate.com/v1/predictions/{ID}"},
        "metrics": {"predict_time": 87.4},
    }
    body.update(fields)
    return json.dumps(body).encode()


class TestStatuses:
    @pytest.mark.parametrize(
        ("given", "ours"),
        [
            ("starting", "queued"),
            ("processing", "processing"),
            ("succeeded", "completed"),
            ("failed", "failed"),
            ("canceled", "cancelled"),
            ("aborted", "failed"),
        ],
    )
    def test_each_maps_onto_ours(self, given: str, ours: str) -> None:
        answer = replicate.parse_answer(ID, prediction(given))
        assert (answer.id, answer.status.value) == (ID, ours)

    def test_a_failed_prediction_keeps_its_error(self) -> None:
        answer = replicate.parse_answer(ID, prediction("failed", error="NSFW content detected"))
        assert answer.error == "NSFW content detected"

    def test_aborted_says_it_never_ran(self) -> None:
        answer = replicate.parse_answer(ID, prediction("aborted"))
        assert answer.error == replicate.ABORTED_REASON

    def test_an_unknown_status_is_malformed(self) -> None:
        with pytest.raises(errors.MalformedAnswer, match="unknown status"):
            replicate.parse_answer(ID, prediction("pondering"))

    def test_an_answer_about_another_prediction_is_malformed(self) -> None:
        with pytest.raises(errors.MalformedAnswer, match="not the one asked for"):
            replicate.parse_answer("a" * 26, prediction())


class TestOutput:
    def test_a_succeeded_prediction_links_its_video_and_is_kept_an_hour(self) -> None:
        answer = replicate.parse_answer(ID, prediction())
        assert (answer.video_url, answer.model) == (LINK, "bytedance/seedance-1-pro")
        assert answer.created == dt.datetime(2026, 12, 6, 11, 58, tzinfo=dt.UTC)
        completed = dt.datetime(2026, 12, 6, 11, 59, 30, 500_000, tzinfo=dt.UTC)
        assert answer.expires_at == completed + dt.timedelta(hours=1)
        assert answer.gone is None

    def test_the_resolution_asked_for_is_read_for_the_skip(self) -> None:
        """With it the fewer-polls policy knows how long such a video takes (and learns it)."""
        answer = replicate.parse_answer(ID, prediction("processing", input={"resolution": "1080p"}))
        assert answer.resolution == "1080p"
        assert policy.skip_seconds(answer, RULES_WITH_SEED_TIMES) == 180.0
        assert replicate.parse_answer(ID, prediction("processing", input="?")).resolution is None

    def test_from_a_list_the_video_is_taken(self) -> None:
        poster = "https://replicate.delivery/xezq/abc/poster.webp"
        answer = replicate.parse_answer(ID, prediction(output=[poster, LINK]))
        assert answer.video_url == LINK

    def test_a_list_without_a_video_gives_its_first_link(self) -> None:
        only = "https://replicate.delivery/xezq/abc/out"
        assert replicate.parse_answer(ID, prediction(output=[only])).video_url == only

    @pytest.mark.parametrize("output", [42, {"url": LINK}, [LINK, 7], "not a url"])
    def test_an_output_off_the_contract_is_malformed(self, output: object) -> None:
        with pytest.raises(errors.MalformedAnswer):
            replicate.parse_answer(ID, prediction(output=output))

    def test_a_succeeded_prediction_without_output_is_polled_again_not_given_up(self) -> None:
        answer = replicate.parse_answer(ID, prediction(output=None))
        assert (answer.status, answer.video_url, answer.gone) == ("completed", None, None)

    def test_a_side_field_that_drifted_is_noted_not_fatal(self) -> None:
        answer = replicate.parse_answer(ID, prediction(created_at="yesterday", model=["x"]))
        assert answer.video_url == LINK
        assert {name for name, _ in answer.ignored} == {"created_at", "model"}


class TestDataRemoved:
    """``data_removed: true`` on a finished prediction without output is the provider's word that
    the video is gone; nothing less is."""

    def test_removed_data_is_gone(self) -> None:
        answer = replicate.parse_answer(ID, prediction(output=None, data_removed=True))
        assert answer.gone == replicate.REMOVED_REASON

    def test_a_link_still_given_is_tried_first(self) -> None:
        answer = replicate.parse_answer(ID, prediction(data_removed=True))
        assert (answer.video_url, answer.gone) == (LINK, None)

    @pytest.mark.parametrize("value", ["true", 1, "yes"])
    def test_anything_but_true_is_not_believed(self, value: object) -> None:
        answer = replicate.parse_answer(ID, prediction(output=None, data_removed=value))
        assert answer.gone is None
        assert [name for name, _ in answer.ignored] == ["data_removed"]

    def test_a_failed_prediction_stays_failed_when_its_data_is_removed(self) -> None:
        answer = replicate.parse_answer(ID, prediction("failed", error="oom", data_removed=True))
        assert (answer.status, answer.error, answer.gone) == ("failed", "oom", None)

    def test_the_policy_ends_it_expired_with_that_reason(self) -> None:
        answer = replicate.parse_answer(ID, prediction(output=None, data_removed=True))
        task = models.Task(task_id=ID, state="polling", provider_status="processing")
        after = policy.on_answer(task, answer, NOW, RULES, testing.low_draw)
        assert (after.state, after.error) == ("expired", replicate.REMOVED_REASON)


class TestIdsAndErrors:
    @pytest.mark.parametrize("task_id", [ID, "a" * 16, "0" * 64])
    def test_replicates_ids_pass_its_rule(self, task_id: str) -> None:
        assert replicate.DIALECT.task_id_problem(task_id) is None

    @pytest.mark.parametrize("task_id", ["video_abc123def456", ID.upper(), "a" * 15, "cgt-2025"])
    def test_other_ids_are_refused_by_its_rule(self, task_id: str) -> None:
        assert replicate.DIALECT.task_id_problem(task_id) == replicate.ID_RULE

    def test_its_problem_details_404_is_its_own(self) -> None:
        assert replicate.is_own_not_found(
            b'{"title":"Not found","detail":"Not found.","status":404}'
        )
        assert not replicate.is_own_not_found(b"<html>404</html>")
        assert not replicate.is_own_not_found(b'{"message":"no route"}')

    @pytest.mark.parametrize(
        ("header", "body", "wait"),
        [
            ("7", b"{}", 7.0),
            (None, b'{"detail":"Request was throttled.","status":429,"retry_after":8}', 8.0),
            (None, b'{"retry_after": 1e9}', replicate.RETRY_AFTER_MAX_SECONDS),
            (None, b'{"retry_after": -1}', None),
            (None, b'{"retry_after": true}', None),
            (None, b"rate limited", None),
        ],
    )
    def test_a_429_says_when_to_come_back(
        self, header: str | None, body: bytes, wait: float | None
    ) -> None:
        assert replicate.retry_after(header, body, NOW) == wait


class TestWebhooks:
    """A webhook counts only with a valid Standard Webhooks signature by the account's secret."""

    def signed_headers(self, body: bytes, secret: str = SECRET) -> dict[str, str]:
        at = dt.datetime.now(dt.UTC)
        signature = standardwebhooks.Webhook(secret).sign("msg_1", at, body.decode())
        return {
            "webhook-id": "msg_1",
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signature,
        }

    def test_a_signed_webhook_is_the_providers_and_names_its_prediction(self) -> None:
        body = prediction()
        assert replicate.signed(SECRET, "", self.signed_headers(body), body)
        assert replicate.CALLBACKS.task_id(body) == ID

    def test_a_wrong_secret_a_changed_body_or_no_signature_is_not(self) -> None:
        body = prediction()
        other = "whsec_" + base64.b64encode(b"f" * 32).decode()
        assert not replicate.signed(SECRET, "", self.signed_headers(body, other), body)
        assert not replicate.signed(SECRET, "", self.signed_headers(body), body + b" ")
        assert not replicate.signed(SECRET, "", {}, body)
        headers = self.signed_headers(body)
        headers["webhook-timestamp"] = str(int(NOW.timestamp()) - 86_400)
        assert not replicate.signed(SECRET, "", headers, body)

    @pytest.mark.parametrize("value", ["r8_0123456789", "whsec_not base64!", ""])
    def test_a_secret_that_is_not_a_signing_secret_is_refused_without_echo(
        self, value: str
    ) -> None:
        problem = replicate.secret_problem(value)
        assert problem is not None and "whsec_" in problem
        assert value == "" or value not in problem
        assert replicate.secret_problem(SECRET) is None


class TestItsHour:
    """An hour's window scales what an hour meant for a day's: at risk and "should still have"."""

    RULES = dataclasses.replace(RULES, at_risk=providers.AT_RISK)

    def row(self, left: dt.timedelta) -> models.Task:
        return models.Task(
            task_id=ID, provider="replicate", provider_status="completed", expires_at=NOW + left
        )

    def test_at_risk_in_its_last_quarter_hour(self) -> None:
        assert not providers.AT_RISK.test(self.row(dt.timedelta(minutes=20)), NOW)
        assert providers.AT_RISK.test(self.row(dt.timedelta(minutes=10)), NOW)

    def test_its_404_is_an_outage_sign_until_its_last_quarter_hour(self) -> None:
        assert policy.well_inside(self.row(dt.timedelta(minutes=20)), NOW, self.RULES)
        assert not policy.well_inside(self.row(dt.timedelta(minutes=10)), NOW, self.RULES)
