"""SQLite back end of the query language: AST → SQL text + bound parameters (JSON1, 3.40+).

Same contract as ``proxy.query.pg``: the SQL text depends only on the shape of the AST;
every value and every field-path segment is a bound parameter (paths are bound as JSON
path strings such as ``$."a"`` or ``$[0]``, built here), so SQLite's statement cache hits
and nothing a client sends becomes SQL text. Documents are JSON text in ``t.doc``.

How the language maps onto SQLite:

* A JSON value inside SQL is a pair ``(ty, v)``: ``ty`` is ``json_type``'s name ('null',
  'true', 'false', 'integer', 'real', 'text', 'array', 'object'; SQL NULL = MISSING) and
  ``v`` is ``json_extract``'s value (numbers, text, 1/0 for booleans, JSON text for
  containers). That is exactly what ``json_each`` yields for array elements, so values and
  elements are tested alike. ``ty`` keeps ``true`` apart from ``1`` and ``null`` apart
  from missing, which ``json_extract`` alone cannot.
* A path's values are a chain of CTEs, one per segment (array fan-out through
  ``json_each``). Chains of CTEs rather than nested subqueries because SQLite's parser
  stack overflows at ~15 nested FROM-subqueries and 16 segments are allowed; every CTE
  ends with ``LIMIT -1 OFFSET 0`` so the query flattener cannot inline the chain (which
  duplicates expressions at every level: exponential work in the path length).
* Numeric segments index arrays and name keys of objects, so their JSON path depends on
  the data: both paths are bound and ``CASE`` on the parent's type picks one.
* Object and array equality goes through ``dbp_canon`` (canonical JSON: sorted keys,
  ``1.0`` == ``1``); container sort order is the ``dbp_json`` collation (the reference
  value order: by type bracket, arrays element-wise, objects by sorted keys). Regular
  expressions are RE2 (linear time, ``proxy.query.regex``) via ``dbp_regexp``. The
  backend registers these deterministic functions on every connection (see
  ``proxy.backends.sqlite``).
* Updates compile to ONE ``UPDATE`` statement: each operator is a few CTEs that walk the
  path top-down (container, JSON path of the segment, current child) and rebuild it
  bottom-up with ``json_set``/``json_remove``, creating missing objects and padding
  arrays with nulls like MongoDB. Arithmetic (``dbp_arith``) and the value order of
  ``$min``/``$max`` (``dbp_cmp``) are Python helpers because SQLite renders a REAL with
  only 15 significant digits when it writes it into JSON; new values always enter as JSON
  text through ``json()``. Type errors call ``dbp_fail``, which aborts the statement; the
  backend turns that into ``update_type_mismatch`` and the write transaction changes
  nothing. No read-modify-write happens in Python.

Not expressible on SQLite 3.40 (``UnsupportedByBackend``): field-path segments holding a
double quote, a backslash or a control character. JSON1 compares path labels with the
*escaped* form of stored keys and ``json_set`` escapes new labels a second time, so such
keys can be neither found reliably nor created.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from proxy import numbers
from proxy.errors import InvalidQuery, NumberOutOfRange, UnsupportedByBackend
from proxy.query import cursor as cursors
from proxy.query import regex
from proxy.query.ast import (
    MAX_ARRAY_INDEX,
    Cmp,
    ElemMatch,
    Eq,
    Exists,
    Filter,
    In,
    Never,
    Not,
    Path,
    Pred,
    Regex,
    Size,
    SortKey,
    TypeIs,
    Update,
    UpdateOp,
)
from proxy.query.common import TYPE_RANKS, FilterWalker, keyset_after
from proxy.query.common import order_by as order_by  # re-exported for the backend

# Names of the helpers the backend registers on every connection.
FN_REGEXP = "dbp_regexp"  # (pattern, options, text) -> 0/1
FN_CANON = "dbp_canon"  # (json text) -> canonical json text
FN_CMP = "dbp_cmp"  # (json text, json text) -> -1/0/1 in the language's value order
FN_ARITH = "dbp_arith"  # ('inc'|'mul', json number, json number) -> json number
FN_FAIL = "dbp_fail"  # (code, message) -> raises; not deterministic
COLLATION = "dbp_json"  # container order for ORDER BY and keyset comparisons

BARRIER = "LIMIT -1 OFFSET 0"  # keeps SQLite from flattening a CTE into its user
MAX_PADDING = MAX_ARRAY_INDEX  # an update pads an array with nulls up to this index only
_INDEX_CLAMP = 10**15  # larger indexes behave alike: past the end of any real array
_INT64 = (-(2**63), 2**63 - 1)

SQLITE_TYPES = {
    "null": ("null",),
    "number": ("integer", "real"),
    "string": ("text",),
    "object": ("object",),
    "array": ("array",),
    "bool": ("true", "false"),
}
_RANK_OF_SQLITE_TYPE = {t: TYPE_RANKS[k] for k, ts in SQLITE_TYPES.items() for t in ts}
RANK_SQL = (
    "CASE {ty} "
    + " ".join(f"WHEN '{t}' THEN {r}" for t, r in _RANK_OF_SQLITE_TYPE.items() if r > 1)
    + " ELSE 1 END"
)
_SCALAR_TYPES = "('integer', 'real', 'text', 'true', 'false')"
_CMP_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
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
    return f"$[{min(int(seg), _INDEX_CLAMP)}]"


def sql_number(value: int | float) -> int | float:
    """A number SQLite can bind (integers past 64 bits compare as doubles, like JSON1's)."""
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        return float(value)
    return value


def _check_no_nul(value: Any) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidQuery("strings may not contain the NUL character", code="invalid_value")
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


def loads(raw: str | bytes) -> Any:
    """Parse JSON text written by orjson or by SQLite (numbers past 64 bits included)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def canonical(value: Any) -> str:
    """JSON text equal for equal values: sorted keys, ``1.0`` written as ``1``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    items = sorted(value.items())
    return "{" + ",".join(f"{orjson.dumps(k).decode()}:{canonical(v)}" for k, v in items) + "}"


def canonical_json(raw: str | None) -> str | None:
    """``dbp_canon``: NULL-safe, as SQLite may evaluate both sides of an AND."""
    return None if raw is None else canonical(loads(raw))


def order_key(value: Any) -> tuple[Any, ...]:
    """Sort key of a JSON value: type bracket, then numbers by value, strings by code point,
    booleans false < true, arrays element-wise, objects by their sorted (key, value) pairs."""
    if value is None:
        return (1,)
    if isinstance(value, bool):
        return (6, value)
    if isinstance(value, int | float):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    if isinstance(value, list):
        return (5, tuple(order_key(v) for v in value))
    return (4, tuple((k, order_key(value[k])) for k in sorted(value)))


@functools.lru_cache(maxsize=4096)
def _order_key_of(raw: str) -> tuple[Any, ...]:
    return order_key(loads(raw))


def compare_json(a: str, b: str) -> int:
    """-1, 0 or 1: the order of two JSON texts (the ``dbp_json`` collation)."""
    ka, kb = _order_key_of(a), _order_key_of(b)
    return (ka > kb) - (ka < kb)


def compare_json_sql(a: str | None, b: str | None) -> int | None:
    """``dbp_cmp``: ``compare_json``, NULL when either side is NULL (MISSING)."""
    return None if a is None or b is None else compare_json(a, b)


def arith(op: str, current: str, operand: str) -> str:
    """``$inc``/``$mul`` on two JSON numbers, with JSON's (IEEE double / integer) rules: a
    result outside signed 64 bits or beyond double range is refused (number_out_of_range)."""
    a, b = loads(current), loads(operand)
    result = a + b if op == "inc" else a * b
    if isinstance(result, int):
        if not numbers.INT64_MIN <= result <= numbers.INT64_MAX:
            raise NumberOutOfRange(
                f"${op} gives an integer outside signed 64 bits "
                f"({numbers.INT64_MIN} to {numbers.INT64_MAX})"
            )
        return str(result)
    if not math.isfinite(result):
        raise NumberOutOfRange(f"${op} gives a number beyond the range of a double")
    return orjson.dumps(result).decode()


compile_regex = regex.compile_regex  # RE2, compiled once per (pattern, options)
regex_search = regex.search


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


def _fail(message: str) -> str:
    assert "'" not in message
    return f"{FN_FAIL}('update_type_mismatch', '{message}')"


# ---- filters --------------------------------------------------------------------------


class FilterCompiler(FilterWalker[Value]):
    """Compiles a filter to a boolean SQL expression over a JSON-text document expression."""

    def __init__(self, params: Params, names: Names | None = None) -> None:
        self.p = params
        self.names = names or Names()

    def where(self, flt: Filter, doc: str = "t.doc") -> str:
        return super().where(flt, doc)

    # -- paths ---------------------------------------------------------------------

    def _values_ctes(self, path: Path, doc: str) -> tuple[list[str], str]:
        """CTEs computing the path's values as rows (ty, v); returns them and the last name."""
        segs = path.segments
        n = self.names.fresh("v")
        first = self.p.add(key_path(segs[:1]))
        ctes = [f"{n}0(ty, v) AS (SELECT json_type({doc}, {first}), json_extract({doc}, {first}))"]
        for i in range(1, len(segs)):
            ctes.append(f"{n}{i}(ty, v) AS ({self._step(f'{n}{i - 1}', segs[i])} {BARRIER})")
        return ctes, f"{n}{len(segs) - 1}"

    def _step(self, prev: str, seg: str) -> str:
        key = self.p.add(key_path((seg,)))
        if is_index(seg):  # an index into arrays, a key of objects; no fan-out
            idx = self.p.add(index_path(seg))
            return (
                f"SELECT CASE w.ty WHEN 'object' THEN json_type(w.v, {key}) "
                f"WHEN 'array' THEN json_type(w.v, {idx}) END, "
                f"CASE w.ty WHEN 'object' THEN json_extract(w.v, {key}) "
                f"WHEN 'array' THEN json_extract(w.v, {idx}) END FROM {prev} w"
            )
        # objects: their field; arrays: the field of each object element (others skipped);
        # anything else: MISSING (the LEFT JOIN keeps one row with e.* NULL)
        return (
            f"SELECT CASE w.ty WHEN 'object' THEN json_type(w.v, {key}) "
            f"ELSE json_type(e.value, {key}) END, "
            f"CASE w.ty WHEN 'object' THEN json_extract(w.v, {key}) "
            f"ELSE json_extract(e.value, {key}) END "
            f"FROM {prev} w LEFT JOIN json_each(CASE WHEN w.ty = 'array' THEN w.v END) e "
            f"WHERE w.ty IS NOT 'array' OR e.type = 'object'"
        )

    def values_sql(self, path: Path, doc: str) -> str:
        ctes, last = self._values_ctes(path, doc)
        return f"WITH {', '.join(ctes)} SELECT ty, v FROM {last}"

    def candidates_sql(self, path: Path, doc: str) -> str:
        ctes, last = self._values_ctes(path, doc)
        return (
            f"WITH {', '.join(ctes)} SELECT ty, v FROM {last} UNION ALL "
            f"SELECT e.type, e.value FROM {last} w, "
            f"json_each(CASE WHEN w.ty = 'array' THEN w.v END) e"
        )

    def row_value(self, alias: str) -> Value:
        return (f"{alias}.ty", f"{alias}.v")

    def is_present(self, alias: str) -> str:
        return f"{alias}.ty IS NOT NULL"

    def is_null_or_missing(self, alias: str) -> str:
        return f"{alias}.ty IS NULL OR {alias}.ty = 'null'"

    def _in(self, path: Path, pred: In, doc: str) -> str:
        # one pass over the candidates instead of one subquery per listed value
        rest = In(tuple(v for v in pred.values if v is not None))
        parts = []
        if len(rest.values) < len(pred.values):
            parts.append(self._pred(path, Eq(None), doc))
        if rest.values:

            def general() -> str:
                cands = self.candidates_sql(path, doc)
                test = self.test_in(self.row_value("q"), rest)
                return f"EXISTS (SELECT 1 FROM ({cands}) q WHERE {test})"

            parts.append(self._direct_or(path, rest, doc, general))
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def _pred(self, path: Path, pred: Pred, doc: str) -> str:
        if isinstance(pred, Not | Never | In):  # they come back here for their parts
            return super()._pred(path, pred, doc)
        return self._direct_or(
            path, pred, doc, lambda: super(FilterCompiler, self)._pred(path, pred, doc)
        )

    def _direct_or(self, path: Path, pred: Pred, doc: str, general: Callable[[], str]) -> str:
        """While every value on the way is an object the path has exactly one value (or
        MISSING) and needs no CTE: about half the work of the general form, which runs
        only when an array or a scalar is on the way."""
        segs = path.segments
        direct = self._direct(path, pred, doc)
        if len(segs) == 1:  # the document itself is an object
            return direct
        objects = " AND ".join(
            f"json_type({doc}, {self.p.add(key_path(segs[:i]))}) = 'object'"
            for i in range(1, len(segs))
        )
        return f"(CASE WHEN {objects} THEN {direct} ELSE {general()} END)"

    def _direct(self, path: Path, pred: Pred, doc: str) -> str:
        """``pred`` on the single value at ``path`` read as object keys all the way."""
        p = self.p.add(key_path(path.segments))
        value = (f"json_type({doc}, {p})", f"json_extract({doc}, {p})")
        # "is an array AND ...": correct in any evaluation order, and skips the subquery
        elements = f"{value[0]} = 'array' AND EXISTS (SELECT 1 FROM json_each({doc}, {p})"
        e = self.names.fresh("e")
        if isinstance(pred, Eq) and pred.value is None:
            return (
                f"({value[0]} IS NULL OR {value[0]} = 'null' OR "
                f"({elements} {e} WHERE {e}.type = 'null')))"
            )
        if isinstance(pred, Exists):
            return f"({value[0]} IS {'NOT ' if pred.present else ''}NULL)"
        if isinstance(pred, Size | ElemMatch):  # on the value, not its elements
            return f"COALESCE({self.value_test(value, pred)}, FALSE)"
        own = self.value_test(value, pred)
        element = self.value_test((f"{e}.type", f"{e}.value"), pred)
        return f"(COALESCE({own}, FALSE) OR ({elements} {e} WHERE {element})))"

    # -- tests on one value (a candidate or an $elemMatch element) ----------------------

    def test_eq(self, x: Value, value: Any) -> str:
        ty, v = x
        if value is None:
            return f"{ty} = 'null'"
        if isinstance(value, bool):
            return f"{ty} = {self.p.add('true' if value else 'false')}"
        if isinstance(value, int | float):
            return f"({ty} IN ('integer', 'real') AND {v} = {self.p.add(sql_number(value))})"
        if isinstance(value, str):
            return f"({ty} = 'text' AND {v} = {self.p.add(text(value))})"
        kind = "object" if isinstance(value, dict) else "array"
        json_text(value)  # refuses NUL
        canon = self.p.add(canonical(value))
        return f"(CASE WHEN {ty} = '{kind}' THEN {FN_CANON}({v}) = {canon} END)"

    def test_in(self, x: Value, pred: In) -> str:
        ty, v = x
        nulls = any(val is None for val in pred.values)
        bools = sorted({"true" if val else "false" for val in pred.values if isinstance(val, bool)})
        numbers = [
            sql_number(val)
            for val in pred.values
            if isinstance(val, int | float) and not isinstance(val, bool)
        ]
        strings = [text(val) for val in pred.values if isinstance(val, str)]
        containers = [canonical(val) for val in pred.values if isinstance(val, dict | list)]
        parts = []
        if nulls:
            parts.append(f"{ty} = 'null'")
        if bools:
            parts.append(f"{ty} IN (SELECT value FROM json_each({self.p.add(json_text(bools))}))")
        if numbers:
            listed = self.p.add(json_text(numbers))
            parts.append(
                f"({ty} IN ('integer', 'real') AND {v} IN (SELECT value FROM json_each({listed})))"
            )
        if strings:
            listed = self.p.add(json_text(strings))
            parts.append(f"({ty} = 'text' AND {v} IN (SELECT value FROM json_each({listed})))")
        if containers:
            listed = self.p.add(json_text(containers))
            parts.append(
                f"(CASE WHEN {ty} IN ('object', 'array') THEN "
                f"{FN_CANON}({v}) IN (SELECT value FROM json_each({listed})) END)"
            )
        if not parts:
            return "FALSE"
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def test_cmp(self, x: Value, pred: Cmp) -> str:
        ty, v = x
        op = _CMP_OPS[pred.op]
        value = pred.value
        if isinstance(value, bool):
            return f"({ty} IN ('true', 'false') AND {v} {op} {self.p.add(int(value))})"
        if isinstance(value, str):
            return f"({ty} = 'text' AND {v} {op} {self.p.add(text(value))})"
        return f"({ty} IN ('integer', 'real') AND {v} {op} {self.p.add(sql_number(value))})"

    def test_type(self, x: Value, pred: TypeIs) -> str:
        names = [n for t in pred.types for n in SQLITE_TYPES[t]]
        return f"{x[0]} IN (SELECT value FROM json_each({self.p.add(json_text(names))}))"

    def test_regex(self, x: Value, pred: Regex) -> str:
        compile_regex(pred.pattern, pred.options)  # invalid_regex before any I/O
        pat = self.p.add(pred.pattern)
        opts = self.p.add(pred.options)
        return f"(CASE WHEN {x[0]} = 'text' THEN {FN_REGEXP}({pat}, {opts}, {x[1]}) END)"

    def test_size(self, x: Value, pred: Size) -> str:
        n = self.p.add(pred.n)
        return f"(CASE WHEN {x[0]} = 'array' THEN json_array_length({x[1]}) = {n} END)"

    def test_elem_match(self, x: Value, pred: ElemMatch) -> str:
        ty, v = x
        em = self.names.fresh("em")
        elements = f"json_each(CASE WHEN {ty} = 'array' THEN {v} END) {em}"
        if pred.preds is not None:
            elem = (f"{em}.type", f"{em}.value")
            tests = " AND ".join(f"COALESCE({self.value_test(elem, p)}, FALSE)" for p in pred.preds)
        else:
            assert pred.filter is not None
            inner = self.where(pred.filter, f"{em}.value")
            tests = f"(CASE WHEN {em}.type = 'object' THEN {inner} END)"
        return f"EXISTS (SELECT 1 FROM {elements} WHERE {tests})"


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


# ---- sort and keyset pagination -------------------------------------------------------


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


# ---- updates --------------------------------------------------------------------------

# A leaf builder gets the name of the leaf level's CTE (its row is aliased ``l``, columns
# c, t, p, ch) and returns (extra CTEs, extra FROM items, the rebuilt container's JSON).
Leaf = Callable[[str], tuple[list[str], str, str]]


_THROUGH_SCALAR = _fail("a field path runs through a value that is not an object or array")


def _concat(a: str, b: str) -> str:
    """Two minified JSON array texts joined into one."""
    return (
        f"(CASE WHEN json_array_length({b}) = 0 THEN {a} WHEN json_array_length({a}) = 0 "
        f"THEN {b} ELSE substr({a}, 1, length({a}) - 1) || ',' || substr({b}, 2) END)"
    )


def _json_equal(a: str, b: str) -> str:
    """Equality of two json_each rows aliased ``a`` and ``b``."""
    return (
        f"(CASE WHEN {a}.type IN ('integer', 'real') "
        f"THEN {b}.type IN ('integer', 'real') AND {a}.value = {b}.value "
        f"WHEN {a}.type IN ('object', 'array') THEN CASE WHEN {a}.type = {b}.type "
        f"THEN {FN_CANON}({a}.value) = {FN_CANON}({b}.value) ELSE FALSE END "
        f"ELSE {a}.type = {b}.type AND {a}.value IS {b}.value END)"
    )


class UpdateCompiler:
    """Compiles update operators to one scalar subquery: the new document's JSON text.

    Operators apply in order, each reading the previous one's document CTE. Type errors
    call ``dbp_fail`` (see the module docstring)."""

    def __init__(self, params: Params, names: Names | None = None) -> None:
        self.p = params
        self.names = names or Names()

    def document_expr(self, update: Update, base: str) -> str:
        d = self.names.fresh("d")
        ctes = [f"{d}0(d) AS (SELECT {base})"]
        for i, op in enumerate(update.ops, start=1):
            ctes.extend(self._op(op, f"{d}{i - 1}", f"{d}{i}"))
        return f"(WITH {', '.join(ctes)} SELECT d FROM {d}{len(update.ops)})"

    # -- walking a path ----------------------------------------------------------------

    def _levels(
        self, src: str, segs: Sequence[str], w: str, *, create: bool, arrays: bool
    ) -> list[str]:
        """Top-down CTEs ``{w}L{i}(c, t, p, ch)``: the container at depth i (padded with
        nulls when an index goes past its end), its type, the JSON path of segment i in
        it (NULL when it cannot hold that segment) and the current child (NULL: missing)."""
        ctes: list[str] = []
        for i, seg in enumerate(segs):
            prev = src if i == 0 else f"{w}L{i - 1}"
            col = "d" if i == 0 else "ch"
            container = f"x.{col}" if i == 0 or not create else "COALESCE(x.ch, '{}')"
            ctes.append(
                f"{w}K{i}(c, t) AS (SELECT {container}, json_type({container}) "
                f"FROM {prev} x {BARRIER})"
            )
            key = self.p.add(key_path((seg,)))
            if is_index(seg) and arrays:
                idx = self.p.add(index_path(seg))
                n = self.p.add(min(int(seg), _INDEX_CLAMP))
                gap = f"{n} - json_array_length(k.c)"
                if create:
                    nulls = f"replace(hex(zeroblob({gap} + 1)), '00', ',null')"
                    padded = (
                        f"CASE WHEN json_array_length(k.c) = 0 THEN '[' || substr({nulls}, 2) "
                        f"|| ']' ELSE substr(k.c, 1, length(k.c) - 1) || {nulls} || ']' END"
                    )
                    too_far = (
                        f"{FN_FAIL}('array_index_too_large', "
                        f"'an update may extend an array up to index {MAX_ARRAY_INDEX}')"
                    )
                    container = (
                        f"CASE WHEN k.t = 'array' AND {gap} >= 0 THEN CASE WHEN {gap} > 0 "
                        f"AND {n} > {MAX_ARRAY_INDEX} THEN {too_far} ELSE {padded} END "
                        "ELSE k.c END"
                    )
                    in_array = idx
                else:
                    container = "k.c"
                    in_array = f"CASE WHEN {gap} < 0 THEN {idx} END"
                path = f"CASE k.t WHEN 'object' THEN {key} WHEN 'array' THEN {in_array} END"
                child = (
                    f"CASE k.t WHEN 'object' THEN k.c -> {key} WHEN 'array' THEN k.c -> {idx} END"
                )
            else:
                container = "k.c"
                path = f"CASE WHEN k.t = 'object' THEN {key} END"
                child = f"k.c -> {key}"
            ctes.append(
                f"{w}L{i}(c, t, p, ch) AS (SELECT {container}, k.t, {path}, {child} "
                f"FROM {w}K{i} k {BARRIER})"
            )
        return ctes

    def _edit(
        self,
        src: str,
        path: Path | Sequence[str],
        out: str,
        leaf: Leaf,
        *,
        create: bool = True,
        arrays: bool = True,
    ) -> list[str]:
        """CTEs rebuilding document ``src`` with the child at ``path`` replaced by the leaf's
        value; the last one is ``out(d)``.

        create: missing containers become objects and a container that cannot hold the
        next segment is a type error. Otherwise (``$unset``, ``$pull``) a missing path
        leaves the document as it is, and the leaf runs only where the child exists."""
        segs = path.segments if isinstance(path, Path) else tuple(path)
        w = self.names.fresh("w")
        ctes = self._levels(src, segs, w, create=create, arrays=arrays)
        last = len(segs) - 1
        extra_ctes, joins, value = leaf(f"{w}L{last}")
        ctes.extend(extra_ctes)
        for i in range(last, -1, -1):
            name = out if i == 0 else f"{w}B{i}"
            if i == last:
                source, new = f"{w}L{i} l{joins}", value
            else:
                source, new = f"{w}L{i} l, {w}B{i + 1} b", "json_set(l.c, l.p, json(b.d))"
            if create:
                bad = f"CASE WHEN l.c IS NOT NULL THEN {_THROUGH_SCALAR} END"
                body = f"CASE WHEN l.p IS NULL THEN {bad} ELSE {new} END"
            else:
                body = f"CASE WHEN l.p IS NULL OR l.ch IS NULL THEN l.c ELSE {new} END"
            ctes.append(f"{name}(d) AS (SELECT {body} FROM {source} {BARRIER})")
        return ctes

    # -- operators ---------------------------------------------------------------------

    def _op(self, op: UpdateOp, src: str, out: str) -> list[str]:
        if op.op == "unset":
            return self._edit(src, op.path, out, self._unset_leaf, create=False)
        if op.op == "pull":
            return self._edit(src, op.path, out, self._pull_leaf(op), create=False)
        if op.op == "rename":
            return self._rename(op, src, out)
        builders: dict[str, Callable[[UpdateOp], Callable[[str], str]]] = {
            "set": self._set_value,
            "inc": self._arith_value,
            "mul": self._arith_value,
            "min": self._minmax_value,
            "max": self._minmax_value,
            "push": self._push_value,
        }
        if op.op == "addToSet":
            return self._edit(src, op.path, out, self._add_to_set_leaf(op))
        if op.op not in builders:
            raise TypeError(f"unknown update op {op.op}")
        value_of = builders[op.op](op)

        def leaf(level: str) -> tuple[list[str], str, str]:
            return [], "", f"json_set(l.c, l.p, json({value_of('l.ch')}))"

        return self._edit(src, op.path, out, leaf)

    def _set_value(self, op: UpdateOp) -> Callable[[str], str]:
        v = self.p.add(json_text(op.value))
        return lambda ch: v

    def _arith_value(self, op: UpdateOp) -> Callable[[str], str]:
        n = self.p.add(json_text(op.value))
        missing = n  # $mul on a missing field stores 0 (0.0 for a float operand)
        if op.op == "mul":
            missing = self.p.add("0.0" if isinstance(op.value, float) else "0")
        fail = _fail(f"${op.op} needs a numeric field")
        return lambda ch: (
            f"(CASE WHEN {ch} IS NULL THEN {missing} WHEN json_type({ch}) IN ('integer', 'real') "
            f"THEN {FN_ARITH}('{op.op}', {ch}, {n}) ELSE {fail} END)"
        )

    def _minmax_value(self, op: UpdateOp) -> Callable[[str], str]:
        v = self.p.add(json_text(op.value))
        cmp = "<" if op.op == "min" else ">"
        return lambda ch: (
            f"(CASE WHEN {ch} IS NULL OR {FN_CMP}({v}, {ch}) {cmp} 0 THEN {v} ELSE {ch} END)"
        )

    def _push_value(self, op: UpdateOp) -> Callable[[str], str]:
        items = self.p.add(json_text(list(op.value)))
        fail = _fail("$push needs an array field")
        return lambda ch: (
            f"(CASE WHEN {ch} IS NULL THEN {items} WHEN json_type({ch}) = 'array' "
            f"THEN {_concat(ch, items)} ELSE {fail} END)"
        )

    def _add_to_set_leaf(self, op: UpdateOp) -> Leaf:
        unique: dict[str, Any] = {}
        for item in op.value:
            unique.setdefault(canonical(item), item)
        items = self.p.add(json_text(list(unique.values())))
        fail = _fail("$addToSet needs an array field")
        a, y, nw = self.names.fresh("a"), self.names.fresh("y"), self.names.fresh("new")

        def leaf(level: str) -> tuple[list[str], str, str]:
            fresh = (
                f"SELECT json_group_array(json({items} -> {a}.fullkey)) "
                f"FROM json_each({items}) {a} "
                f"WHERE NOT EXISTS (SELECT 1 FROM json_each(CASE WHEN json_type(l.ch) = 'array' "
                f"THEN l.ch END) {y} WHERE {_json_equal(y, a)})"
            )
            cte = f"{nw}(items) AS (SELECT ({fresh}) FROM {level} l {BARRIER})"
            value = (
                f"(CASE WHEN l.ch IS NULL THEN {items} WHEN json_type(l.ch) = 'array' "
                f"THEN {_concat('l.ch', f'{nw}.items')} ELSE {fail} END)"
            )
            return [cte], f", {nw}", f"json_set(l.c, l.p, json({value}))"

        return leaf

    @staticmethod
    def _unset_leaf(level: str) -> tuple[list[str], str, str]:
        # MongoDB removes a field from an object but nulls an array element
        value = (
            "CASE l.t WHEN 'object' THEN json_remove(l.c, l.p) ELSE json_set(l.c, l.p, NULL) END"
        )
        return [], "", value

    def _pull_leaf(self, op: UpdateOp) -> Leaf:
        a = self.names.fresh("a")
        elem = (f"{a}.type", f"{a}.value")
        fc = FilterCompiler(self.p, self.names)
        if isinstance(op.value, tuple):
            match = " AND ".join(f"COALESCE({fc.value_test(elem, p)}, FALSE)" for p in op.value)
        else:
            match = f"COALESCE({fc.test_eq(elem, op.value)}, FALSE)"

        def leaf(level: str) -> tuple[list[str], str, str]:
            kept = (
                f"(SELECT json_group_array(json(l.ch -> {a}.fullkey)) FROM json_each(l.ch) {a} "
                f"WHERE NOT ({match}))"
            )
            value = (
                f"CASE WHEN json_type(l.ch) = 'array' THEN json_set(l.c, l.p, json({kept})) "
                f"ELSE l.c END"
            )
            return [], "", value

        return leaf

    def _rename(self, op: UpdateOp, src: str, out: str) -> list[str]:
        """MongoDB's $rename: a missing source changes nothing; a source inside an array
        is an error; the target is created like $set but through objects only."""
        r = self.names.fresh("r")
        source = op.path.segments
        target: Path = op.value
        objpath = self.p.add(key_path(source))
        anywhere = navigate(source, "x.d", self.p, self.names)
        ctes = [
            f"{r}S(anywhere, obj) AS (SELECT {anywhere}, x.d -> {objpath} FROM {src} x)",
            f"{r}R(d) AS (SELECT CASE WHEN s.obj IS NOT NULL THEN json_remove(x.d, {objpath}) END "
            f"FROM {src} x, {r}S s)",
        ]

        def leaf(level: str) -> tuple[list[str], str, str]:
            return [], f", {r}S s", "json_set(l.c, l.p, json(s.obj))"

        ctes += self._edit(f"{r}R", target, f"{r}E", leaf, arrays=False)
        fail = _fail("$rename cannot move a field out of an array")
        ctes.append(
            f"{out}(d) AS (SELECT CASE WHEN s.anywhere IS NULL THEN x.d WHEN s.obj IS NULL "
            f"THEN {fail} ELSE e.d END FROM {src} x, {r}S s, {r}E e)"
        )
        return ctes
