"""The SQL primitives of aggregation on SQLite: JSON-text tests and builders the expression
compiler, the operators and the stages share, and what an operator or a stage asks of them."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from proxy.query.aggregate.ast import Expr
from proxy.query.sqlite.agg_functions import FN_JNUM
from proxy.query.sqlite.values import BARRIER, Names, Params

_LIFTED = re.compile(r"\blx\d+_")


class Scope:
    """Columns computed per row, in layers: a column's layer is one above the highest
    layer of the columns it reads (columns of enclosing scopes are there already)."""

    def __init__(self) -> None:
        self.layers: list[list[tuple[str, str]]] = []
        self._layer: dict[str, int] = {}

    def add(self, name: str, text: str) -> None:
        depth = 1 + max((self._layer.get(n, 0) for n in _LIFTED.findall(text)), default=0)
        while len(self.layers) < depth:
            self.layers.append([])
        self.layers[depth - 1].append((name, text))
        self._layer[name] = depth

    def ctes(self, source: str, alias: str, names: Names) -> tuple[list[str], str]:
        """CTEs adding the layers to ``source`` (a FROM item), and the last one's name."""
        ctes: list[str] = []
        prev = source
        for layer in self.layers:
            name = names.fresh("ly")
            cols = ", ".join(f"{text} AS {col}" for col, text in layer)
            ctes.append(f"{name} AS MATERIALIZED (SELECT {alias}.*, {cols} FROM {prev} {alias})")
            prev = name
        return ctes, prev


@dataclass(frozen=True, slots=True)
class Sql:
    """A compiled expression: SQL giving JSON text, or NULL for missing."""

    text: str
    leaf: bool = False  # a column or a parameter: cheap to repeat in the SQL text
    missing: bool = True  # may give missing


class OpCompiler(Protocol):
    """What an operator's SQL (sqlite_ops) needs of the expression compiler."""

    p: Params  # the statement's bound values
    names: Names  # fresh names of the statement
    nesting: int  # $filter/$map bodies being compiled

    def fail(self, message: str) -> str: ...

    def num(self, op: str, value: str) -> str: ...

    def lift(self, text: str) -> str: ...

    def bind(self, args: Sequence[Sql], body: Callable[[list[str]], str]) -> str: ...

    def ref(self, arg: Sql) -> Sql: ...

    def truthy(self, arg: Sql) -> str: ...

    def inner_scope(self) -> AbstractContextManager[Scope]: ...

    def compile(self, expr: Expr, doc: str, env: Mapping[str, str] | None = None) -> Sql: ...


class KeyCompiler(OpCompiler, Protocol):
    """An operator's compiler that also compiles ``$group`` keys."""

    def compile_key(self, expr: Expr, doc: str) -> Sql: ...


class StageChain(Protocol):
    """What the grouping and sorting stages (sqlite_group) need of the statement's chain."""

    p: Params
    names: Names

    @property
    def expr(self) -> KeyCompiler: ...

    def add(self, prefix: str, body: str, columns: str = "(o, doc)") -> str: ...

    def layered(self, cur: str) -> str: ...


# ---- small SQL builders over a repeatable reference ---------------------------------------


def jtype(r: str) -> str:
    return f"COALESCE(json_type({r}), 'missing')"


def jval(r: str) -> str:
    return f"json_extract({r}, '$')"


def nullish(r: str) -> str:
    return f"COALESCE(json_type({r}), 'null') = 'null'"


def not_type(r: str, *types: str) -> str:
    listed = ", ".join(f"'{t}'" for t in types)
    return f"{jtype(r)} NOT IN ({listed})"


def jbool(cond: str) -> str:
    return f"(CASE WHEN {cond} THEN 'true' ELSE 'false' END)"


def elem_json(e: str, ty: str = "type", v: str = "value") -> str:
    """The JSON text of a row ``e`` of json_each (or of a (ty, v) row of a filter's values)."""
    t, x = f"{e}.{ty}", f"{e}.{v}"
    return (
        f"(CASE {t} WHEN 'text' THEN json_quote({x}) WHEN 'real' THEN {FN_JNUM}({x}) "
        f"WHEN 'integer' THEN json_quote({x}) WHEN 'true' THEN 'true' WHEN 'false' THEN "
        f"'false' WHEN 'null' THEN 'null' ELSE {x} END)"
    )


def ordered(select: str, order: str) -> str:
    """A subquery whose rows an enclosing aggregate sees in ``order`` (the LIMIT keeps
    SQLite from dropping the ORDER BY of a FROM-clause subquery)."""
    return f"({select} ORDER BY {order} {BARRIER})"
