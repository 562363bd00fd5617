"""Unit tests of the search query syntax and request body (proxy/query/search*.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given

from proxy.backends.base import COLLECTION_RE
from proxy.config import Limits
from proxy.errors import BadRequest
from proxy.query.ast import MATCH_ALL, Path
from proxy.query.pg import Params
from proxy.query.search import (
    COLLECTION_PATTERN,
    Group,
    SearchQuery,
    Term,
    fold_case,
    is_word,
    parse_query,
    parse_search_body,
    words_of,
)
from proxy.query.search_pg import NOTHING, pg_tsquery
from proxy.query.search_sqlite import fts5_match
from tests.search_support import check_compiled, search_texts

LIMITS = Limits()


def shape(q: str) -> tuple[list[list[str]], list[str], bool]:
    """(groups as lists of space-joined terms, excluded terms, prefix)."""
    sq = parse_query(q)
    assert sq.empty == (not sq.groups)
    groups = [[" ".join(t.words) for t in g.terms] for g in sq.groups]
    return groups, [" ".join(t.words) for t in sq.excluded], sq.prefix


# ---- words, phrases, exclusion ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("foo bar ", ([["foo"], ["bar"]], [], False)),
        ("Foo BAR", ([["foo"], ["bar"]], [], True)),
        ("  foo\t\nbar\u3000", ([["foo"], ["bar"]], [], False)),
        ('"exact phrase"', ([["exact phrase"]], [], False)),
        ('"exact phrase" ', ([["exact phrase"]], [], False)),
        ('"exact phr', ([["exact phr"]], [], True)),  # an unclosed quote runs to the end
        ('"exact phr ', ([["exact phr"]], [], False)),
        ('"one"', ([["one"]], [], False)),  # a one-word phrase is a word
        ('a"b c"d', ([["a"], ["b c"], ["d"]], [], True)),
        ("foo -bar", ([["foo"]], ["bar"], False)),  # no prefix for an excluded last word
        ('foo -"bad thing" baz', ([["foo"], ["baz"]], ["bad thing"], True)),
        ('foo -"bad thi', ([["foo"]], ["bad thi"], False)),
        ("e-mail ", ([["e mail"]], [], False)),  # punctuation inside a chunk: a phrase
        ("-e-mail x", ([["x"]], ["e mail"], True)),
        ("--foo", ([["foo"]], [], True)),  # only one leading '-' excludes
        ("- foo", ([["foo"]], [], True)),
        ("foo_bar", ([["foo bar"]], [], True)),  # '_' separates, as in both engines
    ],
)
def test_words_phrases_exclusion(q: str, expected: Any) -> None:
    assert shape(q) == expected


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("a or b c ", ([["a", "b"], ["c"]], [], False)),
        ("a OR b", ([["a", "b"]], [], True)),
        ("a Or b oR c", ([["a", "b", "c"]], [], True)),
        ('"a b" or c d or "e f" ', ([["a b", "c"], ["d", "e f"]], [], False)),
        ("or a ", ([["or"], ["a"]], [], False)),  # leading: a plain word
        ("a or ", ([["a"], ["or"]], [], False)),  # trailing: a plain word
        ("a or", ([["a"], ["or"]], [], True)),  # ... typed on: prefix "or"
        ("a or or b ", ([["a"], ["or"], ["or"], ["b"]], [], False)),  # double: plain words
        ("or", ([["or"]], [], True)),
        ("a or -b ", ([["a"], ["or"]], ["b"], False)),  # an excluded term is no operand
        ("-a or b ", ([["or"], ["b"]], ["a"], False)),
        ('a "or" b ', ([["a"], ["or"], ["b"]], [], False)),  # quoted: a word
        ("a or, b ", ([["a"], ["or"], ["b"]], [], False)),  # only a bare 'or' is the operator
        ("a or &&& b ", ([["a", "b"]], [], False)),  # wordless chunks are dropped first
    ],
)
def test_or(q: str, expected: Any) -> None:
    assert shape(q) == expected


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("databa", ([["databa"]], [], True)),
        ("databa ", ([["databa"]], [], False)),
        ("databa.", ([["databa"]], [], False)),  # punctuation finished the word
        ("databa&", ([["databa"]], [], False)),
        ('"databa"', ([["databa"]], [], False)),
        ("x databa\u0301", ([["x"], ["databa\u0301"]], [], True)),
        ("x \u0301", ([["x"]], [], False)),  # a lone mark is no word: the last word is done
    ],
)
def test_prefix(q: str, expected: Any) -> None:
    assert shape(q) == expected


@pytest.mark.parametrize(
    "q", ["&&&", "", "   ", '""', "-", "-foo", '-foo -"a b"', "\u0301", "_", "!!:*()<->", None, 5]
)
def test_matches_nothing(q: Any) -> None:
    sq = parse_query(q)
    assert sq.empty and sq.groups == () and not sq.prefix
    assert fts5_match(sq) is None
    assert pg_tsquery(sq, "$1::regconfig", Params(["english"])) == NOTHING


def test_only_excluded_keeps_them() -> None:
    assert parse_query('-foo -"a b"').excluded == (Term(("foo",)), Term(("a", "b")))


def test_operator_characters_are_plain_text() -> None:
    assert shape("a&b|!c:*(d)<->'e'\\f ")[0] == [["a b c d e f"]]
    assert shape("foo & bar | !baz (qux) ")[0] == [["foo"], ["bar"], ["baz"], ["qux"]]
    assert shape("a\x00b ")[0] == [["a b"]]


def test_unicode_words_and_case() -> None:
    assert shape("Größe café 日本語 ١٢٣ ")[0] == [["größe"], ["café"], ["日本語"], ["١٢٣"]]
    assert words_of("cafe\u0301!x") == ["cafe\u0301", "x"]
    # the simple lower-case mapping, as PostgreSQL and FTS5 fold: no casefold, no final sigma
    assert fold_case("Straße ΣΟΦΟΣ İstanbul") == "straße σοφοσ istanbul"
    assert not is_word("_") and not is_word("\u0301") and is_word("a\u0301")


def test_dataclasses_hold_their_invariants() -> None:
    with pytest.raises(ValueError):
        Term(("a b",))
    with pytest.raises(ValueError):
        Term(())
    with pytest.raises(ValueError):
        Group(())
    with pytest.raises(ValueError):
        SearchQuery(groups=(), empty=False)
    assert SearchQuery(groups=(Group((Term(("a",)),)),)) == parse_query("a ")


# ---- compilers --------------------------------------------------------------------------------


def test_pg_shapes() -> None:
    p = Params(["english"])
    sql = pg_tsquery(parse_query('a b "c d" e or f -g -"h i" j'), "$1::regconfig", p)
    assert sql == (
        "(CASE WHEN numnode((plainto_tsquery($1::regconfig, $2::text) && "
        "phraseto_tsquery($1::regconfig, $3::text) && (plainto_tsquery($1::regconfig, $4::text)"
        " || plainto_tsquery($1::regconfig, $5::text)) && to_tsquery($1::regconfig, $6::text)))"
        " = 0 THEN ''::tsquery ELSE (plainto_tsquery($1::regconfig, $2::text) && "
        "phraseto_tsquery($1::regconfig, $3::text) && (plainto_tsquery($1::regconfig, $4::text)"
        " || plainto_tsquery($1::regconfig, $5::text)) && to_tsquery($1::regconfig, $6::text))"
        " && (!! plainto_tsquery($1::regconfig, $7::text)) && "
        "(!! phraseto_tsquery($1::regconfig, $8::text)) END)"
    )
    assert p.values == ["english", "a b", "c d", "e", "f", "j:*", "g", "h i"]
    p = Params(["simple"])
    sql = pg_tsquery(parse_query('"quick bro'), "$1::regconfig", p)
    assert (
        sql == "(phraseto_tsquery($1::regconfig, $2::text) <-> to_tsquery($1::regconfig, $3::text))"
    )
    assert p.values == ["simple", "quick", "bro:*"]


def test_pg_text_depends_only_on_shape() -> None:
    def sql(q: str) -> str:
        return pg_tsquery(parse_query(q), "$1::regconfig", Params(["english"]))

    assert sql("a b c ") == sql("x y ") == sql("one ")
    assert sql("a or b -c") == sql("'x' or (y) -z")


def test_fts5_shapes() -> None:
    assert fts5_match(parse_query("a b ")) == '"a" AND "b"'
    assert fts5_match(parse_query('a or "b c" d -e -"f g" h')) == (
        '(("a" OR "b c") AND "d" AND "h"*) NOT "e" NOT "f g"'
    )
    assert fts5_match(parse_query('"exact phr')) == '"exact phr"*'
    assert fts5_match(parse_query("AND NOT NEAR ")) == '"and" AND "not" AND "near"'


@given(search_texts(60))
def test_parse_query_never_raises_and_compiles_well_formed(q: str) -> None:
    sq = parse_query(q)
    for term in (*[t for g in sq.groups for t in g.terms], *sq.excluded):
        assert all(is_word(w) for w in term.words)
    if sq.prefix:
        assert q and not q[-1].isspace() and q[-1] != '"'
    check_compiled(sq)


@given(search_texts(1000))
def test_long_texts_compile(q: str) -> None:
    check_compiled(parse_query(q[:1000]))


# ---- the body ---------------------------------------------------------------------------------


def test_body_defaults() -> None:
    spec = parse_search_body({"q": "hello wor"}, LIMITS)
    assert spec.q == "hello wor" and spec.query == parse_query("hello wor")
    assert spec.collections is None and spec.filter is MATCH_ALL and spec.limit == 20
    assert spec.cursor is None and spec.highlight is True and spec.fields is None
    assert spec.total is False


def test_body_full() -> None:
    spec = parse_search_body(
        {
            "q": "x",
            "collections": ["b", "a", "b"],
            "filter": {"n": {"$gt": 1}},
            "limit": 100,
            "next": "abc",
            "highlight": False,
            "fields": ["title", "body.text"],
            "total": True,
        },
        LIMITS,
    )
    assert spec.collections == ("b", "a") and spec.limit == 100 and spec.cursor == "abc"
    assert spec.filter is not MATCH_ALL and spec.highlight is False and spec.total is True
    assert spec.fields == (Path(("title",)), Path(("body", "text")))
    nulls = dict.fromkeys(["collections", "filter", "limit", "next", "highlight", "fields"])
    assert parse_search_body({"q": "x", **nulls}, LIMITS).limit == 20
    assert parse_search_body({"q": "&&&"}, LIMITS).query.empty  # no words: no error
    assert parse_search_body({"q": "x" * 1000}, LIMITS).q == "x" * 1000
    assert parse_search_body({"q": "x"}, Limits(max_limit=10)).limit == 10


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([], "invalid_search"),
        ("q", "invalid_search"),
        ({}, "empty_query"),
        ({"q": None}, "empty_query"),
        ({"q": ""}, "empty_query"),
        ({"q": " \t\n\u3000"}, "empty_query"),
        ({"q": 5}, "invalid_search"),
        ({"q": ["x"]}, "invalid_search"),
        ({"q": "x" * 1001}, "query_too_long"),
        ({"q": " " * 1001}, "query_too_long"),
        ({"q": "x", "collections": "a"}, "invalid_search"),
        ({"q": "x", "collections": [1]}, "invalid_search"),
        ({"q": "x", "collections": {"a": 1}}, "invalid_search"),
        ({"q": "x", "collections": []}, "invalid_search"),
        ({"q": "x", "collections": ["1a"]}, "invalid_collection_name"),
        ({"q": "x", "collections": ["a", "a-b"]}, "invalid_collection_name"),
        ({"q": "x", "collections": ["a" * 64]}, "invalid_collection_name"),
        ({"q": "x", "collections": [""]}, "invalid_collection_name"),
        ({"q": "x", "collections": ["a\n"]}, "invalid_collection_name"),
        ({"q": "x", "collections": [f"c{i}" for i in range(101)]}, "too_many_collections"),
        ({"q": "x", "limit": 101}, "limit_too_large"),
        ({"q": "x", "limit": 0}, "invalid_limit"),
        ({"q": "x", "limit": -1}, "invalid_limit"),
        ({"q": "x", "limit": "5"}, "invalid_limit"),
        ({"q": "x", "limit": 5.0}, "invalid_limit"),
        ({"q": "x", "limit": True}, "invalid_limit"),
        ({"q": "x", "sort": "a"}, "unknown_parameter"),
        ({"q": "x", "skip": 1}, "unknown_parameter"),
        ({"q": "x", "filter": []}, "invalid_query"),
        ({"q": "x", "filter": {"$where": "1"}}, "forbidden_operator"),
        ({"q": "x", "next": 5}, "invalid_cursor"),
        ({"q": "x", "highlight": "yes"}, "invalid_search"),
        ({"q": "x", "total": 1}, "invalid_search"),
        ({"q": "x", "fields": "title"}, "invalid_search"),
        ({"q": "x", "fields": [1]}, "invalid_search"),
        ({"q": "x", "fields": []}, "invalid_search"),
        ({"q": "x", "fields": ["a..b"]}, "invalid_query"),
        ({"q": "x", "fields": ["$a"]}, "invalid_field_path"),
        ({"q": "x", "fields": [f"f{i}" for i in range(101)]}, "too_many_fields"),
    ],
)
def test_body_errors(body: Any, code: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_search_body(body, LIMITS)
    assert err.value.status == 400
    assert err.value.code == code


def test_limit_over_a_lower_configured_cap() -> None:
    with pytest.raises(BadRequest) as err:
        parse_search_body({"q": "x", "limit": 11}, Limits(max_limit=10))
    assert err.value.code == "limit_too_large"


def test_error_messages_do_not_echo_long_input() -> None:
    with pytest.raises(BadRequest) as err:
        parse_search_body({"q": "x", "collections": ["-" * 5000]}, LIMITS)
    assert len(err.value.message) < 200


def test_collection_pattern_is_the_backends() -> None:
    assert COLLECTION_RE.pattern == COLLECTION_PATTERN
