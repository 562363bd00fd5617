"""The validated syntax tree of the query language: filters, sorts, projections and updates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

Json: TypeAlias = Any


# An update may extend an array (padding it with nulls) up to this index, no further: the
# same on every backend, 400 ``array_index_too_large`` beyond it.
MAX_ARRAY_INDEX = 10_000
INT32_MAX = 2**31 - 1  # numeric segments past this index no array; bound clamped to it


def is_index(segment: str) -> bool:
    """A numeric path segment: ASCII digits only (``"²".isdigit()`` is true too)."""
    return segment.isascii() and segment.isdigit()


@dataclass(frozen=True, slots=True)
class Path:
    segments: tuple[str, ...]

    @property
    def dotted(self) -> str:
        return ".".join(self.segments)

    def is_numeric(self, i: int) -> bool:
        return is_index(self.segments[i])


# ---- value predicates: tested against the candidates (or values) of one path ----


@dataclass(frozen=True, slots=True)
class Eq:
    value: Json


@dataclass(frozen=True, slots=True)
class Cmp:
    op: str  # "gt" | "gte" | "lt" | "lte"
    value: Json  # number, string or bool (never null: the parser rewrites those)


@dataclass(frozen=True, slots=True)
class In:
    values: tuple[Json, ...]


@dataclass(frozen=True, slots=True)
class Exists:
    present: bool


@dataclass(frozen=True, slots=True)
class TypeIs:
    types: tuple[str, ...]  # canonical: null number string object array bool


@dataclass(frozen=True, slots=True)
class Regex:
    pattern: str
    options: str  # subset of "imsx", sorted


@dataclass(frozen=True, slots=True)
class Size:
    n: int


@dataclass(frozen=True, slots=True)
class ElemMatch:
    """``preds`` for the value form ({"$gt": 1}), ``filter`` for the document form."""

    preds: tuple[Pred, ...] | None
    filter: Filter | None


@dataclass(frozen=True, slots=True)
class Not:
    preds: tuple[Pred, ...]


@dataclass(frozen=True, slots=True)
class Never:
    """A predicate that matches nothing (``$gt: null``, ``$in: []``)."""


Pred: TypeAlias = Eq | Cmp | In | Exists | TypeIs | Regex | Size | ElemMatch | Not | Never


# ---- filter nodes ----


@dataclass(frozen=True, slots=True)
class FieldCond:
    path: Path
    preds: tuple[Pred, ...]  # all must hold


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Filter, ...]  # empty And matches everything


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Nor:
    children: tuple[Filter, ...]


Filter: TypeAlias = FieldCond | And | Or | Nor

MATCH_ALL = And(())


# ---- sort and projection ----


@dataclass(frozen=True, slots=True)
class SortKey:
    path: Path
    descending: bool


# ---- updates ----


@dataclass(frozen=True, slots=True)
class UpdateOp:
    """One field operation. ``value`` is the operand: for $push/$addToSet a tuple of items
    (``$each`` or a single one), for $pull a value or a tuple of preds, for $rename the
    target Path, for $unset None."""

    op: str  # set unset inc mul min max push addToSet pull rename
    path: Path
    value: Any


@dataclass(frozen=True, slots=True)
class Update:
    ops: tuple[UpdateOp, ...]
