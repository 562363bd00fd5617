"""Unit tests of the number range (issue 13, item 6): what a request may carry (signed 64-bit
integers, finite doubles), what the update parser and the SQLite arithmetic refuse, and how a
stored number outside that range is decoded and rendered."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import Limits
from proxy.errors import BadRequest, InvalidJson, ProxyError
from proxy.query import sqlite as q
from proxy.query.parse import parse_filter, parse_update
from proxy.query.spec import parse_json_text
from tests import strategies

L = Limits()
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DOUBLE_MAX = sys.float_info.max


def refused(fn: Any, *args: Any) -> ProxyError:
    with pytest.raises(BadRequest) as info:
        fn(*args)
    assert info.value.status == 400
    assert info.value.code == "number_out_of_range", info.value.message
    return info.value


# ---- request decoding --------------------------------------------------------------------


@pytest.mark.parametrize(
    "literal",
    [
        "123456789012345678901234567890",
        "9223372036854775808",  # 2**63: orjson reads it as an int, but it is not signed 64-bit
        "18446744073709551615",
        "18446744073709551616",  # past u64: orjson silently makes it a float
        "-9223372036854775809",
        "1" + "0" * 5000,  # longer than Python's int() would parse
        "2" + "0" * 308,  # also past double range
    ],
)
def test_integers_outside_signed_64_bit_are_refused(literal: str) -> None:
    for text in (f'{{"n": {literal}}}', f'{{"a": [1, {{"b": {literal}}}]}}', literal):
        err = refused(parse_json_text, text.encode(), L, "request body")
        assert "signed 64 bits" in err.message
    refused(parse_json_text, f'{{"n": {literal}}}', L, "filter")  # str input too


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "2e308", "1.8e308", "-0.5e309"])
def test_numbers_beyond_double_range_are_refused(literal: str) -> None:
    err = refused(parse_json_text, f'{{"n": {literal}}}'.encode(), L, "request body")
    assert "double" in err.message


def test_edges_and_look_alikes_are_kept_exactly() -> None:
    text = (
        b'{"lo": -9223372036854775808, "hi": 9223372036854775807, "max": 1.7976931348623157e308,'
        b' "digits": "123456789012345678901234567890", "f": 12345678901234567890.5, "e": 1e300}'
    )
    got = parse_json_text(text, L, "request body")
    assert got["lo"] == INT64_MIN and type(got["lo"]) is int
    assert got["hi"] == INT64_MAX and got["max"] == DOUBLE_MAX
    assert got["digits"] == "123456789012345678901234567890"
    assert got["f"] == 12345678901234567890.5 and got["e"] == 1e300


def test_invalid_json_is_still_invalid_json() -> None:
    for text in (b'{"n": 1e30', b'{"n": NaN}', b'{"n": -Infinity}', b"[1,]", b'{"n": 1}}', b"\xff"):
        with pytest.raises(InvalidJson):
            parse_json_text(text, L, "request body")


@given(st.integers(min_value=-(2**80), max_value=2**80))
def test_an_integer_is_kept_exactly_or_refused(n: int) -> None:
    text = f'{{"n": {n}}}'.encode()
    if INT64_MIN <= n <= INT64_MAX:
        got = parse_json_text(text, L, "request body")["n"]
        assert got == n and type(got) is int
    else:
        refused(parse_json_text, text, L, "request body")


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_finite_double_is_kept(x: float) -> None:
    assert parse_json_text(orjson.dumps({"x": x}), L, "request body")["x"] == x


# ---- the update and filter parsers (values from any caller, not only HTTP) ----------------


@pytest.mark.parametrize("bad", [2**63, -(2**63) - 1, 2**70, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("op", ["$inc", "$mul", "$set", "$min", "$max", "$push", "$addToSet"])
def test_update_operands_outside_the_range_are_refused(op: str, bad: Any) -> None:
    if op in ("$min", "$max") and bad != bad:
        return  # NaN there has its own error (invalid_update)
    refused(parse_update, {op: {"a": bad}}, L)
    if op in ("$set", "$push"):
        refused(parse_update, {op: {"a": {"deep": [1, bad]}}}, L)


def test_filter_values_outside_the_range_are_refused() -> None:
    for flt in ({"a": 2**64}, {"a": {"$gt": 2**63}}, {"a": {"$in": [1, math.inf]}}, {"a": [2**70]}):
        refused(parse_filter, flt, L)
    parse_filter({"a": INT64_MAX, "b": {"$lt": DOUBLE_MAX}}, L)


# ---- the SQLite store's arithmetic --------------------------------------------------------


def test_sqlite_arithmetic_refuses_results_outside_the_range() -> None:
    assert q.arith("inc", str(INT64_MAX - 1), "1") == str(INT64_MAX)
    assert q.arith("mul", str(2**62), "-2") == str(INT64_MIN)
    for op, a, b in (
        ("inc", str(INT64_MAX), "1"),
        ("inc", str(INT64_MIN), "-1"),
        ("mul", str(2**62), "2"),
        ("mul", "1e308", "10"),
        ("inc", "1.7976931348623157e308", "1e300"),
        ("mul", "1e999", "1"),  # a stored infinity does not come back out
    ):
        err = refused(q.arith, op, a, b)
        assert f"${op}" in err.message


# ---- decoding what is stored ----------------------------------------------------------------


def test_stored_numbers_beyond_double_range_are_rendered_as_stored() -> None:
    from proxy import numbers

    big = "2" + "0" * 308  # PostgreSQL's jsonb writes 2e308 like this
    raw = (
        f'{{"_id": "a", "inf": 2e308, "pg": {big}, "neg": -1e999, "u64": 9223372036854775808, '
        f'"huge": 123456789012345678901234567890, "ok": [1, 2.5, null], "_version": 3}}'
    ).encode()
    doc = numbers.loads_stored(raw)
    assert doc["_id"] == "a" and doc["ok"] == [1, 2.5, None] and doc["_version"] == 3
    # within double range everything decodes as orjson decodes it
    assert doc["u64"] == 2**63 and doc["huge"] == 1.2345678901234568e29
    out = numbers.dumps_stored(doc)
    assert b'"inf":2e308' in out and f'"pg":{big},'.encode() in out and b'"neg":-1e999' in out
    assert json.loads(out)["inf"] == math.inf and json.loads(out)["pg"] == int(big)
    # such a value cannot be written back through any write path
    with pytest.raises(BadRequest) as info:
        numbers.check_value(doc)
    assert info.value.code == "number_out_of_range"
    assert numbers.loads_stored(b'{"a": 1e30}') == {"a": 1e30}  # the fast path: orjson


@given(strategies.documents())
def test_stored_documents_in_range_decode_like_orjson(doc: dict[str, Any]) -> None:
    from proxy import numbers

    raw = orjson.dumps(doc)
    assert numbers.loads_stored(raw) == orjson.loads(raw)
    assert numbers.dumps_stored(numbers.loads_stored(raw)) == raw
