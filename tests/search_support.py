"""Shared by the search syntax tests: hostile query texts, well-formedness checks of the
compiled PostgreSQL / FTS5 expressions, and a reference evaluator of SearchQuery."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from proxy.query.search import SearchQuery, Term, is_word
from proxy.query.search_pg import NOTHING

SYNTAX_CHARS = "&|!:*()<->'\\\"-_^+~{}[],.;/%@#$=? \t"  # syntax of some query parser
# pieces that mean something to some query parser (tsquery, FTS5, ours), words, marks
PIECES = (
    *SYNTAX_CHARS,
    ":*",
    "<->",
    "<2>",
    "!!",
    "&&",
    "||",
    "''",
    '""',
    "\\'",
    "AND",
    "NOT",
    "NEAR",
    "OR",
    "or",
    "Or",
    " ",
    "  ",
    "\t",
    "\n",
    "\x00",
    "foo",
    "bar",
    "databa",
    "the",
    "a",
    "é",
    "e\u0301",
    "\u0301",
    "ß",
    "Σ",
    "İ",
    "日本",
    "١٢",
    "²",
    "\u200b",
    "\u3000",
    "x" * 30,
)


def search_texts(max_size: int = 40) -> st.SearchStrategy[str]:
    """Arbitrary text, and text assembled from pieces that are syntax somewhere."""
    pieces = st.lists(st.sampled_from(PIECES), max_size=max_size).map("".join)
    return st.one_of(
        st.text(max_size=max_size), pieces, st.text(alphabet=SYNTAX_CHARS + "ab\u0301é")
    )


# ---- PostgreSQL: the expression is made only of these tokens ------------------------------

_PG_TOKEN = re.compile(
    r"\s+|plainto_tsquery|phraseto_tsquery|to_tsquery|numnode|CASE|WHEN|THEN|ELSE|END"
    r"|''::tsquery|\$\d+::text|&&|\|\||!!|<->|=|0|\(|\)|,"
)


def check_pg(sql: str, values: Sequence[Any], cfg: str) -> None:
    """``sql`` is built from the allowed functions and operators over bound parameters only;
    every bound word is sanitised; to_tsquery's operands are ``word:*``."""
    rest = sql.replace(cfg, "")
    pos, depth = 0, 0
    while pos < len(rest):
        m = _PG_TOKEN.match(rest, pos)
        assert m is not None, f"unexpected SQL text at {rest[pos : pos + 30]!r} in {sql!r}"
        depth += {"(": 1, ")": -1}.get(m.group(), 0)
        assert depth >= 0, sql
        pos = m.end()
    assert depth == 0, sql
    used = {int(n) for n in re.findall(r"\$(\d+)::text", sql)}
    calls = re.findall(r"(\w+)\(" + re.escape(cfg) + r", \$(\d+)::text\)", sql)
    assert used == {int(n) for _, n in calls}, sql  # every parameter is a function's text
    for func, n in calls:
        value = values[int(n) - 1]
        assert isinstance(value, str)
        if func == "to_tsquery":
            assert value.endswith(":*") and is_word(value[:-2]), value
        else:
            assert func in ("plainto_tsquery", "phraseto_tsquery"), func
            assert all(is_word(w) for w in value.split(" ")), value
    assert used <= set(range(1, len(values) + 1))


# ---- FTS5: strings, AND / OR / NOT and parentheses only -------------------------------------

_FTS5_TOKEN = re.compile(r'\s+|"(?:[^"]|"")*"\*?|AND|OR|NOT|\(|\)')


def check_fts5(expr: str) -> None:
    pos, depth = 0, 0
    while pos < len(expr):
        m = _FTS5_TOKEN.match(expr, pos)
        assert m is not None, f"unexpected FTS5 text at {expr[pos : pos + 30]!r} in {expr!r}"
        tok = m.group()
        depth += {"(": 1, ")": -1}.get(tok, 0)
        assert depth >= 0, expr
        if tok.startswith('"'):
            inner = tok.rstrip("*")[1:-1]
            assert '"' not in inner.replace('""', ""), tok
            assert all(is_word(w) for w in inner.split(" ")), tok
        pos = m.end()
    assert depth == 0, expr


def check_compiled(query: SearchQuery) -> None:
    from proxy.query.pg import Params
    from proxy.query.search_pg import pg_tsquery
    from proxy.query.search_sqlite import fts5_match

    params = Params(["english"])
    sql = pg_tsquery(query, "$1::regconfig", params)
    if query.empty:
        assert sql == NOTHING
        assert fts5_match(query) is None
        return
    check_pg(sql, params.values, "$1::regconfig")
    match = fts5_match(query)
    assert match is not None
    check_fts5(match)


# ---- reference semantics over a document's words (no stemming, no stop words) ----------------


def term_matches(term: Term, words: Sequence[str], prefix: bool) -> bool:
    n = len(term.words)
    for i in range(len(words) - n + 1):
        head = all(words[i + j] == term.words[j] for j in range(n - 1))
        last = words[i + n - 1]
        if head and (last.startswith(term.words[-1]) if prefix else last == term.words[-1]):
            return True
    return False


def reference_matches(query: SearchQuery, words: Sequence[str]) -> bool:
    if query.empty:
        return False
    last = len(query.groups) - 1
    for k, group in enumerate(query.groups):
        n = len(group.terms) - 1
        if not any(
            term_matches(t, words, query.prefix and k == last and i == n)
            for i, t in enumerate(group.terms)
        ):
            return False
    return not any(term_matches(t, words, False) for t in query.excluded)
