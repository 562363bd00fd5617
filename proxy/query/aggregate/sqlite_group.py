"""SQLite SQL of the stages that reorder or merge documents: ``$group``, ``$bucket`` (window
functions over the input order) and ``$sort`` (cross-type keys, arrays by min/max)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from proxy.query.aggregate.ast import Accumulator, Bucket, Group, Sort
from proxy.query.aggregate.sqlite_values import StageChain, elem_json, jval, not_type
from proxy.query.sqlite.agg_functions import FN_JNUM, FN_SUM
from proxy.query.sqlite.functions import COLLATION, FN_CANON
from proxy.query.sqlite.values import BARRIER, json_text, key_path, sql_number, text

_FULL = "ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING"
_NUMERIC = "(CASE WHEN json_type({a}) IN ('integer', 'real') THEN json_extract({a}, '$') END)"
_PRESENT = "(CASE WHEN COALESCE(json_type({a}), 'null') <> 'null' THEN {a} END)"


def _window(acc: Accumulator, a: str, distinct: str) -> tuple[str, str]:
    """(window expression over ``w``, its JSON text from the column ``x``)."""
    op = acc.op
    if op in ("sum", "count"):  # integers in two halves: no 64-bit overflow on the way
        v, ty = f"json_extract({a}, '$')", f"json_type({a})"
        halves = (
            f"sum(CASE WHEN {ty} = 'integer' THEN {v} >> 32 END) OVER w, "
            f"sum(CASE WHEN {ty} = 'integer' THEN {v} & 4294967295 END) OVER w, "
            f"sum(CASE WHEN {ty} = 'real' THEN {v} END) OVER w"
        )
        return f"{FN_SUM}({halves})", "{x}"
    if op == "avg":
        return f"avg({_NUMERIC.format(a=a)}) OVER w", f"COALESCE({FN_JNUM}({{x}}), 'null')"
    if op in ("min", "max"):
        return f"{op}({_PRESENT.format(a=a)} COLLATE {COLLATION}) OVER w", "COALESCE({x}, 'null')"
    if op in ("first", "last"):
        return f"{op}_value({a}) OVER w", "COALESCE({x}, 'null')"
    if op == "push":
        return f"json_group_array(json({a})) FILTER (WHERE {a} IS NOT NULL) OVER w", "{x}"
    assert op == "addToSet"
    return (
        f"json_group_array(json({a})) FILTER (WHERE {a} IS NOT NULL AND {distinct} = 1) OVER w",
        "{x}",
    )


def accumulate(
    ch: StageChain, inputs: str, accs: Sequence[tuple[str, Accumulator]], out_order: str
) -> str:
    """Groups of ``inputs`` (columns o, g, k, a0..): one document per ``g`` with ``_id`` k
    and each accumulator over the group's inputs in ``o`` order; ordered by ``out_order``
    (``o``: the group's first input; ``g``)."""
    marks = []
    for i, (_, acc) in enumerate(accs):
        if acc.op == "addToSet":
            marks.append(f"row_number() OVER (PARTITION BY g, {FN_CANON}(a{i}) ORDER BY o) AS d{i}")
    marked = f"SELECT *{''.join(', ' + m for m in marks)} FROM {inputs}"
    cols = []
    outs = []
    for i, (name, acc) in enumerate(accs):
        win, out = _window(acc, f"a{i}", f"d{i}")
        cols.append(f"{win} AS x{i}")
        outs.append(f"{ch.p.add(name)}, json({out.format(x=f'x{i}')})")
    windows = (
        f"SELECT o, g, k, row_number() OVER (PARTITION BY g ORDER BY o) AS rn"
        f"{''.join(', ' + c for c in cols)} FROM ({marked}) "
        f"WINDOW w AS (PARTITION BY g ORDER BY o {_FULL})"
    )
    win_cte = ch.add("gw", windows, columns="")
    doc = f"json_object('_id', json(k){''.join(', ' + o for o in outs)})"
    return ch.add("g", f"SELECT {out_order} AS o, {doc} AS doc FROM {win_cte} WHERE rn = 1")


def _args(ch: StageChain, accs: Sequence[tuple[str, Accumulator]]) -> str:
    return "".join(
        f", {ch.expr.compile(acc.arg, 's.doc').text} AS a{i}" for i, (_, acc) in enumerate(accs)
    )


def group(ch: StageChain, cur: str, stage: Group) -> str:
    key = ch.expr.compile_key(stage.key, "s.doc")
    keyed = ch.add(
        "gk",
        f"SELECT s.o AS o, COALESCE({key.text}, 'null') AS k{_args(ch, stage.accumulators)} "
        f"FROM {ch.layered(cur)} s",
        columns="",
    )
    inputs = f"(SELECT *, {FN_CANON}(k) AS g FROM {keyed})"
    return accumulate(ch, inputs, stage.accumulators, "o")


def bucket(ch: StageChain, cur: str, stage: Bucket) -> str:
    value = ch.expr.compile(stage.group_by, "s.doc")
    bounds = stage.boundaries
    numeric = not isinstance(bounds[0], str)
    last = len(bounds) - 1

    def index(r: list[str]) -> str:
        v = r[0]
        kind = not_type(v, "integer", "real") if numeric else not_type(v, "text")
        whens = " ".join(
            f"WHEN {jval(v)} >= {_bound(ch, lo)} AND {jval(v)} < {_bound(ch, hi)} THEN {i}"
            for i, (lo, hi) in enumerate(pairwise(bounds))
        )
        other = (
            str(last)
            if stage.has_default
            else ch.expr.fail(
                "$bucket: a value falls outside the boundaries and there is no default"
            )
        )
        return f"(CASE WHEN {kind} THEN {other} {whens} ELSE {other} END)"

    g = ch.expr.bind([value], index)
    ids = " ".join(f"WHEN {i} THEN {ch.p.add(json_text(b))}" for i, b in enumerate(bounds[:-1]))
    default = ch.p.add(json_text(stage.default)) if stage.has_default else "'null'"
    args = _args(ch, stage.output)
    keyed = ch.add("bk", f"SELECT s.o AS o, {g} AS g{args} FROM {ch.layered(cur)} s", columns="")
    inputs = f"(SELECT *, (CASE g {ids} ELSE {default} END) AS k FROM {keyed})"
    return accumulate(ch, inputs, stage.output, "g")


def _bound(ch: StageChain, b: object) -> str:
    return ch.p.add(text(b) if isinstance(b, str) else sql_number(b))  # type: ignore[arg-type]


def _sort_values(ch: StageChain, segs: tuple[str, ...], doc: str) -> str:
    """Rows (ty, v) of the values a sort path reaches: objects by key (a numeric segment
    too), arrays of objects entered; a row with ty NULL where nothing is there."""
    n = ch.names.fresh("sv")
    first = ch.p.add(key_path(segs[:1]))
    ctes = [f"{n}0(ty, v) AS (SELECT json_type({doc}, {first}), json_extract({doc}, {first}))"]
    for i, seg in enumerate(segs[1:], start=1):
        key = ch.p.add(key_path((seg,)))
        ctes.append(
            f"{n}{i}(ty, v) AS (SELECT CASE w.ty WHEN 'object' THEN json_type(w.v, {key}) "
            f"ELSE json_type(e.value, {key}) END, CASE w.ty WHEN 'object' THEN "
            f"json_extract(w.v, {key}) ELSE json_extract(e.value, {key}) END FROM {n}{i - 1} w "
            f"LEFT JOIN json_each(CASE WHEN w.ty = 'array' THEN w.v END) e "
            f"WHERE w.ty IS NOT 'array' OR e.type = 'object' {BARRIER})"
        )
    return f"WITH {', '.join(ctes)} SELECT ty, v FROM {n}{len(segs) - 1}"


def sort_key(ch: StageChain, segs: tuple[str, ...], descending: bool) -> str:
    """A text key: '0null' for a path reaching only empty arrays, else '1' and the JSON
    text of the value it sorts by (arrays: their smallest / largest element)."""
    values = _sort_values(ch, segs, "s.doc")
    q, e = ch.names.fresh("q"), ch.names.fresh("e")
    own = elem_json(q, "ty", "v")
    cands = (
        f"SELECT CASE WHEN {q}.ty IS NULL THEN 'null' WHEN {q}.ty = 'array' THEN {elem_json(e)} "
        f"ELSE {own} END AS j, COALESCE({q}.ty = 'array' AND {e}.key IS NULL, 0) AS empty "
        f"FROM ({values}) {q} LEFT JOIN json_each(CASE WHEN {q}.ty = 'array' THEN {q}.v END) {e}"
    )
    direction = "DESC" if descending else "ASC"
    return (
        f"COALESCE((SELECT CASE WHEN empty THEN '0null' ELSE '1' || j END FROM ({cands}) "
        f"ORDER BY empty, j COLLATE {COLLATION} {direction} LIMIT 1), '1null')"
    )


def sort(ch: StageChain, cur: str, stage: Sort) -> str:
    keys = [sort_key(ch, k.path, k.descending) for k in stage.keys]
    cols = "".join(f", {k} AS k{i}" for i, k in enumerate(keys))
    order = ", ".join(
        f"substr(k{i}, 1, 1) {d}, substr(k{i}, 2) COLLATE {COLLATION} {d}"
        for i, d in enumerate("DESC" if k.descending else "ASC" for k in stage.keys)
    )
    keyed = f"SELECT s.o AS o, s.doc AS doc{cols} FROM {cur} s"
    return ch.add("so", f"SELECT row_number() OVER (ORDER BY {order}, o) AS o, doc FROM ({keyed})")
