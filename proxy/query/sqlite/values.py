"""JSON values and field paths as SQL: bound values, JSON path strings, placeholders, fresh
names and plain navigation."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import orjson

from proxy.errors import InvalidQuery, UnsupportedByBackend

BARRIER = "LIMIT -1 OFFSET 0"  # keeps SQLite from flattening a CTE into its user

INDEX_CLAMP = 10**15  # larger indexes behave alike: past the end of any real array
_INT64 = (-(2**63), 2**63 - 1)

SQLITE_TYPES = {
    "null": ("null",),
    "number": ("integer", "real"),
    "string": ("text",),
    "object": ("object",),
    "array": ("array",),
    "bool": ("true", "false"),
}
_NOT_ADDRESSABLE = re.compile(r'["\\\x00-\x1f]')

# A JSON value inside SQL: (type expression, value expression).
Value = tuple[str, str]


# ---- values and paths -------------------------------------------------------------------


def is_index(seg: str) -> bool:
    """A numeric path segment (ASCII digits only: ``"²".isdigit()`` is true too)."""
    return seg.isascii() and seg.isdigit()


def key_path(segments: Sequence[str]) -> str:
    """The JSON path naming ``segments`` as object keys: ``$."a"."b"``."""
    for seg in segments:
        if _NOT_ADDRESSABLE.search(seg):
            raise UnsupportedByBackend(
                "the SQLite store cannot address field names holding a double quote, a "
                f"backslash or a control character ({seg[:40]!r})",
                details={"feature": "field path with quote, backslash or control character"},
            )
    return "$" + "".join(f'."{seg}"' for seg in segments)


def index_path(seg: str) -> str:
    return f"$[{min(int(seg), INDEX_CLAMP)}]"


def sql_number(value: int | float) -> int | float:
    """A number SQLite can bind (integers past 64 bits compare as doubles, like JSON1's)."""
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        return float(value)
    return value


def _check_no_nul(value: Any) -> None:
    if isinstance(value, str):
        text(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_no_nul(k)
            _check_no_nul(v)
    elif isinstance(value, list):
        for v in value:
            _check_no_nul(v)


def text(value: str) -> str:
    """A string to bind; NUL is refused as PostgreSQL refuses it."""
    if "\x00" in value:
        raise InvalidQuery("strings may not contain the NUL character", code="invalid_value")
    return value


def json_text(value: Any) -> str:
    """``value`` as JSON text to bind (NUL refused, like PostgreSQL's jsonb)."""
    try:
        out = orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError):
        raise InvalidQuery("a value JSON cannot carry", code="invalid_value") from None
    if b"\\u0000" in out:
        _check_no_nul(value)
    return out.decode()


# ---- parameters and names -------------------------------------------------------------


class Params:
    """Collects bound values; ``add`` returns the numbered placeholder (``?3``), which may
    appear several times in the SQL text."""

    __slots__ = ("values",)

    def __init__(self, start: Sequence[Any] = ()) -> None:
        self.values: list[Any] = list(start)

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"?{len(self.values)}"


class Names:
    """Fresh CTE and alias names for one statement (deterministic for one AST shape)."""

    __slots__ = ("_n",)

    def __init__(self) -> None:
        self._n = 0

    def fresh(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}_"


# ---- plain navigation (sort keys, $rename sources) ---------------------------------------


def navigate(segments: Sequence[str], doc: str, params: Params, names: Names) -> str:
    """JSON text at ``segments`` (objects by key, arrays by numeric segment, no fan-out),
    or NULL: a scalar subquery, one CTE per numeric segment."""
    n = names.fresh("n")
    runs: list[list[str]] = [[segments[0]]]
    for seg in segments[1:]:
        if is_index(seg):
            runs.append([seg])
            runs.append([])
        else:
            runs[-1].append(seg)
    ctes: list[str] = []
    for run in runs:
        if not run:
            continue
        prev = f"{n}{len(ctes) - 1}"
        if not ctes:
            body = f"SELECT {doc} -> {params.add(key_path(run))}"
        elif len(run) == 1 and is_index(run[0]):
            idx = params.add(index_path(run[0]))
            key = params.add(key_path(run))
            body = (
                f"SELECT CASE json_type(x.j) WHEN 'array' THEN x.j -> {idx} "
                f"WHEN 'object' THEN x.j -> {key} END FROM {prev} x {BARRIER}"
            )
        else:
            body = f"SELECT x.j -> {params.add(key_path(run))} FROM {prev} x {BARRIER}"
        ctes.append(f"{n}{len(ctes)}(j) AS ({body})")
    return f"(WITH {', '.join(ctes)} SELECT j FROM {n}{len(ctes) - 1})"


def locate(segments: Sequence[str], doc: str, params: Params, names: Names) -> Value:
    """(type, value) at ``segments`` by plain navigation."""
    if not any(is_index(s) for s in segments[1:]):  # the document itself is an object
        path = params.add(key_path(segments))
        return (f"json_type({doc}, {path})", f"json_extract({doc}, {path})")
    j = navigate(segments, doc, params, names)
    return (f"json_type({j})", f"json_extract({j}, '$')")


@functools.lru_cache(maxsize=4096)
def declared_expr(path: tuple[str, ...], kind: str, doc: str = "t.doc") -> str:
    """The expression of a declared scalar path (``proxy.query.pg.declared_expr``'s twin):
    what an index on the path and a query that may use it are both written with. The
    segments are declared names (``proxy.schema.model.SEGMENT_RE``), never request text."""
    del kind  # json_extract gives each scalar kind its SQL value (strings in byte order)
    return f"json_extract({doc}, '{key_path(path)}')"
