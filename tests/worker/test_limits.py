"""The JSON depth check: exact at the limit, blind to brackets inside strings, cheap for ordinary chunks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.limits import Limits, json_depth_exceeds


def depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(item) for item in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(item) for item in value), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab{}[]"\\', max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='k{["\\', max_size=3), inner,
                                                                max_size=3),
    max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(value=json_values, limit=st.integers(min_value=0, max_value=12))
def test_the_depth_check_agrees_with_the_parsed_value(value: object, limit: int) -> None:
    assert json_depth_exceeds(json.dumps(value).encode(), limit) == (depth(value) > limit)


@pytest.mark.parametrize(("raw", "limit", "exceeds"), [
    (b'{"a":{"b":[1]}}', 3, False),
    (b'{"a":{"b":[1]}}', 2, True),
    (b'{"text":"[[[[[[[[{{{{{{{{"}', 1, False),  # brackets in a string do not nest
    (b'{"text":"\\"[[[[[[[[\\\\"}', 1, False),  # nor do they after escaped quotes
    (b"[" * 10 + b"]" * 10, 9, True),
])
def test_depth_examples(raw: bytes, limit: int, exceeds: bool) -> None:
    assert json_depth_exceeds(raw, limit) is exceeds


def test_a_payload_problem_names_the_setting() -> None:
    limits = Limits(chunk_bytes=1_024, json_depth=8)
    assert limits.payload_problem(b"{}") is None
    assert "STREAMFOLD_MAX_CHUNK_BYTES=1024" in (limits.payload_problem(b"x" * 1_025) or "")
    assert "STREAMFOLD_MAX_JSON_DEPTH=8" in (limits.payload_problem(b"[" * 9 + b"]" * 9) or "")
