"""Typed compilation (declared scalar paths on ``declared_expr``) against the generic one and
the reference evaluator, on documents valid for the schema, on every backend: the same
documents, in the same order, page by page."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.backends.base import Backend
from proxy.config import Limits
from proxy.query.spec import FindSpec, build_find_spec
from tests import reference, strategies
from tests.backends import kinds_with, open_backend

pytestmark = pytest.mark.integration

LIMITS = Limits(max_filter_nodes=1000)
KINDS_OF = strategies.DECLARED_KINDS
_names = itertools.count()


class Env:
    def __init__(self, runner: asyncio.Runner, backend: Backend) -> None:
        self.runner = runner
        self.backend = backend

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def load(self, docs: list[dict[str, Any]]) -> str:
        name = f"t{next(_names)}"
        self.run(self.backend.insert_many(name, [{"probe": 1, "_id": "~probe"}]))
        self.run(self.backend.delete(name, "~probe"))
        if docs:
            result = self.run(self.backend.insert_many(name, docs))
            assert all(r.status == 201 for r in result), result
        return name

    def spec(self, raw: dict[str, Any], typed: bool) -> FindSpec:
        spec = build_find_spec(raw, LIMITS, from_url=False)
        return dataclasses.replace(spec, kinds=KINDS_OF) if typed else spec

    def ids(self, name: str, raw: dict[str, Any], typed: bool) -> list[str]:
        page = self.run(self.backend.find(name, self.spec({"limit": 1000, **raw}, typed)))
        return [orjson.loads(b)["_id"] for b in page.items]

    def pages(self, name: str, raw: dict[str, Any], typed: bool, size: int) -> list[str]:
        seen: list[str] = []
        nxt = None
        for _ in range(50):
            spec = self.spec({**raw, "limit": size, "next": nxt}, typed)
            page = self.run(self.backend.find(name, spec))
            seen += [orjson.loads(b)["_id"] for b in page.items]
            nxt = page.next
            if nxt is None:
                return seen
        raise AssertionError("pagination did not end")


@pytest.fixture(scope="module", params=kinds_with("schemas"))
def env(request: pytest.FixtureRequest, pg_dsn: str, tmp_path_factory: Any) -> Iterator[Env]:
    runner = asyncio.Runner()
    tmp: Path = tmp_path_factory.mktemp("declared")
    cm = open_backend(request.param, pg_dsn, LIMITS, str(tmp))
    backend = runner.run(cm.__aenter__())
    try:
        yield Env(runner, backend)
    finally:
        runner.run(cm.__aexit__(None, None, None))
        runner.close()


@settings(max_examples=150, deadline=None)
@given(docs=strategies.declared_document_lists(0, 10), flt=strategies.declared_filters())
def test_typed_filter_agrees_with_generic_and_reference(
    env: Env, docs: list[dict[str, Any]], flt: dict[str, Any]
) -> None:
    name = env.load(docs)
    expected = sorted(d["_id"] for d in docs if reference.matches(d, flt))
    generic = env.ids(name, {"filter": flt}, typed=False)
    typed = env.ids(name, {"filter": flt}, typed=True)
    assert sorted(generic) == expected, flt
    assert typed == generic, flt
    parsed = build_find_spec({"filter": flt}, LIMITS, from_url=False).filter
    assert env.run(env.backend.count(name, parsed, kinds=KINDS_OF)) == len(expected)


@settings(max_examples=100, deadline=None)
@given(
    docs=strategies.declared_document_lists(0, 12),
    sort=strategies.declared_sorts(),
    flt=st.one_of(st.just({}), strategies.declared_filters(depth=0)),
    size=st.integers(1, 4),
)
def test_typed_sort_and_cursors_agree(
    env: Env,
    docs: list[dict[str, Any]],
    sort: list[tuple[str, int]],
    flt: dict[str, Any],
    size: int,
) -> None:
    name = env.load(docs)
    raw = {"filter": flt, "sort": [[p, d] for p, d in sort]}
    matching = [d for d in docs if reference.matches(d, flt)]
    expected = [d["_id"] for d in reference.apply_sort(matching, sort)]
    assert env.ids(name, raw, typed=False) == expected
    assert env.ids(name, raw, typed=True) == expected, raw
    assert env.pages(name, raw, typed=True, size=size) == expected, raw


def test_typed_cursor_is_not_a_generic_one(env: Env) -> None:
    """A cursor of a typed sort is refused by the generic compilation (schema changed between
    pages): 400 invalid_cursor, never a wrong page."""
    from proxy.errors import InvalidQuery

    if hasattr(env.backend, "database"):
        pytest.skip(
            "MongoDB compiles a sort one way whatever the declared kinds (no typed SQL "
            "expressions), so a typed cursor is a generic one there"
        )
    name = env.load([{"_id": f"x{i}", "n": i} for i in range(3)])
    raw = {"sort": "n", "limit": 1}
    page = env.run(env.backend.find(name, env.spec(raw, typed=True)))
    assert page.next is not None
    with pytest.raises(InvalidQuery) as info:
        env.run(env.backend.find(name, env.spec({**raw, "next": page.next}, typed=False)))
    assert info.value.code == "invalid_cursor"
