"""What the parser tests of both provider dialects fuzz with: any JSON, and the check that an
answer is usable or refused as malformed."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable

from hypothesis import strategies as st
from seedance_archiver import errors, models

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


def parses_or_refuses(parse: Callable[[bytes], models.Answer], raw: bytes, task_id: str) -> None:
    """``parse(raw)`` is a usable Answer about ``task_id``, or raises MalformedAnswer."""
    try:
        answer = parse(raw)
    except errors.MalformedAnswer:
        return
    assert answer.id == task_id
    assert isinstance(answer.status, models.Status)
    assert answer.created is None or answer.created.utcoffset() == dt.timedelta(0)
    assert answer.actual_duration is None or math.isfinite(answer.actual_duration)
    assert answer.error is None or isinstance(answer.error, str)
    assert answer.expires_at is None or answer.expires_at.utcoffset() == dt.timedelta(0)
    assert all(isinstance(name, str) and isinstance(why, str) for name, why in answer.ignored)
