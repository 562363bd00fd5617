"""The shape of a PostgreSQL $group's input (proxy.query.aggregate.pg_group): each argument's
number computed once per row, the other brackets of $min/$max tested only where it is not a
number. What the statement answers is held by the differential and reference tests."""

from __future__ import annotations

from benchmarks import workload
from proxy.config import Limits
from proxy.query.aggregate.ast import View
from proxy.query.aggregate.parse import parse_pipeline
from proxy.query.aggregate.pg import compile_pipeline


def _sql(view: View) -> str:
    p = parse_pipeline(workload.AGG_GROUP_PIPELINE, Limits())
    sql, _ = compile_pipeline(p, view, {}, schema="s", tables={view.collection: "s.t"}, cap=10)
    return sql


def test_one_type_test_per_argument_and_row() -> None:
    sql = _sql(View("c"))
    # n (a0: $sum and $max) and price (a1: $avg): one number test each, in the outer fence
    assert sql.count("jsonb_typeof(q.a0) = 'number'") == 1
    assert sql.count("jsonb_typeof(q.a1) = 'number'") == 1
    assert "THEN (q.a0)::numeric END AS v0" in sql and "THEN (q.a1)::numeric END AS v1" in sql
    assert "sum(q.v0)" in sql and "avg(q.v1)" in sql and "max(q.v0)" in sql
    # $max's string and rare brackets look at the type only when v0 is not a number
    assert "q.v0 IS NULL AND jsonb_typeof(q.a0) = 'string'" in sql
    assert "q.v0 IS NULL AND jsonb_typeof(q.a0) IN ('object', 'array', 'boolean')" in sql
    # both sub-selects fenced: nothing is flattened into repeating an expression per use
    assert sql.count("OFFSET 0) q") == 2


def test_declared_numbers_are_cast_once_without_the_outer_fence() -> None:
    view = View("c", numbers=frozenset({("n",), ("price",)}))
    sql = _sql(view)
    assert "jsonb_typeof" not in sql.split("SELECT CASE WHEN octet_length")[0]
    assert sql.count("))::numeric AS v0") == 1 and sql.count("))::numeric AS v1") == 1
    assert "sum(q.v0)" in sql and "max(q.v0)" in sql
    assert sql.count("OFFSET 0) q") == 1
