"""Sort keys, keyset pagination and ``next`` cursors on SQLite."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from proxy.errors import InvalidQuery
from proxy.query import cursor as cursors
from proxy.query.ast import SortKey
from proxy.query.common import TYPE_RANKS, Kinds, declared_kind, keyset_after
from proxy.query.sqlite.functions import COLLATION
from proxy.query.sqlite.values import SQLITE_TYPES, Names, Params, declared_expr, locate

_RANK_OF_SQLITE_TYPE = {t: TYPE_RANKS[k] for k, ts in SQLITE_TYPES.items() for t in ts}
RANK_SQL = (
    "CASE {ty} "
    + " ".join(f"WHEN '{t}' THEN {r}" for t, r in _RANK_OF_SQLITE_TYPE.items() if r > 1)
    + " ELSE 1 END"
)
_SCALAR_TYPES = "('integer', 'real', 'text', 'true', 'false')"


def key_kinds(keys: Sequence[SortKey], kinds: Kinds | None) -> list[str | None]:
    """The declared kind of each sort key (None: sorted the generic way)."""
    return [declared_kind(kinds, k.path) if kinds else None for k in keys]


def sort_exprs(
    keys: Sequence[SortKey],
    params: Params,
    doc: str = "t.doc",
    names: Names | None = None,
    kinds: Kinds | None = None,
) -> list[tuple[str, bool]]:
    """The flat list of (SQL expression, descending) that orders rows; _id always last.

    Three expressions per key: the type bracket, the scalar value (numbers compare
    numerically, text by code point, booleans as 0/1) and the container in the
    ``dbp_json`` collation. A declared path is one key, its declared expression (NULL for
    missing and null: first ascending, last descending, as in MongoDB)."""
    names = names or Names()
    out: list[tuple[str, bool]] = []
    for key, kind in zip(keys, key_kinds(keys, kinds), strict=True):
        if kind is not None:
            out.append((declared_expr(key.path.segments, kind, doc), key.descending))
            continue
        ty, v = locate(key.path.segments, doc, params, names)
        out.append((RANK_SQL.format(ty=ty), key.descending))
        out.append((f"(CASE WHEN {ty} IN {_SCALAR_TYPES} THEN {v} END)", key.descending))
        out.append(
            (
                f"(CASE WHEN {ty} IN ('object', 'array') THEN {v} END COLLATE {COLLATION})",
                key.descending,
            )
        )
    out.append(("t._id", False))
    return out


def after_cursor(
    exprs: Sequence[tuple[str, bool]],
    values: Sequence[Any],
    params: Params,
    keys: Sequence[SortKey] = (),
    kinds: Kinds | None = None,
) -> str:
    """Rows strictly after the cursor row (``IS``: the scalar and container keys are NULL
    for the other type brackets; a declared key is NULL for missing and null)."""
    if len(values) != len(exprs):
        raise ValueError("one cursor value per sort expression")
    flags: list[bool] = []
    for kind in key_kinds(keys, kinds):
        flags += [True] if kind is not None else [False] * 3
    return keyset_after(
        exprs, lambda i: params.add(values[i]), equal="IS", nullable=flags, null_equal="IS"
    )


def cursor_tag(keys: Sequence[SortKey], kinds: Kinds | None = None) -> str:
    typed = [(i, k) for i, k in enumerate(key_kinds(keys, kinds)) if k is not None]
    return cursors.sort_tag("sqlite:" + repr(tuple(keys)) + (repr(typed) if typed else ""))


def _safe(v: Any) -> Any:
    return {"inf": 1 if v > 0 else -1} if isinstance(v, float) and math.isinf(v) else v


def encode_cursor(
    keys: Sequence[SortKey], values: Sequence[Any], kinds: Kinds | None = None
) -> str:
    """A ``next`` cursor. A stored infinity (a number past double range written around
    dbproxy) travels as ``{"inf": 1}`` or ``{"inf": -1}``: JSON has no infinity."""
    return cursors.encode(cursor_tag(keys, kinds), [_safe(v) for v in values])


def _scalar(values: list[Any], i: int) -> bool:
    """Restores a cursor's infinity at ``i``; whether the value there is a scalar key."""
    scalar = values[i]
    if scalar in ({"inf": 1}, {"inf": -1}):
        scalar = values[i] = math.inf * scalar["inf"]
    return scalar is None or (
        isinstance(scalar, int | float | str) and not isinstance(scalar, bool)
    )


def decode_cursor(token: Any, keys: Sequence[SortKey], kinds: Kinds | None = None) -> list[Any]:
    """The sort-key values of a ``next`` cursor, type-checked for this dialect."""
    typed = key_kinds(keys, kinds)
    expected: list[type] = []
    for kind in typed:
        expected += [object] if kind is not None else [int, object, object]
    values = cursors.decode(token, cursor_tag(keys, kinds), [*expected, str])
    bad = InvalidQuery("next cursor is invalid or belongs to another query", code="invalid_cursor")
    i = 0
    for kind in typed:
        if kind is not None:
            if not _scalar(values, i):
                raise bad
            i += 1
            continue
        container = values[i + 2]
        if not _scalar(values, i + 1) or not (container is None or isinstance(container, str)):
            raise bad
        i += 3
    return values
