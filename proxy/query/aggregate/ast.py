"""The validated syntax tree of aggregation pipelines: stages, expressions, accumulators.
Semantics (the contract every compiler and the reference evaluator hold): docs/aggregation.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from proxy.query.ast import Filter

Json: TypeAlias = Any
FieldPath: TypeAlias = tuple[str, ...]  # "a.b" → ("a", "b"); never empty in a stage


# ---- expressions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """``"$a.b"``: a path into the current document; ``"$$ROOT"``/``"$$CURRENT"`` is
    ``Field(())`` (the whole current document)."""

    path: FieldPath


@dataclass(frozen=True, slots=True)
class Var:
    """``"$$name.a.b"``: the variable ``name`` bound by an enclosing ``$filter``/``$map``
    (``this`` or their ``as``), and a path into it (may be empty)."""

    name: str
    path: FieldPath


@dataclass(frozen=True, slots=True)
class Lit:
    """A constant: ``{"$literal": v}``, or a JSON scalar that is not a ``$`` string."""

    value: Json


@dataclass(frozen=True, slots=True)
class Call:
    """An operator, ``op`` without its ``$`` (``"add"``, ``"substrCP"``, ``"cond"``).
    ``args`` are normalised to positional form (docs/aggregation.md, "Operators"):
    ``cond`` is always (if, then, else), ``round`` always (x, place), ``trim`` always
    (input, chars) with ``Lit(None)`` for whitespace, ``slice`` 2 or 3 args as written."""

    op: str
    args: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Obj:
    """An object whose values are expressions, in the order written."""

    fields: tuple[tuple[str, Expr], ...]


@dataclass(frozen=True, slots=True)
class Arr:
    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Switch:
    branches: tuple[tuple[Expr, Expr], ...]  # (case, then)
    default: Expr | None  # None: no branch true is a runtime error (expression_failed)


@dataclass(frozen=True, slots=True)
class Iterate:
    """``$filter`` (``body`` is ``cond``, optional ``limit``) and ``$map`` (``body`` is
    ``in``); ``var`` is the name ``body`` reads the element as (default ``this``)."""

    op: str  # "filter" | "map"
    input: Expr
    var: str
    body: Expr
    limit: Expr | None = None


Expr: TypeAlias = Field | Var | Lit | Call | Obj | Arr | Switch | Iterate


# ---- accumulators ---------------------------------------------------------------------

ACCUMULATORS = ("sum", "avg", "min", "max", "first", "last", "push", "addToSet", "count")


@dataclass(frozen=True, slots=True)
class Accumulator:
    op: str  # one of ACCUMULATORS; "count" ({"$count": {}}) has arg Lit(1) and sums it
    arg: Expr


# ---- stages ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    filter: Filter  # the query language's own AST (proxy.query.ast)


@dataclass(frozen=True, slots=True)
class AddFields:
    """``$addFields`` / ``$set``: each path set to its expression, in order."""

    fields: tuple[tuple[FieldPath, Expr], ...]


@dataclass(frozen=True, slots=True)
class Unset:
    """``$unset``, and ``$project`` in exclusion mode (``{"a": 0, "_id": 0}``)."""

    paths: tuple[FieldPath, ...]


@dataclass(frozen=True, slots=True)
class Project:
    """``$project`` in inclusion mode: ``None`` keeps the path as stored (``1``/``true``),
    an expression computes it. ``_id`` is kept unless ``exclude_id``."""

    fields: tuple[tuple[FieldPath, Expr | None], ...]
    exclude_id: bool = False


@dataclass(frozen=True, slots=True)
class ReplaceRoot:
    """``$replaceRoot {newRoot}`` / ``$replaceWith``: a non-object result is an error."""

    expr: Expr


@dataclass(frozen=True, slots=True)
class Group:
    key: Expr  # the group _id
    accumulators: tuple[tuple[str, Accumulator], ...]  # output field → accumulator


@dataclass(frozen=True, slots=True)
class SortKey:
    path: FieldPath
    descending: bool


@dataclass(frozen=True, slots=True)
class Sort:
    keys: tuple[SortKey, ...]


@dataclass(frozen=True, slots=True)
class Skip:
    n: int


@dataclass(frozen=True, slots=True)
class Limit:
    n: int  # >= 1


@dataclass(frozen=True, slots=True)
class Unwind:
    path: FieldPath
    index_field: FieldPath | None = None  # includeArrayIndex
    preserve: bool = False  # preserveNullAndEmptyArrays


@dataclass(frozen=True, slots=True)
class Count:
    field: str  # $count: one document {field: n}; no document over no input


@dataclass(frozen=True, slots=True)
class Lookup:
    """``$lookup {from, localField, foreignField, as}`` (the equality form only)."""

    collection: str  # "from": a valid collection name
    local: FieldPath
    foreign: FieldPath
    as_: FieldPath


@dataclass(frozen=True, slots=True)
class Facet:
    facets: tuple[tuple[str, tuple[Stage, ...]], ...]  # output field → sub-pipeline (no $facet)


@dataclass(frozen=True, slots=True)
class Bucket:
    group_by: Expr
    boundaries: tuple[Json, ...]  # >= 2, strictly ascending, one type bracket
    default: Json  # the default bucket's _id; meaningful only when has_default
    has_default: bool
    output: tuple[tuple[str, Accumulator], ...]  # default: (("count", sum 1),)


Stage: TypeAlias = (
    Match
    | AddFields
    | Unset
    | Project
    | ReplaceRoot
    | Group
    | Sort
    | Skip
    | Limit
    | Unwind
    | Count
    | Lookup
    | Facet
    | Bucket
)


@dataclass(frozen=True, slots=True)
class Pipeline:
    stages: tuple[Stage, ...]
    lookups: tuple[str, ...] = ()  # every collection a $lookup names (also inside $facet), sorted


# ---- what a compiler reads from: the caller's view of a collection ---------------------


@dataclass(frozen=True, slots=True)
class View:
    """The rows of ``collection`` the caller may see (``guard``, the row rules; None: all)
    with only the fields it may read (``readable``, FieldRule semantics: a listed path
    covers everything under it; None: every field). ``_id`` and ``_version`` always pass.
    ``scalars``/``numbers``: what its enforced schema declares (see below)."""

    collection: str
    guard: Filter | None = None
    readable: frozenset[str] | None = None
    # from an enforced schema: top-level declared scalar paths (any kind), and declared
    # number paths never null; a compiler may use them while documents are as stored
    scalars: frozenset[FieldPath] = frozenset()
    numbers: frozenset[FieldPath] = frozenset()


@dataclass(frozen=True, slots=True)
class AggregateSpec:
    """One aggregation as a backend runs it: the pipeline over the caller's view of the
    collection (``base``) and of each looked-up one (``views``), at most ``cap`` output
    documents wanted (the backend returns up to ``cap + 1``: one more tells "over")."""

    pipeline: Pipeline
    base: View
    views: tuple[View, ...]
    cap: int
    explain: bool = False
    max_bytes: int = 16 * 1024 * 1024  # one output document as JSON text, at most

    def view(self, collection: str) -> View:
        for v in self.views:
            if v.collection == collection:
                return v
        raise KeyError(collection)


@dataclass(frozen=True, slots=True)
class Aggregated:
    """What a backend answers: the output documents as JSON text (at most ``cap + 1``), or
    with ``explain`` the statement and its plan instead."""

    items: list[bytes]
    explain: dict[str, Any] | None = None
