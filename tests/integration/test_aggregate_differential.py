"""Differential tests of aggregation: every backend must give what the reference evaluator
(tests/reference_aggregate.py) gives, on random documents and random pipelines — the same
documents in the same order, or the same run-time failure."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings

from proxy.config import Limits
from proxy.errors import InternalError, InvalidQuery
from proxy.pipeline.core import Core
from tests import reference_aggregate as ref
from tests.backends import kinds_with, open_core
from tests.strategies_aggregate import documents, pipelines

pytestmark = pytest.mark.integration

LOOKUP = "lookup_target"  # the name the strategies use; each example gets fresh tables
_names = itertools.count()


class Env:
    """A backend opened once per module, driven from synchronous hypothesis tests."""

    def __init__(self, runner: asyncio.Runner, core: Core, kind: str = "") -> None:
        self.runner = runner
        self.core = core
        self.kind = kind

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def load(self, docs: list[dict[str, Any]]) -> str:
        name = f"g{next(_names)}"
        if docs:
            result = self.run(self.core.create(name, [dict(d) for d in docs]))
            assert all(r.status == 201 for r in result), result
        return name


@pytest.fixture(scope="module", params=kinds_with("aggregate"))
def env(request: pytest.FixtureRequest, pg_dsn: str, tmp_path_factory: Any) -> Iterator[Env]:
    runner = asyncio.Runner()
    tmp: Path = tmp_path_factory.mktemp("aggdiff")
    cm = open_core(request.param, pg_dsn, Limits(), str(tmp))
    core = runner.run(cm.__aenter__())
    try:
        yield Env(runner, core, str(request.param))
    finally:
        runner.run(cm.__aexit__(None, None, None))
        runner.close()


def stored(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The documents as the store holds them (it adds ``_version``)."""
    return [{**d, "_version": 1} for d in docs]


def renamed(pipeline: list[Any], foreign: str) -> list[Any]:
    text = orjson.dumps(pipeline).replace(
        f'"from":"{LOOKUP}"'.encode(), f'"from":"{foreign}"'.encode()
    )
    return list(orjson.loads(text))


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(docs=documents(), foreign=documents(max_size=5), pipeline=pipelines(LOOKUP))
def test_backend_agrees_with_the_reference(
    env: Env, docs: list[dict[str, Any]], foreign: list[dict[str, Any]], pipeline: list[Any]
) -> None:
    collections = {"main": stored(docs), LOOKUP: stored(foreign)}
    assume(ref.promised(collections, "main", pipeline))
    try:
        want: list[Any] | None = ref.aggregate(collections, "main", pipeline)
    except ref.ExpressionFailed:
        want = None
    name, other = env.load(docs), env.load(foreign)
    body = {"pipeline": renamed(pipeline, other)}
    try:
        result = env.run(env.core.aggregate(name, body))
    except InternalError as err:
        if env.kind == "mongodb" and (err.details or {}).get("server_code") == 1:
            # SecantusDB fails internally (code 1) on a rare shape ($group, $addFields,
            # $match, $group: about 1 in 600 examples); MongoDB documents no such failure,
            # so it is the test server's: set aside, not counted as an agreement
            assume(False)
        raise
    except InvalidQuery as err:
        if want is None:
            assert err.code == "expression_failed", err
            return
        if env.kind == "mongodb" and (err.details or {}).get("when") == "optimising":
            # MongoDB folds constant sub-expressions when it optimises the pipeline, so a
            # constant that fails ({"$toInt": "x"}, a $switch with no true case and no
            # default) fails over no input too, where the reference (per document) gives []
            # (recorded, not bent: the example is set aside; the case is also in
            # tests/integration/test_aggregate_mongo.py)
            assume(False)
        raise
    assert want is not None, f"expected expression_failed, got {result.items!r}"
    got = [orjson.loads(b) for b in result.items]
    assert ref.results_equal(got, want), f"\npipeline: {pipeline}\n got: {got}\nwant: {want}"
