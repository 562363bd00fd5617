"""The request body's nesting limit: ``parse_json_text`` refuses exactly the texts whose
value ``json_depth_ok`` refuses, with or without its bracket-count shortcut."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import Limits
from proxy.errors import LimitExceeded
from proxy.query.spec import json_depth_ok, parse_json_text

scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=5)
# strings full of brackets: they make the count overcount, never undercount
bracketed = st.text(alphabet="[]{}a", max_size=6)
values = st.recursive(
    scalars | bracketed,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=30,
)


@given(values, st.integers(1, 8), st.booleans())
def test_the_verdict_is_the_walks(value: Any, depth: int, as_text: bool) -> None:
    raw = orjson.dumps(value)
    text: str | bytes = raw.decode() if as_text else raw
    limits = Limits(max_json_depth=depth)
    if json_depth_ok(value, depth):
        assert parse_json_text(text, limits, "body") == value
    else:
        with pytest.raises(LimitExceeded) as info:
            parse_json_text(text, limits, "body")
        assert info.value.code == "too_deep"


def test_a_deep_body_is_refused_and_a_deep_string_is_not() -> None:
    limits = Limits(max_json_depth=4)
    with pytest.raises(LimitExceeded):
        parse_json_text(b"[[[[[1]]]]]", limits, "body")
    assert parse_json_text(b'{"a": "[[[[[[[[{{{{"}', limits, "body") == {"a": "[[[[[[[[{{{{"}
