"""The compiled search queries on the real engines: PostgreSQL evaluates every tsquery
expression and SQLite FTS5 every MATCH string, for any text; exact results for the syntax."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.query.pg import Params
from proxy.query.search import SearchQuery, fold_case, parse_query, words_of
from proxy.query.search_pg import pg_tsquery
from proxy.query.search_sqlite import fts5_match
from tests.search_support import reference_matches, search_texts

pytestmark = pytest.mark.integration

_ADMIN = os.environ.get("DBPROXY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TEST_DSN = _ADMIN.rpartition("/")[0] + "/test"  # no tables: only expressions are evaluated
DOC = "The quick brown fox jumps over the lazy dog; databases running e-mail foo_bar 日本語 café"


class Pg:
    """One connection to the machine's PostgreSQL, driven from synchronous hypothesis tests."""

    def __init__(self, runner: asyncio.Runner, conn: asyncpg.Connection) -> None:
        self.runner = runner
        self.conn = conn
        self.notices: list[str] = []
        conn.add_log_listener(lambda _c, msg: self.notices.append(msg.message))

    def matches(self, query: SearchQuery, doc: str, config: str) -> bool:
        params = Params([config, doc])
        expr = pg_tsquery(query, "$1::regconfig", params)
        sql = f"SELECT to_tsvector($1::regconfig, $2::text) @@ {expr}"
        result = self.runner.run(self.conn.fetchval(sql, *params.values))
        assert isinstance(result, bool)
        return result


@pytest.fixture(scope="module")
def pg() -> Iterator[Pg]:
    runner = asyncio.Runner()
    conn = runner.run(asyncpg.connect(TEST_DSN))
    try:
        yield Pg(runner, conn)
    finally:
        runner.run(conn.close())
        runner.close()


class Fts:
    """An in-memory FTS5 table per tokenizer, one document in each."""

    def __init__(self) -> None:
        self.db = sqlite3.connect(":memory:")

    def table(self, doc: str, tokenize: str = "unicode61") -> str:
        name = f"t{abs(hash((doc, tokenize)))}"
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone():
            self.db.execute(
                f"CREATE VIRTUAL TABLE {name} USING fts5(body, tokenize = '{tokenize}')"
            )
            self.db.execute(f"INSERT INTO {name} (body) VALUES (?)", (doc,))
        return name

    def matches(self, query: SearchQuery, doc: str, tokenize: str = "unicode61") -> bool:
        expr = fts5_match(query)
        if expr is None:
            return False
        name = self.table(doc, tokenize)
        row = self.db.execute(f"SELECT count(*) FROM {name} WHERE {name} MATCH ?", (expr,))
        return bool(row.fetchone()[0])


@pytest.fixture(scope="module")
def fts() -> Iterator[Fts]:
    f = Fts()
    try:
        yield f
    finally:
        f.db.close()


# ---- any text is evaluated without error ---------------------------------------------------


@given(q=search_texts(60))
def test_postgres_evaluates_any_text(pg: Pg, q: str) -> None:
    query = parse_query(q)
    for config in ("english", "simple"):
        got = pg.matches(query, DOC, config)
        assert got is False or not query.empty


@given(q=search_texts(1000))
def test_postgres_evaluates_long_texts(pg: Pg, q: str) -> None:
    pg.matches(parse_query(q[:1000]), DOC, "english")


@given(q=search_texts(60))
def test_fts5_evaluates_any_text(fts: Fts, q: str) -> None:
    query = parse_query(q)
    for tokenize in ("unicode61", "porter unicode61", "unicode61 remove_diacritics 2"):
        fts.matches(query, DOC, tokenize)


@given(q=search_texts(1000))
def test_fts5_evaluates_long_texts(fts: Fts, q: str) -> None:
    fts.matches(parse_query(q[:1000]), DOC)


def test_largest_queries(pg: Pg, fts: Fts) -> None:
    for q in ("a " * 500, "a or " * 199 + "zz ", "-a " * 330 + "zz ", '"a" ' * 250, "ab" * 500):
        assert len(q) <= 1000
        query = parse_query(q)
        assert not pg.matches(query, DOC, "simple")
        assert not fts.matches(query, DOC)


# ---- both engines agree with the reference semantics (no stemming, no stop words) -----------

VOCAB = ("a", "b", "ab", "abc", "ba", "bab")
QUERY_PIECES = (*VOCAB, "or", "OR", "-", '"', " ", " ", " ", "&", "!", ":*", "x")


@given(
    doc=st.lists(st.sampled_from(VOCAB), max_size=8).map(" ".join),
    q=st.lists(st.sampled_from(QUERY_PIECES), max_size=12).map("".join),
)
def test_engines_agree_with_reference(pg: Pg, fts: Fts, doc: str, q: str) -> None:
    query = parse_query(q)
    expected = reference_matches(query, words_of(fold_case(doc)))
    assert pg.matches(query, doc, "simple") is expected, (q, doc, query)
    assert fts.matches(query, doc) is expected, (q, doc, query)


# ---- exact results --------------------------------------------------------------------------

ENGLISH_CASES = [
    ('"quick brown"', True),
    ('"brown quick"', False),  # a phrase matches only in order
    ('"quick fox"', False),  # ... and only adjacent
    ("fox -quick", False),
    ("fox -cat", True),
    ('fox -"brown quick"', True),
    ('fox -"quick brown"', False),
    ("cat or fox", True),
    ("cat or dog", True),
    ("cat or cow", False),
    ("cat or cow fox", False),  # (cat OR cow) AND fox
    ("fox cat or cow", False),
    ("databa", True),  # type-ahead: the last word is a prefix
    ("databa ", False),  # ... a finished word is not
    ("quick databa", True),
    ('"quick bro', True),
    ('"quick fo', False),
    ('"the quic', True),  # a stop word in a type-ahead phrase is dropped
    ("run", True),  # stemming: running → run
    ("runs", True),
    ("RUNNING ", True),
    ("the fox", True),  # a stop word is ignored
    ("the", False),  # ... a query of stop words only matches nothing
    ("the -fox", False),
    ("the -cat", False),  # not "every document without cat"
    ("-the fox", True),
    ("fox & !quick", True),  # operator characters are plain text: fox AND quick
    ("fox:* <-> | cat", False),  # fox AND cat
    ("'fox' \\& quick)", True),
    ("e-mail", True),
    ("foo_bar", True),
    ("日本語 café", True),
    ("CAFÉ", True),
]


@pytest.mark.parametrize(("q", "expected"), ENGLISH_CASES)
def test_postgres_english(pg: Pg, q: str, expected: bool) -> None:
    assert pg.matches(parse_query(q), DOC, "english") is expected


FTS5_CASES = [
    *[(q, e) for q, e in ENGLISH_CASES if not q.lower().startswith(("the", "run", "-the"))],
    ("the fox", True),  # FTS5 has no stop words: "the" is in the document
    ("the -fox", False),
    ("the -cat", True),
    ("-the fox", False),
    ("run ", False),  # no stemming with unicode61
    ("running", True),
]


@pytest.mark.parametrize(("q", "expected"), FTS5_CASES)
def test_fts5_unicode61(fts: Fts, q: str, expected: bool) -> None:
    assert fts.matches(parse_query(q), DOC) is expected


@pytest.mark.parametrize(("q", "expected"), [("run ", True), ("runs ", True), ("ran ", False)])
def test_fts5_porter_stems(fts: Fts, q: str, expected: bool) -> None:
    assert fts.matches(parse_query(q), DOC, "porter unicode61") is expected


@pytest.mark.parametrize("config", ["english", "simple"])
def test_postgres_simple_and_english_agree_without_stems(pg: Pg, config: str) -> None:
    assert pg.matches(parse_query('"lazy dog"'), DOC, config)
    assert not pg.matches(parse_query('"dog lazy"'), DOC, config)
    assert pg.matches(parse_query("jump "), DOC, config) is (config == "english")


def test_stop_word_only_query_raises_no_error(pg: Pg) -> None:
    pg.notices.clear()
    assert not pg.matches(parse_query("the a of"), DOC, "english")
    assert all("stop words" in n or "lexemes" in n for n in pg.notices)


def test_postgres_known_phrase_gaps(pg: Pg) -> None:
    """Pinned PostgreSQL behaviours (the backends' docs must say so): the parser indexes a
    hyphenated word whole and then its parts, so a phrase running into it from before misses;
    and a stop word before a type-ahead prefix word loses its position."""
    doc = "send e-mail now; big fat the cat"
    assert pg.matches(parse_query('"e-mail now"'), doc, "simple")
    assert not pg.matches(parse_query('"send e-mail"'), doc, "simple")
    assert pg.matches(parse_query('"big fat the cat"'), doc, "english")
    assert not pg.matches(parse_query('"big fat the ca'), doc, "english")
