"""The search benchmark's data and hand-written SQL (benchmarks/search.py, issue 17): on a
real PostgreSQL backend, the baseline's statement over the sidecar's own ``_search`` column
answers what the sidecar's search answers, and ``check`` tells them apart when they differ."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks import search
from proxy.config import Limits
from proxy.migrate.ops import parse_migration
from proxy.migrate.runner import MigrationRunner
from proxy.pipeline.core import Core
from tests.backends import open_core

pytestmark = pytest.mark.integration
_ids = itertools.count()
N = 3000


@pytest.fixture
async def core(pg_dsn: str, tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core("postgresql", pg_dsn, Limits(), str(tmp_path)) as c:
        docs = [search.search_doc(i) for i in range(1, N + 1)]
        for start in range(0, N, 1000):
            await c.create(search.COLLECTION, docs[start : start + 1000])
        runner = MigrationRunner({"main": c.backend().migrations()}, "main")
        raw = {
            "id": f"bs{next(_ids)}",
            "version": 1,
            "script": {"operations": search.migration_ops()},
        }
        await runner.submit(parse_migration(raw))
        await c.refresh_schemas()
        yield c


async def _baseline(core: Core, q: str) -> bytes:
    args = search.baseline_args(q)
    assert args is not None
    backend: Any = core.backend()
    sql = search.SQL.format(c=search.COLLECTION, limit=search.LIMIT).replace(
        'dbproxy."', f'"{backend.schema}"."'
    )
    async with backend._conn() as conn:
        rows = await conn.fetch(sql, *args, search.HEADLINE, search.COLLECTION)
    return b'{"items":[' + b",".join(r[0].encode() for r in rows) + b"]}"


def test_the_documents_are_deterministic_and_use_the_vocabulary() -> None:
    a, b = search.search_doc(42), search.search_doc(42)
    assert a == b and a["_id"] == search.search_id(42)
    assert len(a["title"].split()) == search.TITLE_WORDS
    assert len(a["body"].split()) == search.BODY_WORDS
    words = {w.strip(".,").lower() for w in a["body"].split()}
    assert words <= set(search.VOCAB)
    assert search.baseline_args("ab cd") == ("ab", "cd:*")
    assert search.baseline_args("ab; DROP") is None and search.baseline_args(3) is None


async def test_the_hand_written_sql_answers_what_the_sidecar_answers(core: Core) -> None:
    # the most frequent words, so that 3,000 documents give 20 hits for both words
    first, second = search.VOCAB[0], search.VOCAB[1]
    q = f"{first} {second[:-1]}"
    body = orjson.loads(search.body(first, second[:-1]))
    assert body["q"] == q
    got = await core.search(body)
    sidecar = orjson.dumps(got)
    baseline = await _baseline(core, q)
    assert len(got["items"]) == search.LIMIT
    assert search.check({"sidecar": sidecar, "baseline": baseline}) == []
    # and check() is not blind: a different order or score is reported
    items = orjson.loads(baseline)["items"]
    swapped = [items[1], items[0], *items[2:]]
    moved = orjson.dumps({"items": swapped})
    assert search.check({"sidecar": moved, "baseline": baseline}) != [] or (
        items[0]["score"] == items[1]["score"]
    )
    off = [{**items[0], "score": items[0]["score"] + 1}, *items[1:]]
    problems = search.check({"sidecar": orjson.dumps({"items": off}), "baseline": baseline})
    assert problems == ["sidecar: search scores differ from the baseline's"]
