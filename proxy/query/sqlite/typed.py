"""SQLite compilation of declared scalar paths: filters on the one expression an index on
the path is built with (``values.declared_expr``); docs/query-language.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.query.ast import Cmp, Eq, Exists, In, Path, Pred
from proxy.query.sqlite.values import declared_expr, json_text, key_path, sql_number, text

_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def sql_scalar(value: Any) -> Any:
    """A declared kind's value as json_extract gives it: booleans are 0/1."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return text(value)
    return sql_number(value)


def typed_pred(path: Path, kind: str, pred: Pred, doc: str, add: Callable[[Any], str]) -> str:
    """``pred`` (one ``common.typed_ok`` accepts) on the declared path; never SQL NULL:
    ``json_extract`` is NULL for missing and null, and ``AND e IS NOT NULL`` turns a NULL
    test into false, so a negation stays sound."""
    if isinstance(pred, Exists):
        test = f"json_type({doc}, '{key_path(path.segments)}') IS NOT NULL"
        return f"({test})" if pred.present else f"(NOT ({test}))"
    e = declared_expr(path.segments, kind, doc)
    if isinstance(pred, Eq):
        if pred.value is None:
            return f"({e} IS NULL)"
        return f"({e} = {add(sql_scalar(pred.value))} AND {e} IS NOT NULL)"
    if isinstance(pred, Cmp):
        return f"({e} {_OPS[pred.op]} {add(sql_scalar(pred.value))} AND {e} IS NOT NULL)"
    assert isinstance(pred, In)
    listed = [sql_scalar(v) for v in pred.values if v is not None]
    parts = []
    if listed:
        values = add(json_text(listed))
        parts.append(f"({e} IN (SELECT value FROM json_each({values})) AND {e} IS NOT NULL)")
    if len(listed) < len(pred.values):
        parts.append(f"{e} IS NULL")
    if not parts:
        return "FALSE"
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"
