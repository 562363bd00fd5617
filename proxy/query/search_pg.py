"""PostgreSQL compiler of a SearchQuery: one tsquery expression built only from
plainto_tsquery / phraseto_tsquery / to_tsquery over bound, sanitised words."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from proxy.query.pg import FilterCompiler, Params
from proxy.query.search import (
    FRAGMENT_SEPARATOR,
    FRAGMENT_WORDS,
    MARK_START,
    MARK_STOP,
    Keyset,
    SearchQuery,
    SearchRequest,
    SearchTarget,
    Term,
    has_mark,
    marked,
)
from proxy.schema.model import (
    SEARCH_LANGUAGES,
    SEARCH_WEIGHTS,
    UNDECLARED_LANGUAGE,
    SearchDeclaration,
)

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


# ---- the stored vector and the search statement -------------------------------------------

SEARCH_COLUMN = "_search"
_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HEADLINE_OPTIONS = (
    f"StartSel={MARK_START}, StopSel={MARK_STOP}, MaxFragments=3, "
    f"MaxWords={FRAGMENT_WORDS}, MinWords={FRAGMENT_WORDS // 3}, ShortWord=0, "
    f'FragmentDelimiter="{FRAGMENT_SEPARATOR}"'
)


def _path_literal(path: tuple[str, ...]) -> str:
    """A declared path as SQL text (DDL takes no parameters): its segments are identifier
    characters only (schema.model.parse_path), checked again here."""
    if not all(_SEGMENT.fullmatch(s) for s in path):
        raise ValueError(f"not a declared path: {path!r:.80}")
    return "ARRAY[" + ", ".join(f"'{s}'" for s in path) + "]::text[]"


def _language_literal(language: str) -> str:
    if language not in SEARCH_LANGUAGES:
        raise ValueError(f"not a text-search configuration: {language!r:.80}")
    return f"'{language}'::regconfig"


def field_vector(path: tuple[str, ...], weight: str, language: str, doc: str = "doc") -> str:
    """One field's weighted tsvector: every string in its value (a string, or the strings
    inside an array or object)."""
    if weight not in SEARCH_WEIGHTS:
        raise ValueError(f"not a weight: {weight!r}")
    value = f"COALESCE({doc} #> {_path_literal(path)}, 'null'::jsonb)"
    return (
        f"setweight(jsonb_to_tsvector({_language_literal(language)}, {value}, "
        f"'[\"string\"]'), '{weight}')"
    )


def declared_vector(
    fields: tuple[tuple[tuple[str, ...], str], ...], language: str, doc: str = "doc"
) -> str:
    """The tsvector of declared fields (the stored column's expression: immutable, and
    built from validated names only)."""
    return " || ".join(field_vector(p, w, language, doc) for p, w in fields)


def column_ddl(table: str, index: str, declared: SearchDeclaration) -> list[str]:
    """The statements that give ``table`` its stored vector and GIN index ``index`` (after
    any old one was dropped): PostgreSQL keeps the column in the statement of every write."""
    return [
        f"ALTER TABLE {table} ADD COLUMN {SEARCH_COLUMN} tsvector GENERATED ALWAYS AS "
        f"({declared_vector(declared.fields, declared.language)}) STORED",
        f'CREATE INDEX "{index}" ON {table} USING gin ({SEARCH_COLUMN})',
    ]


class SearchLayout:
    """Where each column of the search statement's rows is."""

    COLLECTION, ID, SCORE, DOC, HEADLINE, TOTAL = range(6)


def compile_search(
    request: SearchRequest, schema: str, tables: Mapping[str, str]
) -> tuple[str, list[Any]] | None:
    """One statement for the whole request (see SearchRequest), its rows laid out as
    SearchLayout says (HEADLINE: the page's searched fields as jsonb with the matches
    bracketed, NULL without ``highlight``; TOTAL: the exact count, NULL without ``total``).
    ``tables``: the targets that have a table. None: no target can match."""
    if request.query.empty:
        return None
    p = Params()
    queries: dict[str, str] = {}

    def tsquery(language: str) -> str:
        if language not in queries:  # a scalar subquery (InitPlan): computed once
            cfg = p.add(language, "regconfig")
            queries[language] = f"(SELECT {pg_tsquery(request.query, cfg, p)})"
        return queries[language]

    options = p.add(HEADLINE_OPTIONS, "text") if request.highlight else ""
    branches: list[str] = []
    headlines: list[str] = []
    for target in request.targets:
        table = tables.get(target.collection)
        searched = target.searched()
        if table is None or (searched is not None and not searched):
            continue  # no table, or every declared field is hidden from this caller
        declared = target.declared
        language = declared.language if declared is not None else UNDECLARED_LANGUAGE
        cfg = _language_literal(language)
        q = tsquery(language)
        vector, strings, prefilter = _target_vector(request, target, searched, schema, q, p)
        conds = [f"{prefilter}{vector} @@ {q}"]
        if target.guard is not None:
            conds.append(FilterCompiler(p).where(target.guard, "t.doc"))
        name = p.add(target.collection, "text")
        branches.append(
            f"SELECT {name} AS c, t._id, ts_rank_cd({vector}, {q}, 32)::float8 AS s, t.doc "
            f"FROM {table} t WHERE {' AND '.join(conds)}"
        )
        if request.highlight:
            hl = f"ts_headline({cfg}, {strings('r.doc')}, {q}, {options})"
            headlines.append(f"WHEN {name} THEN {hl}")
    if not branches:
        return None
    keyset = _keyset(request.after, p)
    limit = p.add(request.limit + 1, "bigint")
    headline = f"(CASE r.c {' '.join(headlines)} END)::text" if headlines else "NULL::text"
    total = "(SELECT count(*) FROM m)" if request.total else "NULL::bigint"
    order = 's DESC, c COLLATE "C", _id COLLATE "C"'
    sql = (
        f"WITH m AS NOT MATERIALIZED ({' UNION ALL '.join(branches)}), "
        f"r AS (SELECT * FROM m{keyset} ORDER BY {order} LIMIT {limit}) "
        f"SELECT r.c, r._id, r.s, r.doc::text, {headline}, {total} FROM r "
        'ORDER BY r.s DESC, r.c COLLATE "C", r._id COLLATE "C"'
    )
    return sql, p.values


def _target_vector(
    request: SearchRequest,
    target: SearchTarget,
    searched: tuple[tuple[tuple[str, ...], str], ...] | None,
    schema: str,
    q: str,
    p: Params,
) -> tuple[str, Callable[[str], str], str]:
    """One target's (vector, searched strings of a row alias, prefilter): the stored vector
    when every declared field is searched, else one made from the searched fields (the
    stored one a prefilter), or an undeclared collection's readable strings."""
    declared = target.declared
    if searched is None:
        names = None if target.readable is None else p.add(sorted(target.readable), "text[]")
        strings = _all_strings(schema, names)
        cfg = _language_literal(UNDECLARED_LANGUAGE if declared is None else declared.language)
        return f"jsonb_to_tsvector({cfg}, {strings('t.doc')}, '[\"string\"]')", strings, ""
    # the highlighter's field names: bound only when used (an unused parameter has no type
    # PostgreSQL can infer)
    keys = [
        (p.add(".".join(path), "text") if request.highlight else "", _path_literal(path))
        for path, _ in searched
    ]
    strings = _fields(keys)
    assert declared is not None
    if len(searched) == len(declared.fields):
        return f"t.{SEARCH_COLUMN}", strings, ""
    vector = declared_vector(searched, declared.language, "t.doc")
    # the stored vector holds more fields, so a match here is one there too, unless the
    # query excludes something: then it is no prefilter
    prefilter = "" if request.query.excluded else f"t.{SEARCH_COLUMN} @@ {q} AND "
    return vector, strings, prefilter


def _keyset(after: Keyset | None, p: Params) -> str:
    """The page's keyset condition on (score desc, collection, _id): after the last hit."""
    if after is None:
        return ""
    s, c, i = after
    ps, pc, pi = p.add(s, "float8"), p.add(c, "text"), p.add(i, "text")
    return (
        f' WHERE (s < {ps} OR (s = {ps} AND (c COLLATE "C" > {pc} OR '
        f'(c = {pc} AND _id COLLATE "C" > {pi}))))'
    )


def _all_strings(schema: str, names: str | None) -> Callable[[str], str]:
    """An undeclared collection's searched text: the readable part of the document
    (``names`` bound, None: all of it) but ``_id`` and ``_version``."""

    def strings(doc: str) -> str:
        if names is not None:
            doc = f"{schema}.dbproxy_agg_readable({doc}, {names}, '')"
        return f"({doc} - '_id' - '_version')"

    return strings


def _fields(keys: list[tuple[str, str]]) -> Callable[[str], str]:
    """A declared collection's searched fields as one object (dotted path → value)."""

    def strings(doc: str) -> str:
        pairs = ", ".join(f"{k}, {doc} #> {path}" for k, path in keys)
        return f"jsonb_build_object({pairs})"

    return strings


def headline_fields(raw: str | None) -> dict[str, str]:
    """The highlights of one hit from the statement's HEADLINE column: each field (dotted
    path) whose text has a bracketed match, an array's matching strings joined."""
    if raw is None:
        return {}
    out: dict[str, str] = {}

    def walk(value: Any, path: str) -> list[str]:
        if isinstance(value, str):
            return [value] if has_mark(value) else []
        if isinstance(value, list):
            return [s for v in value for s in walk(v, path)]
        if isinstance(value, dict):
            for k, v in value.items():
                sub = f"{path}.{k}" if path else k
                found = walk(v, sub)
                if found and not isinstance(v, dict):
                    out[sub] = FRAGMENT_SEPARATOR.join(marked(t) for t in found)
        return []

    top = orjson.loads(raw)
    if isinstance(top, dict):
        walk(top, "")
    return out
