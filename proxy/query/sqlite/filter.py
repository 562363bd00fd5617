"""Filters compiled to a boolean SQL expression over a JSON-text document (SQLite)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.query.ast import (
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
    TypeIs,
)
from proxy.query.common import FilterWalker, Kinds
from proxy.query.sqlite.functions import FN_CANON, FN_REGEXP, canonical, compile_regex
from proxy.query.sqlite.typed import typed_pred
from proxy.query.sqlite.values import (
    BARRIER,
    SQLITE_TYPES,
    Names,
    Params,
    Value,
    index_path,
    is_index,
    json_text,
    key_path,
    sql_number,
    text,
)

_CMP_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


class FilterCompiler(FilterWalker[Value]):
    """Compiles a filter to a boolean SQL expression over a JSON-text document expression."""

    def __init__(
        self, params: Params, names: Names | None = None, kinds: Kinds | None = None
    ) -> None:
        self.p = params
        self.names = names or Names()
        if kinds:
            self.kinds = kinds

    def typed_sql(self, path: Path, kind: str, pred: Pred, doc: str) -> str:
        return typed_pred(path, kind, pred, doc, self.p.add)

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
        typed = self.typed(path, pred, doc)
        if typed is not None:
            return typed
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
