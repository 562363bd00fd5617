"""PostgreSQL back end of the query language: AST → SQL text + bound parameters.
Design notes: docs/query-language.md."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from proxy.numbers import DOUBLE_MAX_EXACT, INT64_MAX, INT64_MIN
from proxy.query.ast import (
    INT32_MAX,
    MAX_ARRAY_INDEX,
    Cmp,
    ElemMatch,
    Filter,
    In,
    Path,
    Pred,
    Regex,
    Size,
    SortKey,
    TypeIs,
    Update,
    UpdateOp,
    is_index,
)
from proxy.query.common import FilterWalker, Kinds, keyset_after
from proxy.query.common import order_by as order_by  # re-exported for the backend
from proxy.query.pg_typed import JSON_KEY_SQL, PG_TYPES, RANK_SQL, TEXT_KEY_SQL, typed_pred
from proxy.query.pg_typed import declared_expr as declared_expr  # index DDL uses it too

# PCRE-style (m, s) options → PostgreSQL ARE embedded options.
# p: '.' and [^] exclude newline, ^$ only at string ends (PCRE default)
# n: newline-sensitive (PCRE m);  s: '.' matches newline (PCRE s);  w: both m and s
_NEWLINE_MODE = {"": "p", "m": "n", "s": "s", "ms": "w"}


def regex_with_options(pattern: str, options: str) -> str:
    """Prefix the pattern with the ARE embedded options equivalent to PCRE ``options``."""
    mode = _NEWLINE_MODE["".join(c for c in options if c in "ms")]
    flags = mode + ("i" if "i" in options else "") + ("x" if "x" in options else "")
    return f"(?{flags}){pattern}"


def jsonb(value: Any) -> str:
    return orjson.dumps(value).decode()


class Params:
    """Collects bound values; ``add`` returns the placeholder for the next one."""

    __slots__ = ("values",)

    def __init__(self, start: Sequence[Any] = ()) -> None:
        self.values: list[Any] = list(start)

    def add(self, value: Any, cast: str) -> str:
        self.values.append(value)
        return f"${len(self.values)}::{cast}"


class FilterCompiler(FilterWalker[str]):
    """Compiles a filter to a boolean SQL expression over a jsonb document expression."""

    def __init__(self, params: Params, kinds: Kinds | None = None) -> None:
        self.p = params
        if kinds:
            self.kinds = kinds

    def where(self, flt: Filter, doc: str = "t.doc") -> str:
        return super().where(flt, doc)

    def typed_sql(self, path: Path, kind: str, pred: Pred, doc: str) -> str:
        return typed_pred(path, kind, pred, doc, self.p.add)

    # -- paths ---------------------------------------------------------------------

    def values_sql(self, path: Path, doc: str) -> str:
        """A subquery yielding column ``v``: the path's values, NULL standing for MISSING."""
        first = self.p.add(path.segments[0], "text")
        sql = f"SELECT {doc} -> {first} AS v"
        for i in range(1, len(path.segments)):
            sql = self._step(sql, path, i)
        return sql

    def _step(self, inner: str, path: Path, i: int) -> str:
        seg = path.segments[i]
        key = self.p.add(seg, "text")
        branches = [
            f"SELECT CASE WHEN jsonb_typeof(w.v) = 'object' THEN w.v -> {key} END "
            f"WHERE jsonb_typeof(w.v) IS DISTINCT FROM 'array'"
        ]
        if is_index(seg):
            idx = self.p.add(min(int(seg), INT32_MAX), "int")
            branches.append(f"SELECT w.v -> {idx} WHERE jsonb_typeof(w.v) = 'array'")
        else:
            branches.append(
                f"SELECT e -> {key} FROM jsonb_array_elements(CASE WHEN jsonb_typeof(w.v) = "
                f"'array' THEN w.v END) e WHERE jsonb_typeof(e) = 'object'"
            )
        return f"SELECT x.v FROM ({inner}) w, LATERAL ({' UNION ALL '.join(branches)}) x(v)"

    def candidates_sql(self, path: Path, doc: str) -> str:
        vals = self.values_sql(path, doc)
        return (
            f"SELECT c.v FROM ({vals}) c0, LATERAL (SELECT c0.v UNION ALL SELECT "
            f"jsonb_array_elements(CASE WHEN jsonb_typeof(c0.v) = 'array' THEN c0.v END)) c(v)"
        )

    def row_value(self, alias: str) -> str:
        return f"{alias}.v"

    def is_present(self, alias: str) -> str:
        return f"{alias}.v IS NOT NULL"

    def is_null_or_missing(self, alias: str) -> str:
        return f"{alias}.v IS NULL OR {alias}.v = 'null'::jsonb"

    def _eq(self, path: Path, value: Any, doc: str) -> str:
        if len(path.segments) == 1 and not isinstance(value, dict | list):
            # top-level scalar equality: exactly two containment tests, served by the GIN index
            key = path.segments[0]
            a = self.p.add(jsonb({key: value}), "jsonb")
            b = self.p.add(jsonb({key: [value]}), "jsonb")
            return f"({doc} @> {a} OR {doc} @> {b})"
        return super()._eq(path, value, doc)

    # -- tests on one value (a candidate or an $elemMatch element) ----------------------

    def test_eq(self, x: str, value: Any) -> str:
        return f"{x} = {self.p.add(jsonb(value), 'jsonb')}"

    def test_in(self, x: str, pred: In) -> str:
        arr = self.p.add([jsonb(v) for v in pred.values], "jsonb[]")
        return f"{x} = ANY({arr})"

    def test_type(self, x: str, pred: TypeIs) -> str:
        types = self.p.add([PG_TYPES[t] for t in pred.types], "text[]")
        return f"jsonb_typeof({x}) = ANY({types})"

    def test_regex(self, x: str, pred: Regex) -> str:
        pat = self.p.add(regex_with_options(pred.pattern, pred.options), "text")
        return f"(CASE WHEN jsonb_typeof({x}) = 'string' THEN ({x} #>> '{{}}') ~ {pat} END)"

    def test_size(self, x: str, pred: Size) -> str:
        n = self.p.add(pred.n, "int")
        return f"(CASE WHEN jsonb_typeof({x}) = 'array' THEN jsonb_array_length({x}) = {n} END)"

    def test_cmp(self, x: str, pred: Cmp) -> str:
        op = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}[pred.op]
        v = pred.value
        if isinstance(v, str):
            t = self.p.add(v, "text")
            return (
                f"(CASE WHEN jsonb_typeof({x}) = 'string' THEN "
                f'({x} #>> \'{{}}\') COLLATE "C" {op} {t} COLLATE "C" END)'
            )
        kind = "boolean" if isinstance(v, bool) else "number"
        j = self.p.add(jsonb(v), "jsonb")
        return f"(jsonb_typeof({x}) = '{kind}' AND {x} {op} {j})"

    def test_elem_match(self, x: str, pred: ElemMatch) -> str:
        elements = f"jsonb_array_elements(CASE WHEN jsonb_typeof({x}) = 'array' THEN {x} END)"
        if pred.preds is not None:
            tests = " AND ".join(
                f"COALESCE({self.value_test('em.e', p)}, FALSE)" for p in pred.preds
            )
        else:
            assert pred.filter is not None
            tests = f"jsonb_typeof(em.e) = 'object' AND {self.where(pred.filter, 'em.e')}"
        return f"EXISTS (SELECT 1 FROM {elements} em(e) WHERE {tests})"


# ---- sort and keyset pagination -------------------------------------------------------


def sort_exprs(
    keys: Sequence[SortKey], params: Params, doc: str = "t.doc"
) -> list[tuple[str, bool]]:
    """The flat list of (SQL expression, descending) that orders rows; _id always last."""
    out: list[tuple[str, bool]] = []
    for key in keys:
        path = params.add(list(key.path.segments), "text[]")
        x = f"({doc} #> {path})"
        out.append((RANK_SQL.format(x=x), key.descending))
        out.append((TEXT_KEY_SQL.format(x=x), key.descending))
        out.append((JSON_KEY_SQL.format(x=x), key.descending))
    out.append(("t._id", False))
    return out


KEY_CASTS = ("int", "text", "jsonb")


def key_casts(n_sort_keys: int) -> list[str]:
    return [c for _ in range(n_sort_keys) for c in KEY_CASTS] + ["text"]


def after_cursor(exprs: Sequence[tuple[str, bool]], values: Sequence[Any], params: Params) -> str:
    """Rows strictly after the cursor row in the order of ``exprs`` (nested OR chain)."""
    casts = key_casts((len(exprs) - 1) // 3)
    if len(values) != len(exprs):
        raise ValueError("one cursor value per sort expression")
    return keyset_after(exprs, lambda i: params.add(values[i], casts[i]))


# ---- updates --------------------------------------------------------------------------


class UpdateCompiler:
    """Compiles update operators to one jsonb expression, applied step by step.

    Each operator reads the previous step's document through a LATERAL column, so the SQL
    text grows linearly with the number of operators. Type errors raise SQLSTATE DP001
    through ``{schema}.dbproxy_fail``.
    """

    def __init__(self, params: Params, schema_ident: str) -> None:
        self.p = params
        self.fail = f"{schema_ident}.dbproxy_fail"
        self.schema = schema_ident

    def document_expr(self, update: Update, base: str) -> str:
        sql = f"SELECT {base} AS d0"
        for i, op in enumerate(update.ops, start=1):
            step = self._op(op, f"s{i - 1}.d{i - 1}")
            sql = f"SELECT {step} AS d{i} FROM ({sql}) s{i - 1}"
        return f"({sql})"

    def _path(self, path: Path) -> str:
        return self.p.add(list(path.segments), "text[]")

    def _set(self, d: str, path: Path, value_sql: str) -> str:
        """Set ``path`` in ``d`` to ``value_sql``, creating missing intermediate objects."""
        segs = path.segments
        keys = [self.p.add([s], "text[]") for s in segs]
        return self._set_rec(d, keys, value_sql, segs)

    def _set_rec(
        self, d: str, keys: list[str], value_sql: str, segs: Sequence[str], depth: int = 0
    ) -> str:
        """One level of the path: ``d`` is bound once (a sub-select), so the SQL text grows
        linearly with the path length. A numeric segment past an array's end pads the array
        with nulls first (MongoDB's rule)."""
        x = f"q{depth}.x"
        head = keys[0]
        if len(keys) == 1:
            inner = value_sql
        else:
            child = f"COALESCE({x} #> {head}, '{{}}'::jsonb)"
            inner = self._set_rec(child, keys[1:], value_sql, segs[1:], depth + 1)
        target = x
        if is_index(segs[0]):
            idx = self.p.add(min(int(segs[0]), INT32_MAX), "int")
            too_far = (
                f"{self.schema}.dbproxy_refuse('array_index_too_large', "
                f"'an update may extend an array up to index {MAX_ARRAY_INDEX}')"
            )
            target = (
                f"(CASE WHEN jsonb_typeof({x}) = 'array' AND jsonb_array_length({x}) < {idx} "
                f"THEN CASE WHEN {idx} > {MAX_ARRAY_INDEX} THEN {too_far} ELSE "
                f"{x} || (SELECT jsonb_agg('null'::jsonb) FROM generate_series(1, {idx} - "
                f"jsonb_array_length({x}))) END ELSE {x} END)"
            )
        checked = (
            f"CASE WHEN jsonb_typeof({x}) IN ('object', 'array') THEN {target} "
            f"ELSE {self.fail}('cannot set a field inside a non-container value') END"
        )
        return (
            f"(SELECT jsonb_set({checked}, {head}, {inner}, true) FROM (SELECT {d} AS x) q{depth})"
        )

    def _unset(self, d: str, path: Path) -> str:
        """Remove a field; only when present (``#-`` raises on a non-index into an array).
        An array element is set to null instead of removed (MongoDB's rule)."""
        full = self._path(path)
        if not is_index(path.segments[-1]):
            return f"(CASE WHEN ({d} #> {full}) IS NULL THEN {d} ELSE {d} #- {full} END)"
        parent = self.p.add(list(path.segments[:-1]), "text[]")
        return (
            f"(CASE WHEN ({d} #> {full}) IS NULL THEN {d} "
            f"WHEN jsonb_typeof({d} #> {parent}) = 'array' THEN jsonb_set({d}, {full}, 'null') "
            f"ELSE {d} #- {full} END)"
        )

    def _arith(self, op: UpdateOp, cur: str) -> str:
        """``$inc``/``$mul``: numeric arithmetic, the result range-checked by
        ``dbproxy_number`` in the same statement (SQLSTATE DP002 when it leaves the range).
        The result is an integer (signed 64 bits) when the operand is one and the stored
        value is integral and within 64 bits; otherwise a double (finite)."""
        n = self.p.add(jsonb(op.value), "jsonb")
        sign = "+" if op.op == "inc" else "*"
        missing = n if op.op == "inc" else f"to_jsonb(0 * ({n})::numeric)"
        int_operand = self.p.add(isinstance(op.value, int), "boolean")
        what = self.p.add(f"${op.op} on {op.path.dotted!r}", "text")
        c = f"({cur})::numeric"
        as_int = f"({int_operand} AND scale({c}) = 0 AND {c} BETWEEN {INT64_MIN} AND {INT64_MAX})"
        result = f"{self.schema}.dbproxy_number({c} {sign} ({n})::numeric, {as_int}, {what})"
        return (
            f"(CASE WHEN {cur} IS NULL THEN {missing} WHEN jsonb_typeof({cur}) = 'number' "
            f"THEN {result} ELSE {self.fail}('${op.op} needs a numeric field') END)"
        )

    def _op(self, op: UpdateOp, d: str) -> str:
        if op.op == "set":
            return self._set(d, op.path, self.p.add(jsonb(op.value), "jsonb"))
        if op.op == "unset":
            return self._unset(d, op.path)
        if op.op == "rename":
            src = self._path(op.path)
            moved = self._set(f"({d} #- {src})", op.value, f"({d} #> {src})")
            return f"(CASE WHEN ({d} #> {src}) IS NULL THEN {d} ELSE {moved} END)"
        cur = f"({d} #> {self._path(op.path)})"
        if op.op in ("inc", "mul"):
            return self._set(d, op.path, self._arith(op, cur))
        if op.op in ("min", "max"):
            v = self.p.add(jsonb(op.value), "jsonb")
            cmp = "<" if op.op == "min" else ">"
            new = (
                f"(CASE WHEN {cur} IS NULL OR {self.schema}.dbproxy_cmp({v}, {cur}) {cmp} 0 "
                f"THEN {v} ELSE {cur} END)"
            )
            return self._set(d, op.path, new)
        if op.op in ("push", "addToSet"):
            items = self.p.add(jsonb(list(op.value)), "jsonb")
            if op.op == "addToSet":
                items = (
                    f"(SELECT COALESCE(jsonb_agg(a.e ORDER BY a.i), '[]'::jsonb) FROM "
                    f"jsonb_array_elements({items}) WITH ORDINALITY a(e, i) WHERE NOT EXISTS "
                    f"(SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof({cur}) = 'array'"
                    f" THEN {cur} END) y WHERE y = a.e) AND NOT EXISTS (SELECT 1 FROM "
                    f"jsonb_array_elements({items}) WITH ORDINALITY b(e, i) "
                    f"WHERE b.e = a.e AND b.i < a.i))"
                )
            new = (
                f"(CASE WHEN {cur} IS NULL THEN {items} WHEN jsonb_typeof({cur}) = 'array' "
                f"THEN {cur} || {items} ELSE {self.fail}('${op.op} needs an array field') END)"
            )
            return self._set(d, op.path, new)
        if op.op == "pull":
            if isinstance(op.value, tuple):
                fc = FilterCompiler(self.p)
                keep = " AND ".join(f"COALESCE({fc.value_test('a.e', p)}, FALSE)" for p in op.value)
            else:
                keep = f"a.e = {self.p.add(jsonb(op.value), 'jsonb')}"
            new = (
                f"(SELECT COALESCE(jsonb_agg(a.e ORDER BY a.i), '[]'::jsonb) FROM "
                f"jsonb_array_elements({cur}) WITH ORDINALITY a(e, i) WHERE NOT ({keep}))"
            )
            return (
                f"(CASE WHEN jsonb_typeof({cur}) = 'array' THEN {self._set(d, op.path, new)} "
                f"ELSE {d} END)"
            )
        raise TypeError(f"unknown update op {op.op}")


_HELPERS = """
CREATE OR REPLACE FUNCTION {schema}.dbproxy_fail(msg text) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $f$
BEGIN
  RAISE EXCEPTION USING ERRCODE = 'DP001', MESSAGE = msg;
END $f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_number(r numeric, as_int boolean, what text)
RETURNS jsonb LANGUAGE plpgsql VOLATILE AS $f$
BEGIN
  IF as_int THEN
    IF r < {int64_min} OR r > {int64_max} THEN
      RAISE EXCEPTION USING ERRCODE = 'DP002',
        MESSAGE = what || ' gives an integer outside signed 64 bits ({int64_min} to {int64_max})';
    END IF;
  ELSIF abs(r) > {double_max} THEN
    RAISE EXCEPTION USING ERRCODE = 'DP002',
      MESSAGE = what || ' gives a number beyond the range of a double';
  END IF;
  RETURN to_jsonb(r);
END $f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_refuse(code text, msg text) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $f$
BEGIN
  RAISE EXCEPTION USING ERRCODE = 'DP003', MESSAGE = msg, DETAIL = code;
END $f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_rank(x jsonb) RETURNS int
LANGUAGE sql IMMUTABLE AS $f$
  SELECT CASE jsonb_typeof(x) WHEN 'number' THEN 2 WHEN 'string' THEN 3 WHEN 'object' THEN 4
         WHEN 'array' THEN 5 WHEN 'boolean' THEN 6 ELSE 1 END
$f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_cmp(a jsonb, b jsonb) RETURNS int
LANGUAGE sql IMMUTABLE AS $f$
  SELECT CASE
    WHEN {schema}.dbproxy_rank(a) <> {schema}.dbproxy_rank(b)
      THEN sign({schema}.dbproxy_rank(a) - {schema}.dbproxy_rank(b))::int
    WHEN jsonb_typeof(a) = 'string' THEN
      CASE WHEN (a #>> '{{}}') COLLATE "C" < (b #>> '{{}}') COLLATE "C" THEN -1
           WHEN (a #>> '{{}}') = (b #>> '{{}}') THEN 0 ELSE 1 END
    WHEN a < b THEN -1 WHEN a = b THEN 0 ELSE 1 END
$f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $f$
DECLARE k text; v jsonb; result jsonb;
BEGIN
  IF jsonb_typeof(patch) IS DISTINCT FROM 'object' THEN RETURN patch; END IF;
  IF target IS NULL OR jsonb_typeof(target) <> 'object' THEN result := '{{}}'::jsonb;
  ELSE result := target; END IF;
  FOR k, v IN SELECT * FROM jsonb_each(patch) LOOP
    IF jsonb_typeof(v) = 'null' THEN result := result - k;
    ELSE result := jsonb_set(result, ARRAY[k], {schema}.dbproxy_merge_patch(result -> k, v));
    END IF;
  END LOOP;
  RETURN result;
END $f$;
"""
# the range dbproxy_number enforces, written into the function's text (format keeps {schema})
HELPER_FUNCTIONS = (
    _HELPERS.replace("{int64_min}", str(INT64_MIN))
    .replace("{int64_max}", str(INT64_MAX))
    .replace("{double_max}", str(DOUBLE_MAX_EXACT))
)
