"""Dialect-independent query compilation: the filter walk, sort ranks, keyset chains."""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from proxy.query.ast import (
    And,
    Cmp,
    ElemMatch,
    Eq,
    Exists,
    FieldCond,
    Filter,
    In,
    Never,
    Nor,
    Not,
    Or,
    Path,
    Pred,
    Regex,
    Size,
    TypeIs,
)

# Sort brackets of the language; missing sorts with null.
TYPE_RANKS = {"null": 1, "number": 2, "string": 3, "object": 4, "array": 5, "bool": 6}

X = TypeVar("X")  # how a dialect refers to one JSON value inside SQL (an expression, a pair...)

# The kinds of declared scalar paths (a schema's ``scalar_kinds()``): number, string, boolean.
Kinds = Mapping[tuple[str, ...], str]
TOP_DOC = "t.doc"  # declared paths are relative to the stored document, never to an element
_DECLARED_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # proxy.schema.model.parse_path's


def value_kind(value: Any) -> str | None:
    """The declared kind a JSON scalar belongs to (None: null or a container)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def declared_kind(kinds: Kinds, path: Path) -> str | None:
    """The declared kind of ``path`` when its segments may appear in SQL text (declared
    names only), else None: the path is compiled the generic way."""
    kind = kinds.get(path.segments)
    if kind is None or kind not in ("number", "string", "boolean"):
        return None
    return kind if declared_names(path.segments) else None


@functools.lru_cache(maxsize=4096)
def declared_names(segments: tuple[str, ...]) -> bool:
    """Every segment is a declared name (``proxy.schema.model.parse_path``'s pattern)."""
    return all(_DECLARED_SEGMENT.match(s) for s in segments)


@functools.lru_cache(maxsize=1024)
def kinds_map(kinds: tuple[tuple[tuple[str, ...], str], ...]) -> Kinds:
    """``FindSpec.kinds`` as a mapping (one per distinct schema, shared: never mutated)."""
    return dict(kinds)


def typed_ok(pred: Pred, kind: str) -> bool:
    """Whether ``pred`` on a path of ``kind`` compiles on the declared expression: equality,
    comparison and ``$in`` with values of that kind (or null), and ``$exists``. Anything
    else (another kind's value: MongoDB's type bracketing says it matches nothing) keeps
    the generic compilation, which is always correct."""
    if isinstance(pred, Eq):
        return pred.value is None or value_kind(pred.value) == kind
    if isinstance(pred, Cmp):
        return value_kind(pred.value) == kind
    if isinstance(pred, In):
        return all(v is None or value_kind(v) == kind for v in pred.values)
    return isinstance(pred, Exists)


class FilterWalker(ABC, Generic[X]):
    """Compiles a filter to a boolean SQL expression; subclasses write the leaf SQL."""

    kinds: Kinds = {}  # declared scalar paths a dialect compiles on ``declared_expr``
    all_typed = True  # False once a predicate compiled the generic way

    # -- entry ---------------------------------------------------------------------

    def where(self, flt: Filter, doc: str) -> str:
        if isinstance(flt, FieldCond):
            return self._field(flt, doc)
        if isinstance(flt, And):
            if not flt.children:
                return "TRUE"
            return "(" + " AND ".join(self.where(c, doc) for c in flt.children) + ")"
        if isinstance(flt, Or):
            return "(" + " OR ".join(self.where(c, doc) for c in flt.children) + ")"
        if isinstance(flt, Nor):
            return "NOT (" + " OR ".join(self.where(c, doc) for c in flt.children) + ")"
        raise TypeError(f"not a filter node: {flt!r}")

    # -- what a dialect provides -------------------------------------------------------

    @abstractmethod
    def values_sql(self, path: Path, doc: str) -> str:
        """A subquery yielding the path's values, one row each, MISSING as SQL NULL."""

    @abstractmethod
    def candidates_sql(self, path: Path, doc: str) -> str:
        """Like ``values_sql`` plus the elements of every array value (one level)."""

    @abstractmethod
    def row_value(self, alias: str) -> X:
        """The value of a row of ``values_sql``/``candidates_sql`` aliased ``alias``."""

    @abstractmethod
    def is_present(self, alias: str) -> str:
        """The row's value is not MISSING."""

    @abstractmethod
    def is_null_or_missing(self, alias: str) -> str:
        """The row's value is JSON null or MISSING."""

    # -- field conditions ------------------------------------------------------------

    def _field(self, cond: FieldCond, doc: str) -> str:
        parts = [self._pred(cond.path, pred, doc) for pred in cond.preds]
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def typed(self, path: Path, pred: Pred, doc: str) -> str | None:
        """``pred`` compiled on the declared expression of ``path``, or None (generic)."""
        kind = declared_kind(self.kinds, path) if self.kinds and doc == TOP_DOC else None
        if kind is None or not typed_ok(pred, kind):
            if not isinstance(pred, Not | Never):  # those compile their parts
                self.all_typed = False
            return None
        return self.typed_sql(path, kind, pred, doc)

    def typed_sql(self, path: Path, kind: str, pred: Pred, doc: str) -> str:
        """A dialect's SQL of ``pred`` (``typed_ok``) on the declared path; never SQL NULL,
        so ``$not`` negates it soundly."""
        raise NotImplementedError

    def _pred(self, path: Path, pred: Pred, doc: str) -> str:
        typed = self.typed(path, pred, doc)
        if typed is not None:
            return typed
        if isinstance(pred, Eq) and pred.value is not None:
            return self._eq(path, pred.value, doc)
        if isinstance(pred, Eq):  # null: a null or missing candidate, or no values at all
            cands = self.candidates_sql(path, doc)
            vals = self.values_sql(path, doc)
            return (
                f"(EXISTS (SELECT 1 FROM ({cands}) q WHERE {self.is_null_or_missing('q')})"
                f" OR NOT EXISTS ({vals}))"
            )
        if isinstance(pred, In):
            return self._in(path, pred, doc)
        if isinstance(pred, Not):
            inner = [self._pred(path, p, doc) for p in pred.preds]
            return "NOT (" + " AND ".join(inner) + ")"
        if isinstance(pred, Never):
            return "FALSE"
        if isinstance(pred, Exists):
            vals = self.values_sql(path, doc)
            test = f"EXISTS (SELECT 1 FROM ({vals}) q WHERE {self.is_present('q')})"
            return test if pred.present else f"NOT {test}"
        if isinstance(pred, Size | ElemMatch):  # on the values, not their elements
            vals = self.values_sql(path, doc)
            test = self.value_test(self.row_value("q"), pred)
            return f"EXISTS (SELECT 1 FROM ({vals}) q WHERE {test})"
        cands = self.candidates_sql(path, doc)
        return (
            f"EXISTS (SELECT 1 FROM ({cands}) q WHERE {self.value_test(self.row_value('q'), pred)})"
        )

    def _eq(self, path: Path, value: Any, doc: str) -> str:
        """``$eq`` with a non-null value: some candidate equals it."""
        cands = self.candidates_sql(path, doc)
        test = self.value_test(self.row_value("q"), Eq(value))
        return f"EXISTS (SELECT 1 FROM ({cands}) q WHERE {test})"

    def _in(self, path: Path, pred: In, doc: str) -> str:
        """``$in``: ``$eq`` holds for one of the values."""
        return "(" + " OR ".join(self._pred(path, Eq(v), doc) for v in pred.values) + ")"

    # -- tests on one value (a candidate or an $elemMatch element) ----------------------

    def value_test(self, x: X, pred: Pred) -> str:
        """A condition on the value ``x`` (never MISSING); NULL counts as false."""
        if isinstance(pred, Eq):
            return self.test_eq(x, pred.value)
        if isinstance(pred, Cmp):
            return self.test_cmp(x, pred)
        if isinstance(pred, In):
            return self.test_in(x, pred)
        if isinstance(pred, Not):
            inner = " AND ".join(f"COALESCE({self.value_test(x, p)}, FALSE)" for p in pred.preds)
            return f"NOT ({inner})"
        if isinstance(pred, Never):
            return "FALSE"
        if isinstance(pred, Exists):
            return "TRUE" if pred.present else "FALSE"
        if isinstance(pred, TypeIs):
            return self.test_type(x, pred)
        if isinstance(pred, Regex):
            return self.test_regex(x, pred)
        if isinstance(pred, Size):
            return self.test_size(x, pred)
        if isinstance(pred, ElemMatch):
            return self.test_elem_match(x, pred)
        raise TypeError(f"not a predicate: {pred!r}")

    @abstractmethod
    def test_eq(self, x: X, value: Any) -> str: ...

    @abstractmethod
    def test_cmp(self, x: X, pred: Cmp) -> str: ...

    @abstractmethod
    def test_in(self, x: X, pred: In) -> str: ...

    @abstractmethod
    def test_type(self, x: X, pred: TypeIs) -> str: ...

    @abstractmethod
    def test_regex(self, x: X, pred: Regex) -> str: ...

    @abstractmethod
    def test_size(self, x: X, pred: Size) -> str: ...

    @abstractmethod
    def test_elem_match(self, x: X, pred: ElemMatch) -> str: ...


# ---- sort and keyset pagination -------------------------------------------------------


def order_by(exprs: Sequence[tuple[str, bool]]) -> str:
    return ", ".join(f"{e} DESC" if desc else e for e, desc in exprs)


def keyset_after(
    exprs: Sequence[tuple[str, bool]],
    bind: Callable[[int], str],
    equal: str = "=",
    nullable: Sequence[bool] = (),
    null_equal: str = "IS NOT DISTINCT FROM",
) -> str:
    """Rows strictly after the cursor row in the order of ``exprs`` (nested OR chain).

    ``bind(i)`` returns the placeholder of the cursor's i-th value; it is called from the
    last expression to the first. ``equal`` is the dialect's equality for sort keys. A key
    marked ``nullable`` (a declared path: SQL NULL for missing and null, which sort first
    ascending and last descending) compares with ``null_equal`` and NULL-aware order."""
    sql = ""
    for i in reversed(range(len(exprs))):
        expr, desc = exprs[i]
        ph = bind(i)
        op = "<" if desc else ">"
        eq = equal
        strict = f"{expr} {op} {ph}"
        if i < len(nullable) and nullable[i]:
            eq = null_equal
            if desc:
                strict = f"({strict} OR ({expr} IS NULL AND {ph} IS NOT NULL))"
            else:
                strict = f"({strict} OR ({expr} IS NOT NULL AND {ph} IS NULL))"
        sql = strict if not sql else f"({strict} OR ({expr} {eq} {ph} AND {sql}))"
    return sql
