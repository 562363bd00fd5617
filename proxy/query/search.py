"""Full-text search requests: the query syntax of ``q`` (→ SearchQuery) and the body of
``POST /api/db/search`` (→ SearchSpec). The per-dialect compilers are search_pg / search_sqlite."""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from proxy.config import Limits
from proxy.errors import BadRequest, InvalidCollection, LimitExceeded
from proxy.query.ast import MATCH_ALL, Filter, Path
from proxy.query.parse import parse_filter, parse_path
from proxy.schema.model import SearchDeclaration

MAX_QUERY_CHARS = 1000
MAX_SEARCH_LIMIT = 100
DEFAULT_SEARCH_LIMIT = 20
MAX_SEARCH_COLLECTIONS = 100
MAX_SEARCH_FIELDS = 100
SEARCH_KEYS = frozenset(
    {"q", "collections", "filter", "limit", "next", "highlight", "fields", "total"}
)
# proxy.backends.base.COLLECTION_RE's pattern (query may not import backends; a test checks)
COLLECTION_PATTERN = "[A-Za-z][A-Za-z0-9_]{0,62}"
_COLLECTION_RE = re.compile(COLLECTION_PATTERN)


# ---- the query syntax -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Term:
    """One word (``words`` of length 1) or a phrase (the words in order, adjacent)."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.words or not all(map(is_word, self.words)):
            raise ValueError(f"a term is one or more sanitised words, got {self.words!r:.80}")

    @property
    def is_phrase(self) -> bool:
        return len(self.words) > 1


@dataclass(frozen=True, slots=True)
class Group:
    """Terms joined by ``or``: a document matches the group if it matches any of them."""

    terms: tuple[Term, ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("a group has at least one term")


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A parsed ``q``: every group must match and no excluded term may. ``prefix``: the last
    word of ``groups[-1].terms[-1]`` matches as a prefix (type-ahead). ``empty``: there is no
    positive term, so the query matches nothing (the backends need not be asked)."""

    groups: tuple[Group, ...]
    excluded: tuple[Term, ...] = ()
    prefix: bool = False
    empty: bool = False

    def __post_init__(self) -> None:
        if self.empty != (not self.groups):
            raise ValueError("empty is true exactly when there are no groups")
        if self.prefix and self.empty:
            raise ValueError("an empty query has no prefix word")


def fold_case(text: str) -> str:
    """Lower case, one character at a time with the simple mapping (as the engines' own
    folding does): no final-sigma rule, U+0130 → ``i``, and not casefold (``ß`` stays)."""
    if text.isascii():
        return text.lower()
    return "".join("i" if c == "\u0130" else c.lower() for c in text)


def is_word_char(c: str) -> bool:
    """Letters, digits and combining marks (any script). ``_`` and everything else separate."""
    if c.isascii():
        return c.isalnum()
    return c.isalnum() or unicodedata.category(c)[0] == "M"


def is_word(w: str) -> bool:
    """A sanitised word: word characters only, at least one of them a letter or digit."""
    return bool(w) and all(map(is_word_char, w)) and any(c.isalnum() for c in w)


def words_of(text: str) -> list[str]:
    """The words of ``text``: maximal runs of word characters that hold a letter or digit."""
    out: list[str] = []
    run: list[str] = []
    for c in text + " ":
        if is_word_char(c):
            run.append(c)
        elif run:
            word = "".join(run)
            if any(ch.isalnum() for ch in word):
                out.append(word)
            run = []
    return out


@dataclass(frozen=True, slots=True)
class _Token:
    words: tuple[str, ...]
    negated: bool
    is_or: bool
    at_end: bool  # runs to the end of q (a chunk, or a quote left open)


def _lex(q: str) -> list[_Token]:
    """Whitespace-separated chunks and quoted phrases; tokens without words are dropped."""
    tokens: list[_Token] = []
    i, n = 0, len(q)
    while i < n:
        if q[i].isspace():
            i += 1
            continue
        negated = q[i] == "-" and i + 1 < n and (q[i + 1] == '"' or is_word_char(q[i + 1]))
        if negated:
            i += 1
        quoted = q[i] == '"'
        if quoted:
            close = q.find('"', i + 1)
            stop = n if close < 0 else close
            text, i, at_end = q[i + 1 : stop], stop + 1, close < 0
        else:
            j = i
            while j < n and not q[j].isspace() and q[j] != '"':
                j += 1
            text, i, at_end = q[i:j], j, j == n
        words = words_of(text)
        if words:
            is_or = not quoted and not negated and text == "or"
            tokens.append(_Token(tuple(words), negated, is_or, at_end))
    return tokens


def _operand(tok: _Token) -> bool:
    return not tok.negated and not tok.is_or


def parse_query(q: Any) -> SearchQuery:
    """Parse ``q``; never raises (text with no words, or not a string, is the empty query).

    - q is lower-cased (``fold_case``) and split at whitespace into chunks; ``"`` starts a
      quoted phrase that ends at the next ``"`` or, left open, at the end of q.
    - Words are runs of letters, digits and marks; everything else (``_`` and all
      punctuation, ``&|!:*()<->'\\`` included) separates words. A chunk with one word is a
      word term, one with several (``e-mail``) a phrase, like a quoted one; a chunk or
      quote with no word is dropped.
    - A single leading ``-`` (followed by a word character or ``"``) excludes the term.
    - A bare ``or`` chunk (any case) between two positive, non-``or`` terms joins them into
      one group (``a or b c`` = (a OR b) AND c); any other ``or`` (leading, trailing, next
      to another ``or`` or to an excluded term, quoted) is a plain word.
    - When q ends with a word (its last character a word character), that last word
      matches as a prefix, unless its term is excluded.
    - No positive term (only excluded ones, or no words): ``empty``, matching nothing."""
    if not isinstance(q, str):
        return SearchQuery(groups=(), empty=True)
    text = fold_case(q)
    tokens = _lex(text)
    groups: list[list[Term]] = []
    excluded: list[Term] = []
    join_next = False
    last = len(tokens) - 1
    for k, tok in enumerate(tokens):
        if tok.is_or and 0 < k < last and _operand(tokens[k - 1]) and _operand(tokens[k + 1]):
            join_next = True
            continue
        term = Term(tok.words)
        if tok.negated:
            excluded.append(term)
        elif join_next:
            groups[-1].append(term)
        else:
            groups.append([term])
        join_next = False
    prefix = bool(tokens) and tokens[-1].at_end and not tokens[-1].negated and _ends_in_word(text)
    return SearchQuery(
        groups=tuple(Group(tuple(g)) for g in groups),
        excluded=tuple(excluded),
        prefix=prefix and bool(groups),
        empty=not groups,
    )


def _ends_in_word(text: str) -> bool:
    """The last character of ``text`` ends a word (not whitespace, a quote or punctuation)."""
    end = len(text)
    start = end
    while start > 0 and is_word_char(text[start - 1]):
        start -= 1
    return start < end and is_word(text[start:end])


# ---- the request body ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchSpec:
    """A validated search request. ``collections`` None: every collection the caller may
    search. ``fields`` None: not given (its meaning is the endpoint's)."""

    q: str
    query: SearchQuery
    collections: tuple[str, ...] | None = None
    filter: Filter = MATCH_ALL
    limit: int = DEFAULT_SEARCH_LIMIT
    cursor: str | None = None
    highlight: bool = True
    fields: tuple[Path, ...] | None = None
    total: bool = False


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_search")


def parse_search_body(body: Any, limits: Limits) -> SearchSpec:
    """One SearchSpec from the decoded JSON body; 400 (stable codes) for anything else.
    ``null`` for an optional key is the same as leaving it out."""
    if not isinstance(body, dict):
        raise _invalid("the search body must be a JSON object")
    unknown = set(body) - SEARCH_KEYS
    if unknown:
        names = ", ".join(sorted(str(k) for k in unknown))
        raise BadRequest(f"unknown parameter(s): {names[:200]}", code="unknown_parameter")
    q = _parse_q(body.get("q"))
    cursor = body.get("next")
    if cursor is not None and not isinstance(cursor, str):
        raise BadRequest("next must be the cursor string of a previous page", code="invalid_cursor")
    return SearchSpec(
        q=q,
        query=parse_query(q),
        collections=_parse_collections(body.get("collections")),
        filter=parse_filter(body.get("filter"), limits),
        limit=_parse_limit(body.get("limit"), limits),
        cursor=cursor or None,
        highlight=_parse_flag(body.get("highlight"), "highlight", default=True),
        fields=_parse_fields(body.get("fields"), limits),
        total=_parse_flag(body.get("total"), "total", default=False),
    )


def _parse_q(q: Any) -> str:
    if q is None:
        raise BadRequest("q (the text to search for) is required", code="empty_query")
    if not isinstance(q, str):
        raise _invalid("q must be a string")
    if len(q) > MAX_QUERY_CHARS:
        raise LimitExceeded(f"q may be at most {MAX_QUERY_CHARS} characters", code="query_too_long")
    if not q.strip():
        raise BadRequest("q must not be empty", code="empty_query")
    return q


def _parse_collections(raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise _invalid("collections must be an array of collection names")
    if not raw:
        raise _invalid("collections must name at least one collection (omit it to search all)")
    if len(raw) > MAX_SEARCH_COLLECTIONS:
        raise LimitExceeded(
            f"at most {MAX_SEARCH_COLLECTIONS} collections", code="too_many_collections"
        )
    for name in raw:
        if not _COLLECTION_RE.fullmatch(name):
            raise InvalidCollection(f"invalid collection name {name[:80]!r}")
    return tuple(dict.fromkeys(raw))


def _parse_limit(raw: Any, limits: Limits) -> int:
    cap = min(MAX_SEARCH_LIMIT, limits.max_limit)
    if raw is None:
        return min(DEFAULT_SEARCH_LIMIT, cap)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise BadRequest("limit must be an integer >= 1", code="invalid_limit")
    if raw > cap:
        raise LimitExceeded(f"limit may be at most {cap}", code="limit_too_large")
    return raw


def _parse_flag(raw: Any, name: str, *, default: bool) -> bool:
    if raw is None:
        return default
    if not isinstance(raw, bool):
        raise _invalid(f"{name} must be true or false")
    return raw


def _parse_fields(raw: Any, limits: Limits) -> tuple[Path, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(f, str) for f in raw):
        raise _invalid("fields must be an array of field paths")
    if not raw:
        raise _invalid("fields must name at least one field (omit it for the default)")
    if len(raw) > MAX_SEARCH_FIELDS:
        raise LimitExceeded(f"at most {MAX_SEARCH_FIELDS} fields", code="too_many_fields")
    return tuple(parse_path(f, limits) for f in raw)


# ---- what a backend is asked and answers ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchTarget:
    """One collection searched, as the caller may see it.

    ``guard``: the row rules and the request's ``filter`` together (None: every row).
    ``readable``: the fields the caller may read (FieldRule semantics: a listed path covers
    everything under it; None: every field). ``declared``: the collection's set_search.

    What is searched (and ranked on, and highlighted): with a declaration, each declared
    field the caller may read whole (a declared field only partly readable is left out),
    at its weight, in the declaration's language; without one, every string in the
    document (nested, in arrays) but ``_id`` and ``_version``, readable fields only, at
    weight D, language ``simple``. A hidden field is never searched: search is no oracle."""

    collection: str
    guard: Filter | None = None
    readable: frozenset[str] | None = None
    declared: SearchDeclaration | None = None

    def searched(self) -> tuple[tuple[tuple[str, ...], str], ...] | None:
        """The declared fields searched for this caller (path, weight); None: undeclared."""
        if self.declared is None:
            return None
        return tuple((p, w) for p, w in self.declared.fields if covered(p, self.readable))


def covered(path: tuple[str, ...], readable: frozenset[str] | None) -> bool:
    """``path`` (and everything under it) is readable."""
    if readable is None:
        return True
    return any(".".join(path[:i]) in readable for i in range(1, len(path) + 1))


Keyset = tuple[float, str, str]  # (score, collection, _id) of the last hit of a page


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """One search as a backend runs it: the hits of every target in one ranking, best first
    (``score`` descending, then ``collection``, then ``_id``, both by code point), after
    ``after`` (exclusive), at most ``limit + 1`` of them (one more tells "there is a next
    page"); ``total``: the exact number of matches too (ignoring ``after``)."""

    query: SearchQuery
    targets: tuple[SearchTarget, ...]
    limit: int
    after: Keyset | None = None
    highlight: bool = True
    total: bool = False


@dataclass(frozen=True, slots=True)
class SearchHit:
    """``score``: higher is better, > 0, from the searched fields' weights and the density
    of the query's terms in them (PostgreSQL ``ts_rank_cd``, the embedded store bm25),
    normalised the same way in every collection so the ranking can mix them.
    ``document``: the stored document, JSON text (the pipeline hides what the caller may not
    read). ``highlights``: for each searched field whose text matches (dotted path; an
    array's matching strings joined by " … "), the text HTML-escaped with each matched word
    in ``<mark>…</mark>``, a long text cut to fragments around the matches (see ``marked``)."""

    collection: str
    id: str
    score: float
    document: bytes
    highlights: dict[str, str]


@dataclass(frozen=True, slots=True)
class SearchHits:
    hits: list[SearchHit]
    total: int | None = None


# A backend's highlighter brackets each matched word in these two characters (which it
# first removes from the text); ``marked`` escapes the rest and turns them into <mark>s.
MARK_START = "\x02"
MARK_STOP = "\x03"
FRAGMENT_SEPARATOR = " … "
FRAGMENT_WORDS = 24  # a long text is cut to at most 3 fragments of about this many words


def marked(text: str) -> str:
    """A highlighter's output as HTML: everything escaped, the bracketed words marked;
    an unbalanced bracket is dropped rather than left as an unclosed element."""
    out: list[str] = []
    inside = False
    for chunk in re.split(f"([{MARK_START}{MARK_STOP}])", text):
        if chunk == MARK_START:
            if not inside:
                out.append("<mark>")
                inside = True
        elif chunk == MARK_STOP:
            if inside:
                out.append("</mark>")
                inside = False
        elif chunk:
            out.append(html.escape(chunk, quote=True))
    if inside:
        out.append("</mark>")
    return "".join(out)


def has_mark(text: str) -> bool:
    return MARK_START in text
