"""Query patterns: the normalized shape of a request, values replaced and structure kept
(the rules: docs/observability.md, "Query patterns")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

__all__ = ["PATTERN_MAX_CHARS", "query_pattern"]

PATTERN_MAX_CHARS: Final = 500
_TRUNCATION: Final = "..."
_MAX_SHAPE_DEPTH: Final = 32
_REQUEST_KEYS: Final = frozenset(
    {"filter", "sort", "update", "fields", "limit", "skip", "next", "pipeline", "upsert"}
)
_LOGICAL: Final = frozenset({"$and", "$or", "$nor"})


class _Full(Exception):
    """The shape grew past PATTERN_MAX_CHARS: stop walking the body."""


class _ShapeWriter:
    """The pattern's text so far; raises _Full once it passes PATTERN_MAX_CHARS."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > PATTERN_MAX_CHARS:
            raise _Full


def _key_text(key: object) -> str:
    return orjson.dumps(key if isinstance(key, str) else str(key)).decode()


def _shape(value: Any, out: _ShapeWriter, depth: int = 0) -> None:
    """Structure kept, values replaced: sorted keys and operators kept, arrays of values
    ``[?]``, the arrays of ``$and``/``$or``/``$nor`` one shape per clause."""
    if isinstance(value, Mapping) and depth < _MAX_SHAPE_DEPTH:
        out.add("{")
        for n, key in enumerate(sorted(value, key=str)):
            if n:
                out.add(",")
            out.add(_key_text(key))
            out.add(":")
            child = value[key]
            if key in _LOGICAL and isinstance(child, list):
                _shape_each(child, out, depth + 1)
            else:
                _shape(child, out, depth + 1)
        out.add("}")
    elif isinstance(value, list | tuple):
        out.add("[?]")
    else:
        out.add("?")


def _shape_each(items: Sequence[Any], out: _ShapeWriter, depth: int) -> None:
    out.add("[")
    for n, item in enumerate(items):
        if n:
            out.add(",")
        _shape(item, out, depth)
    out.add("]")


def _sort_text(sort: Any) -> str:
    """``-age,name`` from any accepted spelling: that string, ``{"age": -1}``, or a list of
    names / ``[name, direction]`` pairs. Field names are structure, so they are kept."""
    if isinstance(sort, str):
        return ",".join(part.strip() for part in sort.split(",") if part.strip())
    if isinstance(sort, Mapping):
        items: Iterable[Any] = sort.items()
    elif isinstance(sort, list | tuple):
        items = sort
    else:
        return "?"
    keys = []
    for item in items:
        if isinstance(item, str):
            keys.append(item)
        elif isinstance(item, list | tuple) and len(item) == 2:
            name, direction = item
            descending = direction in (-1, "-1", "desc", "descending")
            keys.append(("-" if descending else "") + str(name))
        else:
            keys.append("?")
    return ",".join(keys)


def _fields_text(fields: Any) -> str:
    if isinstance(fields, str):
        names = [f.strip() for f in fields.split(",") if f.strip()]
    elif isinstance(fields, list | tuple):
        names = [str(f) for f in fields]
    else:
        return "?"
    return ",".join(sorted(set(names)))


def _write_request(body: Mapping[str, Any], out: _ShapeWriter) -> None:
    flt = body.get("filter")
    if flt is not None:
        out.add(" ")
        _shape(flt, out)
    if body.get("update") is not None:
        out.add(" update=")
        _shape(body["update"], out)
    pipeline = body.get("pipeline")
    if pipeline is not None:
        out.add(" pipeline=")
        if isinstance(pipeline, list):
            _shape_each(pipeline, out, 1)
        else:
            _shape(pipeline, out)
    if body.get("sort"):
        out.add(" sort=" + _sort_text(body["sort"]))
    if body.get("fields"):
        out.add(" fields=" + _fields_text(body["fields"]))


def query_pattern(operation: str, collection: str, body: Any) -> str:
    """The normalized shape of a request, e.g. ``find users {"age":{"$gt":?}} sort=-age``,
    at most PATTERN_MAX_CHARS long; ``body`` is parsed JSON or None (rules in the docs)."""
    out = _ShapeWriter()
    try:
        out.add(f"{operation} {collection}")
        if isinstance(body, Mapping) and body and all(k in _REQUEST_KEYS for k in body):
            _write_request(body, out)
        elif body is not None:
            out.add(" ")
            _shape(body, out)
    except _Full:
        text = "".join(out.parts)
        return text[: PATTERN_MAX_CHARS - len(_TRUNCATION)] + _TRUNCATION
    return "".join(out.parts)
