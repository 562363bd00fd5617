"""A minimal raw-pipeline → syntax-tree builder for the SQLite aggregation tests, used until
the front end (proxy.query.aggregate.parse) is available; no validation."""

from __future__ import annotations

from typing import Any

from proxy.config import Limits
from proxy.query.aggregate import ast as A
from proxy.query.parse import parse_filter


def expr(v: Any) -> A.Expr:
    if isinstance(v, str) and v.startswith("$$"):
        name, *rest = v[2:].split(".")
        if name in ("ROOT", "CURRENT"):
            return A.Field(tuple(rest))
        return A.Var(name, tuple(rest))
    if isinstance(v, str) and v.startswith("$"):
        return A.Field(tuple(v[1:].split(".")))
    if isinstance(v, list):
        return A.Arr(tuple(expr(x) for x in v))
    if isinstance(v, dict):
        if len(v) == 1 and next(iter(v)).startswith("$"):
            return _op(*next(iter(v.items())))
        return A.Obj(tuple((k, expr(x)) for k, x in v.items()))
    return A.Lit(v)


def _op(op: str, a: Any) -> A.Expr:
    op = op[1:]
    if op == "literal":
        return A.Lit(a)
    if op == "switch":
        branches = tuple((expr(b["case"]), expr(b["then"])) for b in a["branches"])
        return A.Switch(branches, expr(a["default"]) if "default" in a else None)
    if op in ("filter", "map"):
        body = expr(a["cond" if op == "filter" else "in"])
        limit = expr(a["limit"]) if "limit" in a else None
        return A.Iterate(op, expr(a["input"]), a.get("as", "this"), body, limit)
    if op == "cond" and isinstance(a, dict):
        a = [a["if"], a["then"], a["else"]]
    if op == "round" and not isinstance(a, list):
        a = [a, 0]
    if op == "round" and len(a) == 1:
        a = [a[0], 0]
    if op == "trim":
        a = [a["input"], a.get("chars")]
    if not isinstance(a, list):
        a = [a]
    return A.Call(op, tuple(expr(x) for x in a))


def _path(p: str) -> tuple[str, ...]:
    return tuple(p.removeprefix("$").split("."))


def _accs(spec: dict[str, Any]) -> tuple[tuple[str, A.Accumulator], ...]:
    out = []
    for name, acc in spec.items():
        ((op, arg),) = acc.items()
        op = op[1:]
        out.append((name, A.Accumulator(op, A.Lit(1) if op == "count" else expr(arg))))
    return tuple(out)


def stage(raw: dict[str, Any]) -> A.Stage:
    ((name, arg),) = raw.items()
    if name == "$match":
        return A.Match(parse_filter(arg, Limits()))
    if name in ("$addFields", "$set"):
        return A.AddFields(tuple((_path(k), expr(v)) for k, v in arg.items()))
    if name == "$unset":
        return A.Unset(tuple(_path(p) for p in ([arg] if isinstance(arg, str) else arg)))
    if name == "$project":
        if all(v in (0, False) for v in arg.values()):
            return A.Unset(tuple(_path(k) for k in arg))
        fields = tuple(
            (_path(k), None if v in (1, True) else expr(v)) for k, v in arg.items() if k != "_id"
        )
        keep_id = arg.get("_id", 1)
        if keep_id not in (0, 1, True, False):
            fields = ((("_id",), expr(keep_id)), *fields)
        return A.Project(fields, exclude_id=keep_id in (0, False))
    if name in ("$replaceRoot", "$replaceWith"):
        return A.ReplaceRoot(expr(arg["newRoot"] if name == "$replaceRoot" else arg))
    if name == "$group":
        return A.Group(expr(arg["_id"]), _accs({k: v for k, v in arg.items() if k != "_id"}))
    if name == "$sort":
        return A.Sort(tuple(A.SortKey(_path(k), v == -1) for k, v in arg.items()))
    if name == "$skip":
        return A.Skip(arg)
    if name == "$limit":
        return A.Limit(arg)
    if name == "$unwind":
        if isinstance(arg, str):
            return A.Unwind(_path(arg))
        idx = arg.get("includeArrayIndex")
        return A.Unwind(
            _path(arg["path"]),
            _path(idx) if idx else None,
            arg.get("preserveNullAndEmptyArrays", False),
        )
    if name == "$count":
        return A.Count(arg)
    if name == "$lookup":
        return A.Lookup(
            arg["from"], _path(arg["localField"]), _path(arg["foreignField"]), _path(arg["as"])
        )
    if name == "$facet":
        return A.Facet(tuple((k, _stages(v)) for k, v in arg.items()))
    if name == "$bucket":
        out = _accs(arg.get("output", {"count": {"$sum": 1}}))
        return A.Bucket(
            expr(arg["groupBy"]),
            tuple(arg["boundaries"]),
            arg.get("default"),
            "default" in arg,
            out,
        )
    raise ValueError(name)


def _lookups(stages: tuple[A.Stage, ...]) -> set[str]:
    out: set[str] = set()
    for s in stages:
        if isinstance(s, A.Lookup):
            out.add(s.collection)
        elif isinstance(s, A.Facet):
            for _, sub in s.facets:
                out |= _lookups(sub)
    return out


def _stages(raw: list[dict[str, Any]]) -> tuple[A.Stage, ...]:
    stages: list[A.Stage] = []
    for r in raw:
        if "$sortByCount" in r:
            stages.append(
                A.Group(expr(r["$sortByCount"]), (("count", A.Accumulator("sum", A.Lit(1))),))
            )
            stages.append(A.Sort((A.SortKey(("count",), True),)))
        else:
            stages.append(stage(r))
    return tuple(stages)


def pipeline(raw: list[dict[str, Any]]) -> A.Pipeline:
    st = _stages(raw)
    return A.Pipeline(st, tuple(sorted(_lookups(st))))
