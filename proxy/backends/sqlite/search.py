"""Full-text search on the embedded store: FTS5. A declared collection has an FTS5 table
(one column per declared field, kept by triggers in the writing transaction); an
undeclared one is searched by loading the readable strings of the rows its guard lets
through into a private in-memory FTS5 table for the request. Ranking is bm25 with the
declared weights (A 1.0, B 0.4, C 0.2, D 0.1, like ts_rank's), as ``s / (s + 1)`` of
``-bm25``; highlights come from snippet() for the page's hits only."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import orjson

from proxy import context
from proxy.backends.sqlite.connection import Job, T
from proxy.backends.sqlite.ddl import table_name
from proxy.backends.sqlite.errors import no_table
from proxy.query.search import (
    FRAGMENT_SEPARATOR,
    FRAGMENT_WORDS,
    MARK_START,
    MARK_STOP,
    SearchHit,
    SearchHits,
    SearchQuery,
    SearchRequest,
    SearchTarget,
    covered,
    has_mark,
    marked,
)
from proxy.query.search_sqlite import fts5_match, fts5_string
from proxy.query.sqlite import FilterCompiler, Params
from proxy.schema.model import SearchDeclaration

WEIGHT = {"A": 1.0, "B": 0.4, "C": 0.2, "D": 0.1}
_SNIPPET = (
    f"char({ord(MARK_START)}), char({ord(MARK_STOP)}), '{FRAGMENT_SEPARATOR}', {FRAGMENT_WORDS}"
)
_COLLECTION_NAMES = (
    "SELECT name FROM sqlite_schema WHERE type = 'table' AND name GLOB 'c_*' ORDER BY name"
)


def fts_table(collection: str) -> str:
    """The quoted FTS5 table of a declared collection (``"_fts_c_…"``: no collection's)."""
    return '"_fts_' + table_name(collection)[1:]


def _trigger(collection: str, event: str) -> str:
    return '"_fts_' + event + "_" + table_name(collection)[1:]


def tokenizer(language: str) -> str:
    """Porter stemming for ``english``, none for every other language (FTS5 has no other
    stemmer): the embedded store's one difference from PostgreSQL's configurations."""
    base = "unicode61 remove_diacritics 2"
    return f"porter {base}" if language == "english" else base


def _text_sql(path: tuple[str, ...], row: str) -> str:
    """Every string at the declared path (itself, or inside an array or object), joined."""
    if not all(s.isidentifier() and s.isascii() for s in path):
        raise ValueError(f"not a declared path: {path!r:.80}")
    json_path = "$." + ".".join(f'"{s}"' for s in path)
    return (
        f"(SELECT group_concat(value, ' ') FROM json_tree({row}.doc, '{json_path}') "
        "WHERE type = 'text')"
    )


def search_ddl(collection: str, declared: SearchDeclaration) -> list[str]:
    """The FTS5 table, its triggers and its fill from the stored documents."""
    table, fts = table_name(collection), fts_table(collection)
    cols = [f"c{i}" for i in range(len(declared.fields))]
    new = ", ".join(_text_sql(p, "new") for p, _ in declared.fields)
    fill = ", ".join(_text_sql(p, "t") for p, _ in declared.fields)
    names = ", ".join(cols)
    return [
        f"CREATE VIRTUAL TABLE {fts} USING fts5({names}, "
        f"tokenize = '{tokenizer(declared.language)}')",
        f"INSERT INTO {fts} (rowid, {names}) SELECT t.rowid, {fill} FROM {table} t",
        f"CREATE TRIGGER {_trigger(collection, 'i')} AFTER INSERT ON {table} BEGIN "
        f"INSERT INTO {fts} (rowid, {names}) VALUES (new.rowid, {new}); END",
        f"CREATE TRIGGER {_trigger(collection, 'u')} AFTER UPDATE OF doc ON {table} BEGIN "
        f"DELETE FROM {fts} WHERE rowid = old.rowid; "
        f"INSERT INTO {fts} (rowid, {names}) VALUES (new.rowid, {new}); END",
        f"CREATE TRIGGER {_trigger(collection, 'd')} AFTER DELETE ON {table} BEGIN "
        f"DELETE FROM {fts} WHERE rowid = old.rowid; END",
    ]


def drop_ddl(collection: str) -> list[str]:
    return [
        *(f"DROP TRIGGER IF EXISTS {_trigger(collection, e)}" for e in "iud"),
        f"DROP TABLE IF EXISTS {fts_table(collection)}",
    ]


def _score(bm25: float) -> float:
    s = max(-float(bm25), 0.0)
    return s / (s + 1.0)


def _any_term(query: SearchQuery) -> str | None:
    """Every positive term ORed: what marks a field's matches (the whole query need not
    match inside one field)."""
    if query.empty:
        return None
    last = len(query.groups) - 1
    terms: list[str] = []
    for k, group in enumerate(query.groups):
        n = len(group.terms) - 1
        for i, t in enumerate(group.terms):
            prefix = query.prefix and k == last and i == n
            terms.append(fts5_string(" ".join(t.words)) + ("*" if prefix else ""))
    return " OR ".join(terms)


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v, path)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}" if path else k)


def _readable(doc: dict[str, Any], readable: frozenset[str] | None, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = prefix + key
        if not prefix and key in ("_id", "_version"):
            continue
        if readable is None or covered(tuple(path.split(".")), readable):
            out[key] = value
        elif isinstance(value, dict):
            inner = _readable(value, readable, path + ".")
            if inner:
                out[key] = inner
    return out


Found = tuple[float, str, str, int]  # score, collection, _id, rowid


class SqliteSearch:
    """``search`` and ``collection_names``, mixed into the document operations."""

    async def _read(self, fn: Job[T]) -> T:
        raise NotImplementedError

    async def collection_names(self) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            return [_collection(r[0]) for r in conn.execute(_COLLECTION_NAMES)]

        return sorted(await self._read(run))

    async def search(self, request: SearchRequest) -> SearchHits:
        match = fts5_match(request.query)
        if match is None:
            return SearchHits([], 0 if request.total else None)
        context.last_statement.set((f"fts5 MATCH {match}", ()))

        def run(conn: sqlite3.Connection) -> SearchHits:
            found: list[Found] = []
            for target in request.targets:
                try:
                    found += _target_hits(conn, target, request.query, match)
                except sqlite3.OperationalError as exc:
                    if not no_table(exc):
                        raise
            found.sort(key=lambda f: (-f[0], f[1], f[2]))
            total = len(found) if request.total else None
            if request.after is not None:
                s, c, i = request.after
                found = [f for f in found if f[0] < s or (f[0] == s and (f[1], f[2]) > (c, i))]
            page = found[: request.limit + 1]
            by_name = {t.collection: t for t in request.targets}
            return SearchHits([_hit(conn, by_name[f[1]], f, request) for f in page], total)

        return await self._read(run)


def _collection(name: str) -> str:
    out, upper = [], False
    for ch in name[2:]:
        if ch == "^":
            upper = True
            continue
        out.append(ch.upper() if upper else ch)
        upper = False
    return "".join(out)


def _guard(target: SearchTarget) -> tuple[str, list[Any]]:
    if target.guard is None:
        return "", []
    params = Params()
    return " AND " + FilterCompiler(params).where(target.guard, "t.doc"), params.values


def _target_hits(
    conn: sqlite3.Connection, target: SearchTarget, query: SearchQuery, match: str
) -> list[Found]:
    table = table_name(target.collection)
    searched = target.searched()
    guard, args = _guard(target)
    if searched is None:
        return _undeclared_hits(conn, target, match, guard, args)
    if not searched:
        return []
    declared = target.declared
    assert declared is not None
    index = {p: i for i, (p, _) in enumerate(declared.fields)}
    cols = " ".join(f"c{index[p]}" for p, _ in searched)
    visible = {p for p, _ in searched}
    weights = ", ".join(str(WEIGHT[w]) if p in visible else "0.0" for p, w in declared.fields)
    fts = fts_table(target.collection)
    params = Params(args)
    expr = params.add(f"{{{cols}}} : ({match})")
    sql = (
        f"SELECT bm25({fts}, {weights}), t._id, t.rowid FROM {fts} JOIN {table} t "
        f"ON t.rowid = {fts}.rowid WHERE {fts} MATCH {expr}{guard}"
    )
    return [(_score(b), target.collection, i, r) for b, i, r in conn.execute(sql, params.values)]


def _undeclared_hits(
    conn: sqlite3.Connection, target: SearchTarget, match: str, guard: str, args: list[Any]
) -> list[Found]:
    table = table_name(target.collection)
    rows = conn.execute(f"SELECT t.rowid, t._id, t.doc FROM {table} t WHERE 1{guard}", args)
    mem = sqlite3.connect(":memory:")
    try:
        simple = tokenizer("simple")
        mem.execute(f"CREATE VIRTUAL TABLE m USING fts5(x, id UNINDEXED, tokenize = '{simple}')")
        for rowid, doc_id, raw in rows:
            doc = orjson.loads(raw)
            text = " ".join(s for _, s in _strings(_readable(doc, target.readable, ""), ""))
            mem.execute("INSERT INTO m (rowid, x, id) VALUES (?, ?, ?)", (rowid, text, doc_id))
        got = mem.execute(
            f"SELECT bm25(m, {WEIGHT['D']}, 0.0), id, rowid FROM m WHERE m MATCH ?", (match,)
        ).fetchall()
    finally:
        mem.close()
    return [(_score(b), target.collection, i, r) for b, i, r in got]


def _hit(
    conn: sqlite3.Connection, target: SearchTarget, f: Found, request: SearchRequest
) -> SearchHit:
    score, collection, doc_id, rowid = f
    raw = conn.execute(
        f"SELECT doc FROM {table_name(collection)} WHERE rowid = ?", (rowid,)
    ).fetchone()[0]
    highlights = _highlights(raw, target, request.query) if request.highlight else {}
    doc = raw if isinstance(raw, bytes) else raw.encode()
    return SearchHit(collection, doc_id, score, doc, highlights)


def _highlights(raw: Any, target: SearchTarget, query: SearchQuery) -> dict[str, str]:
    """Each searched field of one hit whose text has a match, marked: its strings in a
    private FTS5 table (one row each), queried with every positive term ORed."""
    terms = _any_term(query)
    if terms is None:
        return {}
    doc = orjson.loads(raw)
    searched = target.searched()
    if searched is None:
        fields = list(_strings(_readable(doc, target.readable, ""), ""))
        language = "simple"
    else:
        fields = []
        for path, _ in searched:
            node: Any = doc
            for seg in path:
                node = node.get(seg) if isinstance(node, dict) else None
            fields += [(".".join(path), s) for _, s in _strings(node, "")]
        assert target.declared is not None
        language = target.declared.language
    if not fields:
        return {}
    mem = sqlite3.connect(":memory:")
    try:
        mem.execute(
            f"CREATE VIRTUAL TABLE h USING fts5(x, p UNINDEXED, tokenize = '{tokenizer(language)}')"
        )
        clean = str.maketrans("", "", MARK_START + MARK_STOP)
        mem.executemany(
            "INSERT INTO h (x, p) VALUES (?, ?)", [(s.translate(clean), p) for p, s in fields]
        )
        rows = mem.execute(
            f"SELECT p, snippet(h, 0, {_SNIPPET}) FROM h WHERE h MATCH ? ORDER BY rowid",
            (terms,),
        ).fetchall()
    finally:
        mem.close()
    out: dict[str, list[str]] = {}
    for path, text in rows:
        if has_mark(text):
            out.setdefault(path, []).append(marked(text))
    return {p: FRAGMENT_SEPARATOR.join(v) for p, v in out.items()}
