"""PostgreSQL SQL of the reordering and joining stages of a pipeline: ``$sort``, ``$unwind``,
``$lookup``, ``$facet``, ``$bucket`` (docs/aggregation.md, "Stages")."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.query.aggregate.ast import (
    Accumulator,
    Bucket,
    Facet,
    FieldPath,
    Lookup,
    Sort,
    Stage,
    Unwind,
    View,
)
from proxy.query.aggregate.pg_accum import Order, order_sql
from proxy.query.aggregate.pg_expr import NULL, ExprCompiler, is_type, txt
from proxy.query.ast import And, Eq, FieldCond, Filter, Nor, Or, Path
from proxy.query.pg import FilterCompiler, Params, jsonb
from proxy.query.pg_typed import RANK_SQL, TEXT_KEY_SQL


def top_fields(flt: Filter) -> set[str]:
    """The first segments of every path a filter reads."""
    if isinstance(flt, FieldCond):
        return {flt.path.segments[0]}
    assert isinstance(flt, And | Or | Nor)
    out: set[str] = set()
    for child in flt.children:
        out |= top_fields(child)
    return out


def raw_is_view(flt: Filter | None, readable: frozenset[str] | None) -> bool:
    """Whether a filter gives the same answer on the stored document as on its readable
    part: every field it reads is readable as a whole."""
    if readable is None or flt is None:
        return True
    return all(f in readable or f in ("_id", "_version") for f in top_fields(flt))


@dataclass(frozen=True, slots=True)
class Rel:
    """A CTE: its name, the ordering columns it carries, and its rows' order over them."""

    name: str
    cols: tuple[str, ...]
    order: tuple[tuple[str, bool], ...]


class StageSql:
    """The stages below; the plumbing is PipelineCompiler's (proxy.query.aggregate.pg)."""

    p: Params
    schema: str
    x: ExprCompiler
    ctes: list[str]
    views: Mapping[str, View]

    def col(self) -> str:
        raise NotImplementedError

    forced: list[str]

    def cte(self, select: str, cols: Sequence[str], order: Order) -> Rel:
        raise NotImplementedError

    def finish(self, last: Rel) -> str | None:
        raise NotImplementedError

    def carry(self, r: Rel, doc: str, *extra: str) -> str:
        raise NotImplementedError

    def readable(self, doc: str, names: frozenset[str] | None) -> str:
        raise NotImplementedError

    def source(self, collection: str) -> str:
        raise NotImplementedError

    def stages(self, stages: Sequence[Stage], r: Rel) -> Rel:
        raise NotImplementedError

    def set_path(self, doc: str, path: FieldPath, value: str) -> str:
        raise NotImplementedError

    def grouped(
        self,
        r: Rel,
        key: str,
        accs: Sequence[tuple[str, Accumulator]],
        ids: str | None,
    ) -> Rel:
        raise NotImplementedError

    # -- $sort -------------------------------------------------------------------------

    def sort_value(self, path: FieldPath, descending: bool) -> str:
        """The value a document sorts by: the path's value, or when arrays are on the way
        their smallest (largest, descending) element; SQL NULL when only empty arrays were
        reached (below null); missing sorts as null."""
        keys = [self.p.add(s, "text") for s in path]
        steps = ["p.doc"]
        for k in keys:
            steps.append(f"{steps[-1]} -> {k}")
        test = " OR ".join(is_type(s, "array") for s in steps[1:])
        full = self.p.add(list(path), "text[]")
        desc = "true" if descending else "false"
        return (
            f"(CASE WHEN {test} THEN {self.schema}.dbproxy_agg_sortkey(p.doc, {full}, {desc}) "
            f"ELSE COALESCE({steps[-1]}, {NULL}) END)"
        )

    def sort(self, s: Sort, r: Rel) -> Rel:
        cols, items, order = list(r.cols), [], []
        for key in s.keys:
            col = self.col()
            cols.append(col)
            items.append(f"{self.sort_value(key.path, key.descending)} AS {col}")
            rank = f"(CASE WHEN {col} IS NULL THEN 0 ELSE {RANK_SQL.format(x=col)} END)"
            order += [(rank, key.descending), (TEXT_KEY_SQL.format(x=col), key.descending)]
            order.append((col, key.descending))
        order += r.order
        return self.cte(f"SELECT {self.carry(r, 'p.doc', *items)} FROM {r.name} p", cols, order)

    # -- $unwind -----------------------------------------------------------------------

    def unwind(self, s: Unwind, r: Rel) -> Rel:
        keys = [self.p.add(seg, "text") for seg in s.path]
        v = "(p.doc" + "".join(f" -> {k}" for k in keys) + ")"  # through objects only
        full = self.p.add(list(s.path), "text[]")
        branches = [
            f"SELECT jsonb_set(p.doc, {full}, e.v), e.i - 1 FROM jsonb_array_elements("
            f"CASE WHEN {is_type(v, 'array')} THEN {v} END) WITH ORDINALITY e(v, i)",
            f"SELECT p.doc, NULL::bigint WHERE jsonb_typeof({v}) NOT IN ('array', 'null')",
        ]
        if s.preserve:
            branches.append(
                f"SELECT CASE WHEN {v} = '[]'::jsonb THEN p.doc #- {full} ELSE p.doc END, "
                f"NULL::bigint WHERE {v} IS NULL OR {v} IN ('null'::jsonb, '[]'::jsonb)"
            )
        doc = "u.d"
        if s.index_field is not None:
            doc = self.set_path(doc, s.index_field, f"COALESCE(to_jsonb(u.i), {NULL})")
        col = self.col()
        lateral = " UNION ALL ".join(branches)
        sql = (
            f"SELECT {self.carry(r, doc, f'u.i AS {col}')} FROM {r.name} p "
            f"CROSS JOIN LATERAL ({lateral}) u(d, i)"
        )
        return self.cte(sql, [*r.cols, col], [*r.order, (col, False)])

    # -- $lookup -----------------------------------------------------------------------

    def lookup(self, s: Lookup, r: Rel) -> Rel:
        """The foreign documents matching as ``{foreignField: {$in: L}}`` would; a local
        scalar on a top-level foreign field runs on the GIN index (containment)."""
        view = self.views[s.collection]
        fc = FilterCompiler(self.p)
        src = self.source(s.collection)
        foreign = Path(s.foreign)
        null_test = FieldCond(foreign, (Eq(None),))
        indexed = len(s.foreign) == 1
        if not raw_is_view(null_test, view.readable):  # match on the readable part only
            where = f" WHERE {fc.where(view.guard, 't.doc')}" if view.guard is not None else ""
            shown = self.readable("t.doc", view.readable)
            src = f"(SELECT t._id, {shown} AS doc FROM {src} t{where})"
            fdoc, guard, indexed = "f.doc", "TRUE", False
        else:
            fdoc = self.readable("f.doc", view.readable)
            guard = fc.where(view.guard, "f.doc") if view.guard is not None else "TRUE"
        local = self.x.path("p.doc", s.local, False)

        def match(lv: str) -> str:
            cands = fc.candidates_sql(foreign, "f.doc")
            elems = (
                f"jsonb_array_elements(CASE WHEN {is_type(lv, 'array')} THEN {lv} "
                f"ELSE jsonb_build_array({lv}) END)"
            )
            has_null = (
                f"COALESCE(jsonb_typeof({lv}), 'null') = 'null' OR "
                f"({is_type(lv, 'array')} AND {lv} @> '[null]'::jsonb)"
            )
            return (
                f"(EXISTS (SELECT 1 FROM ({cands}) q WHERE q.v IN (SELECT {elems})) OR "
                f"(({has_null}) AND {fc.where(null_test, 'f.doc')}))"
            )

        def joined(lv: str) -> str:
            rows = f"SELECT f._id, f.doc FROM {src} f WHERE {guard} AND "
            if indexed:
                key = self.p.add(s.foreign[0], "text")
                scalar = f"jsonb_typeof({lv}) IN ('string', 'number', 'boolean')"
                contains = (
                    f"(f.doc @> jsonb_build_object({key}, {lv}) OR "
                    f"f.doc @> jsonb_build_object({key}, jsonb_build_array({lv})))"
                )
                rows = (
                    f"{rows}{scalar} AND {contains} UNION ALL "
                    f"{rows}NOT COALESCE({scalar}, false) AND {match(lv)}"
                )
            else:
                rows += match(lv)
            return (
                f"(SELECT COALESCE(jsonb_agg({fdoc} ORDER BY f._id), '[]'::jsonb) FROM ({rows}) f)"
            )

        doc = self.set_path("p.doc", s.as_, self.x.bind([local], joined))
        return self.cte(f"SELECT {self.carry(r, doc)} FROM {r.name} p", r.cols, r.order)

    # -- $facet ------------------------------------------------------------------------

    def facet(self, s: Facet, r: Rel) -> Rel:
        pairs = []
        for name, stages in s.facets:
            (outer, self.ctes), (kept, self.forced) = (self.ctes, []), (self.forced, [])
            try:
                sub = self.stages(stages, r)
                inner = self.ctes
                guard = self.finish(sub) if inner else None
            finally:
                self.ctes, self.forced = outer, kept
            order = f" ORDER BY {order_sql(sub.order)}" if sub.order else ""
            agg = f"COALESCE(jsonb_agg(x.doc{order}), '[]'::jsonb)"
            if guard is not None:  # a select list without GROUP BY: evaluated on no rows too
                agg = f"CASE WHEN {guard} THEN {agg} END"
            agg = f"SELECT {agg} FROM {sub.name} x"
            if inner:
                agg = f"WITH {', '.join(inner)} {agg}"
            pairs.append(f"{self.p.add(name, 'text')}, ({agg})")
        # computed: a later stage's every reference to ``doc`` would otherwise repeat the
        # whole $facet (the planner pulls a FROM-less select up into each one), which
        # grows exponentially with each $facet and $sort that follows
        self.computed = True
        return self.cte(f"SELECT jsonb_build_object({', '.join(pairs)}) AS doc", [], [])

    # -- $bucket -----------------------------------------------------------------------

    def bucket(self, s: Bucket, r: Rel) -> Rel:
        strings = isinstance(s.boundaries[0], str)
        bounds = [
            self.p.add(b, "text") if strings else self.p.add(jsonb(b), "jsonb")
            for b in s.boundaries
        ]

        def index(v: str) -> tuple[str, str]:
            if strings:
                x = f'{txt(v)} COLLATE "C"'
                kind = is_type(v, "string")
            else:
                x, kind = v, is_type(v, "number")
            whens = " ".join(
                f"WHEN {x} >= {lo} AND {x} < {hi} THEN {i}"
                for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
            )
            fallback = (
                str(len(bounds) - 1)
                if s.has_default
                else f"({self.x.fail('$bucket: a value is outside the boundaries')})::text::int"
            )
            return f"(CASE WHEN {kind} THEN CASE {whens} END END)", fallback

        value = self.x.expr(s.group_by, "p.doc")

        def key(v: str) -> str:
            found, fallback = index(v)
            return f"COALESCE({found}, {fallback})"

        ids: list[Any] = list(s.boundaries[:-1]) + ([s.default] if s.has_default else [])
        ids_sql = self.p.add(jsonb(ids), "jsonb")
        return self.grouped(r, self.x.bind([value], key), s.output, ids_sql)
