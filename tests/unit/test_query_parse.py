"""Unit tests of the query front end (proxy/query/parse.py): grammar, limits, error codes."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import Limits
from proxy.errors import BadRequest, ForbiddenOperator, InvalidQuery, LimitExceeded
from proxy.query.ast import (
    MATCH_ALL,
    And,
    Cmp,
    ElemMatch,
    Eq,
    Exists,
    FieldCond,
    In,
    Never,
    Nor,
    Not,
    Or,
    Path,
    Regex,
    Size,
    SortKey,
    TypeIs,
)
from proxy.query.parse import (
    is_update_document,
    parse_fields,
    parse_filter,
    parse_sort,
    parse_update,
)

L = Limits()


def p(*segs: str) -> Path:
    return Path(segs)


@pytest.mark.parametrize(
    ("raw", "ast"),
    [
        (None, MATCH_ALL),
        ({}, MATCH_ALL),
        ({"a": 1}, FieldCond(p("a"), (Eq(1),))),
        ({"a.b": None}, FieldCond(p("a", "b"), (Eq(None),))),
        ({"a": {"x": 1}}, FieldCond(p("a"), (Eq({"x": 1}),))),
        ({"a": {"$ne": 2}}, FieldCond(p("a"), (Not((Eq(2),)),))),
        ({"a": {"$gt": 1, "$lte": 5}}, FieldCond(p("a"), (Cmp("gt", 1), Cmp("lte", 5)))),
        ({"a": {"$gte": None}}, FieldCond(p("a"), (Eq(None),))),
        ({"a": {"$lt": None}}, FieldCond(p("a"), (Never(),))),
        ({"a": {"$in": []}}, FieldCond(p("a"), (Never(),))),
        ({"a": {"$nin": [1, None]}}, FieldCond(p("a"), (Not((In((1, None)),)),))),
        ({"a": {"$exists": 0}}, FieldCond(p("a"), (Exists(False),))),
        (
            {"a": {"$type": ["int", "double", "bool"]}},
            FieldCond(p("a"), (TypeIs(("bool", "number")),)),
        ),
        ({"a": {"$regex": "x", "$options": "si"}}, FieldCond(p("a"), (Regex("x", "is"),))),
        ({"a": {"$not": "^x"}}, FieldCond(p("a"), (Not((Regex("^x", ""),)),))),
        ({"a": {"$all": [1, 2]}}, FieldCond(p("a"), (Eq(1), Eq(2)))),
        ({"a": {"$size": 2}}, FieldCond(p("a"), (Size(2),))),
        ({"a": {"$elemMatch": {"$gt": 1}}}, FieldCond(p("a"), (ElemMatch((Cmp("gt", 1),), None),))),
        (
            {"a": {"$elemMatch": {"b": 1}}},
            FieldCond(p("a"), (ElemMatch(None, FieldCond(p("b"), (Eq(1),))),)),
        ),
        ({"a": 1, "b": 2}, And((FieldCond(p("a"), (Eq(1),)), FieldCond(p("b"), (Eq(2),))))),
        ({"$or": [{"a": 1}]}, Or((FieldCond(p("a"), (Eq(1),)),))),
        ({"$nor": [{"a": 1}]}, Nor((FieldCond(p("a"), (Eq(1),)),))),
    ],
)
def test_parse_filter(raw: Any, ast: Any) -> None:
    assert parse_filter(raw, L) == ast


@pytest.mark.parametrize(
    ("raw", "exc", "code"),
    [
        ([1], InvalidQuery, "invalid_query"),
        ({"$where": "x"}, ForbiddenOperator, "forbidden_operator"),
        ({"a": {"$function": 1}}, ForbiddenOperator, "forbidden_operator"),
        ({"a": {"$accumulator": 1}}, ForbiddenOperator, "forbidden_operator"),
        ({"$expr": {}}, ForbiddenOperator, "forbidden_operator"),
        ({"a": {"$near": 1}}, InvalidQuery, "unknown_operator"),
        ({"a": {"$gt": 1, "b": 2}}, InvalidQuery, "invalid_query"),
        ({"$or": []}, InvalidQuery, "invalid_query"),
        ({"$or": [1]}, InvalidQuery, "invalid_query"),
        ({"a": {"$in": 1}}, InvalidQuery, "invalid_query"),
        ({"a": {"$in": [{"$gt": 1}]}}, InvalidQuery, "invalid_query"),
        ({"a": {"$exists": "yes"}}, InvalidQuery, "invalid_query"),
        ({"a": {"$type": "date"}}, InvalidQuery, "invalid_operator_value"),
        ({"a": {"$gt": [1]}}, InvalidQuery, "invalid_operator_value"),
        ({"a": {"$size": -1}}, InvalidQuery, "invalid_query"),
        ({"a": {"$size": True}}, InvalidQuery, "invalid_query"),
        ({"a": {"$all": []}}, InvalidQuery, "invalid_query"),
        ({"a": {"$options": "i"}}, InvalidQuery, "invalid_query"),
        ({"a": {"$regex": 5}}, InvalidQuery, "invalid_query"),
        ({"a": {"$regex": "x", "$options": "q"}}, InvalidQuery, "invalid_query"),
        ({"a": {"$not": 5}}, InvalidQuery, "invalid_query"),
        ({"a": float("nan")}, InvalidQuery, "invalid_query"),
        ({"": 1}, InvalidQuery, "invalid_query"),
        ({"a.": 1}, InvalidQuery, "invalid_query"),
        ({"a.$b": 1}, InvalidQuery, "invalid_field_path"),
        ({".".join("a" * 17): 1}, LimitExceeded, "path_too_deep"),
        ({"a": {"$in": list(range(1001))}}, LimitExceeded, "in_list_too_long"),
        ({"a": {"$regex": "x" * 257}}, LimitExceeded, "regex_too_long"),
        ({"$and": [{"a": i} for i in range(250)]}, LimitExceeded, "filter_too_large"),
    ],
)
def test_parse_filter_rejects(raw: Any, exc: type[BadRequest], code: str) -> None:
    with pytest.raises(exc) as info:
        parse_filter(raw, L)
    assert info.value.code == code
    assert info.value.status == 400


def test_error_names_operator_and_path() -> None:
    with pytest.raises(ForbiddenOperator) as info:
        parse_filter({"$or": [{"a": 1}, {"b": {"$where": "x"}}]}, L)
    assert info.value.details == {"operator": "$where", "path": "$or[1].b.$where"}


def test_limits_are_configurable() -> None:
    small = Limits(max_filter_nodes=3, max_in_items=2, max_regex_length=3)
    parse_filter({"a": 1, "b": 2}, small)
    with pytest.raises(LimitExceeded):
        parse_filter({"a": 1, "b": 2, "c": 3, "d": 4}, small)
    with pytest.raises(LimitExceeded):
        parse_filter({"a": {"$in": [1, 2, 3]}}, small)
    with pytest.raises(LimitExceeded):
        parse_filter({"a": {"$regex": "abcd"}}, small)


@pytest.mark.parametrize(
    ("raw", "keys"),
    [
        (None, ()),
        ("-age,name", (SortKey(p("age"), True), SortKey(p("name"), False))),
        ("+a", (SortKey(p("a"), False),)),
        ({"a.b": -1, "c": 1}, (SortKey(p("a", "b"), True), SortKey(p("c"), False))),
        ([["a", -1]], (SortKey(p("a"), True),)),
        ("a,_id", (SortKey(p("a"), False),)),
    ],
)
def test_parse_sort(raw: Any, keys: Any) -> None:
    assert parse_sort(raw, L) == keys


@pytest.mark.parametrize("raw", ["a,a", {"a": 2}, {"a": True}, 5, [["a"]], "a,,b", "$x"])
def test_parse_sort_rejects(raw: Any) -> None:
    with pytest.raises(BadRequest):
        parse_sort(raw, L)


def test_parse_fields() -> None:
    assert parse_fields("a, b.c", L) == (p("a"), p("b", "c"))
    assert parse_fields(["x"], L) == (p("x"),)
    assert parse_fields(None, L) is None
    with pytest.raises(BadRequest):
        parse_fields([1], L)


def test_parse_update() -> None:
    upd = parse_update(
        {"$set": {"a.b": 1}, "$push": {"l": {"$each": [1, 2]}}, "$unset": {"x": ""}}, L
    )
    assert [(o.op, o.path.dotted, o.value) for o in upd.ops] == [
        ("set", "a.b", 1),
        ("push", "l", (1, 2)),
        ("unset", "x", None),
    ]
    pull = parse_update({"$pull": {"l": {"$gt": 3}}}, L)
    assert pull.ops[0].value == (Cmp("gt", 3),)
    ren = parse_update({"$rename": {"a": "b.c"}}, L)
    assert ren.ops[0].value == p("b", "c")
    assert is_update_document({"$set": {}}) and not is_update_document({"a": 1})


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ({}, "invalid_update"),
        ({"$set": 1}, "invalid_update"),
        ({"$set": {"_id": 1}}, "immutable_field"),
        ({"$unset": {"_version": ""}}, "immutable_field"),
        ({"$rename": {"a": "_id"}}, "immutable_field"),
        ({"$rename": {"a": "a"}}, "invalid_update"),
        ({"$rename": {"a": 1}}, "invalid_update"),
        ({"$inc": {"a": True}}, "invalid_update"),
        ({"$push": {"a": {"$each": 1}}}, "invalid_update"),
        ({"$push": {"a": {"$slice": 1}}}, "invalid_update"),
        ({"$set": {"a": 1}, "$unset": {"a": ""}}, "conflicting_update"),
        ({"$set": {"a.b": 1}, "$inc": {"a": 1}}, "conflicting_update"),
        ({"$rename": {"a": "b"}, "$set": {"b.c": 1}}, "conflicting_update"),
        ({"$setOnInsert": {"a": 1}}, "unknown_operator"),
        ({"$set": {"a": 1}, "b": 2}, "invalid_update"),
    ],
)
def test_parse_update_rejects(raw: Any, code: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_update(raw, L)
    assert info.value.code == code
