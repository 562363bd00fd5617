"""PostgreSQL compilation of declared scalar paths: filters and sort keys on the one
expression an index on the path is built with (docs/query-language.md, "Declared paths")."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import InvalidQuery
from proxy.query import cursor as cursors
from proxy.query.ast import Cmp, Eq, Exists, In, Path, Pred, SortKey
from proxy.query.common import TYPE_RANKS, Kinds, declared_kind, keyset_after

PG_TYPES = {
    "null": "null",
    "number": "number",
    "string": "string",
    "object": "object",
    "array": "array",
    "bool": "boolean",
}
RANK_SQL = (
    "CASE jsonb_typeof({x}) "
    + " ".join(f"WHEN '{PG_TYPES[t]}' THEN {r}" for t, r in TYPE_RANKS.items() if r > 1)
    + " ELSE 1 END"
)
TEXT_KEY_SQL = (
    "COALESCE(CASE WHEN jsonb_typeof({x}) = 'string' THEN {x} #>> '{{}}' END, '') COLLATE \"C\""
)
JSON_KEY_SQL = "COALESCE({x}, 'null'::jsonb)"

Add = Callable[[Any, str], str]  # Params.add: a bound value and its cast → its placeholder

_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
# the smallest value of a kind in jsonb order (null < string < number < boolean): a lower
# bound that keeps $lt/$lte off null (a declared number path holds no strings)
_JSONB_FLOOR = {"number": "> 'null'::jsonb", "boolean": ">= 'false'::jsonb"}


@functools.lru_cache(maxsize=4096)
def declared_expr(path: tuple[str, ...], kind: str, doc: str = "t.doc") -> str:
    """The expression of a declared scalar path of ``kind`` (``number``, ``string``,
    ``boolean``): the one expression both an index on the path and a query that may use it
    are written with, so the planner matches them. Never fails on any stored value.
    The segments are declared names (``proxy.schema.model.SEGMENT_RE``), never request text.
    Strings are text in byte order (missing and null are SQL NULL); numbers and booleans
    stay jsonb (missing is JSON null), whose order within one kind is MongoDB's."""
    keys = [f"'{seg}'" for seg in path]
    if kind == "string":
        head = "".join(f" -> {k}" for k in keys[:-1])
        return f'(({doc}{head} ->> {keys[-1]}) COLLATE "C")'
    return f"COALESCE({doc}{''.join(f' -> {k}' for k in keys)}, 'null'::jsonb)"


@functools.lru_cache(maxsize=4096)
def declared_order(path: tuple[str, ...], kind: str, descending: bool, doc: str = "t.doc") -> str:
    """One ORDER BY item (or index column) of a declared path in MongoDB's order: missing
    and null first ascending, last descending. An index column written this way serves
    both directions (scanned backwards for the other)."""
    expr = declared_expr(path, kind, doc)
    if kind != "string":  # never SQL NULL: JSON null sorts first in jsonb order
        return f"{expr} DESC" if descending else expr
    return f"{expr} DESC NULLS LAST" if descending else f"{expr} NULLS FIRST"


def _present(path: tuple[str, ...], doc: str) -> str:
    return doc + "".join(f" -> '{seg}'" for seg in path) + " IS NOT NULL"


def _jsonb(value: Any) -> str:
    return orjson.dumps(value).decode()


def _text(value: str) -> str:
    if "\x00" in value:
        raise InvalidQuery("strings may not contain the NUL character", code="invalid_value")
    return value


def typed_pred(path: Path, kind: str, pred: Pred, doc: str, add: Add) -> str:
    """``pred`` (one ``common.typed_ok`` accepts) on the declared path; never SQL NULL."""
    segs = path.segments
    if isinstance(pred, Exists):
        test = _present(segs, doc)
        return f"({test})" if pred.present else f"(NOT ({test}))"
    e = declared_expr(segs, kind, doc)
    if kind == "string":
        return _text_pred(e, pred, add)
    if isinstance(pred, Eq):
        if pred.value is None:
            return f"{e} = 'null'::jsonb"
        return f"{e} = {add(_jsonb(pred.value), 'jsonb')}"
    if isinstance(pred, Cmp):
        test = f"{e} {_OPS[pred.op]} {add(_jsonb(pred.value), 'jsonb')}"
        return f"({e} {_JSONB_FLOOR[kind]} AND {test})" if pred.op in ("lt", "lte") else test
    assert isinstance(pred, In)
    if not pred.values:
        return "FALSE"
    return f"{e} = ANY({add([_jsonb(v) for v in pred.values], 'jsonb[]')})"


def _text_pred(e: str, pred: Pred, add: Add) -> str:
    """On ``e`` (text, NULL for missing and null): ``AND e IS NOT NULL`` turns a NULL test
    into false, so a negation stays sound."""
    if isinstance(pred, Eq):
        if pred.value is None:
            return f"({e} IS NULL)"
        return f"({e} = {add(_text(pred.value), 'text')} AND {e} IS NOT NULL)"
    if isinstance(pred, Cmp):
        return f"({e} {_OPS[pred.op]} {add(_text(pred.value), 'text')} AND {e} IS NOT NULL)"
    assert isinstance(pred, In)
    strings = [_text(v) for v in pred.values if v is not None]
    parts = [f"({e} = ANY({add(strings, 'text[]')}) AND {e} IS NOT NULL)"] if strings else []
    if len(strings) < len(pred.values):
        parts.append(f"{e} IS NULL")
    if not parts:
        return "FALSE"
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


# ---- sort keys and keyset cursors ---------------------------------------------------------

# the generic keys of one sort path: type bracket, text, jsonb (proxy.query.pg.sort_exprs)
GENERIC_CASTS = ("int", "text", "jsonb")
_CAST_KINDS: dict[str, type] = {"int": int, "text": str, "jsonb": str}


@dataclass(frozen=True, slots=True)
class SortPlan:
    """The ORDER BY of a find: its expressions (each with its direction and whether it can
    be SQL NULL), the casts of the cursor values, and the cursor's tag."""

    exprs: tuple[tuple[str, bool], ...]
    nullable: tuple[bool, ...]
    casts: tuple[str, ...]
    tag: str
    bound: tuple[bool, ...]  # a declared, never-NULL first key: the cursor bounds it (index)

    def order_by(self, alias: str | None = None) -> str:
        """The ORDER BY list; with ``alias``, over the keys ``k0, k1...`` of that row."""
        out = []
        for i, ((expr, desc), null) in enumerate(zip(self.exprs, self.nullable, strict=True)):
            e = f"{alias}.k{i}" if alias else expr
            nulls = (" NULLS LAST" if desc else " NULLS FIRST") if null else ""
            out.append(f"{e}{' DESC' if desc else ''}{nulls}")
        return ", ".join(out)

    def decode(self, token: str) -> list[Any]:
        kinds = [
            object if n else _CAST_KINDS[c] for c, n in zip(self.casts, self.nullable, strict=True)
        ]
        values = cursors.decode(token, self.tag, kinds)
        for v, null in zip(values, self.nullable, strict=True):
            if null and not (v is None or isinstance(v, str)):
                raise InvalidQuery(
                    "next cursor is invalid or belongs to another query", code="invalid_cursor"
                )
        return values

    def after(self, values: Sequence[Any], add: Add) -> str:
        """Rows strictly after the cursor row."""
        if len(values) != len(self.exprs):
            raise ValueError("one cursor value per sort expression")
        placeholders: dict[int, str] = {}

        def bind(i: int) -> str:
            placeholders[i] = add(values[i], self.casts[i])
            return placeholders[i]

        sql = keyset_after(self.exprs, bind, nullable=self.nullable)
        if self.bound and self.bound[0]:  # redundant, but an index range condition
            expr, desc = self.exprs[0]
            sql = f"{expr} {'<=' if desc else '>='} {placeholders[0]} AND {sql}"
        return sql


def sort_plan(
    keys: Sequence[SortKey], add: Add, kinds: Kinds | None = None, doc: str = "t.doc"
) -> SortPlan:
    """Declared paths sort on their declared expression (one key, index-ordered); the
    others on the three generic keys; ``_id`` last. A sort on declared paths only binds
    nothing, so its plan is built once per (sort, schema)."""
    if kinds and doc == "t.doc" and all(declared_kind(kinds, k.path) for k in keys):
        cache_key = (tuple(keys), tuple(sorted(kinds.items())))
        plan = _TYPED_PLANS.get(cache_key)
        if plan is None:
            if len(_TYPED_PLANS) > 4096:
                _TYPED_PLANS.clear()
            plan = _TYPED_PLANS[cache_key] = _sort_plan(keys, add, kinds, doc)
        return plan
    return _sort_plan(keys, add, kinds, doc)


_TYPED_PLANS: dict[Any, SortPlan] = {}


def _sort_plan(keys: Sequence[SortKey], add: Add, kinds: Kinds | None, doc: str) -> SortPlan:
    exprs: list[tuple[str, bool]] = []
    nullable: list[bool] = []
    casts: list[str] = []
    bound: list[bool] = []
    typed: list[tuple[int, str]] = []
    for n, key in enumerate(keys):
        kind = declared_kind(kinds, key.path) if kinds else None
        if kind is not None:
            typed.append((n, kind))
            exprs.append((declared_expr(key.path.segments, kind, doc), key.descending))
            nullable.append(kind == "string")
            casts.append("text" if kind == "string" else "jsonb")
            bound.append(kind != "string")
            continue
        path = add(list(key.path.segments), "text[]")
        x = f"({doc} #> {path})"
        for sql in (RANK_SQL, TEXT_KEY_SQL, JSON_KEY_SQL):
            exprs.append((sql.format(x=x), key.descending))
        nullable += [False] * 3
        casts += GENERIC_CASTS
        bound += [False] * 3
    exprs.append(("t._id", False))
    nullable.append(False)
    casts.append("text")
    bound.append(False)
    tag_src = repr(tuple(keys)) + (repr(typed) if typed else "")
    return SortPlan(
        tuple(exprs), tuple(nullable), tuple(casts), cursors.sort_tag(tag_src), tuple(bound)
    )
