"""The full-text search scenario's own parts (issue 17): its documents, its queries, the
hand-written SQL the baseline runs, the migration that declares what is searched, and the
answer check before any load; the rest goes through the common harness.

``bench_search`` holds SEARCH_DOCS documents ``{title, body}`` of words drawn (Zipf over a
vocabulary of made-up words) from a generator seeded with the document's number, declared
``set_search {"title": "A", "body": "C"}`` in English. A request searches two words of
middling frequency, the second typed as a prefix (what ``"q": "w1 w2"`` means: type-ahead),
20 hits with highlights: about 0.5 % of the documents match both.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any

import orjson

COLLECTION = "bench_search"
SEARCH_DOCS = 100_000
LIMIT = 20
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
VOCAB_SIZE = 3000
ZIPF_S = 1.0
TITLE_WORDS, BODY_WORDS = 6, 50
# the queried words: middling ranks, so both words of a query match a few hundred documents
QUERY_RANKS = range(30, 130)
DECLARATION = {"fields": {"title": "A", "body": "C"}, "language": "english"}
# the highlighter's options of both servers (the sidecar's, proxy.query.search_pg, with its
# own markers: it escapes the text and writes <mark> itself)
HEADLINE = (
    "StartSel=<mark>, StopSel=</mark>, MaxFragments=3, MaxWords=24, MinWords=8, "
    'ShortWord=0, FragmentDelimiter=" … "'
)
# the baseline: the same query written by hand over the sidecar's stored vector and GIN index
SQL = (
    "SELECT jsonb_build_object('collection', $4::text, '_id', r._id, 'score', r.s, "
    "'highlights', jsonb_build_object("
    "'title', ts_headline('english', r.doc ->> 'title', r.q, $3), "
    "'body', ts_headline('english', r.doc ->> 'body', r.q, $3)), 'document', r.doc)::text "
    "FROM (SELECT t._id, t.doc, ts_rank_cd(t._search, q.q, 32)::float8 AS s, q.q "
    "FROM dbproxy.\"{c}\" t, (SELECT plainto_tsquery('english', $1) && "
    "to_tsquery('english', $2) AS q) q WHERE t._search @@ q.q "
    "ORDER BY s DESC, t._id LIMIT {limit}) r ORDER BY r.s DESC, r._id"
)
WORD = re.compile(r"[a-z]{1,40}")


def _vocabulary() -> list[str]:
    rng = random.Random(1717)
    words: list[str] = []
    seen = set()
    while len(words) < VOCAB_SIZE:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


VOCAB = _vocabulary()
_CUM = list(itertools.accumulate(1 / (k**ZIPF_S) for k in range(1, VOCAB_SIZE + 1)))
QUERY_WORDS = [VOCAB[k] for k in QUERY_RANKS]


def search_id(i: int) -> str:
    return f"s-{i:06d}"


def search_doc(i: int) -> dict[str, Any]:
    """The i-th document (1-based) of bench_search."""
    rng = random.Random(i * 2654435761)
    words = rng.choices(VOCAB, cum_weights=_CUM, k=TITLE_WORDS + BODY_WORDS)
    return {
        "_id": search_id(i),
        "_version": 1,
        "title": " ".join(words[:TITLE_WORDS]).capitalize(),
        "body": " ".join(words[TITLE_WORDS:]).capitalize() + ".",
    }


def body(first: str, second: str) -> str:
    """One request of the scenario: two words, the second a prefix (type-ahead)."""
    return orjson.dumps(
        {"q": f"{first} {second}", "collections": [COLLECTION], "limit": LIMIT, "highlight": True}
    ).decode()


def baseline_args(q: Any) -> tuple[str, str] | None:
    """The baseline's two parameters from a request's ``q`` (two plain words), else None."""
    if not isinstance(q, str):
        return None
    words = q.split()
    if len(words) != 2 or not all(WORD.fullmatch(w) for w in words):
        return None
    return words[0], words[1] + ":*"


def migration_ops() -> list[dict[str, Any]]:
    return [{"op": "set_search", "collection": COLLECTION, "search": DECLARATION}]


def rows() -> list[tuple[str, str, int]]:
    """The COPY records (_id, doc, _version) of every document."""
    return [
        (d["_id"], orjson.dumps(d).decode(), 1) for d in map(search_doc, range(1, SEARCH_DOCS + 1))
    ]


def check(answers: dict[str, bytes]) -> list[str]:
    """The answers of each server to the same request: 20 hits, every hit highlighted, and
    the sidecar's ids, order and scores those of the hand-written SQL."""
    problems, ranked = [], {}
    for name, raw in answers.items():
        try:
            items = orjson.loads(raw)["items"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            problems.append(f"{name}: search answered {raw[:300]!r}")
            continue
        if len(items) != LIMIT:
            problems.append(f"{name}: search answered {len(items)} hits, expected {LIMIT}")
        if not all("<mark>" in "".join(it.get("highlights", {}).values()) for it in items):
            problems.append(f"{name}: a search hit without a highlighted match")
        ranked[name] = [(it["_id"], it["score"]) for it in items]
    base = ranked.get("baseline")
    for name, got in ranked.items():
        if base is None or name == "baseline":
            continue
        if [i for i, _ in got] != [i for i, _ in base]:
            problems.append(f"{name}: search hits {got[:3]} differ from the baseline's {base[:3]}")
        elif any(abs(a - b) > 1e-9 for (_, a), (_, b) in zip(got, base, strict=True)):
            problems.append(f"{name}: search scores differ from the baseline's")
    return problems
