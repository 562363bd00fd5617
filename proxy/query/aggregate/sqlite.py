"""Aggregation pipelines compiled to one SQLite statement: a chain of CTEs of (o, doc), ``o``
the ordering key, ``doc`` JSON text; docs/aggregation.md is the contract."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proxy.query.aggregate import sqlite_group
from proxy.query.aggregate.ast import (
    AddFields,
    Bucket,
    Count,
    Expr,
    Facet,
    Field,
    FieldPath,
    Group,
    Limit,
    Lookup,
    Match,
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
from proxy.query.aggregate.sqlite_expr import ExprCompiler
from proxy.query.aggregate.sqlite_values import Sql, elem_json, ordered
from proxy.query.ast import And, Filter, Path
from proxy.query.sqlite.agg_functions import (
    FN_AGG_FAIL,
    FN_AGG_TOO_LARGE,
    FN_KEEP,
    FN_READABLE,
    FN_SET,
    FN_UNSET,
)
from proxy.query.sqlite.filter import FilterCompiler
from proxy.query.sqlite.functions import FN_CANON
from proxy.query.sqlite.values import Names, Params, json_text, key_path

_FULL = "ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING"
_RISKY = f"{FN_AGG_FAIL}("  # in a CTE's SQL: an expression there may fail


class Chain:
    """The CTEs of one statement, its parameters and names."""

    def __init__(self) -> None:
        self.p = Params()
        self.names = Names()
        self.ctes: list[str] = []
        self.expr = ExprCompiler(self.p, self.names)
        self.views: dict[str, str] = {}  # looked-up collection → its CTE (_id, doc)
        self.forced: list[str] = []  # CTEs that may fail: every row of them is computed

    def add(self, prefix: str, body: str, columns: str = "(o, doc)") -> str:
        """One CTE (MATERIALIZED: computed once, in full, when first read). One that may
        fail is also read in full by the statement (``finish``), as the reference evaluates
        every stage on every document, whatever later stages read of it."""
        name = self.names.fresh(prefix)
        self.ctes.append(f"{name}{columns} AS MATERIALIZED ({body})")
        if _RISKY in body:
            self.forced.append(name)
        return name

    def finish(self, last: str) -> str:
        """The FROM clause of the statement over ``last``: when some CTE may fail, a
        one-row CTE counting every such CTE is read first (CROSS JOIN: SQLite keeps that
        order), so each is computed in full even when nothing later reads its rows (a
        ``$match`` SQLite knows is false, a field a ``$project`` drops). A one-time filter
        in a WHERE clause would not do: SQLite evaluates it only once a row of ``last``
        is there."""
        if not self.forced:
            return f"{last} r"
        counts = " + ".join(f"(SELECT count(*) FROM {n})" for n in self.forced)
        checked = self.add("fc", f"SELECT {counts}", columns="(n)")
        return f"{checked} CROSS JOIN {last} r"

    def where(self, flt: Filter, doc: str) -> str:
        return FilterCompiler(self.p, self.names).where(flt, doc)

    def readable(self, view: View, doc: str) -> str:
        if view.readable is None:
            return doc
        return f"{FN_READABLE}({doc}, {self.p.add(json_text(sorted(view.readable)))})"

    # -- setting paths -----------------------------------------------------------------------

    def set_path(self, doc: str, path: FieldPath, value: Sql) -> str:
        """``doc`` with ``path`` set to ``value`` (missing: removed), as ``$addFields``."""
        if len(path) == 1 and not value.missing:
            return f"json_set({doc}, {self.p.add(key_path(path))}, json({value.text}))"
        return f"{FN_SET}({doc}, {self.p.add(json_text(list(path)))}, {value.text})"

    def set_all(self, doc: str, fields: Sequence[tuple[FieldPath, Expr]], src: str) -> str:
        """``doc`` with each path set to its expression (all read from ``src``): runs of
        top-level fields in one json_set, the document a column every few helper calls."""
        values = [(path, self.expr.ref(self.expr.compile(expr, src))) for path, expr in fields]
        out, depth, run = doc, 0, []
        for path, value in values:
            if len(path) == 1 and not value.missing:
                run.append(f"{self.p.add(key_path(path))}, json({value.text})")
                continue
            if run:
                out, run = f"json_set({out}, {', '.join(run)})", []
            out, depth = self.set_path(out, path, value), depth + 1
            if depth % 4 == 0:
                out = self.expr.lift(out)
        return f"json_set({out}, {', '.join(run)})" if run else out

    def layered(self, cur: str) -> str:
        """``cur`` with the columns the expressions compiled since the last call need."""
        scope = self.expr.scope
        if not scope.layers:
            return cur
        ctes, last = scope.ctes(cur, "s", self.names)
        self.ctes.extend(ctes)
        if any(_RISKY in c for c in ctes):  # the last reads each layer before it in full
            self.forced.append(last)
        self.expr.scope = type(scope)()
        return last

    def reshape(self, prefix: str, cur: str, doc: str) -> str:
        return self.add(prefix, f"SELECT o, {doc} FROM {self.layered(cur)} s")

    # -- stages ------------------------------------------------------------------------------

    def run(self, cur: str, stages: Sequence[Stage]) -> str:
        for stage in stages:
            cur = self.stage(cur, stage)
        return cur

    def stage(self, cur: str, stage: Stage) -> str:
        if isinstance(stage, Match):
            return self.add(
                "m", f"SELECT o, doc FROM {cur} s WHERE {self.where(stage.filter, 's.doc')}"
            )
        if isinstance(stage, AddFields):
            return self.reshape("af", cur, self.set_all("s.doc", stage.fields, "s.doc"))
        if isinstance(stage, Unset):
            return self.add("un", f"SELECT o, {self.unset('s.doc', stage.paths)} FROM {cur} s")
        if isinstance(stage, Project):
            return self.reshape("pr", cur, self.project(stage))
        if isinstance(stage, ReplaceRoot):
            return self.reshape("rr", cur, self.replace_root(stage))
        if isinstance(stage, Group):
            return sqlite_group.group(self, cur, stage)
        if isinstance(stage, Bucket):
            return sqlite_group.bucket(self, cur, stage)
        if isinstance(stage, Sort):
            return sqlite_group.sort(self, cur, stage)
        if isinstance(stage, Skip):
            return self.add(
                "sk", f"SELECT o, doc FROM {cur} ORDER BY o LIMIT -1 OFFSET {self.p.add(stage.n)}"
            )
        if isinstance(stage, Limit):
            return self.add(
                "li", f"SELECT o, doc FROM {cur} ORDER BY o LIMIT {self.p.add(stage.n)}"
            )
        if isinstance(stage, Unwind):
            return self.unwind(cur, stage)
        if isinstance(stage, Count):
            counted = f"SELECT count(*) AS n FROM {cur}"
            return self.add(
                "c",
                f"SELECT 0, json_object({self.p.add(stage.field)}, n) FROM ({counted}) WHERE n > 0",
            )
        if isinstance(stage, Lookup):
            return self.lookup(cur, stage)
        assert isinstance(stage, Facet)
        return self.facet(cur, stage)

    def unset(self, doc: str, paths: Sequence[FieldPath]) -> str:
        if all(len(p) == 1 for p in paths):
            return f"json_remove({doc}, {', '.join(self.p.add(key_path(p)) for p in paths)})"
        return f"{FN_UNSET}({doc}, {self.p.add(json_text([list(p) for p in paths]))})"

    def project(self, stage: Project) -> str:
        kept = [list(p) for p, e in stage.fields if e is None]
        if not stage.exclude_id and ["_id"] not in kept:
            kept.insert(0, ["_id"])
        start = f"{FN_KEEP}(s.doc, {self.p.add(json_text(kept))})" if kept else "json_object()"
        computed = [(p, e) for p, e in stage.fields if e is not None]
        return self.set_all(start, computed, "s.doc")

    def replace_root(self, stage: ReplaceRoot) -> str:
        value = self.expr.compile(stage.expr, "s.doc")
        fail = self.expr.fail("$replaceRoot: the new root is not an object")
        return self.expr.bind(
            [value],
            lambda r: f"(CASE WHEN json_type({r[0]}) = 'object' THEN {r[0]} ELSE {fail} END)",
        )

    def unwind(self, cur: str, stage: Unwind) -> str:
        path = self.p.add(key_path(stage.path))
        ty = f"json_type(s.doc, {path})"
        elem = Sql(elem_json("e"), missing=False)
        parts = [
            f"SELECT s.o AS o0, e.key AS o1, {self.set_path('s.doc', stage.path, elem)} AS doc, "
            f"e.key AS i FROM {cur} s, json_each(s.doc, {path}) e WHERE {ty} = 'array'",
            f"SELECT s.o, -1, s.doc, NULL FROM {cur} s WHERE {ty} NOT IN ('array', 'null')",
        ]
        if stage.preserve:
            parts.append(
                f"SELECT s.o, -1, CASE WHEN {ty} = 'array' THEN json_remove(s.doc, {path}) "
                f"ELSE s.doc END, NULL FROM {cur} s WHERE {ty} IS NULL OR {ty} = 'null' OR "
                f"({ty} = 'array' AND json_array_length(s.doc, {path}) = 0)"
            )
        doc = "u.doc"
        if stage.index_field is not None:
            index = Sql("COALESCE(CAST(u.i AS TEXT), 'null')", missing=False)
            doc = self.set_path(doc, stage.index_field, index)
        union = " UNION ALL ".join(parts)
        return self.add(
            "uw", f"SELECT row_number() OVER (ORDER BY u.o0, u.o1), {doc} FROM ({union}) u"
        )

    def lookup(self, cur: str, stage: Lookup) -> str:
        """Set-based: the canonical keys of each side, joined on equality; each input's
        matches gathered in ``_id`` order by a window, joined back on ``o``."""
        view = self.views[stage.collection]
        cands = FilterCompiler(self.p, self.names).candidates_sql(Path(stage.foreign), "f.doc")
        key = f"CASE WHEN c.ty IS NULL THEN 'null' ELSE {FN_CANON}({elem_json('c', 'ty', 'v')}) END"
        keys = f"(SELECT json_group_array({key}) FROM ({cands}) c)"
        theirs = self.add("lkf", f"SELECT f._id, {keys} FROM {view} f", columns="(id, keys)")

        def my_keys(r: list[str]) -> str:
            x = r[0]
            mine = (
                f"SELECT {FN_CANON}(COALESCE({x}, 'null')) AS k "
                f"WHERE COALESCE(json_type({x}), '') <> 'array' "
                f"UNION ALL SELECT {FN_CANON}({elem_json('le')}) FROM "
                f"json_each(CASE WHEN json_type({x}) = 'array' THEN {x} END) le"
            )
            return f"(SELECT json_group_array(k) FROM ({mine}))"

        local = self.expr.compile(Field(stage.local), "s.doc")
        mine = self.expr.bind([local], my_keys)
        src = self.layered(cur)
        ours = self.add("lkl", f"SELECT s.o, {mine} FROM {src} s", columns="(o, keys)")
        pairs = (
            f"SELECT DISTINCT l.o AS o, f.id AS id FROM {ours} l, json_each(l.keys) lk, "
            f"{theirs} f, json_each(f.keys) fk WHERE lk.value = fk.value"
        )
        gathered = (
            f"SELECT p.o AS o, row_number() OVER (PARTITION BY p.o ORDER BY v._id) AS rn, "
            f"json_group_array(json(v.doc)) OVER (PARTITION BY p.o ORDER BY v._id {_FULL}) "
            f"AS found FROM ({pairs}) p JOIN {view} v ON v._id = p.id"
        )
        found = self.add(
            "lkj", f"SELECT o, found FROM ({gathered}) WHERE rn = 1", columns="(o, found)"
        )
        value = Sql("COALESCE(j.found, '[]')", missing=False)
        doc = self.set_path("s.doc", stage.as_, value)
        return self.add("lk", f"SELECT s.o, {doc} FROM {src} s LEFT JOIN {found} j ON j.o = s.o")

    def facet(self, cur: str, stage: Facet) -> str:
        parts = []
        for name, sub in stage.facets:
            last = self.run(cur, sub)
            items = ordered(f"SELECT doc, o FROM {last}", "o")
            rows = f"(SELECT json_group_array(json(doc)) FROM {items})"
            parts.append(f"{self.p.add(name)}, json({rows})")
        return self.add("fa", f"SELECT 0, json_object({', '.join(parts)})")


def _scan(ch: Chain, view: View, table: str | None, matches: Sequence[Filter]) -> str:
    if table is None:
        return "SELECT NULL, NULL WHERE 0"
    """The caller's rows of ``table`` (the guard reads the stored document), readable parts
    only; ``matches`` read what the caller sees (the stored document when all is readable)."""
    hidden = view.readable is not None
    conds = [f for f in (view.guard, *([] if hidden else matches)) if f is not None]
    where = f" WHERE {ch.where(And(tuple(conds)), 't.doc')}" if conds else ""
    scan = f"SELECT t._id AS _id, {ch.readable(view, 't.doc')} AS doc FROM {table} t{where}"
    if not hidden or not matches:
        return scan
    seen = ch.where(And(tuple(matches)), "r.doc")
    return f"SELECT r._id, r.doc FROM ({scan}) r WHERE {seen}"


def compile_pipeline(
    pipeline: Pipeline,
    base: View,
    views: Mapping[str, View],
    *,
    tables: Mapping[str, str | None],
    cap: int,
    max_bytes: int = 16 * 1024 * 1024,
) -> tuple[str, list[Any]]:
    """One statement whose rows (one column, ``doc``) are the pipeline's output in order,
    at most ``cap + 1`` of them; an output document over ``max_bytes`` of JSON text fails
    it (result_too_large)."""
    ch = Chain()
    stages = list(pipeline.stages)
    matches: list[Filter] = []
    while stages and isinstance(stages[0], Match):
        matches.append(stages.pop(0).filter)  # type: ignore[union-attr]
    for name in pipeline.lookups:
        ch.views[name] = ch.add(
            "lv", _scan(ch, views[name], tables.get(name), ()), columns="(_id, doc)"
        )
    first = ch.add("t", _scan(ch, base, tables.get(base.collection), matches))
    last = ch.run(first, stages)
    big, msg = ch.p.add(max_bytes), ch.p.add(f"an output document is over {max_bytes} bytes")
    checked = (
        f"CASE WHEN length(CAST(r.doc AS BLOB)) > {big} THEN {FN_AGG_TOO_LARGE}({msg}) "
        "ELSE r.doc END"
    )
    source = ch.finish(last)
    sql = (
        f"WITH {', '.join(ch.ctes)} SELECT {checked} AS doc FROM {source} ORDER BY r.o "
        f"LIMIT {ch.p.add(cap + 1)}"
    )
    return sql, ch.p.values
