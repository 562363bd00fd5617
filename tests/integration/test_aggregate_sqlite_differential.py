"""Random pipelines over random collections: the SQLite compiler agrees with the reference
evaluator (results, or expression_failed on both sides)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.config import Limits
from proxy.errors import InvalidQuery
from proxy.query.aggregate.parse import parse_pipeline
from tests import reference_aggregate as ref
from tests.integration.aggregate_sqlite_support import Store
from tests.strategies_aggregate import documents, pipelines

_DIR = tempfile.mkdtemp(prefix="aggdiff")
_STORE = Store(Path(_DIR) / "agg.sqlite3")
_STORE.conn.execute("PRAGMA synchronous = OFF")  # thousands of tiny loads; nothing to keep


def _load(collections: dict[str, list[dict[str, Any]]]) -> None:
    _STORE.conn.execute("BEGIN")
    for name, docs in collections.items():
        _STORE.put(name, [])
        _STORE.conn.execute(f"DELETE FROM {_STORE.tables[name]}")
        _STORE.put(name, docs)
    _STORE.conn.execute("COMMIT")


@settings(max_examples=50)  # the strategies are slow to draw (~0.4 s an example)
@given(
    items=documents(),
    other=documents(max_size=5),
    pipeline=pipelines(lookup_collection="other"),
)
def test_random_pipelines(
    items: list[dict[str, Any]], other: list[dict[str, Any]], pipeline: list[dict[str, Any]]
) -> None:
    collections = {"items": items, "other": other}
    assume(ref.promised(collections, "items", pipeline))
    try:
        parse_pipeline(pipeline, Limits())
    except InvalidQuery:  # the strategies draw a few the front end refuses ($last: [...])
        assume(False)
    _load(collections)
    stored = {n: [{"_version": 1, **d} for d in docs] for n, docs in collections.items()}
    try:
        expected = ref.aggregate(stored, "items", pipeline)
    except ref.ExpressionFailed:
        try:
            _STORE.run(pipeline)
        except InvalidQuery as exc:
            assert exc.code == "expression_failed", (pipeline, exc)
            return
        raise AssertionError(f"the reference fails, SQLite does not: {pipeline}") from None
    got = _STORE.run(pipeline)
    assert ref.results_equal(expected, got), (pipeline, expected, got)


@settings(max_examples=50)  # the strategies are slow to draw (~0.4 s an example)
@given(items=documents(), data=st.data())
def test_random_expressions(items: list[dict[str, Any]], data: st.DataObject) -> None:
    from tests.strategies_aggregate import expressions

    expr = data.draw(expressions(depth=3))
    pipeline = [{"$addFields": {"r": expr}}, {"$project": {"_id": 1, "r": 1}}]
    test_random_pipelines.hypothesis.inner_test(items, [], pipeline)  # type: ignore[attr-defined]
