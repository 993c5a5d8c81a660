"""Parsing the provider's answer (seed page) and its Retry-After header."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon import errors, provider, testing

TASK_ID = "video_abc123def456"
SEED_CREATED = 1761635478
# The seed page's example answer, as the provider sends it.
SEED_ANSWER: dict[str, Any] = {
    "id": TASK_ID,
    "object": "video",
    "created": SEED_CREATED,
    "model": "seedance_1_5_pro_720p",
    "status": "processing",
    "video_url": None,
    "error": None,
}
FIELDS = ["id", "object", "created", "model", "status", "video_url", "actualDuration", "error"]
MISSING = object()


def body(**changes: Any) -> bytes:
    """The seed answer with ``changes`` applied; a value of MISSING drops the field."""
    payload = {**SEED_ANSWER, **changes}
    payload = {k: v for k, v in payload.items() if v is not MISSING}
    return json.dumps(payload).encode()


def parse(raw: bytes) -> provider.Answer:
    return provider.parse_answer(TASK_ID, raw)


class TestParseAnswer:
    """Every field of a well-formed answer is read."""

    def test_the_seed_example(self) -> None:
        assert parse(body()) == provider.Answer(
            id=TASK_ID,
            status=provider.Status.PROCESSING,
            created=dt.datetime(2025, 10, 28, 7, 11, 18, tzinfo=dt.UTC),
            model="seedance_1_5_pro_720p",
            video_url=None,
            actual_duration=None,
            error=None,
        )

    @pytest.mark.parametrize("status", ["queued", "processing", "completed", "failed", "cancelled"])
    def test_every_status(self, status: str) -> None:
        answer = parse(body(status=status))
        assert answer.status is provider.Status(status)
        assert answer.status.value == status

    def test_created_is_an_aware_utc_datetime(self) -> None:
        created = parse(body()).created
        assert created is not None
        assert created.utcoffset() == dt.timedelta(0)
        assert created.timestamp() == SEED_CREATED

    def test_fractional_created(self) -> None:
        created = parse(body(created=SEED_CREATED + 0.5)).created
        assert created is not None
        assert created.microsecond == 500_000

    def test_completed_answer(self) -> None:
        url = "https://cdn.example.com/v/abc.mp4?sig=1"
        answer = parse(body(status="completed", video_url=url, actualDuration=5))
        assert answer.video_url == url
        assert answer.actual_duration == 5.0
        assert isinstance(answer.actual_duration, float)

    def test_fractional_duration(self) -> None:
        assert parse(body(actualDuration=5.04)).actual_duration == 5.04

    def test_failed_answer_carries_the_error(self) -> None:
        answer = parse(body(status="failed", error="content policy violation"))
        assert answer.status is provider.Status.FAILED
        assert answer.error == "content policy violation"

    def test_optional_fields_may_be_missing(self) -> None:
        raw = json.dumps({"id": TASK_ID, "status": "queued"}).encode()
        answer = parse(raw)
        assert (answer.created, answer.model, answer.video_url) == (None, None, None)
        assert (answer.actual_duration, answer.error) == (None, None)

    def test_unknown_fields_are_ignored(self) -> None:
        assert parse(body(extra={"nested": [1, 2]}, object="video")).id == TASK_ID


MALFORMED: list[tuple[str, bytes, str]] = [
    ("not json", b"<html>502 Bad Gateway</html>", "not JSON"),
    ("empty body", b"", "not JSON"),
    ("invalid utf-8", b'{"id": "video_\xff\xfe", "status": "queued"}', "not JSON"),
    ("json array", b"[]", "expected a JSON object"),
    ("json string", b'"completed"', "expected a JSON object"),
    ("json number", b"42", "expected a JSON object"),
    ("json null", b"null", "expected a JSON object"),
    ("json true", b"true", "expected a JSON object"),
    ("missing id", body(id=MISSING), "'id'"),
    ("id a number", body(id=123), "'id'"),
    ("id null", body(id=None), "'id'"),
    ("another task", body(id="video_other"), "not the one asked for"),
    ("missing status", body(status=MISSING), "'status'"),
    ("unknown status", body(status="done"), "unknown status"),
    ("status in capitals", body(status="COMPLETED"), "unknown status"),
    ("status a number", body(status=1), "'status'"),
    ("status a list", body(status=["queued"]), "'status'"),
    ("status null", body(status=None), "'status'"),
    ("created a string", body(created=str(SEED_CREATED)), "'created'"),
    ("created a bool", body(created=True), "'created'"),
    ("created negative", body(created=-5), "'created'"),
    ("created zero", body(created=0), "'created'"),
    ("created huge", body(created=1e12), "'created'"),
    ("created NaN", body(created=math.nan), "'created'"),
    ("created infinite", body(created=math.inf), "'created'"),
    ("model a number", body(model=7), "'model'"),
    ("video_url a number", body(video_url=42), "'video_url'"),
    ("video_url an object", body(video_url={"href": "x"}), "'video_url'"),
    ("video_url a bool", body(video_url=True), "'video_url'"),
    ("duration a string", body(actualDuration="5"), "'actualDuration'"),
    ("duration a bool", body(actualDuration=False), "'actualDuration'"),
    ("duration NaN", body(actualDuration=math.nan), "'actualDuration'"),
    ("error a number", body(error=500), "'error'"),
    ("error a list", body(error=["bad"]), "'error'"),
]


class TestMalformedAnswer:
    """Anything off the contract is MalformedAnswer with a message a person can read."""

    @pytest.mark.parametrize(
        ("raw", "fragment"),
        [(raw, frag) for _, raw, frag in MALFORMED],
        ids=[m[0] for m in MALFORMED],
    )
    def test_refused_with_a_readable_message(self, raw: bytes, fragment: str) -> None:
        with pytest.raises(errors.MalformedAnswer) as caught:
            parse(raw)
        message = str(caught.value)
        assert message.startswith("malformed answer")
        assert fragment in message
        assert "\n" not in message

    def test_is_a_retryable_provider_error(self) -> None:
        assert issubclass(errors.MalformedAnswer, errors.ProviderError)

    def test_a_long_foreign_id_is_shortened_in_the_message(self) -> None:
        with pytest.raises(errors.MalformedAnswer) as caught:
            parse(body(id="x" * 10_000))
        assert len(str(caught.value)) < 200

    def test_created_beyond_float_range(self) -> None:
        raw = body(created=0).replace(b'"created": 0', b'"created": ' + b"9" * 400)
        with pytest.raises(errors.MalformedAnswer):
            parse(raw)

    def test_duration_beyond_float_range(self) -> None:
        raw = body(actualDuration=0).replace(
            b'"actualDuration": 0', b'"actualDuration": ' + b"9" * 400
        )
        with pytest.raises(errors.MalformedAnswer):
            parse(raw)

    def test_deeply_nested_json(self) -> None:
        with pytest.raises(errors.MalformedAnswer):
            parse(b"[" * 100_000 + b"]" * 100_000)


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELD_VALUES = st.one_of(
    JSON_VALUES,
    st.just(TASK_ID),
    st.sampled_from([s.value for s in provider.Status]),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.just("https://cdn.example.com/v.mp4"),
)
ANSWERS = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8), FIELD_VALUES, max_size=len(FIELDS) + 2
)


def parses_or_refuses(raw: bytes) -> None:
    try:
        answer = parse(raw)
    except errors.MalformedAnswer:
        return
    assert answer.id == TASK_ID
    assert isinstance(answer.status, provider.Status)
    assert answer.created is None or answer.created.utcoffset() == dt.timedelta(0)
    assert answer.actual_duration is None or math.isfinite(answer.actual_duration)


class TestParseFuzz:
    """Whatever arrives, the parser returns a usable Answer or raises MalformedAnswer."""

    @given(st.binary())
    def test_arbitrary_bytes(self, raw: bytes) -> None:
        parses_or_refuses(raw)

    @given(ANSWERS)
    def test_arbitrary_json_objects(self, payload: dict[str, Any]) -> None:
        parses_or_refuses(json.dumps(payload).encode())

    @given(ANSWERS)
    def test_arbitrary_json_objects_with_the_right_id(self, payload: dict[str, Any]) -> None:
        parses_or_refuses(json.dumps({**payload, "id": TASK_ID}).encode())

    @given(JSON_VALUES)
    def test_arbitrary_json_values(self, value: Any) -> None:
        parses_or_refuses(json.dumps(value).encode())


NOW = testing.EPOCH


def http_date(when: dt.datetime) -> str:
    return email.utils.format_datetime(when, usegmt=True)


class TestRetryAfter:
    """Retry-After as delta-seconds or an HTTP date, clamped to [0, RETRY_AFTER_MAX_SECONDS]."""

    @pytest.mark.parametrize(
        ("value", "expected"), [("5", 5.0), ("1.5", 1.5), ("0", 0.0), (" 30 ", 30.0)]
    )
    def test_seconds(self, value: str, expected: float) -> None:
        assert provider.parse_retry_after(value, NOW) == expected

    def test_http_date_in_the_future(self) -> None:
        value = http_date(NOW + dt.timedelta(seconds=120))
        assert provider.parse_retry_after(value, NOW) == 120.0

    def test_http_date_in_the_past_means_now(self) -> None:
        value = http_date(NOW - dt.timedelta(hours=1))
        assert provider.parse_retry_after(value, NOW) == 0.0

    @pytest.mark.parametrize("value", ["soon", "abc def", "Mon, 99 Foo 2026", "nan", "inf", ""])
    def test_garbage_is_none(self, value: str) -> None:
        assert provider.parse_retry_after(value, NOW) is None

    def test_absent_is_none(self) -> None:
        assert provider.parse_retry_after(None, NOW) is None

    def test_huge_seconds_are_capped(self) -> None:
        got = provider.parse_retry_after("999999999", NOW)
        assert got == provider.RETRY_AFTER_MAX_SECONDS

    def test_far_future_date_is_capped(self) -> None:
        value = http_date(NOW + dt.timedelta(days=30))
        assert provider.parse_retry_after(value, NOW) == provider.RETRY_AFTER_MAX_SECONDS

    @given(st.text(max_size=40))
    def test_any_header_is_none_or_in_range(self, value: str) -> None:
        got = provider.parse_retry_after(value, NOW)
        assert got is None or 0.0 <= got <= provider.RETRY_AFTER_MAX_SECONDS
