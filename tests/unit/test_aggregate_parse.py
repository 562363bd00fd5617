"""The aggregation front end's stages: every form, normalisations, refusals with their codes
and places, and the pipeline-wide limits."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from proxy.backends.base import COLLECTION_RE as BACKEND_COLLECTION_RE
from proxy.errors import ProxyError
from proxy.query.aggregate.ast import (
    Accumulator,
    AddFields,
    Arr,
    Bucket,
    Call,
    Count,
    Facet,
    Field,
    Group,
    Limit,
    Lit,
    Lookup,
    Match,
    Obj,
    Pipeline,
    Project,
    ReplaceRoot,
    Skip,
    Sort,
    SortKey,
    Unset,
    Unwind,
)
from proxy.query.aggregate.parse import (
    COLLECTION_RE,
    parse_body,
    parse_pipeline,
)
from proxy.query.parse import parse_filter
from tests.unit.aggregate_parse_support import LOOKUP, L, expr, one, refused, stages

# ---- the body -----------------------------------------------------------------------------


def test_body_forms() -> None:
    p, explain = parse_body({"pipeline": [{"$limit": 1}]}, L)
    assert p == Pipeline((Limit(1),)) and explain is False
    _, explain = parse_body({"pipeline": [], "explain": True}, L)
    assert explain is True


@pytest.mark.parametrize(
    "body",
    [[], "x", None, {}, {"pipeline": [], "extra": 1}, {"pipeline": [], "explain": 1}],
)
def test_body_refused(body: Any) -> None:
    with pytest.raises(ProxyError) as info:
        parse_body(body, L)
    assert info.value.status == 400 and info.value.code == "invalid_pipeline"


def test_empty_pipeline() -> None:
    assert parse_pipeline([], L) == Pipeline(())


@pytest.mark.parametrize(
    ("raw", "at"),
    [
        ({"$match": {}}, "pipeline"),
        ([5], "pipeline[0]"),
        ([{}], "pipeline[0]"),
        ([{"$match": {}, "$limit": 1}], "pipeline[0]"),
    ],
)
def test_pipeline_shape(raw: Any, at: str) -> None:
    refused(raw, "invalid_pipeline", at)


def test_unknown_stage() -> None:
    refused([{"$limit": 1}, {"$bogus": {}}], "unknown_operator", "pipeline[1]", "$bogus")


@pytest.mark.parametrize("name", ["$out", "$merge", "$function", "$accumulator", "$where"])
def test_forbidden_stage(name: str) -> None:
    refused([{name: "x"}], "forbidden_operator", "pipeline[0]", name)


# ---- $match -------------------------------------------------------------------------------


def test_match_uses_the_query_language() -> None:
    raw = {"a": {"$gt": 1}, "$or": [{"b": 1}, {"c": {"$in": [1, 2]}}]}
    assert one({"$match": raw}) == Match(parse_filter(raw, L))
    assert one({"$match": {}}) == Match(parse_filter({}, L))


def test_match_errors_propagate() -> None:
    err = refused([{"$match": {"a": {"$foo": 1}}}], "unknown_operator")
    assert err.details["operator"] == "$foo"
    refused([{"$match": []}], "invalid_pipeline", "pipeline[0].$match")
    refused([{"$match": None}], "invalid_pipeline", "pipeline[0].$match")


@pytest.mark.parametrize(
    "raw",
    [
        {"$where": "1"},
        {"$and": [{"$out": 1}]},
        {"a": {"$merge": 1}},
        {"$or": [{"a": 1}, {"$function": {}}]},
        {"$accumulator": {}},
    ],
)
def test_forbidden_inside_match(raw: Any) -> None:
    refused([{"$match": raw}], "forbidden_operator")


# ---- $addFields / $set / $unset ---------------------------------------------------------------


def test_add_fields_and_set() -> None:
    raw = {"a": 1, "b.c": "$d", "e": {"f": "$g", "h": [1]}}
    want = AddFields(
        (
            (("a",), Lit(1)),
            (("b", "c"), Field(("d",))),
            (("e",), Obj((("f", Field(("g",))), ("h", Arr((Lit(1),)))))),
        )
    )
    assert one({"$addFields": raw}) == want
    assert one({"$set": raw}) == want


@pytest.mark.parametrize(
    "spec",
    [{}, [], "a", {"a.": 1}, {"$a": 1}, {"a..b": 1}, {"a.$b": 1}, {"a": 1, "a.b": 2}, {"": 1}],
)
def test_add_fields_refused(spec: Any) -> None:
    refused([{"$set": spec}], "invalid_pipeline", "pipeline[0].$set")


def test_unset() -> None:
    assert one({"$unset": "a.b"}) == Unset((("a", "b"),))
    assert one({"$unset": ["a", "b"]}) == Unset((("a",), ("b",)))
    for bad in ([], 5, [1], ["a", "a.b"], ["$a"], {}):
        refused([{"$unset": bad}], "invalid_pipeline", "pipeline[0].$unset")


# ---- $project ---------------------------------------------------------------------------------


def test_project_inclusion() -> None:
    assert one({"$project": {"a": 1, "b.c": True}}) == Project(
        ((("a",), None), (("b", "c"), None)), exclude_id=False
    )
    assert one({"$project": {"a": 1, "_id": 0}}) == Project(((("a",), None),), exclude_id=True)
    assert one({"$project": {"_id": 1}}) == Project((), exclude_id=False)
    assert one({"$project": {"_id": 1, "a": 1}}) == Project(((("a",), None),), exclude_id=False)


def test_project_computed_and_nested() -> None:
    got = one({"$project": {"a": {"b": 1, "c": {"d": True}}, "s": "$x", "n": {"$add": [1]}}})
    assert got == Project(
        (
            (("a", "b"), None),
            (("a", "c", "d"), None),
            (("s",), Field(("x",))),
            (("n",), Call("add", (Lit(1),))),
        )
    )
    assert one({"$project": {"l": "lit", "z": None, "arr": [1]}}) == Project(
        ((("l",), Lit("lit")), (("z",), Lit(None)), (("arr",), Arr((Lit(1),))))
    )
    # a computed field with _id: 0 is still inclusion mode
    assert one({"$project": {"_id": 0, "k": "$a"}}) == Project(
        ((("k",), Field(("a",))),), exclude_id=True
    )
    assert one({"$project": {"_id": "$a"}}) == Project(((("_id",), Field(("a",))),))


def test_project_exclusion_is_unset() -> None:
    assert one({"$project": {"_id": 0}}) == Unset((("_id",),))
    assert one({"$project": {"_id": False}}) == Unset((("_id",),))
    assert one({"$project": {"a": 0, "b.c": False}}) == Unset((("a",), ("b", "c")))
    assert one({"$project": {"a": 0, "_id": 0}}) == Unset((("a",), ("_id",)))
    assert one({"$project": {"a": {"b": 0}}}) == Unset((("a", "b"),))
    assert one({"$project": {"a": 0, "_id": 1}}) == Unset((("a",),))


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"a": 1, "b": 0},
        {"a": "$x", "b": 0},
        {"a": {"b": 1, "c": 0}},
        {"a": {}},
        {"a": 1, "a.b": 1},
        {"a": {"b": 1, "$add": 1}},
        [],
        "a",
        {"a.": 1},
    ],
)
def test_project_refused(spec: Any) -> None:
    err = refused([{"$project": spec}], "invalid_pipeline")
    assert err.details["at"].startswith("pipeline[0].$project")


def test_project_unknown_operator_place() -> None:
    refused(
        [{"$limit": 1}, {"$project": {"y": {"$x": 1}}}],
        "unknown_operator",
        "pipeline[1].$project.y",
        "$x",
    )


# ---- $replaceRoot / $replaceWith, $group ------------------------------------------------------


def test_replace_root() -> None:
    assert one({"$replaceRoot": {"newRoot": "$a"}}) == ReplaceRoot(Field(("a",)))
    assert one({"$replaceWith": {"k": "$a"}}) == ReplaceRoot(Obj((("k", Field(("a",))),)))
    for bad in ({}, {"newRoot": 1, "x": 2}, "$a"):
        refused([{"$replaceRoot": bad}], "invalid_pipeline", "pipeline[0].$replaceRoot")


def test_group() -> None:
    got = one(
        {
            "$group": {
                "_id": {"k": "$a"},
                "total": {"$sum": "$n"},
                "n": {"$count": {}},
                "m": {"$max": {"$add": ["$x", 1]}},
            }
        }
    )
    assert got == Group(
        Obj((("k", Field(("a",))),)),
        (
            ("total", Accumulator("sum", Field(("n",)))),
            ("n", Accumulator("count", Lit(1))),
            ("m", Accumulator("max", Call("add", (Field(("x",)), Lit(1))))),
        ),
    )
    assert one({"$group": {"_id": None}}) == Group(Lit(None), ())
    for op in ("sum", "avg", "min", "max", "first", "last", "push", "addToSet"):
        assert one({"$group": {"_id": 1, "v": {f"${op}": "$a"}}}).accumulators == (
            ("v", Accumulator(op, Field(("a",)))),
        )


@pytest.mark.parametrize(
    ("spec", "code", "at"),
    [
        ({"n": {"$sum": 1}}, "invalid_pipeline", "pipeline[0].$group"),
        ([], "invalid_pipeline", "pipeline[0].$group"),
        ({"_id": 1, "n": 1}, "invalid_pipeline", "pipeline[0].$group.n"),
        ({"_id": 1, "n": {}}, "invalid_pipeline", "pipeline[0].$group.n"),
        ({"_id": 1, "n": {"$sum": 1, "$avg": 1}}, "invalid_pipeline", "pipeline[0].$group.n"),
        ({"_id": 1, "n": {"sum": 1}}, "invalid_pipeline", "pipeline[0].$group.n"),
        ({"_id": 1, "n": {"$median": 1}}, "unknown_operator", "pipeline[0].$group.n"),
        ({"_id": 1, "n": {"$add": 1}}, "unknown_operator", "pipeline[0].$group.n"),
        ({"_id": 1, "n": {"$accumulator": {}}}, "forbidden_operator", "pipeline[0].$group.n"),
        ({"_id": 1, "n": {"$count": {"a": 1}}}, "invalid_pipeline", "pipeline[0].$group.n"),
        ({"_id": 1, "n": {"$count": 1}}, "invalid_pipeline", "pipeline[0].$group.n"),
        ({"_id": 1, "n": {"$push": ["$a", "$b"]}}, "invalid_pipeline", "pipeline[0].$group.n"),
        ({"_id": 1, "a.b": {"$sum": 1}}, "invalid_pipeline", "pipeline[0].$group.a.b"),
        ({"_id": 1, "$a": {"$sum": 1}}, "invalid_pipeline", "pipeline[0].$group.$a"),
        ({"_id": {"$foo": 1}}, "unknown_operator", "pipeline[0].$group._id"),
    ],
)
def test_group_refused(spec: Any, code: str, at: str) -> None:
    refused([{"$group": spec}], code, at)


def test_group_unknown_accumulator_details() -> None:
    refused(
        [{"$group": {"_id": 1, "n": {"$median": 1}}}],
        "unknown_operator",
        "pipeline[0].$group.n",
        "$median",
    )


# ---- $sort $skip $limit $count $unwind $sortByCount -------------------------------------------


def test_sort() -> None:
    assert one({"$sort": {"a": 1, "b.c": -1, "d": -1.0}}) == Sort(
        (SortKey(("a",), False), SortKey(("b", "c"), True), SortKey(("d",), True))
    )
    assert len(one({"$sort": {f"k{i}": 1 for i in range(32)}}).keys) == 32


@pytest.mark.parametrize(
    "spec",
    [
        {},
        [],
        {"a": 0},
        {"a": True},
        {"a": "asc"},
        {"a": 2},
        {"a": {"$meta": "textScore"}},
        {"$a": 1},
        {f"k{i}": 1 for i in range(33)},
    ],
)
def test_sort_refused(spec: Any) -> None:
    err = refused([{"$sort": spec}], "invalid_pipeline")
    assert err.details["at"].startswith("pipeline[0].$sort")


def test_skip_limit() -> None:
    assert one({"$skip": 0}) == Skip(0)
    assert one({"$skip": 5.0}) == Skip(5)
    assert one({"$limit": 1}) == Limit(1)
    assert one({"$limit": 7.0}) == Limit(7)
    for bad in (-1, True, False, "5", 1.5, None, 2**63, [1]):
        refused([{"$skip": bad}], "invalid_pipeline", "pipeline[0].$skip")
    for bad in (0, -1, True, "5", 0.5, None):
        refused([{"$limit": bad}], "invalid_pipeline", "pipeline[0].$limit")


def test_count() -> None:
    assert one({"$count": "n"}) == Count("n")
    for bad in ("", "$n", "a.b", 5, None, ["n"]):
        refused([{"$count": bad}], "invalid_pipeline", "pipeline[0].$count")


def test_unwind() -> None:
    assert one({"$unwind": "$a.b"}) == Unwind(("a", "b"))
    assert one({"$unwind": {"path": "$a"}}) == Unwind(("a",))
    assert one(
        {"$unwind": {"path": "$a", "includeArrayIndex": "i", "preserveNullAndEmptyArrays": True}}
    ) == Unwind(("a",), ("i",), True)


@pytest.mark.parametrize(
    "spec",
    [
        "a",
        "$",
        "$$ROOT",
        5,
        {},
        {"path": "a"},
        {"path": "$a", "x": 1},
        {"path": "$a", "preserveNullAndEmptyArrays": 1},
        {"path": "$a", "includeArrayIndex": "$i"},
        {"path": "$a", "includeArrayIndex": 5},
    ],
)
def test_unwind_refused(spec: Any) -> None:
    err = refused([{"$unwind": spec}], "invalid_pipeline")
    assert err.details["at"].startswith("pipeline[0].$unwind")


def test_sort_by_count_is_two_stages() -> None:
    assert stages({"$sortByCount": "$a"}, {"$limit": 2}) == (
        Group(Field(("a",)), (("count", Accumulator("sum", Lit(1))),)),
        Sort((SortKey(("count",), True),)),
        Limit(2),
    )
    refused([{"$sortByCount": {"$nope": 1}}], "unknown_operator", "pipeline[0].$sortByCount")


# ---- $lookup $facet $bucket -------------------------------------------------------------------


def test_lookup() -> None:
    p = parse_pipeline([{"$lookup": LOOKUP}], L)
    assert p.stages == (Lookup("orders", ("a", "id"), ("owner",), ("o",)),)
    assert p.lookups == ("orders",)


def test_collection_re_is_the_backends() -> None:
    assert COLLECTION_RE.pattern == BACKEND_COLLECTION_RE.pattern


@pytest.mark.parametrize(
    "spec",
    [
        {k: v for k, v in LOOKUP.items() if k != "as"},
        {**LOOKUP, "extra": 1},
        {**LOOKUP, "as": 5},
        {**LOOKUP, "localField": "$a"},
        {**LOOKUP, "foreignField": ""},
        "orders",
    ],
)
def test_lookup_refused(spec: Any) -> None:
    err = refused([{"$lookup": spec}], "invalid_pipeline")
    assert err.details["at"].startswith("pipeline[0].$lookup")


@pytest.mark.parametrize("extra", [{"pipeline": []}, {"let": {}}])
def test_lookup_other_forms(extra: dict[str, Any]) -> None:
    err = refused([{"$lookup": {**LOOKUP, **extra}}], "invalid_pipeline", "pipeline[0].$lookup")
    assert "only the localField/foreignField form" in err.message


@pytest.mark.parametrize("name", ["1abc", "a-b", "", 5, None, "a" * 64, "a.b"])
def test_lookup_bad_collection(name: Any) -> None:
    refused([{"$lookup": {**LOOKUP, "from": name}}], "invalid_collection_name")


def test_facet() -> None:
    p = parse_pipeline(
        [
            {
                "$facet": {
                    "top": [{"$sort": {"a": -1}}, {"$limit": 1}],
                    "none": [],
                    "j": [{"$lookup": {**LOOKUP, "from": "zeta"}}],
                }
            },
            {"$lookup": LOOKUP},
            {"$lookup": LOOKUP},
        ],
        L,
    )
    assert p.stages[0] == Facet(
        (
            ("top", (Sort((SortKey(("a",), True),)), Limit(1))),
            ("none", ()),
            ("j", (Lookup("zeta", ("a", "id"), ("owner",), ("o",)),)),
        )
    )
    assert p.lookups == ("orders", "zeta")


def test_facet_refused() -> None:
    refused(
        [{"$facet": {"a": [{"$limit": 1}, {"$facet": {"b": []}}]}}],
        "nested_facet",
        "pipeline[0].$facet.a[1]",
    )
    refused([{"$facet": {}}], "invalid_pipeline", "pipeline[0].$facet")
    refused([{"$facet": {"a": {}}}], "invalid_pipeline", "pipeline[0].$facet.a")
    refused([{"$facet": {"a.b": []}}], "invalid_pipeline", "pipeline[0].$facet.a.b")
    refused([{"$facet": {"$a": []}}], "invalid_pipeline", "pipeline[0].$facet.$a")
    refused([{"$facet": {"a": [{"$x": 1}]}}], "unknown_operator", "pipeline[0].$facet.a[0]", "$x")
    refused([{"$facet": {"a": [{"$out": "c"}]}}], "forbidden_operator", "pipeline[0].$facet.a[0]")


def test_bucket() -> None:
    got = one({"$bucket": {"groupBy": "$n", "boundaries": [0, 10, 20.5]}})
    assert got == Bucket(
        Field(("n",)), (0, 10, 20.5), None, False, (("count", Accumulator("sum", Lit(1))),)
    )
    got = one(
        {
            "$bucket": {
                "groupBy": "$s",
                "boundaries": ["a", "m"],
                "default": "other",
                "output": {"total": {"$sum": "$n"}, "names": {"$push": "$s"}},
            }
        }
    )
    assert got == Bucket(
        Field(("s",)),
        ("a", "m"),
        "other",
        True,
        (
            ("total", Accumulator("sum", Field(("n",)))),
            ("names", Accumulator("push", Field(("s",)))),
        ),
    )
    assert one({"$bucket": {"groupBy": "$n", "boundaries": [0, 1], "default": None}}).has_default
    assert one({"$bucket": {"groupBy": "$n", "boundaries": [0, 1], "default": 1}}).default == 1
    assert one({"$bucket": {"groupBy": "$n", "boundaries": [0, 1], "default": "x"}}).default == "x"
    assert one({"$bucket": {"groupBy": "$n", "boundaries": [0, 1], "output": {}}}).output == ()
    assert one({"$bucket": {"groupBy": "$n", "boundaries": [-1e300, 1e300]}}).boundaries == (
        -1e300,
        1e300,
    )
    refused([{"$bucket": {"groupBy": 1, "boundaries": [0, 2**64]}}], "number_out_of_range")
    refused([{"$bucket": {"groupBy": 1, "boundaries": [0, float("inf")]}}], "number_out_of_range")


@pytest.mark.parametrize(
    ("spec", "at"),
    [
        ({"boundaries": [0, 1]}, "pipeline[0].$bucket"),
        ({"groupBy": "$n"}, "pipeline[0].$bucket"),
        ({"groupBy": "$n", "boundaries": [0, 1], "x": 1}, "pipeline[0].$bucket"),
        ({"groupBy": "$n", "boundaries": [0]}, "pipeline[0].$bucket.boundaries"),
        ({"groupBy": "$n", "boundaries": 5}, "pipeline[0].$bucket.boundaries"),
        ({"groupBy": "$n", "boundaries": [1, 1]}, "pipeline[0].$bucket.boundaries"),
        ({"groupBy": "$n", "boundaries": [2, 1]}, "pipeline[0].$bucket.boundaries"),
        ({"groupBy": "$n", "boundaries": [0, "a"]}, "pipeline[0].$bucket.boundaries"),
        ({"groupBy": "$n", "boundaries": [False, True]}, "pipeline[0].$bucket.boundaries"),
        ({"groupBy": "$n", "boundaries": [None, 1]}, "pipeline[0].$bucket.boundaries"),
        ({"groupBy": "$n", "boundaries": [[0], [1]]}, "pipeline[0].$bucket.boundaries"),
        ({"groupBy": "$n", "boundaries": ["a", "a"]}, "pipeline[0].$bucket.boundaries"),
        ({"groupBy": "$n", "boundaries": [0, 2], "default": 1}, "pipeline[0].$bucket.default"),
        (
            {"groupBy": "$n", "boundaries": ["a", "c"], "default": "b"},
            "pipeline[0].$bucket.default",
        ),
        ({"groupBy": "$n", "boundaries": [0, 2], "default": "$a"}, "pipeline[0].$bucket.default"),
        ({"groupBy": "$n", "boundaries": [0, 1], "output": 5}, "pipeline[0].$bucket.output"),
        (
            {"groupBy": "$n", "boundaries": [0, 1], "output": {"n": 1}},
            "pipeline[0].$bucket.output.n",
        ),
    ],
)
def test_bucket_refused(spec: Any, at: str) -> None:
    refused([{"$bucket": spec}], "invalid_pipeline", at)


# ---- limits -----------------------------------------------------------------------------------


def test_pipeline_too_long() -> None:
    assert len(stages(*[{"$limit": 1}] * 50)) == 50
    err = refused([{"$limit": 1}] * 51, "pipeline_too_long")
    assert err.details["stages"] == 51
    facet = {"$facet": {"a": [{"$limit": 1}] * 25, "b": [{"$limit": 1}] * 24}}
    assert len(stages(facet)) == 1  # 1 + 49
    refused([facet, {"$limit": 1}], "pipeline_too_long")
    # counted before any stage is looked at
    refused([{"$bogus": 1}] * 51, "pipeline_too_long")


def test_expression_too_large() -> None:
    raw = {"$add": [1, 2]}  # three nodes
    small = dataclasses.replace(L, max_expression_nodes=3)
    assert expr(raw) == Call("add", (Lit(1), Lit(2)))
    assert stages({"$set": {"x": raw}}, limits=small)
    err = refused([{"$set": {"x": raw, "y": 1}}], "expression_too_large", limits=small)
    assert err.details["at"] == "pipeline[0].$set.y"
    # counted over the whole pipeline, $group keys and accumulators included
    refused(
        [{"$set": {"x": 1, "y": 2}}, {"$group": {"_id": "$a", "n": {"$sum": 1}}}],
        "expression_too_large",
        limits=small,
    )
    refused([{"$set": {"x": list(range(600))}}], "expression_too_large")
    deep: Any = 1
    for _ in range(5000):
        deep = {"$abs": deep}
    refused([{"$set": {"x": deep}}], "too_deep")  # nested deeper than max_json_depth
    lax = dataclasses.replace(L, max_json_depth=10_000, max_expression_nodes=10_000)
    refused([{"$set": {"x": deep}}], "expression_too_large", limits=lax)  # no RecursionError
    deep_filter: Any = {"a": 1}
    for _ in range(5000):
        deep_filter = {"$and": [deep_filter]}
    refused([{"$match": deep_filter}], "too_deep")


def test_too_many_lookups() -> None:
    assert len(stages(*[{"$lookup": LOOKUP}] * 3)) == 3
    refused([{"$lookup": LOOKUP}] * 4, "too_many_lookups", "pipeline[3].$lookup")
    refused(
        [{"$lookup": LOOKUP}] * 2 + [{"$facet": {"a": [{"$lookup": LOOKUP}] * 2}}],
        "too_many_lookups",
        "pipeline[2].$facet.a[1].$lookup",
    )
