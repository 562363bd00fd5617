"""SQLite FTS5 compiler of a SearchQuery: one MATCH expression (bound as a single parameter)
of double-quoted strings joined by AND / OR / NOT."""

from __future__ import annotations

from proxy.query.search import SearchQuery, Term


def fts5_string(text: str) -> str:
    """An FTS5 string: double-quoted, any ``"`` doubled (so nothing in it is syntax)."""
    return '"' + text.replace('"', '""') + '"'


def _term(term: Term, prefix: bool) -> str:
    # a phrase is one string (FTS5 tokenizes it into adjacent tokens); ``*`` after a string
    # makes its last token a prefix
    return fts5_string(" ".join(term.words)) + ("*" if prefix else "")


def fts5_match(query: SearchQuery) -> str | None:
    """The MATCH expression for ``query``, or None when it matches nothing (FTS5's NOT is
    binary: a query of excluded terms only cannot be written, and means nothing anyway)."""
    if query.empty:
        return None
    last = len(query.groups) - 1
    ands: list[str] = []
    for k, group in enumerate(query.groups):
        n = len(group.terms) - 1
        ors = [_term(t, query.prefix and k == last and i == n) for i, t in enumerate(group.terms)]
        ands.append(ors[0] if len(ors) == 1 else "(" + " OR ".join(ors) + ")")
    expr = " AND ".join(ands)
    if not query.excluded:
        return expr
    return f"({expr})" + "".join(f" NOT {_term(t, False)}" for t in query.excluded)
