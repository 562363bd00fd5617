"""The aggregation reference's expression operators: MongoDB's documented examples and the
table of docs/aggregation.md, with exact expected outputs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.reference_aggregate import ExpressionFailed, aggregate

Json = Any
DOC = {
    "_id": "1",
    "n": 7,
    "x": 2.5,
    "s": "  héllo ",
    "arr": [1, 2, 3, 4],
    "objs": [{"b": 1}, {"c": 2}, 5, [{"b": 3}]],
    "o": {"p": {"q": "deep"}},
    "z": None,
    "t": True,
}


def ev(expr: Json, doc: dict[str, Json] | None = None) -> Json:
    """The value of ``expr`` over ``doc`` (MISSING shows as the string "<missing>")."""
    src = DOC if doc is None else {"_id": "1", **doc}
    out = aggregate({"c": [src]}, "c", [{"$project": {"_id": 0, "v": expr}}])
    return out[0].get("v", "<missing>")


def fails(expr: Json, doc: dict[str, Json] | None = None, op: str = "") -> None:
    with pytest.raises(ExpressionFailed, match=op.replace("$", r"\$")):
        ev(expr, doc)


def test_field_paths_map_arrays_and_variables() -> None:
    assert ev("$objs.b") == [1, [3]]
    assert ev("$o.p.q") == "deep"
    assert ev("$n.a") == "<missing>"
    assert ev("$arr.0") == []  # a numeric segment is a key, never an index
    assert ev("$$ROOT.o.p") == {"q": "deep"}
    assert ev("$$CURRENT.n") == 7
    assert ev({"$literal": "$n"}) == "$n"
    assert ev({"a": "$n", "b": "$nope", "c": ["$nope", 1]}) == {"a": 7, "c": [None, 1]}


def test_arithmetic() -> None:
    assert ev({"$add": ["$n", 1, 0.5]}) == 8.5
    assert ev({"$add": []}) == 0
    assert ev({"$multiply": []}) == 1
    assert ev({"$add": ["$n", None]}) is None
    assert ev({"$multiply": ["$n", "$nope"]}) is None
    fails({"$add": ["$n", "1"]}, op="$add")
    fails({"$add": ["$n", True]}, op="$add")
    assert ev({"$subtract": ["$n", 10]}) == -3
    assert ev({"$subtract": ["$z", 1]}) is None
    assert ev({"$divide": [7, 2]}) == 3.5
    assert ev({"$divide": [6, 3]}) == 2.0
    fails({"$divide": [1, 0]}, op="$divide")
    fails({"$divide": ["a", 2]}, op="$divide")
    assert ev({"$mod": [-7, 3]}) == -1
    assert ev({"$mod": [7, -3]}) == 1
    assert ev({"$mod": [7.5, 2]}) == 1.5
    fails({"$mod": [7, 0]}, op="$mod")
    assert ev({"$abs": -2.5}) == 2.5
    assert ev({"$floor": [-2.5]}) == -3
    assert ev({"$ceil": 2.25}) == 3
    assert ev({"$ceil": "$nope"}) is None
    fails({"$abs": "x"}, op="$abs")


def test_round_half_to_even() -> None:
    assert [ev({"$round": v}) for v in (2.5, 3.5, -2.5, 0.5, 1.5)] == [2, 4, -2, 0, 2]
    assert ev({"$round": [1.2345, 2]}) == 1.23
    assert ev({"$round": [1.235, 2]}) == 1.24
    assert ev({"$round": [1234.5678, -2]}) == 1200
    assert ev({"$round": [1250, -2]}) == 1200
    assert ev({"$round": [19, 1]}) == 19
    assert ev({"$round": [None, 1]}) is None


def test_comparisons_with_missing_below_null_and_type_order() -> None:
    assert ev({"$eq": [1, 1.0]}) is True
    assert ev({"$eq": [True, 1]}) is False
    assert ev({"$eq": ["$nope", None]}) is False
    assert ev({"$eq": ["$nope", "$nothing"]}) is True
    assert ev({"$lt": ["$nope", None]}) is True
    assert ev({"$gt": ["a", 99]}) is True
    assert ev({"$gt": [[1], "a"]}) is True
    assert ev({"$lt": [[1, 2], [1, 2, 0]]}) is True
    assert ev({"$gte": [False, [5]]}) is True
    assert ev({"$ne": [{"a": 1, "b": 2}, {"b": 2, "a": 1}]}) is False
    assert [ev({"$cmp": [a, b]}) for a, b in ((1, 2), (2, 2.0), ("b", "a"))] == [-1, 0, 1]


def test_logic_and_truthiness() -> None:
    assert ev({"$and": []}) is True
    assert ev({"$or": []}) is False
    assert ev({"$and": [1, "", [], {"$literal": {}}]}) is True
    assert ev({"$or": [0, None, "$nope", False]}) is False
    assert ev({"$not": [None]}) is True
    assert ev({"$not": 0}) is True
    assert ev({"$not": [[False]]}) is False
    assert ev({"$and": [False, {"$divide": [1, 0]}]}) is False  # short-circuits


def test_cond_if_null_switch() -> None:
    assert ev({"$cond": [{"$gte": ["$n", 5]}, "big", "small"]}) == "big"
    assert ev({"$cond": {"if": "$nope", "then": 1, "else": {"$add": [1, 1]}}}) == 2
    assert ev({"$cond": [True, 1, {"$divide": [1, 0]}]}) == 1
    assert ev({"$ifNull": ["$nope", "$z", "$n"]}) == 7
    assert ev({"$ifNull": ["$nope", None]}) is None
    assert ev({"$ifNull": ["$z", "$nope"]}) == "<missing>"
    switch = {
        "$switch": {
            "branches": [
                {"case": {"$gte": ["$n", 90]}, "then": "A"},
                {"case": {"$gte": ["$n", 5]}, "then": "B"},
            ],
            "default": "F",
        }
    }
    assert ev(switch) == "B"
    assert ev(switch, {"n": 1}) == "F"
    del switch["$switch"]["default"]
    fails(switch, {"n": 1}, op="$switch")


def test_strings() -> None:
    assert ev({"$concat": ["a", "$o.p.q", ""]}) == "adeep"
    assert ev({"$concat": []}) == ""
    assert ev({"$concat": ["a", "$nope"]}) is None
    fails({"$concat": ["a", 1]}, op="$concat")
    assert ev({"$toUpper": "abcÉé1"}) == "ABCÉé1"
    assert ev({"$toLower": ["ABCÉé"]}) == "abcÉé"
    assert ev({"$toLower": "$nope"}) == ""
    fails({"$toUpper": 5}, op="$toUpper")
    assert ev({"$substrCP": ["cafétéria", 0, 5]}) == "cafét"
    assert ev({"$substrCP": ["cafétéria", 5, 99]}) == "éria"
    assert ev({"$substrCP": ["寿司sushi", 0, 3]}) == "寿司s"
    assert ev({"$substrCP": ["$nope", 0, 1]}) == ""
    fails({"$substrCP": ["abc", -1, 1]}, op="$substrCP")
    fails({"$substrCP": [5, 0, 1]}, op="$substrCP")
    assert ev({"$strLenCP": "寿司é"}) == 3
    fails({"$strLenCP": "$nope"}, op="$strLenCP")
    assert ev({"$split": ["June-15-2013", "-"]}) == ["June", "15", "2013"]
    assert ev({"$split": ["a,b,", ","]}) == ["a", "b", ""]
    assert ev({"$split": ["$nope", ","]}) is None
    fails({"$split": ["abc", ""]}, op="$split")
    fails({"$split": [1, ","]}, op="$split")


def test_trim() -> None:
    assert ev({"$trim": {"input": "$s"}}) == "héllo"
    assert ev({"$trim": {"input": "\u3000\u00a0x\t\n\u2003"}}) == "x"
    assert ev({"$trim": {"input": "ggxyzgg", "chars": "g"}}) == "xyz"
    assert ev({"$trim": {"input": " xyz*", "chars": "* "}}) == "xyz"
    assert ev({"$trim": {"input": "$nope"}}) is None
    fails({"$trim": {"input": 5}}, op="$trim")


def test_arrays() -> None:
    assert ev({"$size": "$arr"}) == 4
    fails({"$size": "$nope"}, op="$size")
    fails({"$size": "$n"}, op="$size")
    assert ev({"$arrayElemAt": ["$arr", 0]}) == 1
    assert ev({"$arrayElemAt": ["$arr", -1]}) == 4
    assert ev({"$arrayElemAt": ["$arr", 15]}) == "<missing>"
    assert ev({"$arrayElemAt": ["$nope", 0]}) is None
    fails({"$arrayElemAt": ["$arr", 1.5]}, op="$arrayElemAt")
    fails({"$arrayElemAt": ["$n", 0]}, op="$arrayElemAt")
    assert ev({"$in": [2.0, "$arr"]}) is True
    assert ev({"$in": [None, [None]]}) is True
    assert ev({"$in": ["$nope", [None]]}) is False
    assert ev({"$in": [[1], [[1], 2]]}) is True
    fails({"$in": [1, "$nope"]}, op="$in")
    assert ev({"$concatArrays": ["$arr", [[5]], []]}) == [1, 2, 3, 4, [5]]
    assert ev({"$concatArrays": ["$arr", "$z"]}) is None
    fails({"$concatArrays": ["$arr", "x"]}, op="$concatArrays")


def test_filter_and_map() -> None:
    gt2 = {"$filter": {"input": "$arr", "as": "v", "cond": {"$gt": ["$$v", 2]}}}
    assert ev(gt2) == [3, 4]
    assert ev({"$filter": {"input": "$arr", "cond": {"$mod": ["$$this", 2]}, "limit": 1}}) == [1]
    assert ev({"$filter": {"input": "$nope", "cond": True}}) is None
    fails({"$filter": {"input": "$n", "cond": True}}, op="$filter")
    assert ev({"$map": {"input": "$arr", "as": "v", "in": {"$multiply": ["$$v", "$n"]}}}) == [
        7,
        14,
        21,
        28,
    ]
    assert ev({"$map": {"input": "$objs", "in": "$$this.b"}}) == [1, None, None, [3]]
    nested = {
        "$map": {
            "input": [1, 2],
            "in": {"$map": {"input": [10], "as": "y", "in": {"$add": ["$$this", "$$y"]}}},
        }
    }
    assert ev(nested) == [[11], [12]]
    assert ev({"$map": {"input": None, "in": 1}}) is None


def test_slice() -> None:
    assert ev({"$slice": ["$arr", 2]}) == [1, 2]
    assert ev({"$slice": ["$arr", -2]}) == [3, 4]
    assert ev({"$slice": ["$arr", -9]}) == [1, 2, 3, 4]
    assert ev({"$slice": ["$arr", 0]}) == []
    assert ev({"$slice": ["$arr", 1, 2]}) == [2, 3]
    assert ev({"$slice": ["$arr", -3, 2]}) == [2, 3]
    assert ev({"$slice": ["$arr", -9, 2]}) == [1, 2]
    assert ev({"$slice": ["$arr", 9, 2]}) == []
    assert ev({"$slice": ["$nope", 1]}) is None
    fails({"$slice": ["$arr", 1, 0]}, op="$slice")
    fails({"$slice": ["$n", 1]}, op="$slice")


def test_type_names() -> None:
    cases = {
        "$nope": "missing",
        "$z": "null",
        "$t": "bool",
        "$s": "string",
        "$o": "object",
        "$arr": "array",
        "$n": "int",
        "$x": "double",
    }
    assert {path: ev({"$type": path}) for path in cases} == cases
    assert ev({"$type": {"$literal": 2**31}}) == "long"
    assert ev({"$type": {"$literal": -(2**31)}}) == "int"
    assert ev({"$type": 1.0}) == "double"
    assert ev({"$type": [[1]]}) == "array"


def test_to_int() -> None:
    assert [ev({"$toInt": v}) for v in (True, False, 5, -2.9, 2.9, "-12", "+3", None)] == [
        1,
        0,
        5,
        -2,
        2,
        -12,
        3,
        None,
    ]
    for bad in ("1.5", "abc", "", " 1", 2**31, "2147483648", [1]):
        fails({"$toInt": {"$literal": bad}}, op="$toInt")
    assert ev({"$toInt": 2**31 - 1}) == 2**31 - 1


def test_to_double() -> None:
    assert [ev({"$toDouble": v}) for v in (True, 5, 2.5, "1.5", "-2", "1e3", ".5", "$nope")] == [
        1.0,
        5.0,
        2.5,
        1.5,
        -2.0,
        1000.0,
        0.5,
        None,
    ]
    for bad in ("abc", "inf", "nan", "1e999", "", [1], {"a": 1}):
        fails({"$toDouble": {"$literal": bad}}, op="$toDouble")


def test_to_string() -> None:
    values = ("x", True, False, 42, -7, 1.0, -3.0, 2.5)
    assert [ev({"$toString": v}) for v in values] == [
        "x",
        "true",
        "false",
        "42",
        "-7",
        "1",
        "-3",
        "2.5",
    ]
    assert ev({"$toString": "$nope"}) is None
    fails({"$toString": "$arr"}, op="$toString")
    fails({"$toString": "$o"}, op="$toString")
