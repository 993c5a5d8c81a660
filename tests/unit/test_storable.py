"""fields.storable: text from the provider made safe for any database before it is stored."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from seedance_archiver.providers import fields

BIG = 200_000
REPLACEMENT = "\ufffd"
# Any code point, surrogates included, with the troublesome ones drawn often.
ANY_CHARACTER = st.characters(exclude_categories=()) | st.sampled_from(
    ["\x00", "\ud800", "\udbff", "\udc00", "\udfff", "😀", "样"]
)

# (name, text, limit, expected)
CASES: list[tuple[str, str, int, str]] = [
    ("plain ascii", "content policy violation", 100, "content policy violation"),
    ("empty", "", 10, ""),
    ("nul", "bad\x00name", 100, f"bad{REPLACEMENT}name"),
    ("only nul", "\x00\x00", 100, REPLACEMENT * 2),
    ("lone high surrogate", "a\ud800b", 100, f"a{REPLACEMENT}b"),
    ("lone low surrogate", "a\udc00b", 100, f"a{REPLACEMENT}b"),
    ("reversed pair", "\udc00\ud800", 100, REPLACEMENT * 2),
    ("emoji and cjk untouched", "样片 😀 の動画 👩‍👩‍👧", 100, "样片 😀 の動画 👩‍👩‍👧"),
    ("other controls kept", "tab\there\nnewline\x7f", 100, "tab\there\nnewline\x7f"),
    ("mixed", "模型\x00😀\ud83d", 100, f"模型{REPLACEMENT}😀{REPLACEMENT}"),
    ("exactly the limit", "abcde", 5, "abcde"),
    ("one over the limit", "abcdef", 5, "abcde" + fields.truncation_marker(6)),
    (
        "cut then cleaned",
        "ab\x00" + "x" * 10,
        3,
        f"ab{REPLACEMENT}" + fields.truncation_marker(13),
    ),
    ("zero limit", "abc", 0, fields.truncation_marker(3)),
]


class TestStorable:
    """NUL and lone surrogates become U+FFFD; long text is cut with a visible marker."""

    @pytest.mark.parametrize(
        ("text", "limit", "expected"),
        [(text, limit, expected) for _, text, limit, expected in CASES],
        ids=[case[0] for case in CASES],
    )
    def test_table(self, text: str, limit: int, expected: str) -> None:
        got = fields.storable(text, limit)
        assert got == expected
        got.encode("utf-8")

    def test_a_200_kb_model_name_is_cut_to_the_model_cap(self) -> None:
        got = fields.storable("m" * BIG, fields.MODEL_MAX_CHARS)
        assert got == "m" * fields.MODEL_MAX_CHARS + f"…[truncated, {BIG} chars in all]"

    def test_a_200_kb_error_is_cut_to_the_error_cap(self) -> None:
        text = "模型\x00" * (BIG // 3)
        got = fields.storable(text, fields.ERROR_MAX_CHARS)
        assert got.startswith(f"模型{REPLACEMENT}")
        assert got.endswith(f"…[truncated, {len(text)} chars in all]")
        assert len(got) == fields.ERROR_MAX_CHARS + len(fields.truncation_marker(len(text)))
        assert "\x00" not in got

    def test_text_from_json_escapes(self) -> None:
        text = json.loads(b'"a\\u0000b\\ud800c\\udfffd\\ud83d\\ude00"')
        assert fields.storable(text, 100) == f"a{REPLACEMENT}b{REPLACEMENT}c{REPLACEMENT}d😀"

    def test_negative_limit_is_refused(self) -> None:
        with pytest.raises(ValueError, match="negative"):
            fields.storable("abc", -1)

    @given(
        st.text(alphabet=ANY_CHARACTER),
        st.integers(min_value=0, max_value=50),
    )
    def test_any_json_string_is_storable(self, text: str, limit: int) -> None:
        # Any Python string survives a JSON round trip (lone surrogates as \\udXXX escapes).
        text = json.loads(json.dumps(text))
        got = fields.storable(text, limit)
        got.encode("utf-8")
        assert "\x00" not in got
        assert len(got) <= limit + len(fields.truncation_marker(len(text)))
        if len(text) <= limit:
            assert len(got) == len(text)

    @given(st.text())
    def test_storable_text_passes_untouched(self, text: str) -> None:
        text = text.replace("\x00", "")
        assert fields.storable(text, len(text)) == text
