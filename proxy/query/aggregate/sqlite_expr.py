"""Aggregation expressions compiled to SQLite SQL over JSON text: a value is JSON text, SQL
NULL is *missing*; paths, arithmetic, comparison, boolean and conditional operators."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from proxy.errors import InvalidQuery
from proxy.query.aggregate.ast import Arr, Call, Expr, Field, Iterate, Lit, Obj, Switch, Var
from proxy.query.sqlite.agg_functions import FN_AGG_FAIL, FN_GET, FN_JNUM, FN_ROUND
from proxy.query.sqlite.functions import FN_CMP
from proxy.query.sqlite.values import BARRIER, Names, Params, json_text, key_path


@dataclass(frozen=True, slots=True)
class Sql:
    """A compiled expression: SQL giving JSON text, or NULL for missing."""

    text: str
    leaf: bool = False  # a column or a parameter: cheap to repeat in the SQL text
    missing: bool = True  # may give missing


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


_ARITH = {"add", "multiply", "subtract", "divide", "mod", "abs", "floor", "ceil", "round"}
_CMP = {"eq": "= 0", "ne": "<> 0", "gt": "> 0", "gte": ">= 0", "lt": "< 0", "lte": "<= 0"}


class ExprCompiler:
    """Compiles expressions against a current document (``doc``, SQL of JSON text) and the
    variables ``$filter``/``$map`` bind (name → SQL of JSON text)."""

    def __init__(self, params: Params, names: Names) -> None:
        self.p = params
        self.names = names
        from proxy.query.aggregate import sqlite_ops

        self._ops: dict[str, Callable[[ExprCompiler, str, Sequence[Sql]], Sql]] = dict(
            sqlite_ops.OPS
        )

    # -- plumbing ------------------------------------------------------------------------

    def fail(self, message: str) -> str:
        return f"{FN_AGG_FAIL}({self.p.add(message)})"

    def num(self, op: str, value: str) -> str:
        """An SQL number as JSON text; infinity fails."""
        refuse = self.fail(f"${op} gives a number beyond the range of a double")
        return f"COALESCE({FN_JNUM}({value}), {refuse})"

    def bind(self, args: Sequence[Sql], body: Callable[[list[str]], str]) -> str:
        """``body`` over references to ``args``, each computed once (a subquery binds the
        ones that are not leaves)."""
        refs: list[str] = []
        cols: list[str] = []
        for arg in args:
            if arg.leaf:
                refs.append(arg.text)
            else:
                name = self.names.fresh("b")
                cols.append(f"{arg.text} AS {name}")
                refs.append(name)
        out = body(refs)
        if not cols:
            return out
        return f"(SELECT {out} FROM (SELECT {', '.join(cols)} {BARRIER}))"

    def truthy(self, arg: Sql) -> str:
        """An SQL boolean: false, null, missing and 0 are false."""

        def body(r: list[str]) -> str:
            x = r[0]
            return (
                f"(CASE COALESCE(json_type({x}), 'null') WHEN 'null' THEN 0 WHEN 'false' "
                f"THEN 0 WHEN 'integer' THEN {jval(x)} <> 0 WHEN 'real' THEN {jval(x)} <> 0 "
                f"ELSE 1 END)"
            )

        return self.bind([arg], body)

    def cmp(self, a: str, b: str) -> str:
        """-1/0/1 in the type order, missing below null."""
        return (
            f"(CASE WHEN {a} IS NULL THEN (CASE WHEN {b} IS NULL THEN 0 ELSE -1 END) "
            f"WHEN {b} IS NULL THEN 1 ELSE {FN_CMP}({a}, {b}) END)"
        )

    # -- entry -----------------------------------------------------------------------------

    def compile(self, expr: Expr, doc: str, env: Mapping[str, str] | None = None) -> Sql:
        env = env or {}
        if isinstance(expr, Lit):
            if expr.value is None:
                return Sql("'null'", leaf=True, missing=False)
            return Sql(self.p.add(json_text(expr.value)), leaf=True, missing=False)
        if isinstance(expr, Field):
            return self.path(doc, expr.path, top=True)
        if isinstance(expr, Var):
            if expr.name not in env:
                raise InvalidQuery(f"undefined variable $${expr.name}", code="invalid_pipeline")
            return self.path(env[expr.name], expr.path, top=False)
        if isinstance(expr, Obj):
            return self.obj([(k, self.compile(v, doc, env)) for k, v in expr.fields])
        if isinstance(expr, Arr):
            items = [self.compile(v, doc, env) for v in expr.items]
            inner = ", ".join(f"json(COALESCE({i.text}, 'null'))" for i in items)
            return Sql(f"json_array({inner})", missing=False)
        if isinstance(expr, Switch):
            return self.switch(expr, doc, env)
        if isinstance(expr, Iterate):
            from proxy.query.aggregate.sqlite_ops import iterate

            return iterate(self, expr, doc, env)
        assert isinstance(expr, Call)
        return self.call(expr, doc, env)

    def compile_key(self, expr: Expr, doc: str) -> Sql:
        """A ``$group`` key: inside an object key a missing part is null."""
        if not isinstance(expr, Obj):
            return self.compile(expr, doc)
        parts = [(k, self.compile_key(v, doc)) for k, v in expr.fields]
        inner = ", ".join(f"{self.p.add(k)}, json(COALESCE({v.text}, 'null'))" for k, v in parts)
        return Sql(f"json_object({inner})", missing=False)

    def path(self, base: str, segs: tuple[str, ...], *, top: bool) -> Sql:
        if not segs:
            return Sql(base, leaf=True, missing=not top)
        direct = f"{base} -> {self.p.add(key_path(segs))}"
        if top and len(segs) == 1:  # the current document is an object
            return Sql(direct)
        return Sql(f"COALESCE({direct}, {FN_GET}({base}, {self.p.add(json_text(list(segs)))}))")

    def obj(self, fields: list[tuple[str, Sql]]) -> Sql:
        if not any(v.missing for _, v in fields):
            inner = ", ".join(f"{self.p.add(k)}, json({v.text})" for k, v in fields)
            return Sql(f"json_object({inner})", missing=False)
        rows = " UNION ALL ".join(f"SELECT {self.p.add(k)} AS k, {v.text} AS v" for k, v in fields)
        return Sql(
            f"(SELECT json_group_object(k, json(v)) FROM ({rows}) WHERE v IS NOT NULL)",
            missing=False,
        )

    def switch(self, expr: Switch, doc: str, env: Mapping[str, str]) -> Sql:
        whens = []
        missing = False
        for case, then in expr.branches:
            t = self.compile(then, doc, env)
            missing = missing or t.missing
            whens.append(f"WHEN {self.truthy(self.compile(case, doc, env))} THEN {t.text}")
        if expr.default is None:
            other = self.fail("$switch: no branch matched and there is no default")
        else:
            d = self.compile(expr.default, doc, env)
            missing = missing or d.missing
            other = d.text
        return Sql(f"(CASE {' '.join(whens)} ELSE {other} END)", missing=missing)

    def call(self, expr: Call, doc: str, env: Mapping[str, str]) -> Sql:
        op = expr.op
        args = [self.compile(a, doc, env) for a in expr.args]
        if op in _ARITH:
            return self.arith(op, args)
        if op in _CMP:
            test = _CMP[op]
            return Sql(
                self.bind(args, lambda r: jbool(f"{self.cmp(r[0], r[1])} {test}")), missing=False
            )
        if op == "cmp":
            return Sql(
                self.bind(args, lambda r: f"CAST({self.cmp(r[0], r[1])} AS TEXT)"), missing=False
            )
        if op in ("and", "or"):
            return self.logic(op, args)
        if op == "not":
            return Sql(jbool(f"NOT {self.truthy(args[0])}"), missing=False)
        if op == "cond":
            c, t, e = args
            return Sql(
                f"(CASE WHEN {self.truthy(c)} THEN {t.text} ELSE {e.text} END)",
                missing=t.missing or e.missing,
            )
        if op == "ifNull":
            firsts = [
                self.bind([a], lambda r: f"(CASE WHEN {nullish(r[0])} THEN NULL ELSE {r[0]} END)")
                for a in args[:-1]
            ]
            return Sql(f"COALESCE({', '.join(firsts)}, {args[-1].text})", missing=args[-1].missing)
        fn = self._ops.get(op)
        if fn is None:
            raise InvalidQuery(f"unknown operator ${op}", code="unknown_operator")
        return fn(self, op, args)

    def logic(self, op: str, args: list[Sql]) -> Sql:
        if op == "and":
            whens = " ".join(f"WHEN NOT {self.truthy(a)} THEN 'false'" for a in args)
            return Sql(f"(CASE {whens} ELSE 'true' END)" if args else "'true'", missing=False)
        whens = " ".join(f"WHEN {self.truthy(a)} THEN 'true'" for a in args)
        return Sql(f"(CASE {whens} ELSE 'false' END)" if args else "'false'", missing=False)

    # -- arithmetic ----------------------------------------------------------------------------

    def arith(self, op: str, args: list[Sql]) -> Sql:
        if not args and op in ("add", "multiply"):
            return Sql("'0'" if op == "add" else "'1'", leaf=True, missing=False)
        return Sql(self.bind(args, lambda r: self._arith_body(op, r)), missing=False)

    def _arith_body(self, op: str, r: list[str]) -> str:
        null = " OR ".join(nullish(x) for x in r)
        bad = " OR ".join(not_type(x, "integer", "real") for x in r)
        checks = f"WHEN {null} THEN 'null' WHEN {bad} THEN {self.fail(f'${op} takes numbers')}"
        v = [jval(x) for x in r]
        if op == "round":
            x, place = r
            bad_place = f"{not_type(place, 'integer')} OR {jval(place)} NOT BETWEEN -20 AND 100"
            checks += (
                f" WHEN {bad_place} THEN "
                f"{self.fail('$round takes an integer place between -20 and 100')}"
            )
            return f"(CASE {checks} ELSE {FN_ROUND}({x}, {v[1]}) END)"
        if op in ("floor", "ceil"):
            return (
                f"(CASE {checks} WHEN json_type({r[0]}) = 'integer' THEN {r[0]} "
                f"ELSE {self.num(op, f'{op}({v[0]})')} END)"
            )
        if op in ("divide", "mod"):
            checks += f" WHEN {v[1]} = 0 THEN {self.fail(f'${op} by zero')}"
        if op == "add":
            value = " + ".join(v)
        elif op == "multiply":
            value = " * ".join(v)
        elif op == "subtract":
            value = f"{v[0]} - {v[1]}"
        elif op == "divide":
            value = f"(1.0 * {v[0]}) / {v[1]}"
        elif op == "mod":
            ints = f"json_type({r[0]}) = 'integer' AND json_type({r[1]}) = 'integer'"
            value = f"(CASE WHEN {ints} THEN {v[0]} % {v[1]} ELSE mod({v[0]}, {v[1]}) END)"
        else:  # abs
            value = f"abs({v[0]})"
        return f"(CASE {checks} ELSE {self.num(op, value)} END)"
