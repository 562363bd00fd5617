"""PostgreSQL compiler of aggregation pipelines: one statement, a chain of CTEs over jsonb
documents, each carrying its ordering key (docs/aggregation.md, "Order")."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.query.aggregate.ast import (
    Accumulator,
    AddFields,
    Arr,
    Bucket,
    Count,
    Facet,
    Field,
    FieldPath,
    Group,
    Limit,
    Lit,
    Lookup,
    Match,
    Obj,
    Pipeline,
    Project,
    ReplaceRoot,
    Skip,
    Sort,
    Stage,
    Unset,
    Unwind,
    View,
)
from proxy.query.aggregate.pg_accum import Order, accumulator_sql, order_sql
from proxy.query.aggregate.pg_expr import NULL, ExprCompiler, is_type
from proxy.query.aggregate.pg_group import NUMERIC, group_input
from proxy.query.aggregate.pg_stages import Rel, StageSql, raw_is_view
from proxy.query.ast import Filter, Path
from proxy.query.pg import FilterCompiler, Params, jsonb

EMPTY = "(SELECT NULL::text AS _id, NULL::jsonb AS doc WHERE false)"


def compile_pipeline(
    pipeline: Pipeline,
    base: View,
    views: Mapping[str, View],
    *,
    schema: str,
    tables: Mapping[str, str | None],
    cap: int,
    max_bytes: int = 16 * 1024 * 1024,
) -> tuple[str, list[Any]]:
    """One SQL statement yielding the pipeline's output documents (column ``doc``, text) in
    the contract's order, at most ``cap + 1`` of them, and its bound values. An output
    document over ``max_bytes`` (as JSON text) fails the statement (result_too_large)."""
    c = PipelineCompiler(schema, tables, {base.collection: base, **views})
    return _statement(c, pipeline, base, cap, max_bytes)


def compile_speculative(
    pipeline: Pipeline,
    base: View,
    views: Mapping[str, View],
    *,
    schema: str,
    tables: Mapping[str, str | None],
    cap: int,
    max_bytes: int = 16 * 1024 * 1024,
) -> tuple[str, list[Any]] | None:
    """``compile_pipeline``'s statement, but one whose numeric accumulators (``$sum $avg
    $min $max``) over a field path assume that field holds a number wherever it is present:
    its values are cast without a type test each, and ``$min``/``$max`` are their number
    bracket alone. A value that is not a number (null, a string, ...) makes the cast fail
    the statement (``update_type_mismatch``), never its answer wrong: the caller then runs
    ``compile_pipeline``'s. None when the pipeline has no such accumulator (or an enforced
    schema declares each of them a number already): the statement would be the same."""
    if not _speculable(pipeline.stages):
        return None
    c = PipelineCompiler(schema, tables, {base.collection: base, **views}, speculative=True)
    out = _statement(c, pipeline, base, cap, max_bytes)
    return out if c.assumed else None


def _speculable(stages: Sequence[Stage]) -> bool:
    for s in stages:
        accs = s.accumulators if isinstance(s, Group) else s.output if isinstance(s, Bucket) else ()
        if any(a.op in NUMERIC and isinstance(a.arg, Field) for _, a in accs):
            return True
        if isinstance(s, Facet) and any(_speculable(sub) for _, sub in s.facets):
            return True
    return False


def _statement(
    c: PipelineCompiler, pipeline: Pipeline, base: View, cap: int, max_bytes: int
) -> tuple[str, list[Any]]:
    stages = list(pipeline.stages)
    early: list[Filter] = []
    while stages and isinstance(stages[0], Match):
        early.append(stages.pop(0).filter)  # type: ignore[union-attr]
    rel = c.base(base, early)
    rel = c.stages(stages, rel)
    forced = c.finish(rel)
    order = f" ORDER BY {order_sql(rel.order)}" if rel.order else ""
    cap_sql = c.p.add(cap + 1, "bigint")
    if forced is not None:  # the Limit node evaluates its count before reading any row
        cap_sql = f"(CASE WHEN {forced} THEN {cap_sql} END)"
    big = c.p.add(max_bytes, "int")
    refuse = c.x.fail_with("result_too_large", f"an output document is over {max_bytes} bytes")
    sql = (
        f"WITH {', '.join(c.ctes)} SELECT CASE WHEN octet_length(x.t) > {big} THEN "
        f"({refuse})::text ELSE x.t END AS doc FROM {rel.name} r "
        f"CROSS JOIN LATERAL (SELECT r.doc::text AS t OFFSET 0) x{order} LIMIT {cap_sql}"
    )
    return sql, c.p.values


class PipelineCompiler(StageSql):
    def __init__(
        self,
        schema: str,
        tables: Mapping[str, str | None],
        views: Mapping[str, View],
        speculative: bool = False,
    ) -> None:
        self.p = Params()
        self.schema = schema
        self.tables = tables
        self.views = views
        self.names = itertools.count()
        self.x = ExprCompiler(self.p, schema, self.names)
        self.ctes: list[str] = []
        self.computed = False  # the CTE being built computes its documents (carry says)
        self.forced: list[str] = []  # CTEs that may fail: every row of them is computed
        # declared never-null number paths of the documents as stored (View.numbers), while
        # the stages so far have not reshaped them
        self.numbers: frozenset[tuple[str, ...]] = frozenset()
        self.speculative = speculative  # compile_speculative: every numeric field a number
        self.assumed = False  # ... and some accumulator's argument taken for one so

    # -- plumbing ----------------------------------------------------------------------

    def col(self) -> str:
        return f"o{next(self.names)}"

    def cte(self, select: str, cols: Sequence[str], order: Order) -> Rel:
        """One CTE. One that computes its documents is MATERIALIZED: inlined, each later
        reference to its ``doc`` would repeat the whole computation (subqueries included).
        One that may fail is computed in full (``finish``), as the reference evaluates every
        stage on every document, whatever later stages read of it."""
        name = f"s{next(self.names)}"
        risky = "dbproxy_refuse(" in select
        mode = "MATERIALIZED " if self.computed or risky else ""
        self.computed = False
        if risky:
            self.forced.append(name)
        self.ctes.append(f"{name} AS {mode}({select})")
        return Rel(name, tuple(cols), tuple(order))

    def finish(self, last: Rel) -> str | None:
        """Closes a chain: the last CTE (read once) is inlined unless it may fail. Answers
        a condition, always true, that reads every CTE that may fail in full (None when
        none may). The caller puts it where it is evaluated whatever the planner knows of
        the rows: never in a WHERE, which a relation known to be empty (``WHERE FALSE``)
        drops unevaluated."""
        if last.name not in self.forced:
            self.ctes[-1] = self.ctes[-1].replace(" AS MATERIALIZED (", " AS (", 1)
        if not self.forced:
            return None
        counts = " + ".join(f"(SELECT count(*) FROM {n})" for n in self.forced)
        return f"{counts} >= 0"

    def carry(self, r: Rel, doc: str, *extra: str) -> str:
        """The select list: ``r``'s ordering columns, ``extra`` items, the new doc."""
        items = [f"p.{c}" for c in r.cols] + list(extra) + [f"{doc} AS doc"]
        self.computed = doc not in ("p.doc", "u.d")
        return ", ".join(items)

    def readable(self, doc: str, names: frozenset[str] | None) -> str:
        if names is None:
            return doc
        listed = self.p.add(sorted(names), "text[]")
        return f"{self.schema}.dbproxy_agg_readable({doc}, {listed}, '')"

    def source(self, collection: str) -> str:
        return self.tables.get(collection) or EMPTY

    # -- the base scan -----------------------------------------------------------------

    def base(self, view: View, early: list[Filter]) -> Rel:
        fc = DeclaredFilterCompiler(self.p, view.scalars)
        self.numbers = view.numbers
        conds = [fc.where(view.guard, "t.doc")] if view.guard is not None else []
        src = self.source(view.collection)
        raw = [f for f in early if raw_is_view(f, view.readable)]
        viewed = [f for f in early if not raw_is_view(f, view.readable)]
        conds += [fc.where(f, "t.doc") for f in raw]
        doc = self.readable("t.doc", view.readable)
        if viewed:  # filters reading partly hidden fields see the readable part only
            where = f" WHERE {' AND '.join(conds)}" if conds else ""
            src = f"(SELECT t._id, {doc} AS doc FROM {src} t{where})"
            conds = [fc.where(f, "t.doc") for f in viewed]
            doc = "t.doc"
        col = self.col()
        where = f" WHERE {' AND '.join(conds)}" if conds else ""
        self.computed = doc != "t.doc"
        return self.cte(
            f"SELECT t._id AS {col}, {doc} AS doc FROM {src} t{where}", [col], [(col, False)]
        )

    # -- stages ------------------------------------------------------------------------

    def stages(self, stages: Sequence[Stage], r: Rel) -> Rel:
        for stage in stages:
            r = self.stage(stage, r)
            if not isinstance(stage, Match | Sort | Skip | Limit):
                self.numbers = frozenset()  # documents reshaped: declared kinds no longer hold
        return r

    def stage(self, s: Stage, r: Rel) -> Rel:
        if isinstance(s, Match):
            where = FilterCompiler(self.p).where(s.filter, "p.doc")
            return self.cte(
                f"SELECT {self.carry(r, 'p.doc')} FROM {r.name} p WHERE {where}", r.cols, r.order
            )
        if isinstance(s, AddFields | Unset | Project | ReplaceRoot):
            doc = self.reshaped(s)
            return self.cte(f"SELECT {self.carry(r, doc)} FROM {r.name} p", r.cols, r.order)
        if isinstance(s, Group):
            return self.group(s, r)
        if isinstance(s, Sort):
            return self.sort(s, r)
        if isinstance(s, Skip | Limit):
            order = f" ORDER BY {order_sql(r.order)}" if r.order else ""
            word = "OFFSET" if isinstance(s, Skip) else "LIMIT"
            n = self.p.add(s.n, "bigint")
            return self.cte(
                f"SELECT {self.carry(r, 'p.doc')} FROM {r.name} p{order} {word} {n}",
                r.cols,
                r.order,
            )
        if isinstance(s, Unwind):
            return self.unwind(s, r)
        if isinstance(s, Count):
            name = self.p.add(s.field, "text")
            return self.cte(
                f"SELECT jsonb_build_object({name}, count(*)) AS doc FROM {r.name} p "
                f"HAVING count(*) > 0",
                [],
                [],
            )
        if isinstance(s, Lookup):
            return self.lookup(s, r)
        if isinstance(s, Facet):
            return self.facet(s, r)
        if isinstance(s, Bucket):
            return self.bucket(s, r)
        raise TypeError(f"not a stage: {s!r}")

    def reshaped(self, s: AddFields | Unset | Project | ReplaceRoot) -> str:
        """The new document of a stage that rewrites each one (over ``p.doc``)."""
        if isinstance(s, AddFields):  # every value from the input document, set in order
            doc = "p.doc"
            values = [(path, self.x.expr(e, "p.doc")) for path, e in s.fields]
            for path, v in values:
                doc = self.set_path(doc, path, v)
            return doc
        if isinstance(s, Unset):
            return self.unset("p.doc", s.paths)
        if isinstance(s, Project):
            return self.project(s)
        fail = self.x.fail("$replaceRoot: the new root must be an object")
        return self.x.bind(
            [self.x.expr(s.expr, "p.doc")],
            lambda v: f"(CASE WHEN {is_type(v, 'object')} THEN {v} ELSE {fail} END)",
        )

    def set_path(self, doc: str, path: FieldPath, value: str) -> str:
        if len(path) == 1:
            key = self.p.add(path[0], "text")
            return f"jsonb_set_lax({doc}, ARRAY[{key}], {value}, true, 'delete_key')"
        full = self.p.add(list(path), "text[]")
        return f"{self.schema}.dbproxy_agg_set({doc}, {full}, {value})"

    def unset(self, doc: str, paths: Sequence[FieldPath]) -> str:
        tops = [p[0] for p in paths if len(p) == 1]
        if tops:
            doc = f"({doc} - {self.p.add(tops, 'text[]')})"
        for path in paths:
            if len(path) > 1:
                full = self.p.add(list(path), "text[]")
                doc = f"{self.schema}.dbproxy_agg_unset({doc}, {full})"
        return doc

    def project(self, s: Project) -> str:
        kept = [p for p, e in s.fields if e is None]
        named = {p for p, _ in s.fields}
        if not s.exclude_id and ("_id",) not in named:
            kept.append(("_id",))
        if not kept:
            doc = "'{}'::jsonb"
        elif all(len(p) == 1 for p in kept):  # each kept field copied when present
            doc = "'{}'::jsonb"
            for (k,) in kept:
                key = self.p.add(k, "text")
                doc = f"jsonb_set_lax({doc}, ARRAY[{key}], p.doc -> {key}, true, 'delete_key')"
        else:
            paths = self.p.add(_json([list(p) for p in kept]), "jsonb")
            doc = f"COALESCE({self.schema}.dbproxy_agg_keep(p.doc, {paths}), '{{}}'::jsonb)"
        for path, e in s.fields:
            if e is not None:
                doc = self.set_path(doc, path, self.x.expr(e, "p.doc"))
        return doc

    def single_order(self, r: Rel) -> tuple[Rel, str | None]:
        """``r`` with one ascending ordering column (a row number when it has several)."""
        if not r.order:
            return r, None
        if len(r.order) == 1 and not r.order[0][1] and r.order[0][0] in r.cols:
            return r, r.order[0][0]
        col = self.col()
        rn = f"row_number() OVER (ORDER BY {order_sql(r.order)}) AS {col}"
        cols = (*r.cols, col)
        return self.cte(f"SELECT {self.carry(r, 'p.doc', rn)} FROM {r.name} p", cols, r.order), col

    def group(self, s: Group, r: Rel) -> Rel:
        raw = self.x.expr(s.key, "p.doc", key=True)
        key = raw if isinstance(s.key, Lit | Obj | Arr) else f"COALESCE({raw}, {NULL})"
        return self.grouped(r, key, s.accumulators, None)

    def _declared_number(self, a: Accumulator) -> bool:
        if not isinstance(a.arg, Field):
            return False
        if a.arg.path in self.numbers:
            return True
        if self.speculative:  # whatever reads it: one argument, one kind (group_input)
            self.assumed = self.assumed or a.op in NUMERIC
            return True
        return False

    def grouped(
        self,
        r: Rel,
        key: str,
        accs: Sequence[tuple[str, Accumulator]],
        ids: str | None,
    ) -> Rel:
        """Rows grouped by ``key`` (a pre-computed column ``g``); the group's document is
        ``_id`` (``g``, or ``ids -> g`` for buckets) and the accumulators. Arguments are
        computed once per row (a fenced sub-select)."""
        r, first = self.single_order(r)
        # fenced: the grouping's sort (or hash) then carries the key, the arguments and the
        # ordering columns only, never the whole document (twice as fast on 100k documents)
        rows = group_input(
            key,
            accs,
            lambda e: self.x.expr(e, "p.doc"),
            self._declared_number,
            r.cols,
            r.name,
        )
        values = [
            accumulator_sql(self.x, a, x, v, r.order, self._declared_number(a))
            for (_, a), (x, v) in zip(accs, rows.columns, strict=True)
        ]
        id_sql = "q.g" if ids is None else f"{ids} -> q.g"
        pairs = [("'_id'", id_sql)] + [
            (self.p.add(name, "text"), v) for (name, _), v in zip(accs, values, strict=True)
        ]
        chunks = [pairs[i : i + 40] for i in range(0, len(pairs), 40)]
        doc = " || ".join(
            "jsonb_build_object(" + ", ".join(f"{k}, {v}" for k, v in chunk) + ")"
            for chunk in chunks
        )
        col = self.col()
        if ids is not None:
            order_col = f"q.g AS {col}"
        else:
            order_col = f"min(q.{first}) AS {col}" if first else f"NULL::int AS {col}"
        sql = f"SELECT {order_col}, {doc} AS doc FROM ({rows.source}) q GROUP BY q.g"
        return self.cte(sql, [col], [(col, False)])


class DeclaredFilterCompiler(FilterCompiler):
    """The filter compiler over stored documents whose enforced schema declares scalar
    paths: equality with a scalar there is one containment test (a declared scalar and its
    parents are never arrays, so MongoDB's array arm can be left out), served by the GIN
    index."""

    def __init__(self, params: Params, scalars: frozenset[tuple[str, ...]]) -> None:
        super().__init__(params)
        self.scalars = scalars

    def _eq(self, path: Path, value: Any, doc: str) -> str:
        if (
            path.segments in self.scalars
            and value is not None
            and not isinstance(value, dict | list)
        ):
            nested: Any = value
            for seg in reversed(path.segments):  # parents are declared objects, never arrays
                nested = {seg: nested}
            return f"{doc} @> {self.p.add(jsonb(nested), 'jsonb')}"
        return super()._eq(path, value, doc)


def _json(value: Any) -> str:
    from proxy.query.pg import jsonb

    return jsonb(value)
