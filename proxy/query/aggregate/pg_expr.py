"""PostgreSQL compilation of aggregation expressions: each one a jsonb SQL expression, SQL
NULL standing for *missing* (docs/aggregation.md, "Expressions"); the core operators."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from proxy.query.aggregate.ast import (
    Arr,
    Call,
    Expr,
    Field,
    FieldPath,
    Iterate,
    Lit,
    Obj,
    Switch,
    Var,
)
from proxy.query.aggregate.pg_ops import OPERATORS
from proxy.query.aggregate.pg_values import (
    DEFAULT_CHARS,
    NULL,
    TEXT,
    integral,
    is_type,
    nullish,
    num,
    truthy,
    txt,
)
from proxy.query.pg import Params, jsonb

__all__ = [
    "DEFAULT_CHARS",
    "NULL",
    "TEXT",
    "ExprCompiler",
    "integral",
    "is_type",
    "nullish",
    "num",
    "truthy",
    "txt",
]


class ExprCompiler:
    """Compiles expressions over one document expression; variables of ``$filter``/``$map``
    are SQL aliases in ``scope``. Operands used more than once are bound once (a sub-select)
    unless they are cheap to repeat."""

    def __init__(self, params: Params, schema: str, names: Iterator[int] | None = None) -> None:
        self.p = params
        self.schema = schema
        self.names = names if names is not None else itertools.count()
        self.scope: dict[str, str] = {}
        self.simple: set[str] = {NULL}

    # -- plumbing ----------------------------------------------------------------------

    def alias(self, prefix: str = "x") -> str:
        return f"{prefix}{next(self.names)}"

    def fail(self, message: str) -> str:
        msg = self.p.add(message, "text")
        return f"{self.schema}.dbproxy_refuse('expression_failed', {msg})"

    def lit(self, value: Any) -> str:
        sql = self.p.add(jsonb(value), "jsonb")
        self.simple.add(sql)
        return sql

    def bind(self, parts: list[str], body: Callable[..., str]) -> str:
        """``body`` of the operands, each evaluated once."""
        if all(p in self.simple for p in parts):
            return body(*parts)
        a = self.alias("b")
        cols = ", ".join(f"{p} AS v{i}" for i, p in enumerate(parts))
        return (
            f"(SELECT {body(*[f'{a}.v{i}' for i in range(len(parts))])} FROM (SELECT {cols}) {a})"
        )

    def path(self, base: str, path: FieldPath, base_may_be_array: bool) -> str:
        """A field path into ``base``: a plain ``->`` chain unless an array is on the way,
        then ``dbproxy_agg_get`` (arrays mapped, docs/aggregation.md)."""
        if not path:
            return base
        keys = [self.p.add(s, "text") for s in path]
        steps = [base]
        for k in keys:
            steps.append(f"{steps[-1]} -> {k}")
        plain = f"({steps[-1]})"
        checks = steps[0 if base_may_be_array else 1 : -1]
        if not checks:
            self.simple.add(plain)
            return plain
        test = " OR ".join(is_type(x, "array") for x in checks)
        full = self.p.add(list(path), "text[]")
        return (
            f"(CASE WHEN {test} THEN {self.schema}.dbproxy_agg_get({base}, {full}) "
            f"ELSE {steps[-1]} END)"
        )

    # -- expressions -------------------------------------------------------------------

    def expr(self, e: Expr, doc: str, *, key: bool = False) -> str:
        """jsonb SQL of ``e`` over the document ``doc``; with ``key`` (a group key) the
        missing parts of objects (nested ones too) become null."""
        if isinstance(e, Field):
            if not e.path:
                self.simple.add(doc)
                return doc
            return self.path(doc, e.path, False)
        if isinstance(e, Var):
            base = self.scope[e.name]
            self.simple.add(base)
            return self.path(base, e.path, True)
        if isinstance(e, Lit):
            return self.lit(e.value)
        if isinstance(e, Obj):
            return self.obj(e, doc, key)
        if isinstance(e, Arr):
            if not e.items:
                return "'[]'::jsonb"
            items = ", ".join(f"COALESCE({self.expr(i, doc)}, {NULL})" for i in e.items)
            return f"jsonb_build_array({items})"
        if isinstance(e, Switch):
            return self.switch(e, doc)
        if isinstance(e, Iterate):
            return self.iterate(e, doc)
        if isinstance(e, Call):
            return self.call(e, doc)
        raise TypeError(f"not an expression: {e!r}")

    def obj(self, e: Obj, doc: str, key: bool) -> str:
        if not e.fields:
            return "'{}'::jsonb"
        if key:  # every part present (missing → null): one jsonb_build_object
            parts = ", ".join(
                f"{self.p.add(k, 'text')}, COALESCE({self.expr(v, doc, key=True)}, {NULL})"
                for k, v in e.fields
            )
            return f"jsonb_build_object({parts})"
        # a field giving missing is left out (jsonb_set_lax deletes on SQL NULL)
        sql = "'{}'::jsonb"
        for k, v in e.fields:
            path = f"ARRAY[{self.p.add(k, 'text')}]"
            sql = f"jsonb_set_lax({sql}, {path}, {self.expr(v, doc)}, true, 'delete_key')"
        return sql

    def switch(self, e: Switch, doc: str) -> str:
        whens = " ".join(
            f"WHEN {truthy(self.expr(c, doc))} THEN {self.expr(t, doc)}" for c, t in e.branches
        )
        default = (
            self.expr(e.default, doc)
            if e.default is not None
            else self.fail("$switch: no branch matched and no default")
        )
        return f"(CASE {whens} ELSE {default} END)"

    def iterate(self, e: Iterate, doc: str) -> str:
        src = self.expr(e.input, doc)
        a = self.alias("e")
        outer = self.scope.get(e.var)
        self.scope[e.var] = f"{a}.v"
        try:
            body = self.expr(e.body, doc)
            limit = self.expr(e.limit, doc) if e.limit is not None else None
        finally:
            if outer is None:
                del self.scope[e.var]
            else:
                self.scope[e.var] = outer
        op = f"${e.op}"

        def run(s: str, lim: str | None = None) -> str:
            elems = f"jsonb_array_elements({s}) WITH ORDINALITY {a}(v, i)"
            if e.op == "map":
                agg = f"COALESCE(jsonb_agg(COALESCE({body}, {NULL}) ORDER BY {a}.i), '[]'::jsonb)"
                result = f"(SELECT {agg} FROM {elems})"
            else:
                cut = (
                    f" LIMIT (CASE WHEN {nullish(lim)} THEN NULL ELSE {num(lim)} END)"
                    if lim is not None
                    else ""
                )
                result = (
                    f"(SELECT COALESCE(jsonb_agg(q.v ORDER BY q.i), '[]'::jsonb) FROM "
                    f"(SELECT {a}.v, {a}.i FROM {elems} WHERE {truthy(body)} "
                    f"ORDER BY {a}.i{cut}) q)"
                )
            checks = f"WHEN {nullish(s)} THEN {NULL} WHEN NOT {is_type(s, 'array')} THEN "
            checks += self.fail(f"{op}: input must be an array")
            if lim is not None:
                checks += (
                    f" WHEN {lim} IS NOT NULL AND {lim} <> {NULL} AND NOT ({is_type(lim, 'number')}"
                    f" AND {integral(lim)} AND {num(lim)} > 0) THEN "
                    + self.fail(f"{op}: limit must be a positive integer")
                )
            return f"(CASE {checks} ELSE {result} END)"

        if limit is None:
            return self.bind([src], run)
        return self.bind([src, limit], run)

    def call(self, e: Call, doc: str) -> str:
        compile_op = OPERATORS.get(e.op)
        if compile_op is None:
            raise TypeError(f"unknown operator ${e.op}")
        if e.op == "trim" and e.args[1] == Lit(None):  # no chars: whitespace
            return compile_op(self, [self.expr(e.args[0], doc), DEFAULT_CHARS])
        return compile_op(self, [self.expr(a, doc) for a in e.args])
