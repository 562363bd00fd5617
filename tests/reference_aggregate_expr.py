"""Expression evaluation of the aggregation reference: raw JSON expressions evaluated literally
as docs/aggregation.md ("Expressions") says; the operators themselves live in *_ops."""

from __future__ import annotations

from typing import Any

from tests import reference_aggregate_ops_more  # noqa: F401  (registers its operators)
from tests.reference import MISSING
from tests.reference_aggregate_ops import OPERATORS, Env
from tests.reference_aggregate_values import get_path

Json = Any

__all__ = ["evaluate", "evaluate_group_key"]


def _variable(ref: str, env: Env) -> Json:
    name, _, rest = ref.partition(".")
    if name in ("ROOT", "CURRENT"):
        base = env.root
    elif name in env.variables:
        base = env.variables[name]
    else:
        raise ValueError(f"unknown variable $${name}")
    return get_path(base, rest.split(".")) if rest else base


def evaluate(expr: Json, env: Env) -> Json:
    """The value of the raw expression ``expr`` in ``env`` (may be MISSING)."""
    if isinstance(expr, str):
        if expr.startswith("$$"):
            return _variable(expr[2:], env)
        if expr.startswith("$"):
            return get_path(env.root, expr[1:].split("."))
        return expr
    if isinstance(expr, list):
        return [None if (v := evaluate(e, env)) is MISSING else v for e in expr]
    if isinstance(expr, dict):
        if len(expr) == 1:
            (op, arg), *_ = expr.items()
            if op.startswith("$"):
                if op not in OPERATORS:
                    raise ValueError(f"unknown operator {op}")
                return OPERATORS[op](arg, env, evaluate)
        out = {}
        for k, e in expr.items():
            if k.startswith("$"):
                raise ValueError(f"an expression object may not hold the key {k}")
            v = evaluate(e, env)
            if v is not MISSING:
                out[k] = v
        return out
    return expr


def evaluate_group_key(expr: Json, env: Env) -> Json:
    """A ``$group`` key: missing is null, also for each part of an object key."""
    if isinstance(expr, dict) and not (len(expr) == 1 and next(iter(expr)).startswith("$")):
        return {k: evaluate_group_key(e, env) for k, e in expr.items()}
    v = evaluate(expr, env)
    return None if v is MISSING else v
