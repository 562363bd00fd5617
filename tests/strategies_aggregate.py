"""Hypothesis strategies for the aggregation differential tests: ``documents()`` (collections),
``pipelines()`` (valid raw pipelines); ``assume(reference_aggregate.promised(...))`` with them."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tests.strategies import _filters
from tests.strategies_aggregate_expr import NUMBERS, STRINGS, expressions, pick, typed

Json = Any
Strategy = st.SearchStrategy

__all__ = ["document", "documents", "expressions", "pipelines", "stages"]

_MISSING = object()
_NUM = st.sampled_from(NUMBERS)
_STR = st.sampled_from(STRINGS[:6])
_SCALAR = st.one_of(st.none(), st.booleans(), _NUM, _STR)


def _maybe(*choices: Strategy[Json]) -> Strategy[Json]:
    """One of ``choices``, null, or missing."""
    return st.one_of(*choices, st.none(), st.just(_MISSING))


@st.composite
def document(draw: st.DrawFn) -> dict[str, Json]:
    """One document body (no ``_id``): ``a`` mostly numbers, ``b`` mostly strings, ``c`` an
    object ``{x: number, y: string, f: bool}``, ``tags`` an array of scalars, ``arr`` an array
    of objects ``{x, y}``; each possibly null, missing or of another type."""
    fields = {
        "a": _maybe(_NUM, _NUM, _NUM, _STR, st.lists(_NUM, max_size=3)),
        "b": _maybe(_STR, _STR, _STR, _NUM, st.lists(_STR, max_size=2)),
        "c": _maybe(_object(), _object(), _SCALAR),
        "tags": _maybe(
            st.lists(st.one_of(_SCALAR, st.lists(_SCALAR, max_size=2)), max_size=4), _STR
        ),
        "arr": _maybe(st.lists(st.one_of(_object(), _object(), _SCALAR), max_size=3)),
    }
    out = {}
    for key, values in fields.items():
        v = draw(values)
        if v is not _MISSING:
            out[key] = v
    return out


def _object() -> Strategy[dict[str, Json]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "x": st.one_of(_NUM, st.none()),
            "y": st.one_of(_STR, st.none()),
            "f": st.booleans(),
        },
    )


@st.composite
def documents(draw: st.DrawFn, min_size: int = 0, max_size: int = 8) -> list[dict[str, Json]]:
    """A collection: small documents with pairwise distinct string ``_id``s."""
    bodies = draw(st.lists(document(), min_size=min_size, max_size=max_size))
    keys = draw(
        st.lists(
            st.text(alphabet="abAB0_é", min_size=1, max_size=3),
            min_size=len(bodies),
            max_size=len(bodies),
            unique=True,
        )
    )
    return [{"_id": k, **b} for k, b in zip(keys, bodies, strict=True)]


# ---- stages -------------------------------------------------------------------------------

MATCH_PATHS = ("a", "b", "c", "c.x", "c.y", "tags", "arr", "arr.x", "cnt", "_id")
SORT_PATHS = ("a", "b", "c.x", "c.y", "tags", "arr.x", "cnt", "_id")
PROJECT_PATHS = ("a", "b", "c", "c.x", "tags", "arr", "arr.y", "cnt")
SET_PATHS = ("a", "b", "cnt", "n", "c.x", "arr.y")
OUTPUT_FIELDS = ("a", "b", "c", "tags", "cnt")


def _overlap(p: str, q: str) -> bool:
    a, b = p.split("."), q.split(".")
    return a[: min(len(a), len(b))] == b[: min(len(a), len(b))]


def _disjoint(paths: list[str]) -> list[str]:
    kept: list[str] = []
    for p in paths:
        if not any(_overlap(p, k) for k in kept):
            kept.append(p)
    return kept


def _paths(choices: tuple[str, ...], max_size: int) -> Strategy[list[str]]:
    return st.lists(st.sampled_from(choices), min_size=1, max_size=max_size, unique=True).map(
        _disjoint
    )


def _value_expr(depth: int = 2) -> Strategy[Json]:
    """A computed field's expression: never a bare number/boolean (``$project`` would read
    it as a flag) nor an object literal (MongoDB reads that as a nested projection)."""
    return (
        expressions(depth)
        .map(lambda e: {"$literal": e} if _bare_flag(e) else e)
        .filter(lambda e: not (isinstance(e, dict) and not next(iter(e), "$").startswith("$")))
    )


def _bare_flag(e: Json) -> bool:
    return isinstance(e, bool | int | float)


def _match() -> Strategy[Json]:
    return _filters(1, MATCH_PATHS).map(lambda f: {"$match": f})


@st.composite
def _set(draw: st.DrawFn, name: str) -> Json:
    fields = {}
    for path in draw(_paths(SET_PATHS, 2)):
        e = draw(_value_expr())
        # a dotted path's value is never missing (what removing there means is not promised)
        fields[path] = {"$ifNull": [e, None]} if "." in path else e
    return {name: fields}


@st.composite
def _project(draw: st.DrawFn) -> Json:
    paths = draw(_paths(PROJECT_PATHS, 3))
    if draw(st.integers(0, 3)) == 0:  # exclusion
        spec: dict[str, Json] = {p: draw(st.sampled_from((0, False))) for p in paths}
    else:
        spec = {p: draw(st.sampled_from((1, True))) for p in paths}
        for name in draw(st.lists(st.sampled_from(("p", "q", "n")), max_size=2, unique=True)):
            spec[name] = draw(_value_expr())
    if draw(st.booleans()):
        spec["_id"] = 0
    return {"$project": spec}


@st.composite
def _group(draw: st.DrawFn) -> Json:
    key = draw(
        st.one_of(
            st.sampled_from(("$a", "$b", "$c.x", "$tags", None)),
            st.fixed_dictionaries({"x": st.sampled_from(("$a", "$c.y")), "y": st.just("$b")}),
            expressions(1),
        )
    )
    spec = {"_id": key}
    for name in draw(st.lists(st.sampled_from(OUTPUT_FIELDS), max_size=3, unique=True)):
        spec[name] = draw(_accumulator())
    return {"$group": spec}


def _unary(e: Strategy[Json]) -> Strategy[Json]:
    """An accumulator's argument: one expression, never an array (the front end refuses
    ``{"$sum": [...]}`` as MongoDB does: accumulators are unary)."""
    return e.filter(lambda v: not isinstance(v, list))


def _accumulator() -> Strategy[Json]:
    num = _unary(typed("num", 1))
    scalar = st.one_of(st.sampled_from(("$a", "$b", "$c.x", "$tags")), _unary(typed("str", 1)))
    return pick(
        st.one_of(st.just(1), num).map(lambda e: {"$sum": e}),
        num.map(lambda e: {"$avg": e}),
        st.builds(lambda op, e: {op: e}, st.sampled_from(("$min", "$max")), scalar),
        st.builds(
            lambda op, e: {op: e},
            st.sampled_from(("$first", "$last", "$push", "$addToSet")),
            _unary(expressions(1)),
        ),
        st.just({"$count": {}}),
    )


def _sort() -> Strategy[Json]:
    keys = st.lists(st.sampled_from(SORT_PATHS), min_size=1, max_size=2, unique=True)
    return st.builds(
        lambda ks, dirs: {"$sort": dict(zip(ks, dirs, strict=False))},
        keys,
        st.lists(st.sampled_from((1, -1)), min_size=2, max_size=2),
    )


def _unwind() -> Strategy[Json]:
    path = st.sampled_from(("$tags", "$arr", "$a", "$b", "$c.x"))
    return st.one_of(
        path.map(lambda p: {"$unwind": p}),
        st.builds(
            lambda p, idx, keep: {"$unwind": {"path": p, **idx, **keep}},
            path,
            st.sampled_from(({}, {"includeArrayIndex": "idx"})),
            st.sampled_from(({}, {"preserveNullAndEmptyArrays": True})),
        ),
    )


def _bucket() -> Strategy[Json]:
    numeric = st.lists(st.sampled_from((-2, 0, 1, 2, 5)), min_size=2, max_size=4, unique=True)
    text = st.lists(st.sampled_from(("", "a", "b", "c")), min_size=2, max_size=3, unique=True)
    return st.builds(
        lambda gb, bounds, default, output: {
            "$bucket": {"groupBy": gb, "boundaries": sorted(bounds), **default, **output}
        },
        st.sampled_from(("$a", "$c.x", "$b")),
        st.one_of(numeric, text),
        st.sampled_from(({"default": "other"}, {"default": None}, {})),
        st.sampled_from(({}, {"output": {"cnt": {"$sum": 1}, "a": {"$push": "$a"}}})),
    )


def _replace() -> Strategy[Json]:
    guarded_c = {  # "$c" when it is an object: a run-time failure only now and then
        "$cond": [{"$eq": [{"$type": "$c"}, "object"]}, "$c", {"$literal": {"c": None}}]
    }
    new_root = st.one_of(
        st.sampled_from((guarded_c, guarded_c, "$c")),
        st.dictionaries(st.sampled_from(OUTPUT_FIELDS), expressions(1), min_size=1, max_size=3),
    )
    return st.one_of(
        new_root.map(lambda e: {"$replaceRoot": {"newRoot": e}}),
        new_root.map(lambda e: {"$replaceWith": e}),
    )


def _lookup(collection: str) -> Strategy[Json]:
    return st.builds(
        lambda local, foreign, as_: {
            "$lookup": {"from": collection, "localField": local, "foreignField": foreign, "as": as_}
        },
        st.sampled_from(("a", "b", "tags", "c.x")),
        st.sampled_from(("a", "b", "tags", "c.x")),
        st.sampled_from(("joined", "c.j")),
    )


def stages(lookup_collection: str | None = None, facet: bool = True) -> Strategy[Json]:
    """One valid stage, weighted towards $match/$group/$sort/$project/$addFields/$unwind."""
    weighted: list[tuple[int, Strategy[Json]]] = [
        (4, _match()),
        (4, _group()),
        (4, _sort()),
        (3, _project()),
        (3, _set("$addFields")),
        (3, _unwind()),
        (1, _set("$set")),
        (1, st.sampled_from(({"$unset": "a"}, {"$unset": ["b", "c.x"]}, {"$unset": ["arr.x"]}))),
        (1, _replace()),
        (1, st.just({"$count": "cnt"})),
        (1, st.sampled_from(("$a", "$b", "$tags", "$c.x")).map(lambda e: {"$sortByCount": e})),
        (1, st.integers(0, 3).map(lambda n: {"$skip": n})),
        (1, st.integers(1, 5).map(lambda n: {"$limit": n})),
        (1, _bucket()),
    ]
    if facet:
        weighted.append((1, _facet()))
    if lookup_collection is not None:
        weighted.append((2, _lookup(lookup_collection)))
    return st.sampled_from([s for weight, s in weighted for _ in range(weight)]).flatmap(
        lambda s: s
    )


def _facet() -> Strategy[Json]:
    sub = st.lists(stages(facet=False), min_size=1, max_size=2)
    return st.dictionaries(st.sampled_from(("f1", "f2")), sub, min_size=1, max_size=2).map(
        lambda f: {"$facet": f}
    )


def _lookups(pipeline: list[Json]) -> int:
    return sum(1 for s in pipeline if "$lookup" in s)


def pipelines(lookup_collection: str | None = None) -> Strategy[list[Json]]:
    """Valid raw pipelines of 1-5 stages (``$lookup`` only with ``lookup_collection``, at most
    3). One may fail at run time (``expression_failed``): the backend must then fail too."""
    return st.lists(stages(lookup_collection), min_size=1, max_size=5).filter(
        lambda p: _lookups(p) <= 3
    )


@st.composite
def numeric_documents(draw: st.DrawFn) -> list[dict[str, Json]]:
    """``documents()``, half the time with every ``a`` and ``c.x`` a number or missing
    (the values a speculative statement, proxy.query.aggregate.pg.compile_speculative,
    takes without a type test)."""
    docs = draw(documents())
    if draw(st.booleans()):
        for d in docs:
            if not _is_number(d.get("a", 0)):
                del d["a"]
            c = d.get("c")
            if isinstance(c, dict) and not _is_number(c.get("x", 0)):
                del c["x"]
    return docs


def _is_number(v: Json) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@st.composite
def accumulating_pipelines(draw: st.DrawFn) -> list[Json]:
    """A few random stages, a ``$group`` whose numeric accumulators read field paths (what
    a speculative statement assumes numbers), maybe a stage after it."""
    field = st.sampled_from(("$a", "$a", "$c.x", "$b", "$tags"))
    numeric = st.builds(
        lambda op, f: {op: f}, st.sampled_from(("$sum", "$avg", "$min", "$max")), field
    )
    other = st.builds(lambda op, f: {op: f}, st.sampled_from(("$push", "$first")), field)
    spec: dict[str, Json] = {"_id": draw(st.sampled_from(("$b", "$c.y", None, "$a")))}
    names = draw(st.lists(st.sampled_from(OUTPUT_FIELDS), min_size=1, max_size=3, unique=True))
    for i, name in enumerate(names):
        spec[name] = draw(numeric if i == 0 else st.one_of(numeric, other))
    before = draw(st.lists(stages(facet=False), max_size=2))
    after = draw(st.lists(stages(facet=False), max_size=1))
    return [*before, {"$group": spec}, *after]
