"""Parsing Ark's answer (BytePlus ModelArk / Volcengine Ark) and its callbacks."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from seedance_archiver import errors, models, policy
from seedance_archiver.providers import ark, fields
from seedance_archiver.providers import http as provider_http

from tests.unit import jsonfuzz

TASK_ID = "cgt-20250101123456-abcde"
CREATED = 1735734896
VIDEO_URL = (
    "https://ark-content-generation.tos-cn-beijing.volces.com/doubao-seedance/abc.mp4"
    "?X-Tos-Algorithm=TOS4-HMAC-SHA256&X-Tos-Date=20250101T123456Z&X-Tos-Expires=86400"
    "&X-Tos-Signature=0123abcd"
)
# A succeeded answer with every documented field, as the public documentation describes it.
ANSWER: dict[str, Any] = {
    "id": TASK_ID,
    "model": "doubao-seedance-1-0-pro-250528",
    "status": "succeeded",
    "content": {"video_url": VIDEO_URL, "last_frame_url": "https://cdn.example.com/last.png"},
    "error": None,
    "created_at": CREATED,
    "updated_at": CREATED + 60,
    "seed": 58423,
    "resolution": "1080p",
    "ratio": "16:9",
    "duration": 5,
    "framespersecond": 24,
    "usage": {"completion_tokens": 246840, "total_tokens": 246840},
    "service_tier": "default",
    "execution_expires_after": 172800,
    "draft": False,
}
FIELDS = list(ANSWER)
MISSING = object()


def body(**changes: Any) -> bytes:
    """The full answer with ``changes`` applied; a value of MISSING drops the field."""
    payload = {**ANSWER, **changes}
    payload = {k: v for k, v in payload.items() if v is not MISSING}
    return json.dumps(payload).encode()


def parse(raw: bytes) -> models.Answer:
    return ark.parse_answer(TASK_ID, raw)


class TestParseAnswer:
    """Every field of a well-formed answer is read, and mapped onto ours."""

    def test_a_succeeded_answer(self) -> None:
        assert parse(body()) == models.Answer(
            expires_at=dt.datetime(2025, 1, 2, 12, 34, 56, tzinfo=dt.UTC),
            id=TASK_ID,
            status=models.Status.COMPLETED,
            created=dt.datetime(2025, 1, 1, 12, 34, 56, tzinfo=dt.UTC),
            model="doubao-seedance-1-0-pro-250528",
            video_url=VIDEO_URL,
            actual_duration=5.0,
            error=None,
            resolution="1080p",
        )

    @pytest.mark.parametrize(
        ("status", "ours"),
        [
            ("queued", models.Status.QUEUED),
            ("running", models.Status.PROCESSING),
            ("succeeded", models.Status.COMPLETED),
            ("failed", models.Status.FAILED),
            ("cancelled", models.Status.CANCELLED),
            ("expired", models.Status.FAILED),
        ],
    )
    def test_every_status(self, status: str, ours: models.Status) -> None:
        assert parse(body(status=status, content=None)).status is ours

    def test_expired_is_failed_with_its_reason(self) -> None:
        answer = parse(body(status="expired", content=None))
        assert answer.error == "expired at the provider before it ran"

    def test_expired_keeps_the_providers_message_too(self) -> None:
        error = {"code": "TaskExpired", "message": "timed out in the queue"}
        answer = parse(body(status="expired", content=None, error=error))
        assert (
            answer.error
            == "expired at the provider before it ran: timed out in the queue (TaskExpired)"
        )

    def test_the_error_object_becomes_readable_text(self) -> None:
        error = {
            "code": "OutputVideoSensitiveContentDetected",
            "message": "content policy violation",
        }
        answer = parse(body(status="failed", content=None, error=error))
        assert answer.status is models.Status.FAILED
        assert answer.error == "content policy violation (OutputVideoSensitiveContentDetected)"

    def test_an_error_object_with_a_message_only(self) -> None:
        answer = parse(body(status="failed", error={"message": "boom"}))
        assert answer.error == "boom"

    def test_an_error_object_with_a_numeric_code_only(self) -> None:
        assert parse(body(status="failed", error={"code": 500})).error == "no message (500)"

    def test_an_empty_error_object_is_no_error(self) -> None:
        assert parse(body(status="failed", error={})).error is None

    def test_created_at_is_an_aware_utc_datetime(self) -> None:
        created = parse(body()).created
        assert created is not None
        assert created.utcoffset() == dt.timedelta(0)
        assert created.timestamp() == CREATED

    def test_fractional_duration(self) -> None:
        assert parse(body(duration=5.04)).actual_duration == 5.04

    def test_a_running_answer_without_content(self) -> None:
        answer = parse(body(status="running", content=MISSING))
        assert (answer.video_url, answer.actual_duration) == (None, 5.0)

    def test_only_id_and_status_are_required(self) -> None:
        answer = parse(json.dumps({"id": TASK_ID, "status": "queued"}).encode())
        assert (answer.created, answer.model, answer.video_url, answer.error) == (None,) * 4
        assert (answer.actual_duration, answer.resolution) == (None, None)

    def test_every_optional_field_may_be_null(self) -> None:
        nulls = {k: None for k in ANSWER if k not in ("id", "status")}
        answer = parse(body(**nulls))
        assert answer.video_url is None and answer.resolution is None

    def test_flex_and_draft_answers(self) -> None:
        assert parse(body(service_tier="flex", draft=True)).status is models.Status.COMPLETED

    def test_unknown_fields_are_ignored(self) -> None:
        assert parse(body(extra={"nested": [1, 2]}, object="task")).id == TASK_ID

    def test_strings_come_out_storable(self) -> None:
        error = {"code": "x", "message": "e\x00" * 100_000}
        answer = parse(body(model="m\ud800", status="failed", error=error))
        assert answer.model == "m\ufffd"
        assert answer.error is not None and "\x00" not in answer.error
        assert len(answer.error) < fields.ERROR_MAX_CHARS + 100


MALFORMED: list[tuple[str, bytes, str]] = [
    ("not json", b"<html>502 Bad Gateway</html>", "not JSON"),
    ("json array", b"[]", "expected a JSON object"),
    ("missing id", body(id=MISSING), "'id'"),
    ("another task", body(id="cgt-other"), "not the one asked for"),
    ("missing status", body(status=MISSING), "'status'"),
    ("a reseller status", body(status="completed"), "unknown status"),
    ("a reseller processing", body(status="processing"), "unknown status"),
    ("status in capitals", body(status="SUCCEEDED"), "unknown status"),
    ("status a number", body(status=1), "'status'"),
    ("video_url a number", body(content={"video_url": 1}), "'video_url'"),
    (
        "video_url not a URL",
        body(content={"video_url": "not a url"}),
        "video_url is not a valid URL",
    ),
    (
        "video_url too long",
        body(content={"video_url": "https://a.b/" + "x" * 9000}),
        "characters long",
    ),
]


CREATED_AT = dt.datetime.fromtimestamp(CREATED, dt.UTC)
# (case, changes to the full succeeded answer, attribute, what it reads, the field noted or None)
LENIENT: list[tuple[str, dict[str, Any], str, Any, str | None]] = [
    ("created_at in a string", {"created_at": str(CREATED)}, "created", CREATED_AT, None),
    ("created_at in milliseconds", {"created_at": CREATED * 1000}, "created", CREATED_AT, None),
    ("created_at as ISO 8601", {"created_at": "2025-01-01T12:34:56Z"}, "created", CREATED_AT, None),
    ("created_at negative", {"created_at": -1}, "created", None, "created_at"),
    ("created_at a bool", {"created_at": True}, "created", None, "created_at"),
    ("updated_at a word", {"updated_at": "soon"}, "id", TASK_ID, "updated_at"),
    ("updated_at in milliseconds", {"updated_at": (CREATED + 60) * 1000}, "id", TASK_ID, None),
    ("duration in a string", {"duration": "5"}, "actual_duration", 5.0, None),
    ("duration a word", {"duration": "5s"}, "actual_duration", None, "duration"),
    ("model a number", {"model": 1}, "model", None, "model"),
    ("resolution a number", {"resolution": 720}, "resolution", None, "resolution"),
    ("seed in a string", {"seed": "42"}, "id", TASK_ID, None),
    ("framespersecond in a string", {"framespersecond": "24"}, "id", TASK_ID, None),
    ("usage a number", {"usage": 1}, "id", TASK_ID, None),
    ("draft a string", {"draft": "false"}, "id", TASK_ID, None),
    ("service_tier a number", {"service_tier": 1}, "id", TASK_ID, None),
    (
        "last_frame_url a list",
        {"content": {"video_url": VIDEO_URL, "last_frame_url": []}},
        "video_url",
        VIDEO_URL,
        None,
    ),
    ("error a string", {"status": "failed", "error": "boom"}, "error", "boom", None),
    ("error a list", {"status": "failed", "error": ["boom"]}, "error", '["boom"]', None),
    (
        "error code a list",
        {"status": "failed", "error": {"code": [], "message": "m"}},
        "error",
        "m ([])",
        None,
    ),
    (
        "error message a number",
        {"status": "failed", "error": {"message": 1}},
        "error",
        '{"message": 1}',
        None,
    ),
    ("content a string", {"content": VIDEO_URL}, "video_url", None, "content"),
    ("content a list", {"content": [VIDEO_URL]}, "video_url", None, "content"),
]


class TestLenientFields:
    """Only id, status and a succeeded task's content.video_url must follow the contract; the
    rest is read where it makes sense and otherwise ignored and noted."""

    @pytest.mark.parametrize(
        ("changes", "attribute", "read", "ignored"),
        [case[1:] for case in LENIENT],
        ids=[case[0] for case in LENIENT],
    )
    def test_a_drifted_field(
        self, changes: dict[str, Any], attribute: str, read: Any, ignored: str | None
    ) -> None:
        answer = parse(body(**changes))
        assert getattr(answer, attribute) == read
        assert [name for name, _ in answer.ignored] == ([ignored] if ignored else [])

    def test_the_issues_drifted_answer_still_archives(self) -> None:
        drifted = body(updated_at=(CREATED + 60) * 1000, seed="42", duration="5")
        answer = parse(drifted)
        assert (answer.status, answer.video_url, answer.actual_duration) == (
            models.Status.COMPLETED,
            VIDEO_URL,
            5.0,
        )
        assert answer.ignored == ()


class TestDeadline:
    """expires_at is what Ark's own facts say: the link's expiry, completion + 24 h, or for a task
    not yet finished created + execution_expires_after + 24 h."""

    def test_a_succeeded_task_lives_as_long_as_its_signed_link(self) -> None:
        # X-Tos-Date=20250101T123456Z, X-Tos-Expires=86400
        assert parse(body()).expires_at == dt.datetime(2025, 1, 2, 12, 34, 56, tzinfo=dt.UTC)

    def test_a_link_that_does_not_say_leaves_completion_plus_a_day(self) -> None:
        answer = parse(body(content={"video_url": "https://cdn.example.com/v.mp4"}))
        assert answer.expires_at == CREATED_AT + dt.timedelta(seconds=60, days=1)

    def test_a_link_and_no_completion_time_leave_it_unknown(self) -> None:
        changes = {"content": {"video_url": "https://cdn.example.com/v.mp4"}, "updated_at": None}
        assert parse(body(**changes)).expires_at is None

    @pytest.mark.parametrize(
        ("query", "expected"),
        [
            ("X-Tos-Date=20250101T123456Z&X-Tos-Expires=3600", dt.datetime(2025, 1, 1, 13, 34, 56)),
            ("X-Tos-Date=2025-01-01&X-Tos-Expires=3600", None),
            ("X-Tos-Date=20250101T123456Z&X-Tos-Expires=soon", None),
            ("X-Tos-Date=20250101T123456Z&X-Tos-Expires=-1", None),
            ("X-Tos-Expires=3600", None),
            ("", None),
        ],
    )
    def test_the_links_own_expiry(self, query: str, expected: dt.datetime | None) -> None:
        got = ark.link_expiry(f"https://tos.example.com/v.mp4?{query}")
        assert got == (expected.replace(tzinfo=dt.UTC) if expected else None)

    @pytest.mark.parametrize("status", ["queued", "running"])
    def test_a_task_not_yet_finished_may_wait_its_execution_expiry_then_a_day(
        self, status: str
    ) -> None:
        answer = parse(body(status=status, content=None))
        assert answer.expires_at == CREATED_AT + dt.timedelta(hours=48 + 24)

    def test_a_shorter_execution_expiry(self) -> None:
        answer = parse(body(status="queued", content=None, execution_expires_after=3600))
        assert answer.expires_at == CREATED_AT + dt.timedelta(hours=1 + 24)

    def test_an_unreadable_execution_expiry_is_the_default_and_noted(self) -> None:
        answer = parse(body(status="queued", content=None, execution_expires_after="2d"))
        assert answer.expires_at == CREATED_AT + dt.timedelta(hours=48 + 24)
        assert [name for name, _ in answer.ignored] == ["execution_expires_after"]

    @pytest.mark.parametrize("status", ["failed", "cancelled", "expired"])
    def test_a_task_that_ended_without_a_video_has_none(self, status: str) -> None:
        assert parse(body(status=status, content=None)).expires_at is None

    def test_the_policy_takes_it_over_created_plus_the_retention(self) -> None:
        rules = policy.Rules(
            cadences={"standard": models.Cadence(30, 60)}, retention=dt.timedelta(days=1)
        )
        task = models.Task(task_id=TASK_ID, state="polling")
        queued = parse(body(status="queued", content=None))
        now = CREATED_AT + dt.timedelta(hours=30)
        after = policy.on_answer(task, queued, now, rules, lambda low, high: low)
        assert after.expires_at == CREATED_AT + dt.timedelta(hours=72)


class TestMalformed:
    """Every shape off the contract is MalformedAnswer, saying what was wrong."""

    @pytest.mark.parametrize(
        ("raw", "fragment"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
    )
    def test_refused(self, raw: bytes, fragment: str) -> None:
        with pytest.raises(errors.MalformedAnswer) as caught:
            parse(raw)
        assert fragment in str(caught.value)


class TestDialect:
    """Where Ark's tasks are asked about."""

    def test_the_task_path(self) -> None:
        assert ark.DIALECT.task_path(TASK_ID) == f"/api/v3/contents/generations/tasks/{TASK_ID}"

    def test_the_key_check_id_can_never_be_issued(self) -> None:
        assert not provider_http.KEY_CHECK_TASK_ID.startswith("cgt-")


class TestCallback:
    """A callback names its task; anything else names none."""

    def test_a_task_state(self) -> None:
        assert ark.callback_task_id(body()) == TASK_ID

    @pytest.mark.parametrize(
        "raw",
        [
            b"",
            b"nope",
            b"[]",
            b"null",
            b'{"id": 1}',
            b'{"id": ""}',
            b'{"status": "succeeded"}',
            b"\xff",
        ],
    )
    def test_not_a_task_state(self, raw: bytes) -> None:
        assert ark.callback_task_id(raw) is None

    @given(st.binary())
    def test_arbitrary_bytes(self, raw: bytes) -> None:
        found = ark.callback_task_id(raw)
        assert found is None or (isinstance(found, str) and found)


FIELD_VALUES = st.one_of(
    jsonfuzz.JSON_VALUES,
    st.just(TASK_ID),
    st.sampled_from(sorted(ark.STATUSES)),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.just({"video_url": VIDEO_URL}),
    st.just({"code": "E", "message": "m"}),
    st.fixed_dictionaries(
        {"video_url": jsonfuzz.JSON_VALUES, "last_frame_url": jsonfuzz.JSON_VALUES}
    ),
)
ANSWERS = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8), FIELD_VALUES, max_size=len(FIELDS) + 2
)


def parses_or_refuses(raw: bytes) -> None:
    jsonfuzz.parses_or_refuses(parse, raw, TASK_ID)


class TestParseFuzz:
    """Whatever arrives, the parser returns a usable Answer or raises MalformedAnswer."""

    @given(st.binary())
    def test_arbitrary_bytes(self, raw: bytes) -> None:
        parses_or_refuses(raw)

    @given(ANSWERS)
    def test_arbitrary_json_objects_with_the_right_id(self, payload: dict[str, Any]) -> None:
        parses_or_refuses(json.dumps({**payload, "id": TASK_ID}).encode())

    @given(ANSWERS, st.sampled_from(sorted(ark.STATUSES)))
    def test_arbitrary_fields_around_a_valid_status(
        self, payload: dict[str, Any], status: str
    ) -> None:
        parses_or_refuses(json.dumps({**payload, "id": TASK_ID, "status": status}).encode())

    @given(jsonfuzz.JSON_VALUES)
    def test_arbitrary_json_values(self, value: Any) -> None:
        parses_or_refuses(json.dumps(value).encode())
