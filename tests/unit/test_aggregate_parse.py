"""The aggregation front end: every stage and operator form, normalisations, refusals with
their codes and places, limits, and the paths a pipeline reads (source_paths/foreign_paths)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.backends.base import COLLECTION_RE as BACKEND_COLLECTION_RE
from proxy.config import Limits
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
    Iterate,
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
    Switch,
    Unset,
    Unwind,
    Var,
)
from proxy.query.aggregate.parse import (
    COLLECTION_RE,
    foreign_paths,
    parse_body,
    parse_pipeline,
    source_paths,
)
from proxy.query.parse import parse_filter

L = Limits()


def stages(*raw: Any, limits: Limits = L) -> tuple[Any, ...]:
    return parse_pipeline(list(raw), limits).stages


def one(raw: Any) -> Any:
    (stage,) = stages(raw)
    return stage


def expr(raw: Any) -> Any:
    stage = one({"$addFields": {"x": raw}})
    return stage.fields[0][1]


def refused(
    raw: Any,
    code: str,
    at: str | None = None,
    operator: str | None = None,
    limits: Limits = L,
) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        parse_pipeline(raw, limits)
    err = info.value
    assert err.status == 400
    assert err.code == code, (err.code, err.message)
    if at is not None:
        assert err.details.get("at") == at, err.details
    if operator is not None:
        assert err.details.get("operator") == operator, err.details
    return err


def expr_refused(raw: Any, code: str, at: str | None = None, **kw: Any) -> ProxyError:
    full = None if at is None else "pipeline[0].$addFields.x" + at
    return refused([{"$addFields": {"x": raw}}], code, full, **kw)


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

LOOKUP = {"from": "orders", "localField": "a.id", "foreignField": "owner", "as": "o"}


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


# ---- expressions ------------------------------------------------------------------------------


def test_scalars_paths_and_containers() -> None:
    assert expr("$a.b") == Field(("a", "b"))
    assert expr("$a.0") == Field(("a", "0"))
    assert expr("$$ROOT") == Field(())
    assert expr("$$CURRENT") == Field(())
    assert expr("$$ROOT.a.b") == Field(("a", "b"))
    assert expr("$$CURRENT.x") == Field(("x",))
    assert expr("plain") == Lit("plain")
    assert expr("") == Lit("")
    for v in (1, 2.5, True, False, None, -7):
        assert expr(v) == Lit(v)
    assert expr([1, "$a", [2]]) == Arr((Lit(1), Field(("a",)), Arr((Lit(2),))))
    assert expr({}) == Obj(())
    assert expr({"k": "$a", "l": {"m": 1}}) == Obj(
        (("k", Field(("a",))), ("l", Obj((("m", Lit(1)),))))
    )


def test_literal() -> None:
    assert expr({"$literal": "$a"}) == Lit("$a")
    assert expr({"$literal": {"$add": [1]}}) == Lit({"$add": [1]})
    assert expr({"$literal": [1, {"$out": 1}]}) == Lit([1, {"$out": 1}])


@pytest.mark.parametrize(
    "raw",
    ["$", "$a..b", "$.a", "$a.", "$a.$b", "$$ROOT.", "$$ROOT..a", "$" + ".".join(["a"] * 17)],
)
def test_bad_paths(raw: str) -> None:
    expr_refused(raw, "invalid_pipeline", "")


def test_path_segment_limit() -> None:
    assert expr("$" + ".".join(["a"] * 16)) == Field(("a",) * 16)
    limits = dataclasses.replace(L, max_path_segments=2)
    refused([{"$set": {"x": "$a.b.c"}}], "invalid_pipeline", limits=limits)
    refused([{"$set": {"a.b.c": 1}}], "invalid_pipeline", limits=limits)


@pytest.mark.parametrize("raw", ["$$NOW", "$$REMOVE", "$$this", "$$x.a", "$$", "$$root"])
def test_unknown_variable(raw: str) -> None:
    err = expr_refused(raw, "invalid_pipeline", "")
    assert "unknown variable" in err.message


def test_operator_object_shapes() -> None:
    expr_refused({"$add": [1], "b": 1}, "invalid_pipeline", "")
    expr_refused({"a": 1, "$add": [1]}, "invalid_pipeline", "")
    expr_refused({"a.b": 1}, "invalid_pipeline", "")
    expr_refused({"k": {"$bogus": 1}}, "unknown_operator", ".k", operator="$bogus")
    expr_refused({"$add": [1, {"$bogus": 1}]}, "unknown_operator", ".$add[1]", operator="$bogus")


@pytest.mark.parametrize("op", ["$function", "$accumulator", "$where", "$out", "$merge"])
def test_forbidden_operators(op: str) -> None:
    expr_refused({"k": [{op: {}}]}, "forbidden_operator", ".k[0]", operator=op)


VARIADIC = ["add", "multiply", "and", "or", "concat", "concatArrays"]
BINARY = [
    *["subtract", "divide", "mod", "eq", "ne", "gt", "gte", "lt", "lte", "cmp", "split"],
    "arrayElemAt",
    "in",
]
UNARY = [
    "abs",
    "floor",
    "ceil",
    "toLower",
    "toUpper",
    "strLenCP",
    "size",
    "type",
    "toString",
    "toInt",
    "toDouble",
    "not",
]


@pytest.mark.parametrize("op", VARIADIC)
def test_variadic(op: str) -> None:
    assert expr({f"${op}": []}) == Call(op, ())
    assert expr({f"${op}": ["$a", "$b", "$c"]}) == Call(
        op, (Field(("a",)), Field(("b",)), Field(("c",)))
    )
    assert expr({f"${op}": "$a"}) == Call(op, (Field(("a",)),))


@pytest.mark.parametrize("op", BINARY)
def test_binary(op: str) -> None:
    assert expr({f"${op}": ["$a", "$b"]}) == Call(op, (Field(("a",)), Field(("b",))))
    for bad in ([], ["$a"], ["$a", "$b", "$c"], "$a"):
        expr_refused({f"${op}": bad}, "invalid_pipeline", "")


@pytest.mark.parametrize("op", UNARY)
def test_unary(op: str) -> None:
    assert expr({f"${op}": "$a"}) == Call(op, (Field(("a",)),))
    assert expr({f"${op}": ["$a"]}) == Call(op, (Field(("a",)),))
    for bad in ([], ["$a", "$b"]):
        expr_refused({f"${op}": bad}, "invalid_pipeline", "")


def test_if_null_substr_slice_arity() -> None:
    assert expr({"$ifNull": ["$a", 0]}) == Call("ifNull", (Field(("a",)), Lit(0)))
    assert len(expr({"$ifNull": ["$a", "$b", 0]}).args) == 3
    expr_refused({"$ifNull": ["$a"]}, "invalid_pipeline", "")
    assert expr({"$substrCP": ["$s", 0, 2]}) == Call("substrCP", (Field(("s",)), Lit(0), Lit(2)))
    expr_refused({"$substrCP": ["$s", 0]}, "invalid_pipeline", "")
    assert expr({"$slice": ["$a", -2]}) == Call("slice", (Field(("a",)), Lit(-2)))
    assert expr({"$slice": ["$a", 1, 2]}) == Call("slice", (Field(("a",)), Lit(1), Lit(2)))
    for bad in (["$a"], ["$a", 1, 2, 3]):
        expr_refused({"$slice": bad}, "invalid_pipeline", "")


def test_cond_normalised() -> None:
    want = Call("cond", (Field(("a",)), Lit(1), Lit(2)))
    assert expr({"$cond": ["$a", 1, 2]}) == want
    assert expr({"$cond": {"if": "$a", "then": 1, "else": 2}}) == want
    for bad in (["$a", 1], {"if": "$a", "then": 1}, {"if": 1, "then": 1, "else": 1, "x": 1}, 5):
        expr_refused({"$cond": bad}, "invalid_pipeline")


def test_round_normalised() -> None:
    assert expr({"$round": "$x"}) == Call("round", (Field(("x",)), Lit(0)))
    assert expr({"$round": ["$x"]}) == Call("round", (Field(("x",)), Lit(0)))
    assert expr({"$round": ["$x", 2]}) == Call("round", (Field(("x",)), Lit(2)))
    assert expr({"$round": ["$x", 2.0]}) == Call("round", (Field(("x",)), Lit(2)))
    assert expr({"$round": ["$x", -20]}).args[1] == Lit(-20)
    assert expr({"$round": ["$x", 100]}).args[1] == Lit(100)
    assert expr({"$round": ["$x", "$p"]}).args[1] == Field(("p",))
    assert expr({"$round": ["$x", None]}).args[1] == Lit(None)
    for bad in (101, -21, 1.5, "2", True, [1], {"p": 1}):
        expr_refused({"$round": ["$x", bad]}, "invalid_pipeline")
    expr_refused({"$round": ["$x", 1, 2]}, "invalid_pipeline", "")
    expr_refused({"$round": []}, "invalid_pipeline", "")


def test_trim_and_not_normalised() -> None:
    assert expr({"$trim": {"input": "$s"}}) == Call("trim", (Field(("s",)), Lit(None)))
    assert expr({"$trim": {"input": "$s", "chars": "xy"}}) == Call(
        "trim", (Field(("s",)), Lit("xy"))
    )
    for bad in (
        {},
        {"chars": "x"},
        {"input": "$s", "x": 1},
        {"input": "$s", "chars": 5},
        {"input": "$s", "chars": ["x"]},
        "$s",
    ):
        expr_refused({"$trim": bad}, "invalid_pipeline")
    assert expr({"$not": "$a"}) == Call("not", (Field(("a",)),))
    assert expr({"$not": ["$a"]}) == Call("not", (Field(("a",)),))


def test_constant_arguments_checked() -> None:
    expr_refused({"$split": ["$s", ""]}, "invalid_pipeline")
    expr_refused({"$split": ["$s", 5]}, "invalid_pipeline")
    expr_refused({"$split": ["$s", [","]]}, "invalid_pipeline")
    expr_refused({"$arrayElemAt": ["$a", {"k": 1}]}, "invalid_pipeline")
    assert expr({"$split": ["$s", None]}).args[1] == Lit(None)
    for bad in (-1, 1.5, "1", None):
        expr_refused({"$substrCP": ["$s", bad, 1]}, "invalid_pipeline")
        expr_refused({"$substrCP": ["$s", 0, bad]}, "invalid_pipeline")
    assert expr({"$substrCP": ["$s", 1.0, "$n"]}).args[1:] == (Lit(1), Field(("n",)))
    assert expr({"$arrayElemAt": ["$a", -1.0]}).args[1] == Lit(-1)
    expr_refused({"$arrayElemAt": ["$a", 0.5]}, "invalid_pipeline")
    expr_refused({"$arrayElemAt": ["$a", "0"]}, "invalid_pipeline")
    expr_refused({"$slice": ["$a", 1, 0]}, "invalid_pipeline")
    expr_refused({"$slice": ["$a", 1, -1]}, "invalid_pipeline")
    expr_refused({"$slice": ["$a", "x"]}, "invalid_pipeline")
    assert expr({"$slice": ["$a", 0]}).args[1] == Lit(0)
    assert expr({"$in": ["$a", [1, "$b"]]}).args[1] == Arr((Lit(1), Field(("b",))))
    assert expr({"$in": ["$a", {"$literal": [1]}]}).args[1] == Lit([1])
    assert expr({"$in": ["$a", "$b"]}).args[1] == Field(("b",))
    for bad in (5, None, "x", {"k": 1}):
        expr_refused({"$in": ["$a", bad]}, "invalid_pipeline", ".$in[1]")


def test_numbers_out_of_range() -> None:
    expr_refused(2**64, "number_out_of_range")
    expr_refused({"$literal": {"a": [2**70]}}, "number_out_of_range")
    expr_refused(float("nan"), "number_out_of_range")


def test_switch() -> None:
    got = expr({"$switch": {"branches": [{"case": "$a", "then": 1}, {"case": "$b", "then": 2}]}})
    assert got == Switch(((Field(("a",)), Lit(1)), (Field(("b",)), Lit(2))), None)
    got = expr({"$switch": {"branches": [{"case": "$a", "then": 1}], "default": 0}})
    assert got == Switch(((Field(("a",)), Lit(1)),), Lit(0))
    for bad in (
        {},
        {"branches": []},
        {"branches": {}},
        {"branches": [{"case": 1}]},
        {"branches": [{"case": 1, "then": 1, "x": 1}]},
        {"branches": [5]},
        {"branches": [{"case": 1, "then": 1}], "other": 1},
    ):
        expr_refused({"$switch": bad}, "invalid_pipeline")


def test_filter_and_map() -> None:
    got = expr({"$filter": {"input": "$xs", "cond": {"$gt": ["$$this", "$min"]}}})
    assert got == Iterate(
        "filter", Field(("xs",)), "this", Call("gt", (Var("this", ()), Field(("min",))))
    )
    got = expr({"$filter": {"input": "$xs", "as": "x", "cond": "$$x.ok", "limit": 2}})
    assert got == Iterate("filter", Field(("xs",)), "x", Var("x", ("ok",)), Lit(2))
    got = expr({"$filter": {"input": "$xs", "cond": True, "limit": "$n"}})
    assert got.limit == Field(("n",))
    assert expr({"$filter": {"input": "$xs", "cond": True, "limit": None}}).limit is None
    got = expr({"$map": {"input": "$xs", "in": {"$add": ["$$this.v", 1]}}})
    assert got == Iterate("map", Field(("xs",)), "this", Call("add", (Var("this", ("v",)), Lit(1))))
    # nested: the outer name stays visible inside the inner body
    got = expr(
        {
            "$map": {
                "input": "$xs",
                "as": "o",
                "in": {"$map": {"input": "$$o.ys", "as": "i", "in": ["$$o", "$$i"]}},
            }
        }
    )
    assert got.body == Iterate("map", Var("o", ("ys",)), "i", Arr((Var("o", ()), Var("i", ()))))


@pytest.mark.parametrize(
    "raw",
    [
        {"$filter": {"input": "$xs"}},
        {"$filter": {"cond": True}},
        {"$filter": {"input": "$xs", "cond": True, "in": 1}},
        {"$filter": {"input": "$xs", "cond": True, "limit": 0}},
        {"$filter": {"input": "$xs", "cond": True, "limit": 1.5}},
        {"$filter": {"input": "$xs", "cond": True, "as": "X"}},
        {"$filter": {"input": "$xs", "cond": True, "as": "ROOT"}},
        {"$filter": {"input": "$xs", "cond": True, "as": ""}},
        {"$filter": {"input": "$xs", "cond": True, "as": 5}},
        {"$map": {"input": "$xs"}},
        {"$map": {"input": "$xs", "in": 1, "limit": 1}},
        {"$map": ["$xs"]},
        # the variable is bound only inside the body
        {"$map": {"input": "$$this", "in": 1}},
        {"$filter": {"input": "$xs", "as": "x", "cond": "$$this"}},
        {"$filter": {"input": "$xs", "cond": True, "limit": "$$this"}},
    ],
)
def test_iterate_refused(raw: Any) -> None:
    expr_refused(raw, "invalid_pipeline")


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


# ---- source_paths / foreign_paths -------------------------------------------------------------


def reads(*raw: Any) -> list[tuple[str, str]]:
    return [(".".join(p), where) for p, where in source_paths(parse_pipeline(list(raw), L))]


def test_reads_of_match_and_sort() -> None:
    got = reads(
        {
            "$match": {
                "a": 1,
                "$or": [{"b.c": {"$gt": 1}}, {"$nor": [{"d": 1}]}],
                "e": {"$elemMatch": {"$and": [{"f": 1}, {"g.h": 2}]}},
                "k": {"$not": {"$elemMatch": {"m": 1}}},
                "v": {"$elemMatch": {"$gt": 1}},
                "w": {"$elemMatch": {}},
            }
        },
        {"$sort": {"s": 1, "t.u": -1}},
    )
    m = "pipeline[0].$match"
    assert got == [
        ("a", m),
        ("b.c", m),
        ("d", m),
        ("e.f", m),
        ("e.g.h", m),
        ("k.m", m),
        ("v", m),
        ("w", m),
        ("s", "pipeline[1].$sort"),
        ("t.u", "pipeline[1].$sort"),
    ]


def test_reads_skip_what_the_pipeline_defined() -> None:
    got = reads(
        {"$set": {"x": "$secret", "y.z": 1}},
        {"$match": {"x": 1, "y.z.w": 2, "y.q": 3}},
        {"$unwind": {"path": "$arr", "includeArrayIndex": "i"}},
        {"$lookup": {**LOOKUP, "localField": "i", "as": "joined"}},
        {"$sort": {"i": 1, "joined.n": 1, "arr": 1}},
        {"$lookup": {**LOOKUP, "localField": "own"}},
        {"$unset": "hidden"},
        {"$skip": 1},
        {"$limit": 1},
    )
    assert got == [
        ("secret", "pipeline[0].$addFields"),
        ("y.q", "pipeline[1].$match"),
        ("arr", "pipeline[2].$unwind"),
        ("arr", "pipeline[4].$sort"),
        ("own", "pipeline[5].$lookup"),
    ]


def test_reads_of_expressions() -> None:
    got = reads(
        {
            "$set": {
                "r": "$$ROOT",
                "c": "$$CURRENT.cur",
                "f": {
                    "$filter": {
                        "input": "$items",
                        "as": "it",
                        "cond": {"$gt": ["$$it.price", "$min"]},
                        "limit": "$lim",
                    }
                },
                "m": {"$map": {"input": {"$concatArrays": ["$p", "$q"]}, "in": "$$this.z"}},
                "s": {"$switch": {"branches": [{"case": "$sc", "then": "$st"}], "default": "$sd"}},
                "o": {"k": ["$arr1", {"$literal": "$notapath"}]},
            }
        }
    )
    assert [p for p, _ in got] == [
        "cur",
        "items",
        "min",
        "lim",
        "p",
        "q",
        "sc",
        "st",
        "sd",
        "arr1",
    ]


def test_reads_stop_after_a_reshaping_stage() -> None:
    tail = [{"$match": {"late": 1}}, {"$sort": {"late2": 1}}]
    assert reads({"$group": {"_id": "$k", "t": {"$sum": "$n"}}}, *tail) == [
        ("k", "pipeline[0].$group"),
        ("n", "pipeline[0].$group"),
    ]
    assert reads({"$project": {"a": 1, "b.c": 1, "d": "$e", "_id": 0}}, *tail) == [
        ("a", "pipeline[0].$project"),
        ("b.c", "pipeline[0].$project"),
        ("e", "pipeline[0].$project"),
    ]
    assert reads({"$replaceRoot": {"newRoot": "$sub"}}, *tail) == [
        ("sub", "pipeline[0].$replaceRoot")
    ]
    assert reads({"$replaceWith": "$$ROOT"}, *tail) == []
    assert reads({"$count": "n"}, *tail) == []
    assert reads(
        {"$bucket": {"groupBy": "$g", "boundaries": [0, 1], "output": {"x": {"$max": "$h"}}}},
        *tail,
    ) == [("g", "pipeline[0].$bucket"), ("h", "pipeline[0].$bucket")]
    assert reads({"$sortByCount": "$tag"}, *tail) == [("tag", "pipeline[0].$group")]
    # exclusion $project is $unset: documents keep their shape
    assert reads({"$project": {"a": 0}}, *tail) == [
        ("late", "pipeline[1].$match"),
        ("late2", "pipeline[2].$sort"),
    ]


def test_reads_in_facets() -> None:
    got = reads(
        {"$set": {"mine": 1}},
        {
            "$facet": {
                "a": [{"$match": {"x": 1, "mine": 2}}, {"$set": {"y": 1}}, {"$sort": {"y": 1}}],
                "b": [{"$sort": {"y": 1}}, {"$group": {"_id": "$g"}}, {"$sort": {"z": 1}}],
            }
        },
        {"$match": {"after": 1}},
    )
    assert got == [
        ("x", "pipeline[1].$facet.a[0].$match"),
        ("y", "pipeline[1].$facet.b[0].$sort"),
        ("g", "pipeline[1].$facet.b[1].$group"),
    ]
    # a $facet after reshaping is not walked
    assert reads({"$count": "n"}, {"$facet": {"a": [{"$match": {"x": 1}}]}}) == []


def test_foreign_paths() -> None:
    p = parse_pipeline(
        [
            {"$lookup": LOOKUP},
            {"$group": {"_id": "$a"}},
            {"$lookup": {**LOOKUP, "from": "users", "foreignField": "u.id"}},
            {"$facet": {"f": [{"$lookup": {**LOOKUP, "foreignField": "k"}}]}},
        ],
        L,
    )
    assert foreign_paths(p) == {
        "orders": [
            (("owner",), "pipeline[0].$lookup"),
            (("k",), "pipeline[3].$facet.f[0].$lookup"),
        ],
        "users": [(("u", "id"), "pipeline[2].$lookup")],
    }
    assert p.lookups == ("orders", "users")
    assert foreign_paths(parse_pipeline([{"$limit": 1}], L)) == {}


# ---- never anything but a 400 -----------------------------------------------------------------

KEYS = st.sampled_from(
    [
        "a",
        "b.c",
        "_id",
        "$match",
        "$set",
        "$project",
        "$group",
        "$sort",
        "$unwind",
        "$lookup",
        "$facet",
        "$bucket",
        "$count",
        "$limit",
        "$add",
        "$cond",
        "$filter",
        "$map",
        "$sum",
        "$literal",
        "$round",
        "$switch",
        "$out",
        "input",
        "cond",
        "in",
        "as",
        "path",
        "from",
        "localField",
        "foreignField",
        "groupBy",
        "boundaries",
        "branches",
        "case",
        "then",
        "newRoot",
        "$x",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.sampled_from(["$a", "$$this", "$$ROOT.a", "x", "", "$", "$a..b", "orders", "$$x"])
)
JSON = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=3),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.dictionaries(KEYS, JSON, min_size=1, max_size=2), max_size=4) | JSON)
def test_fuzz_only_400s(raw: Any) -> None:
    try:
        p = parse_pipeline(raw, L)
    except ProxyError as e:
        assert e.status == 400
        return
    source_paths(p)
    foreign_paths(p)


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_fuzz_body_only_400s(raw: Any) -> None:
    try:
        parse_body({"pipeline": [{"$set": {"x": raw}}, {"$group": {"_id": raw}}]}, L)
    except ProxyError as e:
        assert e.status == 400


# ---- well-formed pipelines always parse ---------------------------------------------------

PATHS = st.sampled_from(["a", "b", "a.b", "c.d.e", "_id"])
FIELD_EXPRS = PATHS.map(lambda p: "$" + p)
EXPRS = st.recursive(
    FIELD_EXPRS | st.integers(-5, 5) | st.sampled_from(["x", None, True, "$$ROOT", "$$CURRENT.a"]),
    lambda kids: st.one_of(
        st.lists(kids, max_size=3).map(lambda xs: {"$add": xs}),
        st.tuples(kids, kids).map(lambda t: {"$eq": list(t)}),
        kids.map(lambda x: {"$abs": [x]}),
        kids.map(lambda x: {"$not": [x]}),
        st.tuples(kids, kids, kids).map(
            lambda t: {"$cond": {"if": t[0], "then": t[1], "else": t[2]}}
        ),
        st.dictionaries(st.sampled_from(["k", "l"]), kids, max_size=2),
        st.lists(kids, max_size=3),
        kids.map(lambda x: {"$round": [x, 1]}),
        kids.map(lambda x: {"$map": {"input": x, "as": "v", "in": {"$add": ["$$v.n", "$a"]}}}),
        kids.map(lambda x: {"$filter": {"input": x, "cond": "$$this", "limit": 2}}),
        st.tuples(kids, kids).map(
            lambda t: {"$switch": {"branches": [{"case": t[0], "then": t[1]}], "default": 0}}
        ),
    ),
    max_leaves=8,
)
ACCS = st.sampled_from(["$sum", "$avg", "$min", "$max", "$first", "$last", "$push", "$addToSet"])
SIMPLE_STAGES = st.one_of(
    st.tuples(PATHS, st.integers(-100, 100)).map(lambda t: {"$match": {t[0]: {"$gt": t[1]}}}),
    st.tuples(PATHS, EXPRS).map(lambda t: {"$set": {t[0]: t[1]}}),
    st.tuples(PATHS, EXPRS).map(lambda t: {"$addFields": {"new": t[1], t[0] + "x": 1}}),
    PATHS.map(lambda p: {"$project": {p: 1}}),
    PATHS.map(lambda p: {"$project": {p: 0, "_id": 0}}),
    EXPRS.map(lambda e: {"$project": {"out": e, "_id": 0}}),
    st.tuples(EXPRS, ACCS, EXPRS).map(lambda t: {"$group": {"_id": t[0], "n": {t[1]: t[2]}}}),
    st.tuples(PATHS, st.sampled_from([1, -1])).map(lambda t: {"$sort": {t[0]: t[1]}}),
    st.integers(1, 10).map(lambda n: {"$limit": n}),
    st.integers(0, 10).map(lambda n: {"$skip": n}),
    PATHS.map(lambda p: {"$unwind": "$" + p}),
    PATHS.map(lambda p: {"$unwind": {"path": "$" + p, "includeArrayIndex": "idx"}}),
    EXPRS.map(lambda e: {"$sortByCount": e}),
    st.just({"$count": "n"}),
    PATHS.map(lambda p: {"$unset": p}),
    EXPRS.map(lambda e: {"$replaceWith": {"r": e}}),
    PATHS.map(lambda p: {"$lookup": {**LOOKUP, "localField": p, "as": "j." + p}}),
    EXPRS.map(lambda e: {"$bucket": {"groupBy": e, "boundaries": [0, 5, 10], "default": "o"}}),
)
STAGE_LISTS = st.lists(
    SIMPLE_STAGES
    | st.lists(SIMPLE_STAGES, max_size=3).map(lambda sub: {"$facet": {"f": sub, "g": []}}),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(STAGE_LISTS)
def test_well_formed_pipelines_parse(raw: list[Any]) -> None:
    if sum("$lookup" in json_text(s) for s in raw) > L.max_lookups:
        return
    p = parse_pipeline(raw, L)
    assert len(p.stages) >= len(raw)
    for path, where in source_paths(p):
        assert path and all(isinstance(s, str) and s for s in path)
        assert where.startswith("pipeline[")
    for collection, found in foreign_paths(p).items():
        assert collection in p.lookups and found


def json_text(v: Any) -> str:
    return json.dumps(v)
