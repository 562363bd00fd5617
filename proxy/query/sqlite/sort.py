"""Sort keys, keyset pagination and ``next`` cursors on SQLite."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from proxy.errors import InvalidQuery
from proxy.query import cursor as cursors
from proxy.query.ast import SortKey
from proxy.query.common import TYPE_RANKS, keyset_after
from proxy.query.sqlite.functions import COLLATION
from proxy.query.sqlite.values import SQLITE_TYPES, Names, Params, locate

_RANK_OF_SQLITE_TYPE = {t: TYPE_RANKS[k] for k, ts in SQLITE_TYPES.items() for t in ts}
RANK_SQL = (
    "CASE {ty} "
    + " ".join(f"WHEN '{t}' THEN {r}" for t, r in _RANK_OF_SQLITE_TYPE.items() if r > 1)
    + " ELSE 1 END"
)
_SCALAR_TYPES = "('integer', 'real', 'text', 'true', 'false')"


def sort_exprs(
    keys: Sequence[SortKey], params: Params, doc: str = "t.doc", names: Names | None = None
) -> list[tuple[str, bool]]:
    """The flat list of (SQL expression, descending) that orders rows; _id always last.

    Three expressions per key: the type bracket, the scalar value (numbers compare
    numerically, text by code point, booleans as 0/1) and the container in the
    ``dbp_json`` collation."""
    names = names or Names()
    out: list[tuple[str, bool]] = []
    for key in keys:
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


def after_cursor(exprs: Sequence[tuple[str, bool]], values: Sequence[Any], params: Params) -> str:
    """Rows strictly after the cursor row (``IS``: the scalar and container keys are NULL
    for the other type brackets)."""
    if len(values) != len(exprs):
        raise ValueError("one cursor value per sort expression")
    return keyset_after(exprs, lambda i: params.add(values[i]), equal="IS")


def cursor_tag(keys: Sequence[SortKey]) -> str:
    return cursors.sort_tag("sqlite:" + repr(tuple(keys)))


def encode_cursor(keys: Sequence[SortKey], values: Sequence[Any]) -> str:
    """A ``next`` cursor. A stored infinity (a number past double range written around
    dbproxy) travels as ``{"inf": 1}`` or ``{"inf": -1}``: JSON has no infinity."""
    safe = [
        {"inf": 1 if v > 0 else -1} if isinstance(v, float) and math.isinf(v) else v for v in values
    ]
    return cursors.encode(cursor_tag(keys), safe)


def decode_cursor(token: Any, keys: Sequence[SortKey]) -> list[Any]:
    """The sort-key values of a ``next`` cursor, type-checked for this dialect."""
    kinds: list[type] = [int, object, object] * len(keys) + [str]
    values = cursors.decode(token, cursor_tag(keys), kinds)
    for i in range(len(keys)):
        scalar, container = values[3 * i + 1], values[3 * i + 2]
        if scalar in ({"inf": 1}, {"inf": -1}):
            scalar = values[3 * i + 1] = math.inf * scalar["inf"]
        scalar_ok = scalar is None or (
            isinstance(scalar, int | float | str) and not isinstance(scalar, bool)
        )
        if not scalar_ok or not (container is None or isinstance(container, str)):
            raise InvalidQuery(
                "next cursor is invalid or belongs to another query", code="invalid_cursor"
            )
    return values
