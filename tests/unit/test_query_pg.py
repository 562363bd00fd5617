"""Unit tests of the PostgreSQL compiler: SQL text depends only on shape; nothing is spliced."""

from __future__ import annotations

from typing import Any

from hypothesis import given

from proxy.config import Limits
from proxy.query.parse import parse_filter, parse_sort, parse_update
from proxy.query.pg import FilterCompiler, Params, UpdateCompiler, regex_with_options, sort_exprs
from tests import strategies

L = Limits(max_filter_nodes=1000)
MARK = "zqx"  # appears in every renamed field and string value; must never reach SQL text


def _value(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, str):
        return MARK + v
    if isinstance(v, int | float):
        return v + 1
    if isinstance(v, list):
        return [_value(x) for x in v]
    return {k: _value(x) for k, x in v.items()}


def _path(p: str) -> str:
    return ".".join(s if s.isdigit() else MARK + s for s in p.split("."))


def _ops(ops: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for op, arg in ops.items():
        if op in ("$type", "$exists", "$options"):
            out[op] = arg
        elif op == "$elemMatch":
            is_ops = all(k.startswith("$") for k in arg) and not any(
                k in ("$and", "$or", "$nor") for k in arg
            )
            out[op] = _ops(arg) if is_ops else _filter(arg)
        elif op == "$not" and isinstance(arg, dict):
            out[op] = _ops(arg)
        else:
            out[op] = _value(arg)
    return out


def _filter(f: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in f.items():
        if k in ("$and", "$or", "$nor"):
            out[k] = [_filter(x) for x in v]
        elif isinstance(v, dict) and v and all(x.startswith("$") for x in v):
            out[_path(k)] = _ops(v)
        else:
            out[_path(k)] = _value(v)
    return out


def _update_value(op: str, v: Any) -> Any:
    if op == "$pull" and isinstance(v, dict) and v and all(k.startswith("$") for k in v):
        return _ops(v)  # a condition, not a value
    if op == "$rename":
        return _path(v)
    return _value(v)


def compile_filter(raw: dict[str, Any]) -> tuple[str, list[Any]]:
    params = Params()
    sql = FilterCompiler(params).where(parse_filter(raw, L))
    return sql, params.values


@given(strategies.filters())
def test_sql_text_depends_only_on_shape(flt: dict[str, Any]) -> None:
    sql1, params1 = compile_filter(flt)
    sql2, params2 = compile_filter(_filter(flt))
    assert sql1 == sql2
    assert len(params1) == len(params2)
    assert MARK not in sql2  # no value or field name became SQL text


@given(strategies.updates())
def test_update_sql_depends_only_on_shape(update: dict[str, Any]) -> None:
    renamed = {
        op: {_path(k): _update_value(op, v) for k, v in fields.items()}
        for op, fields in update.items()
    }
    texts = []
    for upd in (update, renamed):
        params = Params(["id"])
        texts.append(UpdateCompiler(params, '"s"').document_expr(parse_update(upd, L), "t.doc"))
    assert texts[0] == texts[1]
    assert MARK not in texts[1]


def test_sort_paths_are_parameters() -> None:
    params = Params()
    exprs = sort_exprs(parse_sort("-x'; drop table t;--,b.c", L), params)
    text = " ".join(e for e, _ in exprs)
    assert "drop" not in text
    assert ["x'; drop table t;--"] in params.values and ["b", "c"] in params.values
    assert exprs[-1] == ("t._id", False)


def test_top_level_equality_uses_containment() -> None:
    sql, params = compile_filter({"status": "active"})
    assert sql == "(t.doc @> $1::jsonb OR t.doc @> $2::jsonb)"
    assert params == ['{"status":"active"}', '{"status":["active"]}']


def test_regex_options_map_to_are_flags() -> None:
    assert regex_with_options("a.b", "") == "(?p)a.b"
    assert regex_with_options("a", "i") == "(?pi)a"
    assert regex_with_options("a", "m") == "(?n)a"
    assert regex_with_options("a", "s") == "(?s)a"
    assert regex_with_options("a", "imsx") == "(?wix)a"
