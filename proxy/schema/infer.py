"""Field types inferred from a bounded sample of documents, for a collection nothing declared
(``GET /api/db/schema/{collection}``); each inferred field is a valid field declaration."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

import jsonschema_rs

from proxy.schema.model import MAX_PATH_DEPTH, SEGMENT_RE

_TRACKED_PER_FIELD: Final = 10  # paths tracked before the cut: max_fields times this
_DATE_PREFIX: Final = re.compile(r"\d{4}-\d\d-\d\d[Tt]")
# the same check the validator runs for ``datetime``, so an inferred datetime always validates
_DATETIME: Final = jsonschema_rs.validator_for(
    {"type": "string", "format": "date-time"}, validate_formats=True
)


def value_type(value: Any) -> str:
    """The FIELD_TYPES name of a decoded JSON value (a float is ``number`` even when integral:
    it was written with a fraction or an exponent)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, str):
        if _DATE_PREFIX.match(value) and _DATETIME.is_valid(value):
            return "datetime"
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return "number"  # float, or a stored number beyond double range (numbers.Unrepresentable)


def infer_fields(
    docs: Iterable[Mapping[str, Any]], *, max_depth: int = 3, max_fields: int = 200
) -> list[dict[str, Any]]:
    """Each field path seen in ``docs`` (object keys to ``max_depth`` segments; arrays are not
    descended; keys that are not declarable segments, and ``_version``, are skipped) as
    ``{"name", "type": [sorted type names], "present": fraction of documents, "inferred":
    True}``, sorted by name. Past ``max_fields`` paths, the most present ones are kept.

    A field is ``datetime`` when every string it holds is an RFC 3339 date-time, ``string``
    otherwise; integers and other numbers are ``integer`` and ``number``."""
    depth = max(1, min(max_depth, MAX_PATH_DEPTH))
    cap = max_fields * _TRACKED_PER_FIELD
    seen: dict[str, tuple[set[str], list[int]]] = {}  # path → (types, [documents holding it])
    total = 0
    for doc in docs:
        if not isinstance(doc, Mapping):
            continue
        total += 1
        _walk(doc, "", 1, depth, seen, cap)
    if not total:
        return []
    kept = sorted(seen.items(), key=lambda kv: (-kv[1][1][0], kv[0]))[:max_fields]
    out = []
    for name, (types, count) in sorted(kept):
        if "datetime" in types and "string" in types:
            types.discard("datetime")  # some string is not a date-time
        out.append(
            {
                "name": name,
                "type": sorted(types),
                "present": round(count[0] / total, 4),
                "inferred": True,
            }
        )
    return out


def _walk(
    obj: Mapping[str, Any],
    prefix: str,
    level: int,
    depth: int,
    seen: dict[str, tuple[set[str], list[int]]],
    cap: int,
) -> None:
    for key, value in obj.items():
        if not isinstance(key, str) or not SEGMENT_RE.fullmatch(key):
            continue
        if level == 1 and key == "_version":
            continue
        path = prefix + key
        entry = seen.get(path)
        if entry is None:
            if len(seen) >= cap:
                continue
            entry = seen[path] = (set(), [0])
        entry[0].add(value_type(value))
        entry[1][0] += 1  # a key appears once per object, so once per document here
        if level < depth and isinstance(value, Mapping):
            _walk(value, path + ".", level + 1, depth, seen, cap)
