"""What a parsed pipeline reads, for the policy check: the input collection's field paths
(``source_paths``) and each looked-up collection's ``foreignField`` (``foreign_paths``)."""

from __future__ import annotations

from collections.abc import Iterator

from proxy.query.aggregate.ast import (
    AddFields,
    Arr,
    Bucket,
    Call,
    Count,
    Expr,
    Facet,
    Field,
    FieldPath,
    Group,
    Iterate,
    Limit,
    Lookup,
    Match,
    Obj,
    Pipeline,
    Project,
    ReplaceRoot,
    Skip,
    Sort,
    Stage,
    Switch,
    Unset,
    Unwind,
)
from proxy.query.ast import ElemMatch, FieldCond, Filter, Not, Pred

Reads = list[tuple[FieldPath, str]]

NAMES: dict[type, str] = {
    Match: "$match",
    AddFields: "$addFields",
    Unset: "$unset",
    Project: "$project",
    ReplaceRoot: "$replaceRoot",
    Group: "$group",
    Sort: "$sort",
    Skip: "$skip",
    Limit: "$limit",
    Unwind: "$unwind",
    Count: "$count",
    Lookup: "$lookup",
    Facet: "$facet",
    Bucket: "$bucket",
}
RESHAPING = (Group, Project, ReplaceRoot, Count, Bucket, Facet)


def place(at: str, i: int, stage: Stage) -> str:
    """``pipeline[2].$sort``: the stage's index in the parsed pipeline and its canonical name."""
    return f"{at}[{i}].{NAMES[type(stage)]}"


def source_paths(pipeline: Pipeline) -> Reads:
    """Every path of the input collection's documents the pipeline reads, with its place: the
    stages are walked while documents are still the collection's (up to the first stage that
    reshapes them, whose reads count); paths the pipeline defined itself are not reported."""
    out: Reads = []
    _walk(pipeline.stages, "pipeline", set(), out)
    return out


def foreign_paths(pipeline: Pipeline) -> dict[str, Reads]:
    """Per looked-up collection, the ``foreignField`` paths (with place), every ``$lookup``."""
    out: dict[str, Reads] = {}
    _lookups(pipeline.stages, "pipeline", out)
    return out


def _lookups(stages: tuple[Stage, ...], at: str, out: dict[str, Reads]) -> None:
    for i, stage in enumerate(stages):
        if isinstance(stage, Lookup):
            out.setdefault(stage.collection, []).append((stage.foreign, place(at, i, stage)))
        elif isinstance(stage, Facet):
            for name, sub in stage.facets:
                _lookups(sub, f"{place(at, i, stage)}.{name}", out)


def _walk(stages: tuple[Stage, ...], at: str, defined: set[FieldPath], out: Reads) -> None:
    for i, stage in enumerate(stages):
        where = place(at, i, stage)
        for path in _stage_reads(stage):
            if not _covered(path, defined) and (path, where) not in out:
                out.append((path, where))
        if isinstance(stage, Facet):
            for name, sub in stage.facets:
                _walk(sub, f"{where}.{name}", set(defined), out)
        if isinstance(stage, RESHAPING):
            return
        defined.update(_defines(stage))


def _covered(path: FieldPath, defined: set[FieldPath]) -> bool:
    return any(path[:k] in defined for k in range(1, len(path) + 1))


def _defines(stage: Stage) -> list[FieldPath]:
    if isinstance(stage, AddFields):
        return [p for p, _ in stage.fields]
    if isinstance(stage, Unwind) and stage.index_field is not None:
        return [stage.index_field]
    if isinstance(stage, Lookup):
        return [stage.as_]
    return []


def _stage_reads(stage: Stage) -> Iterator[FieldPath]:
    if isinstance(stage, Match):
        yield from filter_paths(stage.filter, ())
    elif isinstance(stage, AddFields):
        for _, e in stage.fields:
            yield from expr_paths(e)
    elif isinstance(stage, Project):
        for p, computed in stage.fields:
            if computed is None:
                yield p
            else:
                yield from expr_paths(computed)
    elif isinstance(stage, ReplaceRoot):
        yield from expr_paths(stage.expr)
    elif isinstance(stage, Group | Bucket):
        yield from expr_paths(stage.key if isinstance(stage, Group) else stage.group_by)
        accs = stage.accumulators if isinstance(stage, Group) else stage.output
        for _, acc in accs:
            yield from expr_paths(acc.arg)
    elif isinstance(stage, Sort):
        yield from (k.path for k in stage.keys)
    elif isinstance(stage, Unwind):
        yield stage.path
    elif isinstance(stage, Lookup):
        yield stage.local


def expr_paths(e: Expr) -> Iterator[FieldPath]:
    """The current document's paths an expression reads (``$$ROOT`` and variables not)."""
    if isinstance(e, Field):
        if e.path:
            yield e.path
    elif isinstance(e, Call):
        for a in e.args:
            yield from expr_paths(a)
    elif isinstance(e, Obj):
        for _, v in e.fields:
            yield from expr_paths(v)
    elif isinstance(e, Arr):
        for v in e.items:
            yield from expr_paths(v)
    elif isinstance(e, Switch):
        for case, then in e.branches:
            yield from expr_paths(case)
            yield from expr_paths(then)
        if e.default is not None:
            yield from expr_paths(e.default)
    elif isinstance(e, Iterate):
        yield from expr_paths(e.input)
        yield from expr_paths(e.body)
        if e.limit is not None:
            yield from expr_paths(e.limit)


def filter_paths(f: Filter, prefix: FieldPath) -> Iterator[FieldPath]:
    """A filter's paths; an ``$elemMatch`` document form's as ``parent.child``."""
    if isinstance(f, FieldCond):
        path = prefix + f.path.segments
        direct, nested = _pred_reads(f.preds, path)
        if direct:
            yield path
        yield from nested
    else:
        for child in f.children:
            yield from filter_paths(child, prefix)


def _pred_reads(preds: tuple[Pred, ...], path: FieldPath) -> tuple[bool, list[FieldPath]]:
    """(whether ``path`` itself is read, the paths read below it by document-form matches)."""
    direct = not preds
    nested: list[FieldPath] = []
    for p in preds:
        if isinstance(p, ElemMatch) and p.filter is not None:
            inner = list(filter_paths(p.filter, path))
            nested.extend(inner)
            direct = direct or not inner
        elif isinstance(p, Not):
            d, n = _pred_reads(p.preds, path)
            direct = direct or d
            nested.extend(n)
        else:
            direct = True
    return direct, nested
