"""What a parsed pipeline reads (source_paths, foreign_paths), and properties over
arbitrary and well-formed pipelines (only 400s; well-formed ones always parse)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import ProxyError
from proxy.query.aggregate.parse import (
    foreign_paths,
    parse_body,
    parse_pipeline,
    source_paths,
)
from tests.unit.aggregate_parse_support import LOOKUP, L

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
    EXPRS.filter(lambda e: "{}" not in repr(e)).map(  # an empty sub-projection is refused
        lambda e: {"$project": {"out": e, "_id": 0}}
    ),
    st.tuples(EXPRS, ACCS, EXPRS.filter(lambda e: not isinstance(e, list))).map(
        lambda t: {"$group": {"_id": t[0], "n": {t[1]: t[2]}}}
    ),  # an accumulator takes one expression, never an array
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
