"""Parsing the provider's answer (seed page) and its Retry-After header."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import math
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from seedance_archiver import errors, models, netguard, testing, utils
from seedance_archiver.providers import fields, reseller
from seedance_archiver.providers import http as providers_http

from tests.unit import jsonfuzz

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


def parse(raw: bytes) -> models.Answer:
    return reseller.parse_answer(TASK_ID, raw)


class TestParseAnswer:
    """Every field of a well-formed answer is read."""

    def test_the_seed_example(self) -> None:
        assert parse(body()) == models.Answer(
            id=TASK_ID,
            status=models.Status.PROCESSING,
            created=dt.datetime(2025, 10, 28, 7, 11, 18, tzinfo=dt.UTC),
            model="seedance_1_5_pro_720p",
            video_url=None,
            actual_duration=None,
            error=None,
        )

    @pytest.mark.parametrize("status", ["queued", "processing", "completed", "failed", "cancelled"])
    def test_every_status(self, status: str) -> None:
        answer = parse(body(status=status))
        assert answer.status is models.Status(status)
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
        assert answer.status is models.Status.FAILED
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
    ("video_url a number", body(status="completed", video_url=42), "'video_url'"),
    ("video_url an object", body(status="completed", video_url={"href": "x"}), "'video_url'"),
    ("video_url a bool", body(status="completed", video_url=True), "'video_url'"),
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

    def test_deeply_nested_json(self) -> None:
        with pytest.raises(errors.MalformedAnswer):
            parse(b"[" * 100_000 + b"]" * 100_000)


SEED_TIME = dt.datetime.fromtimestamp(SEED_CREATED, dt.UTC)
# (case, field, value, what the answer reads, the field noted as ignored or None)
LENIENT: list[tuple[str, str, Any, Any, str | None]] = [
    ("duration in a string", "actualDuration", "5.04", 5.04, None),
    ("duration in a padded string", "actualDuration", " 5 ", 5.0, None),
    ("duration a word", "actualDuration", "five", None, "actualDuration"),
    ("duration a bool", "actualDuration", False, None, "actualDuration"),
    ("duration NaN", "actualDuration", math.nan, None, "actualDuration"),
    ("duration a list", "actualDuration", [5], None, "actualDuration"),
    ("created in milliseconds", "created", SEED_CREATED * 1000, SEED_TIME, None),
    ("created in a string", "created", str(SEED_CREATED), SEED_TIME, None),
    ("created in milliseconds in a string", "created", str(SEED_CREATED * 1000), SEED_TIME, None),
    ("created as ISO 8601", "created", "2025-10-28T07:11:18Z", SEED_TIME, None),
    ("created as ISO 8601 with an offset", "created", "2025-10-28T15:11:18+08:00", SEED_TIME, None),
    ("created as ISO 8601 without an offset", "created", "2025-10-28T07:11:18", SEED_TIME, None),
    ("created a word", "created", "yesterday", None, "created"),
    ("created a bool", "created", True, None, "created"),
    ("created negative", "created", -5, None, "created"),
    ("created zero", "created", 0, None, "created"),
    ("created between seconds and milliseconds", "created", 5e11, None, "created"),
    ("created NaN", "created", math.nan, None, "created"),
    ("created infinite", "created", math.inf, None, "created"),
    ("created an object", "created", {"s": 1}, None, "created"),
    ("model a number", "model", 7, None, "model"),
    ("error a number", "error", 500, "500", None),
    ("error a list", "error", ["bad"], '["bad"]', None),
    ("error an object", "error", {"code": "E1", "message": "bad"}, "bad (E1)", None),
]
READ_AS = {"actualDuration": "actual_duration", "created": "created", "model": "model"}


class TestLenientFields:
    """Side fields are read where they make sense and otherwise ignored and noted; a completed
    answer keeps its link whatever its side fields say."""

    @pytest.mark.parametrize(
        ("field", "value", "read", "ignored"),
        [case[1:] for case in LENIENT],
        ids=[case[0] for case in LENIENT],
    )
    def test_a_drifted_field(self, field: str, value: Any, read: Any, ignored: str | None) -> None:
        url = "https://cdn.example.com/v/abc.mp4?sig=1"
        answer = parse(body(status="completed", video_url=url, **{field: value}))
        assert (answer.status, answer.video_url) == (models.Status.COMPLETED, url)
        assert getattr(answer, READ_AS.get(field, field)) == read
        assert [name for name, _ in answer.ignored] == ([ignored] if ignored else [])
        for _, why in answer.ignored:
            assert "\n" not in why and len(why) < 100

    def test_beyond_float_range_is_ignored(self) -> None:
        for field in ("created", "actualDuration"):
            raw = body(**{field: 0}).replace(
                f'"{field}": 0'.encode(), f'"{field}": '.encode() + b"9" * 400
            )
            assert [name for name, _ in parse(raw).ignored] == [field]

    def test_a_well_formed_answer_ignores_nothing(self) -> None:
        assert (
            parse(
                body(status="completed", video_url="https://a.example/v", actualDuration=5)
            ).ignored
            == ()
        )

    def test_a_link_before_completion_is_not_read(self) -> None:
        assert parse(body(status="processing", video_url=42)).video_url is None

    def test_the_reseller_knows_no_deadline_of_its_own(self) -> None:
        # created + SEEDANCE_RETENTION_SECONDS, decided by the policy
        assert parse(body()).expires_at is None


class TestStorableStrings:
    """model and error come out storable and capped; the id is the one asked for."""

    def test_nul_and_lone_surrogates_in_model_and_error(self) -> None:
        raw = b'{"id": "%s", "status": "failed", "model": "m\\u0000x\\ud800",' % TASK_ID.encode()
        raw += b' "error": "bad\\udc00\\u0000"}'
        answer = parse(raw)
        assert answer.model == "m\ufffdx\ufffd"
        assert answer.error == "bad\ufffd\ufffd"
        assert answer.model is not None and answer.error is not None
        (answer.model + answer.error).encode("utf-8")

    def test_a_200_kb_model_is_capped(self) -> None:
        model = parse(body(model="m" * 200_000)).model
        assert model == "m" * fields.MODEL_MAX_CHARS + "…[truncated, 200000 chars in all]"

    def test_a_200_kb_error_is_capped(self) -> None:
        error = parse(body(status="failed", error="e" * 200_000)).error
        assert error == "e" * fields.ERROR_MAX_CHARS + "…[truncated, 200000 chars in all]"

    def test_emoji_and_cjk_pass_untouched(self) -> None:
        answer = parse(body(model="即梦 1.5 😀", error="内容违规 👩‍👩‍👧"))
        assert (answer.model, answer.error) == ("即梦 1.5 😀", "内容违规 👩‍👩‍👧")

    def test_an_id_with_a_nul_is_another_task_with_a_readable_message(self) -> None:
        with pytest.raises(errors.MalformedAnswer, match="not the one asked for") as caught:
            parse(body(id=TASK_ID + "\x00"))
        assert "\x00" not in str(caught.value)

    def test_a_lone_surrogate_id_is_another_task(self) -> None:
        with pytest.raises(errors.MalformedAnswer) as caught:
            parse(body(id="\ud800"))
        str(caught.value).encode("utf-8")


GOOD_URLS: list[tuple[str, str]] = [
    ("signed link", "https://cdn.example.com/v/abc.mp4?expires=1761635478&sig=0a1b2c"),
    ("port", "https://cdn.example.com:8443/v.mp4"),
    ("ipv4", "https://203.0.113.7/v.mp4"),
    ("ipv6", "https://[2001:db8::1]/v.mp4"),
    ("idna host", "https://例え.jp/v.mp4"),
    ("punycode host", "https://xn--r8jz45g.jp/v.mp4"),
    ("trailing dot", "https://cdn.example.com./v.mp4"),
    ("unicode path", "https://cdn.example.com/样片/视频.mp4"),
    ("underscore label", "https://my_bucket.s3.example.com/v.mp4"),
    ("a 63-character label", f"https://{'a' * 63}.com/v.mp4"),
    ("the longest link", "https://cdn.example.com/?" + "s" * (8192 - 25)),
]

BAD_URLS: list[tuple[str, str, str]] = [
    ("invalid punycode", "https://xn--a.com/x", "IDNA"),
    ("emoji punycode", "https://xn--ls8h.la/x", "IDNA"),
    ("refused by IDNA", "https://☃.net/", "IDNA"),
    ("zero-width joiner host", "https://ex\u200dample.com/", "IDNA"),
    ("empty label", "https://a..b/", "empty label"),
    ("leading dot", "https://.example.com/", "empty label"),
    ("unclosed ipv6", "https://[::1/", "not a valid URL"),
    ("space in host", "https://exa mple.com/", "invalid host name label"),
    ("percent in host", "https://exa%20mple.com/", "invalid host name label"),
    ("label of 64", f"https://{'a' * 64}.com/", "longer than 63"),
    ("host of 254", "https://" + ".".join(["a" * 50] * 5) + "x" * 4 + "/", "longer than 253"),
    ("leading hyphen", "https://-cdn.example.com/", "invalid host name label"),
    ("bad ipv4", "https://999.1.1.1/", "IPv4"),
    ("port out of range", "https://cdn.example.com:99999/", "out of range"),
    ("port not a number", "https://cdn.example.com:abc/", "port"),
    ("no host", "https:///v.mp4", "absolute"),
    ("relative", "/files/v.mp4", "absolute"),
    ("no scheme", "//cdn.example.com/v.mp4", "absolute"),
    ("leading space", " https://cdn.example.com/v.mp4", "absolute"),
    ("nul", "https://cdn.example.com/v\x00.mp4", "control character"),
    ("newline", "https://cdn.example.com/v.mp4\r\nX-Evil: 1", "control character"),
    ("tab", "https://cdn.example.com/\tv.mp4", "control character"),
    ("c1 control", "https://cdn.example.com/\x85v.mp4", "control character"),
    ("lone surrogate", "https://cdn.example.com/\ud800.mp4", "control character"),
    ("too long", "https://cdn.example.com/?" + "s" * 8192, "more than 8192"),
]

# Too long to store, but a download could use it.
UNUSABLE_URLS = [b for b in BAD_URLS if b[0] != "too long"]


def raw_with_url(url: str) -> bytes:
    return body(status="completed", video_url=url)


class TestVideoUrl:
    """A video_url is stored whole and usable, or the answer is malformed."""

    @pytest.mark.parametrize("url", [u for _, u in GOOD_URLS], ids=[g[0] for g in GOOD_URLS])
    def test_good_links_pass_unchanged(self, url: str) -> None:
        assert parse(raw_with_url(url)).video_url == url

    @pytest.mark.parametrize(
        ("url", "fragment"),
        [(url, frag) for _, url, frag in BAD_URLS],
        ids=[b[0] for b in BAD_URLS],
    )
    def test_bad_links_are_malformed(self, url: str, fragment: str) -> None:
        with pytest.raises(errors.MalformedAnswer) as caught:
            parse(raw_with_url(url))
        message = str(caught.value)
        assert message.startswith("malformed answer: video_url ")
        assert fragment in message
        assert "\n" not in message
        assert len(message) < 300
        message.encode("utf-8")

    @pytest.mark.parametrize(
        "url", [u for _, u, _ in UNUSABLE_URLS], ids=[b[0] for b in UNUSABLE_URLS]
    )
    async def test_the_download_refuses_them_too(self, url: str) -> None:
        # Rows stored before these checks: a typed error before any lookup or connection.
        rules = netguard.UrlRules(allow_private_hosts=True)  # no DNS lookup either
        http = providers_http.HttpProvider(
            "http://127.0.0.1:9", "key", url_rules=rules, dialect=reseller.DIALECT
        )
        try:
            with pytest.raises(errors.DownloadError, match="not a valid URL"):
                async with http.open_video(models.Task(task_id="video_x", video_url=url)):
                    pass
        finally:
            await http.aclose()

    def test_an_empty_link_is_no_link(self) -> None:
        assert parse(raw_with_url("")).video_url == ""

    def test_a_link_is_parsed_once_and_a_bad_one_every_time(self) -> None:
        """The answer's read and the download's check share one parse of a good link (httpx's
        costs 23-55 us); a bad link is refused the second time as the first."""
        url = "https://cdn.example.com/v/parsed-once.mp4?X-Signature=abc"
        assert parse(raw_with_url(url)).video_url == url
        before = netguard.parse_url.cache_info()
        assert str(netguard.parse_url(url)) == url
        after = netguard.parse_url.cache_info()
        assert (after.hits, after.misses) == (before.hits + 1, before.misses)
        bad = "https://cdn.example.com/v\x00.mp4"
        for _ in range(2):
            with pytest.raises(errors.MalformedAnswer, match="control character"):
                parse(raw_with_url(bad))

    @given(st.text(alphabet=st.characters(exclude_categories=()), max_size=60))
    def test_any_link_is_accepted_only_if_httpx_can_request_it(self, tail: str) -> None:
        for url in (f"https://{tail}", f"https://cdn.example.com/{tail}", tail):
            try:
                got = parse(
                    json.dumps({"id": TASK_ID, "status": "completed", "video_url": url}).encode()
                )
            except errors.MalformedAnswer:
                continue
            assert got.video_url == url
            if url:
                assert httpx.Request("GET", url).url.host


FIELD_VALUES = st.one_of(
    jsonfuzz.JSON_VALUES,
    st.just(TASK_ID),
    st.sampled_from([s.value for s in models.Status]),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.just("https://cdn.example.com/v.mp4"),
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
    def test_arbitrary_json_objects(self, payload: dict[str, Any]) -> None:
        parses_or_refuses(json.dumps(payload).encode())

    @given(ANSWERS)
    def test_arbitrary_json_objects_with_the_right_id(self, payload: dict[str, Any]) -> None:
        parses_or_refuses(json.dumps({**payload, "id": TASK_ID}).encode())

    @given(jsonfuzz.JSON_VALUES)
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
        assert utils.parse_retry_after(value, NOW) == expected

    def test_http_date_in_the_future(self) -> None:
        value = http_date(NOW + dt.timedelta(seconds=120))
        assert utils.parse_retry_after(value, NOW) == 120.0

    def test_http_date_in_the_past_means_now(self) -> None:
        value = http_date(NOW - dt.timedelta(hours=1))
        assert utils.parse_retry_after(value, NOW) == 0.0

    @pytest.mark.parametrize("value", ["soon", "abc def", "Mon, 99 Foo 2026", "nan", "inf", ""])
    def test_garbage_is_none(self, value: str) -> None:
        assert utils.parse_retry_after(value, NOW) is None

    def test_absent_is_none(self) -> None:
        assert utils.parse_retry_after(None, NOW) is None

    def test_huge_seconds_are_capped(self) -> None:
        got = utils.parse_retry_after("999999999", NOW)
        assert got == utils.RETRY_AFTER_MAX_SECONDS

    def test_far_future_date_is_capped(self) -> None:
        value = http_date(NOW + dt.timedelta(days=30))
        assert utils.parse_retry_after(value, NOW) == utils.RETRY_AFTER_MAX_SECONDS

    @given(st.text(max_size=40))
    def test_any_header_is_none_or_in_range(self, value: str) -> None:
        got = utils.parse_retry_after(value, NOW)
        assert got is None or 0.0 <= got <= utils.RETRY_AFTER_MAX_SECONDS
