"""Hypothesis strategies for the differential tests (backends vs ``tests.reference``).

Everything is drawn from small alphabets so that filters hit often:

* top-level keys ``a b c tags`` hold any value; ``n`` and ``s`` hold only scalars or are
  missing, so ``sorts()`` (which only uses ``n``, ``s`` and ``_id``) never sorts on an
  object or an array (their order is backend-defined);
* nested object keys are ``a b c 0`` (``"0"`` exercises numeric segments on objects);
* numbers are small ints and exactly representable binary fractions (no decimal
  round-trip surprises); strings are ``"" a b ab B é`` (``B < a < é`` by code point,
  which a non-"C" collation gets wrong).

Public: ``scalars() json_values() documents() document_lists() filters() sorts()
projections() updates() update_paths_conflict() filter_size()``.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tests.reference import is_operator_object, update_paths_conflict

__all__ = [
    "DECLARED_KINDS",
    "DECLARED_PATHS",
    "FILTER_PATHS",
    "FLOATS",
    "STRINGS",
    "comparable_scalars",
    "declared_document_lists",
    "declared_documents",
    "declared_filters",
    "declared_sorts",
    "document_lists",
    "documents",
    "filter_size",
    "filters",
    "ids",
    "json_values",
    "projections",
    "regex_patterns",
    "scalars",
    "sorts",
    "update_paths_conflict",
    "updates",
    "value_operators",
]

Json = Any
Strategy = st.SearchStrategy

STRINGS = ("", "a", "b", "ab", "B", "é")
FLOATS = (0.5, -1.5, 2.25, 1.0, -0.5)
NESTED_KEYS = ("a", "b", "c", "0")
SORTABLE_KEYS = ("n", "s")  # scalar or missing in every generated document

#: Paths used by filters over whole documents.
FILTER_PATHS = (
    "a",
    "b",
    "c",
    "n",
    "s",
    "tags",
    "a.b",
    "a.c",
    "a.0",
    "b.a",
    "c.a",
    "c.a.b",
    "a.b.c",
    "tags.0",
    "tags.1",
    "tags.a",
    "b.0.a",
    "x",
)
#: Paths used by $elemMatch document-form filters (over array elements).
ELEMENT_PATHS = ("a", "b", "c", "0", "a.b", "b.0", "c.a")
PROJECTION_PATHS = ("a", "b", "c", "n", "s", "tags", "a.b", "c.a", "c.a.b", "tags.0", "x", "b.c")
UPDATE_PATHS = (
    "a",
    "b",
    "c",
    "tags",
    "n",
    "s",
    "x",
    "a.b",
    "a.c",
    "c.a",
    "c.a.b",
    "a.0",
    "tags.0",
    "tags.1",
    "x.y",
)
RENAMEABLE = ("a", "b", "c", "tags", "x", "y")
TYPE_NAMES = ("null", "number", "string", "object", "array", "bool", "int", "double", "boolean")


# --------------------------------------------------------------------------------------
# Values and documents
# --------------------------------------------------------------------------------------


def numbers() -> Strategy[int | float]:
    return st.one_of(st.integers(-5, 5), st.sampled_from(FLOATS))


def scalars() -> Strategy[Json]:
    """null, bools, small ints, binary-fraction floats, short strings."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 5),
        st.sampled_from(FLOATS),
        st.sampled_from(STRINGS),
    )


def comparable_scalars() -> Strategy[Json]:
    """Operands allowed for $gt/$gte/$lt/$lte (and $min/$max in updates)."""
    return scalars()


@st.composite
def json_values(draw: st.DrawFn, depth: int = 3) -> Json:
    """Any JSON value, containers nested at most ``depth`` levels: half scalars, a
    quarter arrays (0-4 items), a quarter objects (0-3 keys from ``a b c 0``)."""
    kind = draw(st.sampled_from(("scalar", "scalar", "array", "object"))) if depth > 0 else "scalar"
    if kind == "scalar":
        return draw(scalars())
    if kind == "array":
        return draw(st.lists(json_values(depth - 1), max_size=4))
    return draw(st.dictionaries(st.sampled_from(NESTED_KEYS), json_values(depth - 1), max_size=3))


@st.composite
def _tags(draw: st.DrawFn) -> Json:
    """Mostly arrays of scalars, small objects and small arrays; sometimes a scalar."""
    if draw(st.integers(0, 4)) == 0:
        return draw(scalars())
    element = st.one_of(
        scalars(),
        scalars(),
        st.dictionaries(st.sampled_from(NESTED_KEYS), json_values(1), max_size=2),
        st.lists(scalars(), max_size=3),
    )
    return draw(st.lists(element, max_size=4))


def ids() -> Strategy[str]:
    return st.text(alphabet="0123456789abcAB_", min_size=1, max_size=5)


@st.composite
def _bodies(draw: st.DrawFn) -> dict[str, Json]:
    """The fields of a document: each key present with probability 3/4."""
    fields: dict[str, Strategy[Json]] = {
        "a": json_values(3),
        "b": json_values(3),
        "c": json_values(3),
        "tags": _tags(),
        "n": scalars(),
        "s": scalars(),
    }
    return {k: draw(v) for k, v in fields.items() if draw(st.integers(0, 3)) > 0}


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Json]:
    """One document with a string ``_id``."""
    return {"_id": draw(ids()), **draw(_bodies())}


@st.composite
def document_lists(draw: st.DrawFn, min_size: int = 0, max_size: int = 10) -> list[dict[str, Json]]:
    """Lists of documents with pairwise distinct ``_id``s."""
    bodies = draw(st.lists(_bodies(), min_size=min_size, max_size=max_size))
    keys = draw(st.lists(ids(), min_size=len(bodies), max_size=len(bodies), unique=True))
    return [{"_id": i, **b} for i, b in zip(keys, bodies, strict=True)]


# --------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------


def regex_patterns() -> Strategy[str]:
    """Patterns from the portable subset only."""
    piece = st.sampled_from(("a", "b", "B", "é", ".", "a*", "[ab]", "(a|b)"))
    return st.builds(
        lambda caret, pieces, dollar: (
            ("^" if caret else "") + "".join(pieces) + ("$" if dollar else "")
        ),
        st.booleans(),
        st.lists(piece, min_size=1, max_size=3),
        st.booleans(),
    )


def _regex_op() -> Strategy[dict[str, Json]]:
    return st.one_of(
        st.builds(lambda p: {"$regex": p}, regex_patterns()),
        st.builds(
            lambda p, o: {"$regex": p, "$options": o}, regex_patterns(), st.sampled_from(("", "i"))
        ),
    )


def _eq_values() -> Strategy[Json]:
    """Operands of $eq/$ne/$in/$nin/$all and literals: mostly scalars, sometimes a small
    array or object (whole-value equality)."""
    return st.deferred(lambda: st.one_of(scalars(), scalars(), scalars(), json_values(1)))


_LEAF_OPS = (
    "$eq",
    "$ne",
    "$gt",
    "$gte",
    "$lt",
    "$lte",
    "$in",
    "$nin",
    "$exists",
    "$type",
    "$regex",
    "$all",
    "$size",
)
_NESTING_OPS = ("$elemMatch", "$not")


def _operator(op: str, depth: int) -> Strategy[dict[str, Json]]:
    """Strategy for one operator (``$regex`` may come with ``$options``)."""
    if op in ("$eq", "$ne"):
        arg: Strategy[Json] = _eq_values()
    elif op in ("$gt", "$gte", "$lt", "$lte"):
        arg = comparable_scalars()
    elif op in ("$in", "$nin"):
        arg = st.lists(_eq_values(), max_size=3)
    elif op == "$exists":
        arg = st.booleans()
    elif op == "$type":
        arg = st.one_of(
            st.sampled_from(TYPE_NAMES),
            st.lists(st.sampled_from(TYPE_NAMES), min_size=1, max_size=2, unique=True),
        )
    elif op == "$regex":
        return _regex_op()
    elif op == "$all":
        arg = st.lists(_eq_values(), min_size=1, max_size=2)
    elif op == "$size":
        arg = st.integers(0, 3)
    elif op == "$elemMatch":
        # value form (operators on the element) or document form (a filter on it)
        arg = st.one_of(value_operators(depth - 1), _filters(depth - 1, ELEMENT_PATHS))
    elif op == "$not":
        arg = st.one_of(value_operators(depth - 1), regex_patterns())
    else:
        raise AssertionError(op)
    return arg.map(lambda v: {op: v})


@st.composite
def value_operators(draw: st.DrawFn, depth: int = 1) -> dict[str, Json]:
    """An operator object ({"$gt": 1, "$lt": 3}, {"$elemMatch": ...}, ...) with 1-2
    operators; ``depth`` bounds the nesting of ``$not``/``$elemMatch``."""
    names = _LEAF_OPS + (_NESTING_OPS if depth > 0 else ())
    size = 2 if draw(st.integers(0, 2)) == 2 else 1  # one operator two times in three
    chosen = draw(st.lists(st.sampled_from(names), min_size=size, max_size=size, unique=True))
    out: dict[str, Json] = {}
    for op in chosen:
        out.update(draw(_operator(op, depth)))
    return out


@st.composite
def _filters(draw: st.DrawFn, depth: int, paths: tuple[str, ...]) -> dict[str, Json]:
    kind = draw(st.sampled_from(("fields", "fields", "fields", "logical", "mixed")))
    if depth <= 0:
        kind = "fields"
    out: dict[str, Json] = {}
    if kind in ("fields", "mixed"):
        size = 2 if draw(st.integers(0, 2)) == 2 else 1  # one condition two times in three
        chosen = draw(st.lists(st.sampled_from(paths), min_size=size, max_size=size, unique=True))
        for path in chosen:
            if draw(st.integers(0, 2)) == 0:
                out[path] = draw(_eq_values())  # implicit $eq
            else:
                out[path] = draw(value_operators(min(depth, 1)))
    if kind in ("logical", "mixed"):
        op = draw(st.sampled_from(("$and", "$or", "$nor")))
        out[op] = draw(st.lists(_filters(depth - 1, paths), min_size=1, max_size=3))
    return out


@st.composite
def filters(draw: st.DrawFn, depth: int = 2, max_nodes: int = 12) -> dict[str, Json]:
    """Valid filters over ``FILTER_PATHS`` using every operator of the spec, with at
    most ``max_nodes`` nodes (see ``filter_size``); now and then the empty filter."""
    if draw(st.integers(0, 49)) == 17:  # about 2% (not 0: Hypothesis favours bounds)
        return {}
    return draw(_filters(depth, FILTER_PATHS).filter(lambda f: filter_size(f) <= max_nodes))


def filter_size(flt: dict[str, Json]) -> int:
    """Nodes of a filter: one per path condition, per operator and per logical operator
    (``$options`` and literal operands do not count)."""
    size = 0
    for key, val in flt.items():
        size += 1
        if key in ("$and", "$or", "$nor"):
            size += sum(filter_size(sub) for sub in val)
        elif is_operator_object(val):
            size += _operators_size(val)
    return size


def _operators_size(ops: dict[str, Json]) -> int:
    size = 0
    for op, arg in ops.items():
        if op == "$options":
            continue
        size += 1
        if op == "$not" and isinstance(arg, dict):
            size += _operators_size(arg)
        elif op == "$elemMatch":
            size += _operators_size(arg) if is_operator_object(arg) else filter_size(arg)
    return size


# --------------------------------------------------------------------------------------
# Sorts and projections
# --------------------------------------------------------------------------------------


def sorts() -> Strategy[list[tuple[str, int]]]:
    """1-2 (path, ±1) over fields that only ever hold scalars (or are missing)."""
    return st.lists(
        st.tuples(st.sampled_from((*SORTABLE_KEYS, "_id")), st.sampled_from((1, -1))),
        min_size=1,
        max_size=2,
        unique_by=lambda t: t[0],
    )


def _overlap(p: str, q: str) -> bool:
    a, b = p.split("."), q.split(".")
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _drop_overlapping(paths: list[str]) -> list[str]:
    kept: list[str] = []
    for p in paths:
        if not any(_overlap(p, k) for k in kept):
            kept.append(p)
    return kept


def projections() -> Strategy[list[str]]:
    """1-3 projection paths, pairwise non-overlapping (``a`` and ``a.b`` never both: the
    spec does not say what that means; MongoDB rejects it as a path collision)."""
    return st.lists(st.sampled_from(PROJECTION_PATHS), min_size=1, max_size=3, unique=True).map(
        _drop_overlapping
    )


# --------------------------------------------------------------------------------------
# Updates
# --------------------------------------------------------------------------------------


def _each_or_value(value: Strategy[Json]) -> Strategy[Json]:
    return st.one_of(value, st.builds(lambda xs: {"$each": xs}, st.lists(value, max_size=3)))


def _update_arg(op: str, path: str) -> Strategy[Json]:
    scalar_only = path in SORTABLE_KEYS  # keep n and s scalar (sortable) after updates
    if op == "$set":
        return scalars() if scalar_only else json_values(2)
    if op == "$unset":
        return st.just("")
    if op in ("$inc", "$mul"):
        return numbers()
    if op in ("$min", "$max"):
        return comparable_scalars()
    if op in ("$push", "$addToSet"):
        return _each_or_value(_eq_values())
    if op == "$pull":
        return st.one_of(_eq_values(), value_operators(0))
    raise AssertionError(op)


_OPS_ANY = ("$set", "$unset", "$inc", "$mul", "$min", "$max", "$push", "$pull", "$addToSet")
_OPS_SCALAR = ("$set", "$unset", "$inc", "$mul", "$min", "$max")


@st.composite
def updates(draw: st.DrawFn) -> dict[str, dict[str, Json]]:
    """Update documents with 1-3 non-conflicting target paths; every operator appears.

    ``$rename`` only moves top-level fields among ``a b c tags x y`` (no array-element
    error cases in random generation; unit tests cover those)."""
    paths = _drop_overlapping(
        draw(st.lists(st.sampled_from(UPDATE_PATHS), min_size=1, max_size=3, unique=True))
    )
    out: dict[str, dict[str, Json]] = {}
    for path in paths:
        choices = _OPS_SCALAR if path in SORTABLE_KEYS else _OPS_ANY
        if path in RENAMEABLE:
            choices = (*choices, "$rename")
        op = draw(st.sampled_from(choices))
        if op == "$rename":
            used = [*paths, *(v for v in out.get("$rename", {}).values())]
            free = [d for d in RENAMEABLE if not any(_overlap(d, u) for u in used)]
            if not free:
                op = "$set"
            else:
                out.setdefault(op, {})[path] = draw(st.sampled_from(free))
                continue
        out.setdefault(op, {})[path] = draw(_update_arg(op, path))
    assert not update_paths_conflict(out), out
    return out


# --------------------------------------------------------------------------------------
# Documents valid for a schema with declared scalar fields (typed compilation)
# --------------------------------------------------------------------------------------

#: The declared scalar paths of the schema the typed-compilation tests use, and their kinds
#: (what ``CollectionSchema.scalar_kinds()`` gives for ``n: number, s: string, f: boolean,
#: o: object|null, o.x: integer``): every generated document holds a value of that kind,
#: null, or nothing there.
DECLARED_KINDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("f",), "boolean"),
    (("n",), "number"),
    (("o", "x"), "number"),
    (("s",), "string"),
)
DECLARED_PATHS = ("n", "s", "f", "o.x")
_DECLARED_VALUE = {
    "n": st.one_of(st.integers(-4, 4), st.sampled_from(FLOATS)),
    "s": st.sampled_from(STRINGS),
    "f": st.booleans(),
    "o.x": st.integers(-3, 3),
}


def _maybe(values: Strategy[Json]) -> Strategy[Json]:
    """A declared field's value, null, or missing (``_MISSING``)."""
    return st.one_of(values, st.none(), st.just(_MISSING))


_MISSING = object()


@st.composite
def declared_documents(draw: st.DrawFn) -> dict[str, Json]:
    """A document valid for the declared schema, plus an undeclared field ``a``."""
    doc: dict[str, Json] = {}
    for key in ("n", "s", "f"):
        v = draw(_maybe(_DECLARED_VALUE[key]))
        if v is not _MISSING:
            doc[key] = v
    o = draw(st.sampled_from(("object", "null", "missing")))
    if o == "null":
        doc["o"] = None
    elif o == "object":
        x = draw(_maybe(_DECLARED_VALUE["o.x"]))
        doc["o"] = {} if x is _MISSING else {"x": x}
    a = draw(st.one_of(st.just(_MISSING), scalars(), st.lists(scalars(), max_size=2)))
    if a is not _MISSING:
        doc["a"] = a
    return doc


def declared_document_lists(min_size: int = 0, max_size: int = 10) -> Strategy[list[Json]]:
    return st.lists(declared_documents(), min_size=min_size, max_size=max_size).map(
        lambda docs: [{"_id": f"d{i:02d}", **d} for i, d in enumerate(docs)]
    )


def _declared_operand(path: str) -> Strategy[Json]:
    """Mostly a value of the path's kind; sometimes null or another kind (type brackets)."""
    return st.one_of(_DECLARED_VALUE[path], _DECLARED_VALUE[path], st.none(), scalars())


def _declared_condition(path: str) -> Strategy[Json]:
    v = _declared_operand(path)
    lists = st.lists(v, min_size=0, max_size=3)
    op = st.one_of(
        st.fixed_dictionaries({"$eq": v}),
        st.fixed_dictionaries({"$ne": v}),
        st.fixed_dictionaries({"$in": lists}),
        st.fixed_dictionaries({"$nin": lists}),
        st.fixed_dictionaries({"$exists": st.booleans()}),
        st.builds(lambda o, x: {o: x}, st.sampled_from(("$gt", "$gte", "$lt", "$lte")), v),
        st.builds(
            lambda lo, hi: {"$gte": lo, "$lt": hi}, _DECLARED_VALUE[path], _DECLARED_VALUE[path]
        ),
        st.builds(lambda o, x: {"$not": {o: x}}, st.sampled_from(("$gt", "$lte", "$eq")), v),
        st.fixed_dictionaries({"$type": st.sampled_from(("number", "string", "null"))}),
    )
    return st.one_of(v, op)


@st.composite
def declared_filters(draw: st.DrawFn, depth: int = 2) -> dict[str, Json]:
    """Filters over the declared paths (and the undeclared ``a``), with $and/$or/$nor."""
    paths = draw(st.lists(st.sampled_from((*DECLARED_PATHS, "a")), min_size=0, max_size=3))
    flt: dict[str, Json] = {}
    for p in paths:
        flt[p] = draw(_declared_condition(p) if p != "a" else scalars())
    if depth > 0 and draw(st.booleans()):
        op = draw(st.sampled_from(("$and", "$or", "$nor")))
        flt[op] = draw(st.lists(declared_filters(depth - 1), min_size=1, max_size=3))
    return flt


def declared_sorts() -> Strategy[list[tuple[str, int]]]:
    """1-2 (path, ±1) over the declared paths and ``_id``."""
    return st.lists(
        st.tuples(st.sampled_from((*DECLARED_PATHS, "_id")), st.sampled_from((1, -1))),
        min_size=1,
        max_size=2,
        unique_by=lambda t: t[0],
    )
