"""The aggregation strategies generate valid pipelines: the reference evaluates each of them
without raising anything but ExpressionFailed (strict mode included)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings

from tests.reference_aggregate import ExpressionFailed, aggregate, promised
from tests.strategies_aggregate import documents, pipelines

Json = Any


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), documents(max_size=4), pipelines(lookup_collection="other"))
def test_generated_pipelines_evaluate_or_fail_with_expression_failed(
    docs: list[dict[str, Json]], other: list[dict[str, Json]], pipeline: list[Json]
) -> None:
    collections = {"c": docs, "other": other}
    try:
        out = aggregate(collections, "c", pipeline)
    except ExpressionFailed:
        out = None
    assert out is None or all(isinstance(d, dict) for d in out)
    promised(collections, "c", pipeline)  # raises nothing either
