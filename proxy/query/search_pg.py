"""PostgreSQL compiler of a SearchQuery: one tsquery expression built only from
plainto_tsquery / phraseto_tsquery / to_tsquery over bound, sanitised words."""

from __future__ import annotations

from proxy.query.pg import Params
from proxy.query.search import SearchQuery, Term

NOTHING = "''::tsquery"  # the empty tsquery: ``tsvector @@ it`` is false for every document


def prefix_operand(word: str) -> str:
    """The to_tsquery input for a prefix word: the sanitised word (word characters only, see
    search.is_word) with ``:*`` appended, so it can hold no tsquery operator."""
    return f"{word}:*"


def pg_tsquery(query: SearchQuery, config_param: str, params: Params) -> str:
    """A SQL expression of type tsquery for ``query``; ``config_param`` is a SQL expression
    of type regconfig (e.g. ``params.add("english", "regconfig")``). Every word is a bound
    parameter; the SQL text depends only on the query's shape."""
    if query.empty:
        return NOTHING
    c = _Compiler(config_param, params)
    last = len(query.groups) - 1
    # one-word groups (the prefix word aside) go into ONE plainto_tsquery, which ANDs them
    plain = [
        g.terms[0].words[0]
        for k, g in enumerate(query.groups)
        if len(g.terms) == 1 and not g.terms[0].is_phrase and not (query.prefix and k == last)
    ]
    parts = [c.plain(" ".join(plain))] if plain else []
    for k, group in enumerate(query.groups):
        prefix = query.prefix and k == last
        if len(group.terms) == 1 and not group.terms[0].is_phrase and not prefix:
            continue
        n = len(group.terms) - 1
        ors = [c.term(t, prefix and i == n) for i, t in enumerate(group.terms)]
        parts.append(ors[0] if len(ors) == 1 else "(" + " || ".join(ors) + ")")
    positive = parts[0] if len(parts) == 1 else "(" + " && ".join(parts) + ")"
    if not query.excluded:
        return positive
    # a positive part of stop words only is the empty tsquery, and '' && !!x is !!x, which
    # would match every document without x: such a query matches nothing instead
    negative = " && ".join(f"(!! {c.term(t, False)})" for t in query.excluded)
    return f"(CASE WHEN numnode({positive}) = 0 THEN {NOTHING} ELSE {positive} && {negative} END)"


class _Compiler:
    __slots__ = ("cfg", "p")

    def __init__(self, cfg: str, params: Params) -> None:
        self.cfg = cfg
        self.p = params

    def plain(self, text: str) -> str:
        return f"plainto_tsquery({self.cfg}, {self.p.add(text, 'text')})"

    def term(self, term: Term, prefix: bool) -> str:
        words = term.words
        if not prefix:
            if term.is_phrase:
                return f"phraseto_tsquery({self.cfg}, {self.p.add(' '.join(words), 'text')})"
            return self.plain(words[0])
        head = ""
        if len(words) > 1:
            head = f"phraseto_tsquery({self.cfg}, {self.p.add(' '.join(words[:-1]), 'text')}) <-> "
        last = f"to_tsquery({self.cfg}, {self.p.add(prefix_operand(words[-1]), 'text')})"
        return f"({head}{last})" if head else last
