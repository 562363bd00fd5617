"""Full-text search on every backend, through the core: declaration by migration, the
syntax, ranking by weight, ties, keyset pages, totals, highlights, the row guard, and
what a caller may not read (docs: README "Full-text search")."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Limits
from proxy.errors import ProxyError
from proxy.migrate.ops import parse_migration
from proxy.migrate.runner import MigrationRunner
from proxy.pipeline.core import Core
from tests.backends import kinds_with, open_core

pytestmark = pytest.mark.integration
_ids = itertools.count()

ARTICLES = [
    {"_id": "a1", "title": "Running dogs", "body": "A story about a cat.", "team": "x"},
    {"_id": "a2", "title": "Cats", "body": "dogs are running in the park", "team": "x"},
    {"_id": "a3", "title": "Birds", "body": "nothing to see here", "team": "y"},
    {"_id": "a4", "title": "Parks", "body": "the dog park opens at noon", "team": "y"},
]
DECLARED = {"fields": {"title": "A", "body": "C"}, "language": "english"}


@pytest.fixture(scope="module", params=kinds_with("search"))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def core(kind: str, pg_dsn: str, tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(kind, pg_dsn, Limits(), str(tmp_path)) as c:
        yield c


async def migrate(core: Core, *operations: dict[str, Any]) -> dict[str, Any]:
    runner = MigrationRunner(
        {"main": core.backend().migrations()},
        "main",
        schemas_changed=lambda _: core.refresh_schemas(),
    )
    raw = {"id": f"m{next(_ids)}", "version": 1, "script": {"operations": list(operations)}}
    out = await runner.submit(parse_migration(raw))
    await core.refresh_schemas()
    return dict(out.record) if hasattr(out, "record") else {}


async def declare(core: Core, collection: str, search: dict[str, Any] | None) -> None:
    await migrate(core, {"op": "set_search", "collection": collection, "search": search})


async def search(core: Core, q: str, **body: Any) -> dict[str, Any]:
    return await core.search({"q": q, **body})


def ids(answer: dict[str, Any]) -> list[str]:
    return [i["_id"] for i in answer["items"]]


async def articles(core: Core, declared: bool = True) -> None:
    await core.create("articles", [dict(d) for d in ARTICLES])
    if declared:
        await declare(core, "articles", DECLARED)


async def test_declared_search_ranks_the_title_weight_first(core: Core) -> None:
    await articles(core)
    plain = await search(core, "dogs running", collections=["articles"], highlight=False)
    assert ids(plain) == ["a1", "a2"] and all("highlights" not in i for i in plain["items"])
    got = await search(core, "dogs running", collections=["articles"])
    assert ids(got) == ["a1", "a2"]  # both words in the title (A) beat the body (C)
    first, second = got["items"]
    assert first["score"] > second["score"] > 0
    assert first["collection"] == "articles"
    assert first["document"]["title"] == "Running dogs"
    assert "<mark>" in first["highlights"]["title"]
    assert got["next"] is None


async def test_the_syntax(core: Core) -> None:
    await articles(core)
    assert set(ids(await search(core, "dog", collections=["articles"]))) == {"a1", "a2", "a4"}
    assert ids(await search(core, '"dog park"', collections=["articles"])) == ["a4"]
    assert set(ids(await search(core, "dog -park", collections=["articles"]))) == {"a1"}
    # stemmed: "cats" finds a1's "cat" too
    found = set(ids(await search(core, "birds or cats", collections=["articles"])))
    assert found == {"a1", "a2", "a3"}
    assert set(ids(await search(core, "par", collections=["articles"]))) == {"a2", "a4"}  # prefix
    for odd in ["&|!:*()<->'\\", '"unclosed', "-", "or", "a & b | !c", "dog:* & (x"]:
        got = await search(core, odd, collections=["articles"])  # never an error
        assert isinstance(got["items"], list)


async def test_every_write_keeps_the_index(core: Core) -> None:
    await declare(core, "notes", {"fields": {"text": "A"}, "language": "simple"})
    await core.create("notes", {"_id": "n1", "text": "alpha"})
    await core.create("notes", [{"_id": "n2", "text": "beta"}, {"_id": "n3", "text": "alpha"}])
    assert set(ids(await search(core, "alpha", collections=["notes"]))) == {"n1", "n3"}
    await core.replace_or_update("notes", "n1", {"text": "gamma"})
    await core.replace_or_update("notes", "n3", {"$set": {"text": "delta"}})
    await core.merge_patch("notes", "n2", {"text": "alpha beta"})
    await core.replace_or_update("notes", "n9", {"$set": {"text": "omega"}}, upsert=True)
    assert ids(await search(core, "omega", collections=["notes"])) == ["n9"]
    assert ids(await search(core, "alpha", collections=["notes"])) == ["n2"]
    await core.delete("notes", "n2")
    assert ids(await search(core, "alpha", collections=["notes"])) == []
    assert ids(await search(core, "gamma", collections=["notes"])) == ["n1"]


async def test_undeclared_collections_search_every_string(core: Core) -> None:
    await core.create(
        "loose",
        [
            {"_id": "l1", "a": {"b": "hidden treasure"}, "tags": ["red", "green"]},
            {"_id": "l2", "a": 5, "other": "treasure map"},
        ],
    )
    assert set(ids(await search(core, "treasure", collections=["loose"]))) == {"l1", "l2"}
    got = await search(core, "green", collections=["loose"])
    assert ids(got) == ["l1"]
    assert got["items"][0]["highlights"] == {"tags": "<mark>green</mark>"}


async def test_across_collections_ties_and_pages(core: Core) -> None:
    for name in ("zeta", "alpha"):
        await core.create(name, [{"_id": f"{k:02}", "t": "same words"} for k in range(5)])
    everything = await search(core, "same", limit=100)
    order = [(i["collection"], i["_id"]) for i in everything["items"]]
    assert order == [("alpha", f"{k:02}") for k in range(5)] + [
        ("zeta", f"{k:02}") for k in range(5)
    ]
    seen: list[tuple[str, str]] = []
    body: dict[str, Any] = {"limit": 3, "total": True}
    while True:
        page = await search(core, "same", **body)
        assert page["total"] == 10
        seen += [(i["collection"], i["_id"]) for i in page["items"]]
        if page["next"] is None:
            break
        body["next"] = page["next"]
    assert seen == order
    with pytest.raises(ProxyError) as info:
        await search(core, "other", next=everything["next"] or page["next"] or "bad")
    assert info.value.code == "invalid_cursor"


async def test_highlights_are_escaped_and_long_text_is_cut(core: Core) -> None:
    long = " ".join(["filler"] * 200 + ["needle"] + ["filler"] * 200)
    await core.create("h", [{"_id": "1", "t": "x < y & needle"}, {"_id": "2", "t": long}])
    got = await search(core, "needle", collections=["h"])
    marks = {i["_id"]: i["highlights"]["t"] for i in got["items"]}
    assert marks["1"] == "x &lt; y &amp; <mark>needle</mark>"
    assert "<mark>needle</mark>" in marks["2"] and len(marks["2"]) < 400
    plain = await search(core, "needle", collections=["h"], highlight=False)
    assert all("highlights" not in i for i in plain["items"])


async def test_the_filter_guards_rows(core: Core) -> None:
    await articles(core)
    got = await search(core, "dog", collections=["articles"], filter={"team": "y"})
    assert ids(got) == ["a4"]


async def test_set_search_reruns_changes_and_removes(core: Core) -> None:
    await articles(core)
    await declare(core, "articles", DECLARED)  # the same again: nothing changes
    described = await core.describe_schema("articles")
    assert described["schema"]["search"] == DECLARED
    await declare(core, "articles", {"fields": {"body": "A"}, "language": "simple"})
    # "running" is no longer stemmed, and the title is no longer searched
    assert ids(await search(core, "birds", collections=["articles"])) == []
    assert ids(await search(core, "running", collections=["articles"])) == ["a2"]
    await declare(core, "articles", None)  # undeclared: every string again
    assert ids(await search(core, "birds", collections=["articles"])) == ["a3"]


async def test_bad_declarations_are_refused(core: Core) -> None:
    for bad in (
        {"fields": {}},
        {"fields": {"t": "E"}},
        {"fields": {"t": "A"}, "language": "klingon"},
        {"fields": {"_id": "A"}},
        {"fields": {"a": "A", "a.b": "B"}},
        {"fields": {"t": "A"}, "extra": 1},
    ):
        with pytest.raises(ProxyError) as info:
            await declare(core, "articles", bad)
        assert info.value.status == 400, bad
