"""Aggregation expressions compiled to SQLite SQL over JSON text: a value is JSON text, SQL
NULL is *missing*; paths, arithmetic, comparison, boolean and conditional operators."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from proxy.errors import InvalidQuery
from proxy.query.aggregate.ast import Arr, Call, Expr, Field, Iterate, Lit, Obj, Switch, Var
from proxy.query.aggregate.sqlite_ops import OPS, Op, iterate
from proxy.query.aggregate.sqlite_values import Scope, Sql, jbool, jval, not_type, nullish
from proxy.query.sqlite.agg_functions import FN_AGG_FAIL, FN_GET, FN_JNUM, FN_ROUND
from proxy.query.sqlite.functions import FN_CMP
from proxy.query.sqlite.values import Names, Params, json_text, key_path

_ARITH = {"add", "multiply", "subtract", "divide", "mod", "abs", "floor", "ceil", "round"}
_LAZY = {"cond", "ifNull", "and", "or"}
_CMP = {"eq": "= 0", "ne": "<> 0", "gt": "> 0", "gte": ">= 0", "lt": "< 0", "lte": "<= 0"}


class ExprCompiler:
    """Compiles expressions against a current document (``doc``, SQL of JSON text) and the
    variables ``$filter``/``$map`` bind (name → SQL of JSON text)."""

    def __init__(self, params: Params, names: Names) -> None:
        self.p = params
        self.names = names
        self.scope = Scope()
        self.guard: str | None = None
        self.nesting = 0  # $filter/$map bodies being compiled
        self._ops: dict[str, Op] = dict(OPS)

    # -- plumbing ------------------------------------------------------------------------

    def fail(self, message: str) -> str:
        return f"{FN_AGG_FAIL}({self.p.add(message)})"

    def num(self, op: str, value: str) -> str:
        """An SQL number as JSON text; infinity fails."""
        refuse = self.fail(f"${op} gives a number beyond the range of a double")
        return f"COALESCE({FN_JNUM}({value}), {refuse})"

    def lift(self, text: str) -> str:
        """``text`` computed once per row as a column of the current scope (under the
        current guard: not evaluated where a conditional does not take its branch)."""
        if self.guard is not None:
            text = f"(CASE WHEN {self.guard} THEN {text} END)"
        name = self.names.fresh("lx")
        self.scope.add(name, text)
        return name

    def bind(self, args: Sequence[Sql], body: Callable[[list[str]], str]) -> str:
        """``body`` over references to ``args``; those that are not leaves become columns,
        so no SQL text nests deeper than one operator (SQLite's parser stack is small)."""
        return body([a.text if a.leaf else self.lift(a.text) for a in args])

    def ref(self, arg: Sql) -> Sql:
        """``arg`` as a leaf (a column when it is not one)."""
        if arg.leaf:
            return arg
        return Sql(self.lift(arg.text), leaf=True, missing=arg.missing)

    @contextmanager
    def guarded(self, cond: str) -> Iterator[None]:
        """Compile under ``cond`` (an SQL boolean) as well as the current guard."""
        outer = self.guard
        if cond != "1":
            self.guard = self.lift(cond)
        try:
            yield
        finally:
            self.guard = outer

    @contextmanager
    def inner_scope(self) -> Iterator[Scope]:
        """A fresh scope (and no guard) for the per-element columns of ``$filter``/``$map``."""
        outer, outer_guard = self.scope, self.guard
        self.scope, self.guard = Scope(), None
        self.nesting += 1
        try:
            yield self.scope
        finally:
            self.scope, self.guard = outer, outer_guard
            self.nesting -= 1

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
            items = [self.ref(self.compile(v, doc, env)) for v in expr.items]
            inner = ", ".join(f"json(COALESCE({i.text}, 'null'))" for i in items)
            return Sql(f"json_array({inner})", missing=False)
        if isinstance(expr, Switch):
            return self.switch(expr, doc, env)
        if isinstance(expr, Iterate):
            return iterate(self, expr, doc, env)
        assert isinstance(expr, Call)
        if expr.op in _LAZY:
            return self.lazy(expr, doc, env)
        return self.call(expr.op, [self.compile(a, doc, env) for a in expr.args])

    def compile_key(self, expr: Expr, doc: str) -> Sql:
        """A ``$group`` key: inside an object key a missing part is null."""
        if not isinstance(expr, Obj):
            return self.compile(expr, doc)
        parts = [(k, self.ref(self.compile_key(v, doc))) for k, v in expr.fields]
        inner = ", ".join(f"{self.p.add(k)}, json(COALESCE({v.text}, 'null'))" for k, v in parts)
        return Sql(f"json_object({inner})", missing=False)

    def path(self, base: str, segs: tuple[str, ...], *, top: bool) -> Sql:
        if not segs:
            return Sql(base, leaf=True, missing=not top)
        direct = f"{base} -> {self.p.add(key_path(segs))}"
        if top and len(segs) == 1:  # the current document is an object: one lookup
            return Sql(direct, leaf=True)
        # the helper only where an array is on the way (else missing is missing)
        prefixes = [
            f"json_type({base}, {self.p.add(key_path(segs[:i]))})" for i in range(1, len(segs))
        ]
        if not top:
            prefixes.insert(0, f"json_type({base})")
        arrays = " OR ".join(f"{t} = 'array'" for t in prefixes)
        mapped = f"{FN_GET}({base}, {self.p.add(json_text(list(segs)))})"
        return Sql(f"COALESCE({direct}, CASE WHEN {arrays} THEN {mapped} END)")

    def obj(self, fields: list[tuple[str, Sql]]) -> Sql:
        fields = [(k, self.ref(v)) for k, v in fields]
        if not any(v.missing for _, v in fields):
            inner = ", ".join(f"{self.p.add(k)}, json({v.text})" for k, v in fields)
            return Sql(f"json_object({inner})", missing=False)
        rows = " UNION ALL ".join(f"SELECT {self.p.add(k)} AS k, {v.text} AS v" for k, v in fields)
        return Sql(
            f"(SELECT json_group_object(k, json(v)) FROM ({rows}) WHERE v IS NOT NULL)",
            missing=False,
        )

    # -- conditionals: each branch computed only where it is taken ---------------------------

    def test(self, expr: Expr, doc: str, env: Mapping[str, str]) -> str:
        """A column holding the truthiness of ``expr`` (0/1)."""
        return self.lift(self.truthy(self.compile(expr, doc, env)))

    def switch(self, expr: Switch, doc: str, env: Mapping[str, str]) -> Sql:
        whens = []
        missing = False
        previous: list[str] = []  # cases already false
        for case, then in expr.branches:
            with self.guarded(" AND ".join(f"NOT {p}" for p in previous) or "1"):
                hit = self.test(case, doc, env)
            with self.guarded(f"{hit}{''.join(f' AND NOT {p}' for p in previous)}"):
                t = self.ref(self.compile(then, doc, env))
            previous.append(hit)
            missing = missing or t.missing
            whens.append(f"WHEN {hit} THEN {t.text}")
        if expr.default is None:
            other = self.fail("$switch: no branch matched and there is no default")
        else:
            with self.guarded(" AND ".join(f"NOT {p}" for p in previous) or "1"):
                d = self.ref(self.compile(expr.default, doc, env))
            missing = missing or d.missing
            other = d.text
        return Sql(f"(CASE {' '.join(whens)} ELSE {other} END)", missing=missing)

    def lazy(self, expr: Call, doc: str, env: Mapping[str, str]) -> Sql:
        op, args = expr.op, expr.args
        if op == "cond":
            hit = self.test(args[0], doc, env)
            with self.guarded(hit):
                t = self.ref(self.compile(args[1], doc, env))
            with self.guarded(f"NOT {hit}"):
                e = self.ref(self.compile(args[2], doc, env))
            text = f"(CASE WHEN {hit} THEN {t.text} ELSE {e.text} END)"
            return Sql(text, missing=t.missing or e.missing)
        if op == "ifNull":
            firsts: list[str] = []
            for i, arg in enumerate(args):
                with self.guarded(" AND ".join(f"{f} IS NULL" for f in firsts) or "1"):
                    value = self.ref(self.compile(arg, doc, env))
                    if i == len(args) - 1:
                        return Sql(
                            f"COALESCE({', '.join([*firsts, value.text])})", missing=value.missing
                        )
                    r = value.text
                    firsts.append(self.lift(f"(CASE WHEN {nullish(r)} THEN NULL ELSE {r} END)"))
        # $and / $or: an argument is looked at only while the answer is open
        tests: list[str] = []
        stop = "NOT " if op == "and" else ""
        for arg in args:
            with self.guarded(" AND ".join(f"{'' if stop else 'NOT '}{t}" for t in tests) or "1"):
                tests.append(self.test(arg, doc, env))
        answer = ("'false'", "'true'") if op == "and" else ("'true'", "'false'")
        whens = " ".join(f"WHEN {stop}{t} THEN {answer[0]}" for t in tests)
        return Sql(f"(CASE {whens} ELSE {answer[1]} END)" if tests else answer[1], missing=False)

    def call(self, op: str, args: list[Sql]) -> Sql:
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
        if op == "not":
            return Sql(jbool(f"NOT {self.truthy(args[0])}"), missing=False)
        fn = self._ops.get(op)
        if fn is None:
            raise InvalidQuery(f"unknown operator ${op}", code="unknown_operator")
        return fn(self, op, args)

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
