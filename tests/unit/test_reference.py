"""Pin the reference evaluator (tests/reference.py) to docs/query-language.md and to known
MongoDB behaviour, and sanity-check the Hypothesis strategies that feed the differential
tests."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import ForbiddenOperator, InvalidQuery
from tests import strategies as S
from tests.reference import (
    MISSING,
    UpdateTypeError,
    apply_sort,
    apply_update,
    candidates,
    compare_values,
    matches,
    merge_patch,
    project,
    sort_key,
    update_paths_conflict,
    validate_filter,
    values,
    values_equal,
)

PROPERTY = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------
# values() / candidates()
# --------------------------------------------------------------------------------------


def test_values_follow_the_spec_algorithm() -> None:
    doc = {"a": [{"b": 1}, {"c": 2}, 3, [{"b": 9}]], "t": ["x", "y"], "o": {"0": "zero"}}
    assert values(doc, "a.b") == [1, MISSING]  # 3 and the nested array are skipped
    assert values(doc, "t.0") == ["x"]
    assert values(doc, "t.5") == [MISSING]
    assert values(doc, "o.0") == ["zero"]  # numeric segment on an object: key lookup
    assert values(doc, "t.x") == [MISSING]  # no objects in the array: [] -> [MISSING]
    assert values(doc, "missing.deep") == [MISSING]
    assert values(doc, "t.0.x") == [MISSING]  # through a scalar
    assert candidates(doc, "t") == [["x", "y"], "x", "y"]
    assert candidates({"a": [[1], 2]}, "a") == [[[1], 2], [1], 2]  # one level only


def test_values_equal_is_type_aware() -> None:
    assert values_equal(1, 1.0)
    assert not values_equal(True, 1)
    assert not values_equal(0, False)
    assert values_equal({"a": 1, "b": [1, {"c": 2}]}, {"b": [1.0, {"c": 2}], "a": 1})
    assert not values_equal([1, 2], [2, 1])
    assert not values_equal([True], [1])
    assert not values_equal(None, MISSING)
    assert values_equal(MISSING, MISSING)


def test_compare_values_follows_type_brackets() -> None:
    ordered = [None, -1, 0.5, 2, "", "B", "a", "é", {"a": 1}, [], [1], False, True]
    for i in range(len(ordered) - 1):
        assert compare_values(ordered[i], ordered[i + 1]) == -1, (ordered[i], ordered[i + 1])
    assert compare_values(MISSING, None) == 0
    assert compare_values(1, 1.0) == 0


# --------------------------------------------------------------------------------------
# matches(): a table of (document, filter, expected)
# --------------------------------------------------------------------------------------

Case = tuple[dict[str, Any], dict[str, Any], bool]

MATCH_CASES: list[Case] = [
    # implicit equality and arrays
    ({"tags": ["x", "y"]}, {"tags": "x"}, True),
    ({"tags": ["x", "y"]}, {"tags": "z"}, False),
    ({"tags": ["x", "y"]}, {"tags": ["x", "y"]}, True),
    ({"tags": ["x", "y"]}, {"tags": ["y", "x"]}, False),
    ({"tags": [["x", "y"], "z"]}, {"tags": ["x", "y"]}, True),
    ({"a": [[1, 2]]}, {"a": 1}, False),  # candidates go one level deep only
    ({"a": []}, {"a": []}, True),
    ({"a": [[]]}, {"a": []}, True),
    # null and missing
    ({}, {"a": None}, True),
    ({"a": None}, {"a": None}, True),
    ({"a": 0}, {"a": None}, False),
    ({"a": False}, {"a": None}, False),
    ({"a": []}, {"a": None}, False),
    ({"a": [None, 1]}, {"a": None}, True),
    ({"a": [{"b": 1}, {"c": 2}]}, {"a.b": None}, True),
    ({"a": [{"b": 1}, {"b": 2}]}, {"a.b": None}, False),
    ({"a": [1, 2]}, {"a.b": None}, True),  # no objects to look into: missing
    ({"a": 5}, {"a.b": None}, True),
    # dotted paths through arrays
    ({"a": [{"b": 1}, {"b": 2}]}, {"a.b": 1}, True),
    ({"a": [{"b": 1}, {"b": 2}]}, {"a.b": 2}, True),
    ({"a": [{"b": 1}, {"b": 2}]}, {"a.b": 3}, False),
    ({"a": [{"b": [1, 2]}]}, {"a.b": 2}, True),
    ({"a": [[{"b": 1}]]}, {"a.b": 1}, False),  # nested arrays are not traversed
    ({"a": [[{"b": 1}]]}, {"a.0.b": 1}, True),
    # numeric segments
    ({"tags": ["x", "y"]}, {"tags.0": "x"}, True),
    ({"tags": ["x", "y"]}, {"tags.1": "x"}, False),
    ({"tags": ["x"]}, {"tags.1": None}, True),
    ({"a": {"0": 1}}, {"a.0": 1}, True),
    ({"a": [{"0": 1}]}, {"a.0": 1}, False),  # deviation: indexes only, a[0] == {"0": 1}
    ({"a": [{"0": 1}]}, {"a.0": {"0": 1}}, True),
    # type-aware equality
    ({"n": True}, {"n": 1}, False),
    ({"n": 1}, {"n": True}, False),
    ({"n": 0}, {"n": False}, False),
    ({"n": 1.0}, {"n": 1}, True),
    ({"n": [1, True]}, {"n": True}, True),
    ({"a": {"b": 1, "c": 2}}, {"a": {"c": 2, "b": 1.0}}, True),  # key order ignored
    ({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}, False),
    ({"a": {"b": True}}, {"a": {"b": 1}}, False),
    ({"a": [{"b": 1}]}, {"a": {"b": 1}}, True),
    ({"a": {}}, {"a": {}}, True),  # {} is a literal, not an operator object
    # comparisons and type brackets
    ({"n": "5"}, {"n": {"$gt": 1}}, False),
    ({"n": 5}, {"n": {"$gt": "1"}}, False),
    ({"n": True}, {"n": {"$gt": False}}, True),
    ({"n": 1}, {"n": {"$gt": False}}, False),
    ({"n": True}, {"n": {"$gt": 0}}, False),
    ({"s": "a"}, {"s": {"$gt": "B"}}, True),  # code point order: "B" < "a"
    ({"s": "é"}, {"s": {"$gt": "b"}}, True),
    ({"s": "ab"}, {"s": {"$lte": "a"}}, False),
    ({"n": 1.0}, {"n": {"$gte": 1, "$lte": 1}}, True),
    ({"a": [1, 3]}, {"a": {"$gt": 2}}, True),
    ({"a": [0, 5]}, {"a": {"$gt": 1, "$lt": 3}}, True),  # different elements may satisfy
    ({"a": [{"b": 1}, {"b": 4}]}, {"a.b": {"$gt": 3}}, True),
    ({}, {"a": {"$gte": None}}, True),
    ({"a": None}, {"a": {"$lte": None}}, True),
    ({"a": None}, {"a": {"$gt": None}}, False),
    ({"a": None}, {"a": {"$lt": None}}, False),
    ({"a": 1}, {"a": {"$gte": None}}, False),
    # $ne / $in / $nin
    ({"tags": ["x", "y"]}, {"tags": {"$ne": "x"}}, False),
    ({"tags": ["y"]}, {"tags": {"$ne": "x"}}, True),
    ({}, {"tags": {"$ne": "x"}}, True),
    ({}, {"a": {"$ne": None}}, False),
    ({"a": 0}, {"a": {"$ne": None}}, True),
    ({"a": [None, 1]}, {"a": {"$ne": None}}, False),
    ({"tags": ["x"]}, {"tags": {"$nin": ["x", "z"]}}, False),
    ({"tags": ["y"]}, {"tags": {"$nin": ["x", "z"]}}, True),
    ({}, {"tags": {"$nin": ["x"]}}, True),
    ({}, {"tags": {"$nin": [None]}}, False),
    ({"tags": ["x", "y"]}, {"tags": {"$in": ["y", "z"]}}, True),
    ({}, {"a": {"$in": [None, 1]}}, True),
    ({"a": [1, 2]}, {"a": {"$in": [[1, 2]]}}, True),
    ({"a": 3}, {"a": {"$in": []}}, False),
    ({"a": 3}, {"a": {"$nin": []}}, True),
    ({"a": True}, {"a": {"$in": [1]}}, False),
    # $exists
    ({"a": [{"c": 1}, {"b": 2}]}, {"a.b": {"$exists": True}}, True),
    ({"a": [1, 2]}, {"a.b": {"$exists": True}}, False),
    ({"a": [{"c": 1}]}, {"a.b": {"$exists": False}}, True),
    ({"a": None}, {"a": {"$exists": True}}, True),
    ({}, {"a": {"$exists": False}}, True),
    ({"tags": []}, {"tags.0": {"$exists": True}}, False),
    ({"tags": [None]}, {"tags.0": {"$exists": True}}, True),
    # $type
    ({"a": [1]}, {"a": {"$type": "array"}}, True),
    ({"a": [1, "x"]}, {"a": {"$type": "number"}}, True),
    ({"a": [1, "x"]}, {"a": {"$type": "string"}}, True),
    ({"a": True}, {"a": {"$type": "number"}}, False),
    ({"a": True}, {"a": {"$type": "bool"}}, True),
    ({"a": False}, {"a": {"$type": "boolean"}}, True),
    ({}, {"a": {"$type": "null"}}, False),
    ({"a": None}, {"a": {"$type": "null"}}, True),
    ({"a": 1.5}, {"a": {"$type": "int"}}, True),  # no int/double distinction
    ({"a": {"b": 1}}, {"a": {"$type": ["string", "object"]}}, True),
    ({"a": [[1]]}, {"a": {"$type": "array"}}, True),
    ({"a": [{"b": 1}]}, {"a": {"$type": "object"}}, True),
    ({"a": "x"}, {"a": {"$type": "array"}}, False),
    # $regex
    ({"s": "ab"}, {"s": {"$regex": "^a"}}, True),
    ({"s": "ab"}, {"s": {"$regex": "b"}}, True),  # search, not full match
    ({"s": "ab"}, {"s": {"$regex": "^b"}}, False),
    ({"s": "AB"}, {"s": {"$regex": "^ab$", "$options": "i"}}, True),
    ({"s": "AB"}, {"s": {"$regex": "^ab$"}}, False),
    ({"tags": ["x", "ab"]}, {"tags": {"$regex": "^a"}}, True),
    ({"n": 5}, {"n": {"$regex": "5"}}, False),  # only strings match
    ({}, {"s": {"$regex": ".*"}}, False),
    ({"s": "x\nab"}, {"s": {"$regex": "^ab"}}, False),
    ({"s": "x\nab"}, {"s": {"$regex": "^ab", "$options": "m"}}, True),
    ({"s": "a\nb"}, {"s": {"$regex": "a.b"}}, False),
    ({"s": "a\nb"}, {"s": {"$regex": "a.b", "$options": "s"}}, True),
    ({"s": "ab"}, {"s": {"$regex": "a b  # comment", "$options": "x"}}, True),
    ({"s": "é"}, {"s": {"$regex": "^[ab]|é$"}}, True),
    # $all
    ({"tags": ["y", "x", "z"]}, {"tags": {"$all": ["x", "y"]}}, True),
    ({"tags": ["x"]}, {"tags": {"$all": ["x", "y"]}}, False),
    ({"tags": "x"}, {"tags": {"$all": ["x"]}}, True),
    ({"tags": [["x", "y"]]}, {"tags": {"$all": [["x", "y"]]}}, True),
    ({"a": [1, 2]}, {"a": {"$all": [1.0]}}, True),
    ({}, {"a": {"$all": [None]}}, True),
    # $size
    ({"tags": [1, 2]}, {"tags": {"$size": 2}}, True),
    ({"tags": [[1, 2]]}, {"tags": {"$size": 2}}, False),  # values, not candidates
    ({"a": [{"b": [1]}, {"b": [1, 2]}]}, {"a.b": {"$size": 2}}, True),
    ({"a": "ab"}, {"a": {"$size": 2}}, False),
    ({"tags": []}, {"tags": {"$size": 0}}, True),
    ({}, {"tags": {"$size": 0}}, False),
    ({"tags": [1, 2]}, {"tags": {"$size": 2.0}}, True),  # integral double, as MongoDB
    # $elemMatch, value form
    ({"a": [0, 5]}, {"a": {"$elemMatch": {"$gt": 1, "$lt": 3}}}, False),
    ({"a": [0, 2]}, {"a": {"$elemMatch": {"$gt": 1, "$lt": 3}}}, True),
    ({"a": 1}, {"a": {"$elemMatch": {"$eq": 1}}}, False),
    ({"a": [[5]]}, {"a": {"$elemMatch": {"$gt": 1}}}, False),  # no further expansion
    ({"a": [[5]]}, {"a": {"$elemMatch": {"$size": 1}}}, True),
    ({"a": [[5]]}, {"a": {"$elemMatch": {"$eq": 5}}}, False),
    ({"a": [None]}, {"a": {"$elemMatch": {"$eq": None}}}, True),
    ({"a": ["x", "ab"]}, {"a": {"$elemMatch": {"$regex": "^A", "$options": "i"}}}, True),
    ({"a": [1, "x"]}, {"a": {"$elemMatch": {"$not": {"$type": "number"}}}}, True),
    ({"a": [1, 2]}, {"a": {"$elemMatch": {"$not": {"$type": "number"}}}}, False),
    # $elemMatch, document form
    ({"a": [{"b": 1}, {"c": 2}]}, {"a": {"$elemMatch": {"b": 1, "c": 2}}}, False),
    ({"a": [{"b": 1, "c": 2}]}, {"a": {"$elemMatch": {"b": 1, "c": 2}}}, True),
    ({"a": [{"b": [1, 2]}]}, {"a": {"$elemMatch": {"b": 2}}}, True),
    ({"a": [1, {"b": 1}]}, {"a": {"$elemMatch": {}}}, True),  # empty: document form
    ({"a": [1, 2]}, {"a": {"$elemMatch": {}}}, False),
    ({"a": [{"b": 2}]}, {"a": {"$elemMatch": {"$or": [{"b": 1}, {"b": 2}]}}}, True),
    ({"a": [{"b": 5}]}, {"a": {"$elemMatch": {"b": {"$gt": 4}, "c": None}}}, True),
    ({"a": {"b": 1}}, {"a": {"$elemMatch": {"b": 1}}}, False),
    ({"a": [{"b": [{"c": 1}]}]}, {"a": {"$elemMatch": {"b": {"$elemMatch": {"c": 1}}}}}, True),
    # $not
    ({}, {"n": {"$not": {"$gt": 1}}}, True),
    ({"n": 5}, {"n": {"$not": {"$gt": 1}}}, False),
    ({"n": "x"}, {"n": {"$not": {"$gt": 1}}}, True),
    ({"s": "ab"}, {"s": {"$not": "^a"}}, False),
    ({"s": "ba"}, {"s": {"$not": "^a"}}, True),
    ({}, {"s": {"$not": "^a"}}, True),
    ({"s": "AB"}, {"s": {"$not": {"$regex": "^a", "$options": "i"}}}, False),
    ({"a": [1, 5]}, {"a": {"$not": {"$gt": 3}}}, False),
    # logical operators
    ({"n": 1}, {"$or": [{"n": 2}, {"n": 1}]}, True),
    ({"n": 1}, {"$and": [{"n": {"$gt": 0}}, {"n": {"$lt": 2}}]}, True),
    ({"n": 1}, {"$nor": [{"n": 1}]}, False),
    ({}, {"$nor": [{"n": 1}, {"s": "a"}]}, True),
    ({"n": 1, "s": "b"}, {"n": 1, "$or": [{"s": "a"}, {"s": "b"}]}, True),
    ({"n": 2, "s": "b"}, {"n": 1, "$or": [{"s": "a"}, {"s": "b"}]}, False),
    ({"n": 1}, {"$and": [{"$or": [{"n": 1}]}, {"$nor": [{"s": {"$exists": True}}]}]}, True),
    ({"anything": [1]}, {}, True),
]


@pytest.mark.parametrize(
    ("doc", "flt", "expected"),
    MATCH_CASES,
    ids=lambda v: repr(v)[:60],
)
def test_matches(doc: dict[str, Any], flt: dict[str, Any], expected: bool) -> None:
    assert matches(doc, flt) is expected


ERROR_CASES: list[Any] = [
    {"a": {"$gt": 1, "b": 2}},  # mixing operators and fields
    {"a": {"$foo": 1}},
    {"$expr": {"$eq": [1, 1]}},
    {"$text": {"$search": "x"}},
    {"a": {"$mod": [2, 0]}},
    {"a": {"$and": [{"b": 1}]}},  # logical operators are not value operators
    {"a": {"$gt": {"b": 1}}},
    {"a": {"$lt": [1]}},
    {"$and": []},
    {"$or": {"a": 1}},
    {"$nor": [1]},
    {"a": {"$options": "i"}},
    {"a": {"$regex": "("}},
    {"a": {"$regex": "a", "$options": "q"}},
    {"a": {"$regex": 5}},
    {"a": {"$type": "date"}},
    {"a": {"$type": []}},
    {"a": {"$size": -1}},
    {"a": {"$size": 1.5}},
    {"a": {"$size": True}},
    {"a": {"$exists": 1}},
    {"a": {"$in": 1}},
    {"a": {"$all": []}},
    {"a": {"$not": {}}},
    {"a": {"$not": {"b": 1}}},
    {"a": {"$not": 5}},
    {"a": {"$elemMatch": {"$gt": 1, "b": 1}}},
    {"a": {"$elemMatch": 1}},
    {"a..b": 1},
    {"a.$b": 1},
    {"": 1},
    {"a": {"$elemMatch": {"b": {"$bad": 1}}}},
    [],
]


@pytest.mark.parametrize("flt", ERROR_CASES, ids=repr)
def test_invalid_filters_are_rejected_whatever_the_document(flt: Any) -> None:
    docs: list[dict[str, Any]] = [{}, {"a": []}, {"a": 1}]
    for doc in docs:
        with pytest.raises(InvalidQuery) as info:
            matches(doc, flt)
        assert not isinstance(info.value, ForbiddenOperator)


@pytest.mark.parametrize(
    "flt", [{"$where": "1"}, {"a": {"$where": 1}}, {"$or": [{"$function": {}}]}], ids=repr
)
def test_server_side_code_is_forbidden(flt: dict[str, Any]) -> None:
    with pytest.raises(ForbiddenOperator):
        validate_filter(flt)


# --------------------------------------------------------------------------------------
# Sort
# --------------------------------------------------------------------------------------


def _ids(docs: list[dict[str, Any]]) -> list[str]:
    return [d["_id"] for d in docs]


TYPED_DOCS: list[dict[str, Any]] = [
    {"_id": "k", "n": True},
    {"_id": "j", "n": False},
    {"_id": "i", "n": [1]},
    {"_id": "h", "n": {"x": 1}},
    {"_id": "g", "n": "é"},
    {"_id": "f", "n": "a"},
    {"_id": "e", "n": "B"},
    {"_id": "d", "n": 2.5},
    {"_id": "c", "n": -1},
    {"_id": "b", "n": None},
    {"_id": "a"},
]


def test_sort_order_across_types() -> None:
    assert _ids(apply_sort(TYPED_DOCS, [("n", 1)])) == list("abcdefghijk")
    # descending: brackets reversed, but missing/null still tie-break on _id ascending
    assert _ids(apply_sort(TYPED_DOCS, [("n", -1)])) == list("kjihgfedcab")


def test_sort_ties_break_on_id_ascending_in_both_directions() -> None:
    docs = [{"_id": "z", "n": 1}, {"_id": "y", "n": 1.0}, {"_id": "x", "n": 0}]
    assert _ids(apply_sort(docs, [("n", 1)])) == ["x", "y", "z"]
    assert _ids(apply_sort(docs, [("n", -1)])) == ["y", "z", "x"]
    assert _ids(apply_sort(docs, [])) == ["x", "y", "z"]


def test_sort_on_two_keys() -> None:
    docs = [
        {"_id": "1", "n": 1, "s": "b"},
        {"_id": "2", "n": 2, "s": "a"},
        {"_id": "3", "n": 1, "s": "a"},
        {"_id": "4", "n": 2, "s": "b"},
    ]
    assert _ids(apply_sort(docs, [("n", -1), ("s", 1)])) == ["2", "4", "3", "1"]
    assert _ids(apply_sort(docs, [("s", 1), ("n", 1)])) == ["3", "2", "1", "4"]


def test_sort_navigation_is_plain() -> None:
    doc = {"_id": "x", "a": [{"b": 1}], "o": {"0": 5, "b": {"c": "z"}}}
    assert sort_key(doc, "a.b") == sort_key(doc, "nope")  # no array fan-out: missing
    assert sort_key(doc, "a.0.b") == sort_key({"v": 1}, "v")
    assert sort_key(doc, "o.0") == sort_key({"v": 5}, "v")
    assert sort_key(doc, "o.b.c") == sort_key({"v": "z"}, "v")
    assert sort_key(doc, "o.b.c.d") == sort_key({}, "v")


def test_sort_rejects_bad_directions() -> None:
    for direction in (0, 2, True, "asc"):
        with pytest.raises(InvalidQuery):
            apply_sort([{"_id": "a"}], [("n", direction)])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------

PDOC = {
    "_id": "p1",
    "_version": 3,
    "a": {"b": 1, "c": 2},
    "n": 5,
    "arr": [{"b": 1, "c": 2}, 3],
    "z": None,
}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (["n"], {"n": 5}),
        (["a.b"], {"a": {"b": 1}}),
        (["a.b", "a.c"], {"a": {"b": 1, "c": 2}}),
        (["a", "a.b"], {"a": {"b": 1, "c": 2}}),
        (["a.b", "a"], {"a": {"b": 1, "c": 2}}),
        (["x", "a.x", "n.x"], {}),  # missing and through-a-scalar paths are omitted
        (["arr.b"], {"arr": [{"b": 1, "c": 2}, 3]}),  # whole value at the first array
        (["arr.0"], {"arr": [{"b": 1, "c": 2}, 3]}),
        (["z"], {"z": None}),  # null is present, not missing
        ([], {}),
        (["_id"], {}),
    ],
)
def test_project(fields: list[str], expected: dict[str, Any]) -> None:
    assert project(PDOC, fields) == {"_id": "p1", "_version": 3, **expected}


def test_project_copies_and_validates() -> None:
    out = project(PDOC, ["a"])
    out["a"]["b"] = 99
    assert PDOC["a"] == {"b": 1, "c": 2}
    assert project({"_id": "q", "a": 1}, ["a"]) == {"_id": "q", "a": 1}  # no _version
    with pytest.raises(InvalidQuery):
        project(PDOC, ["a..b"])


# --------------------------------------------------------------------------------------
# Updates
# --------------------------------------------------------------------------------------

UPDATE_CASES: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    # $set
    ({"a": 1}, {"$set": {"a": 2, "b": [1]}}, {"a": 2, "b": [1]}),
    ({}, {"$set": {"a.b.c": 1}}, {"a": {"b": {"c": 1}}}),
    ({"a": {"x": 1}}, {"$set": {"a.b": 1}}, {"a": {"x": 1, "b": 1}}),
    ({"a": [1, 2]}, {"$set": {"a.1": 5}}, {"a": [1, 5]}),
    ({"a": [1]}, {"$set": {"a.3": 5}}, {"a": [1, None, None, 5]}),  # MongoDB pads
    ({"a": [{"b": 1}]}, {"$set": {"a.0.b": 2}}, {"a": [{"b": 2}]}),
    ({"a": []}, {"$set": {"a.1.b": 2}}, {"a": [None, {"b": 2}]}),
    ({}, {"$set": {"a.0": 1}}, {"a": {"0": 1}}),  # missing intermediate: an object
    # $unset
    ({"a": 1, "b": 2}, {"$unset": {"a": ""}}, {"b": 2}),
    ({"a": {"b": 1, "c": 2}}, {"$unset": {"a.b": ""}}, {"a": {"c": 2}}),
    ({"a": 1}, {"$unset": {"x": "", "a.b": ""}}, {"a": 1}),  # missing / through scalar
    ({"a": [1, 2, 3]}, {"$unset": {"a.1": ""}}, {"a": [1, None, 3]}),  # nulled, not removed
    ({"a": [{"b": 1}]}, {"$unset": {"a.b": ""}}, {"a": [{"b": 1}]}),
    # $inc / $mul
    ({"n": 1}, {"$inc": {"n": 2}}, {"n": 3}),
    ({"n": 1}, {"$inc": {"n": -1.5}}, {"n": -0.5}),
    ({}, {"$inc": {"n": 2, "o.p": 1}}, {"n": 2, "o": {"p": 1}}),
    ({"n": 3}, {"$mul": {"n": 2}}, {"n": 6}),
    ({"n": 3}, {"$mul": {"n": 0.5}}, {"n": 1.5}),
    ({}, {"$mul": {"n": 5}}, {"n": 0}),
    ({"a": [1, 2]}, {"$inc": {"a.0": 10}}, {"a": [11, 2]}),
    # $min / $max (type-aware order)
    ({"n": 5}, {"$min": {"n": 3}}, {"n": 3}),
    ({"n": 5}, {"$min": {"n": 7}}, {"n": 5}),
    ({"n": 5}, {"$max": {"n": 7.5}}, {"n": 7.5}),
    ({}, {"$min": {"n": 7}, "$max": {"m": "x"}}, {"n": 7, "m": "x"}),
    ({"n": 1}, {"$min": {"n": None}}, {"n": None}),  # null < numbers
    ({"n": 1}, {"$max": {"n": "x"}}, {"n": "x"}),  # strings > numbers
    ({"n": "x"}, {"$max": {"n": False}}, {"n": False}),  # booleans are the top bracket
    ({"n": None}, {"$max": {"n": None}}, {"n": None}),
    ({"n": "b"}, {"$min": {"n": "B"}}, {"n": "B"}),  # code point order
    # $push / $addToSet
    ({"t": [1]}, {"$push": {"t": 2}}, {"t": [1, 2]}),
    ({"t": [1]}, {"$push": {"t": 1}}, {"t": [1, 1]}),
    ({"t": [1]}, {"$push": {"t": [2, 3]}}, {"t": [1, [2, 3]]}),
    ({"t": [1]}, {"$push": {"t": {"$each": [2, 3]}}}, {"t": [1, 2, 3]}),
    ({}, {"$push": {"t": "x"}}, {"t": ["x"]}),
    ({}, {"$push": {"t": {"$each": []}}}, {"t": []}),
    ({}, {"$push": {"o.t": {"b": 1}}}, {"o": {"t": [{"b": 1}]}}),
    ({"t": [1, "x"]}, {"$addToSet": {"t": "x"}}, {"t": [1, "x"]}),
    ({"t": [1]}, {"$addToSet": {"t": 1.0}}, {"t": [1]}),
    ({"t": [1]}, {"$addToSet": {"t": True}}, {"t": [1, True]}),  # true is not 1
    ({"t": [{"a": 1, "b": 2}]}, {"$addToSet": {"t": {"b": 2, "a": 1}}}, {"t": [{"a": 1, "b": 2}]}),
    ({"t": [1]}, {"$addToSet": {"t": {"$each": [2, 1, 2, 3]}}}, {"t": [1, 2, 3]}),
    ({}, {"$addToSet": {"t": {"$each": ["a", "a"]}}}, {"t": ["a"]}),
    # $pull
    ({"t": [1, 2, 1, 1.0, True]}, {"$pull": {"t": 1}}, {"t": [2, True]}),
    ({"t": [1, 5, 7, "9"]}, {"$pull": {"t": {"$gt": 3}}}, {"t": [1, "9"]}),
    ({"t": ["a", "b", "c"]}, {"$pull": {"t": {"$in": ["a", "c"]}}}, {"t": ["b"]}),
    ({"t": [[1], [1, 2], 1]}, {"$pull": {"t": [1]}}, {"t": [[1, 2], 1]}),
    ({"t": [{"a": 1}, {"a": 1, "b": 2}]}, {"$pull": {"t": {"a": 1}}}, {"t": [{"a": 1, "b": 2}]}),
    ({"t": [[1, 2], [3]]}, {"$pull": {"t": {"$size": 1}}}, {"t": [[1, 2]]}),
    ({"t": "x"}, {"$pull": {"t": "x"}}, {"t": "x"}),  # not an array: no-op
    ({}, {"$pull": {"t": 1, "a.b": 1}}, {}),
    ({"a": [{"t": [1, 2]}]}, {"$pull": {"a.0.t": 2}}, {"a": [{"t": [1]}]}),
    # $rename
    ({"a": 1, "b": 2}, {"$rename": {"a": "c"}}, {"b": 2, "c": 1}),
    ({"a": 1, "b": 2}, {"$rename": {"a": "b"}}, {"b": 1}),  # overwrites
    ({"b": 2}, {"$rename": {"a": "c"}}, {"b": 2}),  # missing source: no-op
    ({"a": {"x": [1]}}, {"$rename": {"a.x": "b.y"}}, {"a": {}, "b": {"y": [1]}}),
    ({"a": [{"x": 1}]}, {"$rename": {"a.x": "b"}}, {"a": [{"x": 1}]}),  # not found: no-op
    ({"a": 5}, {"$rename": {"a.x": "b"}}, {"a": 5}),
    # several operators at once
    (
        {"n": 1, "t": []},
        {"$inc": {"n": 1}, "$push": {"t": 0}, "$set": {"s": "x"}},
        {
            "n": 2,
            "t": [0],
            "s": "x",
        },
    ),
]


@pytest.mark.parametrize(("doc", "update", "expected"), UPDATE_CASES, ids=lambda v: repr(v)[:60])
def test_apply_update(doc: dict[str, Any], update: dict[str, Any], expected: Any) -> None:
    before = copy.deepcopy(doc)
    out = apply_update(doc, update)
    assert out == expected
    assert values_equal(out, expected)
    assert doc == before  # the input is never modified


def test_update_number_types() -> None:
    assert type(apply_update({"n": 1}, {"$inc": {"n": 1}})["n"]) is int
    assert type(apply_update({"n": 1}, {"$inc": {"n": 1.0}})["n"]) is float
    assert type(apply_update({}, {"$mul": {"n": 2.5}})["n"]) is float
    assert type(apply_update({"n": 1}, {"$min": {"n": 1.0}})["n"]) is int  # equal: unchanged


UPDATE_TYPE_ERRORS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"n": "1"}, {"$inc": {"n": 1}}),
    ({"n": True}, {"$inc": {"n": 1}}),
    ({"n": None}, {"$mul": {"n": 2}}),
    ({"n": [1]}, {"$inc": {"n": 1}}),
    ({"a": 5}, {"$set": {"a.b": 1}}),  # through a scalar
    ({"a": None}, {"$set": {"a.b": 1}}),
    ({"a": [{"b": 1}]}, {"$set": {"a.b": 2}}),  # non-numeric segment on an array
    ({"a": "x"}, {"$inc": {"a.b.c": 1}}),
    ({"t": "x"}, {"$push": {"t": 1}}),
    ({"t": {"a": 1}}, {"$addToSet": {"t": 1}}),
    ({"t": None}, {"$push": {"t": 1}}),
    ({"a": [{"x": 1}]}, {"$rename": {"a.0.x": "b"}}),  # source inside an array
    ({"a": 1, "b": [{}]}, {"$rename": {"a": "b.0.c"}}),  # destination inside an array
    ({"a": 1, "b": 5}, {"$rename": {"a": "b.c"}}),
]


@pytest.mark.parametrize(("doc", "update"), UPDATE_TYPE_ERRORS, ids=lambda v: repr(v)[:60])
def test_update_type_errors(doc: dict[str, Any], update: dict[str, Any]) -> None:
    before = copy.deepcopy(doc)
    with pytest.raises(UpdateTypeError):
        apply_update(doc, update)
    assert doc == before


INVALID_UPDATES: list[Any] = [
    {},
    {"a": 1},  # a replacement document, not an update
    {"$set": {"a": 1}, "b": 2},
    {"$foo": {"a": 1}},
    {"$set": 1},
    {"$set": {"a": 1}, "$inc": {"a.b": 1}},  # conflicting paths
    {"$set": {"a": 1}, "$unset": {"a": ""}},
    {"$rename": {"a": "a.b"}},
    {"$rename": {"a": "b"}, "$set": {"b.c": 1}},
    {"$inc": {"n": "1"}},
    {"$inc": {"n": True}},
    {"$mul": {"n": None}},
    {"$push": {"t": {"$each": 1}}},
    {"$push": {"t": {"$each": [1], "$slice": 1}}},
    {"$addToSet": {"t": {"$foo": 1}}},
    {"$pull": {"t": {"$gt": 1, "b": 1}}},
    {"$pull": {"t": {"$bad": 1}}},
    {"$rename": {"a": 5}},
    {"$set": {"_id": "x"}},
    {"$unset": {"_version": ""}},
    {"$rename": {"a": "_id"}},
    {"$set": {"a..b": 1}},
    {"$set": {"$a": 1}},
]


@pytest.mark.parametrize("update", INVALID_UPDATES, ids=repr)
def test_invalid_updates(update: Any) -> None:
    with pytest.raises(InvalidQuery):
        apply_update({"a": 1, "t": [], "n": 1}, update)


def test_update_paths_conflict() -> None:
    assert update_paths_conflict({"$set": {"a": 1}, "$inc": {"a.b": 1}})
    assert update_paths_conflict({"$set": {"a.b": 1, "a.b.c": 1}})
    assert update_paths_conflict({"$rename": {"x": "a"}, "$set": {"a.0": 1}})
    assert not update_paths_conflict({"$set": {"a": 1, "ab": 1, "b.a": 1}})
    assert not update_paths_conflict({"$set": {"a.b": 1}, "$inc": {"a.c": 1}})


# --------------------------------------------------------------------------------------
# JSON Merge Patch (RFC 7396, appendix A)
# --------------------------------------------------------------------------------------

RFC7396_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC7396_EXAMPLES, ids=repr)
def test_merge_patch_rfc7396_examples(target: Any, patch: Any, expected: Any) -> None:
    before_t, before_p = copy.deepcopy(target), copy.deepcopy(patch)
    assert merge_patch(target, patch) == expected
    assert (target, patch) == (before_t, before_p)


def test_merge_patch_result_does_not_alias_the_patch() -> None:
    patch = {"a": {"b": [1]}}
    out = merge_patch({}, patch)
    out["a"]["b"].append(2)
    assert patch == {"a": {"b": [1]}}


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------


@PROPERTY
@given(S.documents(), S.filters())
def test_generated_filters_are_valid_and_nor_is_not(doc: dict[str, Any], flt: Any) -> None:
    validate_filter(flt)
    assert S.filter_size(flt) <= 12
    assert matches(doc, {"$nor": [flt]}) is (not matches(doc, flt))


@PROPERTY
@given(S.documents(), S.filters(depth=1), S.filters(depth=1))
def test_or_and_are_boolean(doc: dict[str, Any], f: Any, g: Any) -> None:
    assert matches(doc, {"$or": [f, g]}) is (matches(doc, f) or matches(doc, g))
    assert matches(doc, {"$and": [f, g]}) is (matches(doc, f) and matches(doc, g))


@PROPERTY
@given(S.documents(), st.sampled_from(S.FILTER_PATHS), S.json_values(2))
def test_in_ne_nin_reduce_to_eq(doc: dict[str, Any], path: str, v: Any) -> None:
    eq = matches(doc, {path: {"$eq": v}})
    if not (isinstance(v, dict) and v and all(k.startswith("$") for k in v)):
        assert matches(doc, {path: v}) is eq  # implicit $eq
    assert matches(doc, {path: {"$in": [v]}}) is eq
    assert matches(doc, {path: {"$ne": v}}) is (not eq)
    assert matches(doc, {path: {"$nin": [v]}}) is (not eq)
    assert matches(doc, {path: {"$all": [v]}}) is eq


@PROPERTY
@given(S.documents(), st.sampled_from(S.FILTER_PATHS), S.value_operators())
def test_not_negates_an_operator_object(doc: dict[str, Any], path: str, ops: Any) -> None:
    assert matches(doc, {path: {"$not": ops}}) is (not matches(doc, {path: ops}))


@PROPERTY
@given(S.document_lists(0, 12), S.sorts())
def test_apply_sort_is_an_ordered_permutation(docs: list[dict[str, Any]], sort: Any) -> None:
    out = apply_sort(docs, sort)
    assert sorted(_ids(out)) == sorted(_ids(docs))
    assert apply_sort(list(reversed(docs)), sort) == out  # independent of input order

    def full_key(d: dict[str, Any]) -> list[Any]:
        parts = []
        for path, direction in [*sort, ("_id", 1)]:
            k = sort_key(d, path)
            parts.append(k if direction == 1 else _Desc(k))
        return parts

    keys = [full_key(d) for d in out]
    assert all(keys[i] <= keys[i + 1] for i in range(len(keys) - 1))


class _Desc:
    """Inverts the order of a key (for checking descending sorts)."""

    def __init__(self, key: Any) -> None:
        self.key = key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.key == other.key

    def __lt__(self, other: _Desc) -> bool:
        return bool(other.key < self.key)

    def __le__(self, other: _Desc) -> bool:
        return bool(other.key <= self.key)

    __hash__ = None  # type: ignore[assignment]


@PROPERTY
@given(S.documents(), S.projections())
def test_project_is_idempotent_and_a_subset(doc: dict[str, Any], fields: list[str]) -> None:
    out = project(doc, fields)
    assert project(out, fields) == out
    assert set(out) <= set(doc)
    assert out["_id"] == doc["_id"]


@PROPERTY
@given(S.documents(), S.updates())
def test_generated_updates_apply_or_raise_type_errors(doc: dict[str, Any], update: Any) -> None:
    assert not update_paths_conflict(update)
    before = copy.deepcopy(doc)
    try:
        out = apply_update(doc, update)
    except UpdateTypeError:
        pass
    else:
        assert out["_id"] == doc["_id"]
        # $n and $s stay scalar so that sorts() remains meaningful after updates
        for key in ("n", "s"):
            assert not isinstance(out.get(key), dict | list)
    assert doc == before


@PROPERTY
@given(S.document_lists(0, 6))
def test_document_lists_have_unique_ids(docs: list[dict[str, Any]]) -> None:
    assert len({d["_id"] for d in docs}) == len(docs)


@PROPERTY
@given(S.json_values(3), S.json_values(3))
def test_merge_patch_with_itself_and_empty(target: Any, patch: Any) -> None:
    assert merge_patch(target, {}) == (target if isinstance(target, dict) else {})
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once  # merge patches are idempotent
