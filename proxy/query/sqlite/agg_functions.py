"""The value-level helpers SQLite lacks that compiled aggregation pipelines call (paths through
arrays, setting/removing/keeping dotted paths, readable projection, number formatting,
half-even rounding), their SQL names, and the refusal a failing expression raises."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from proxy.errors import InvalidQuery
from proxy.numbers import INT64_MAX, INT64_MIN
from proxy.policy.model import is_listed
from proxy.query.sqlite.functions import loads
from proxy.query.sqlite.values import json_text

FN_AGG_FAIL = "dbp_agg_fail"  # (message) -> raises expression_failed; not deterministic
FN_AGG_TOO_LARGE = "dbp_agg_too_large"  # (message) -> raises result_too_large; the same
FN_GET = "dbp_agg_get"  # (json, path json) -> json at the path, arrays mapped; NULL: missing
FN_SET = "dbp_agg_set"  # (doc, path json, json | NULL) -> doc with the path set / removed
FN_UNSET = "dbp_agg_unset"  # (doc, paths json) -> doc without the paths
FN_KEEP = "dbp_agg_keep"  # (doc, paths json) -> doc with only the paths (inclusion)
FN_READABLE = "dbp_agg_readable"  # (doc, readable names json) -> the readable part
FN_JNUM = "dbp_agg_jnum"  # (SQL number) -> JSON number text; NULL when not finite
FN_ROUND = "dbp_agg_round"  # (json number, place) -> json number, half to even
FN_TOSTR = "dbp_agg_tostr"  # (json number) -> json string of its digits
FN_SUM = "dbp_agg_sum"  # (sum of high halves, of low halves, of doubles) -> json number
FN_TODOUBLE = "dbp_agg_todouble"  # (text) -> real, NULL when not a finite decimal

_MISSING: Any = object()
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def agg_fail(message: str) -> None:
    raise InvalidQuery(message, code="expression_failed")


def agg_too_large(message: str) -> None:
    raise InvalidQuery(message, code="result_too_large")


@functools.lru_cache(maxsize=1024)
def _segments(path: str) -> tuple[str, ...]:
    return tuple(orjson.loads(path))


def _get(value: Any, segs: tuple[str, ...]) -> Any:
    if not segs:
        return value
    if isinstance(value, dict):
        return _get(value[segs[0]], segs[1:]) if segs[0] in value else _MISSING
    if isinstance(value, list):
        found = (_get(v, segs) for v in value if isinstance(v, dict | list))
        return [v for v in found if v is not _MISSING]
    return _MISSING


def get_path(raw: str | None, path: str) -> str | None:
    """An expression's field path: objects by key, arrays mapped (scalars skipped)."""
    if raw is None:
        return None
    out = _get(loads(raw), _segments(path))
    return None if out is _MISSING else json_text(out)


def _build(segs: tuple[str, ...], value: Any) -> Any:
    for seg in reversed(segs):
        value = {seg: value}
    return value


def _set(node: Any, segs: tuple[str, ...], value: Any) -> Any:
    if isinstance(node, list):
        return [_set(v, segs, value) for v in node]
    if not isinstance(node, dict):
        return _build(segs, value)
    out = dict(node)
    key = segs[0]
    if len(segs) == 1:
        out[key] = value
    elif key in out:
        out[key] = _set(out[key], segs[1:], value)
    else:
        out[key] = _build(segs[1:], value)
    return out


def set_path(raw: str, path: str, value: str | None) -> str:
    """``$addFields`` of one dotted path (``value`` NULL: the path removed)."""
    segs = _segments(path)
    if value is None:  # missing: the path is removed, nothing is created
        return json_text(_unset(loads(raw), segs))
    return json_text(_set(loads(raw), segs, loads(value)))


def _unset(node: Any, segs: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_unset(v, segs) for v in node]
    if not isinstance(node, dict) or segs[0] not in node:
        return node
    out = dict(node)
    if len(segs) == 1:
        del out[segs[0]]
    else:
        out[segs[0]] = _unset(out[segs[0]], segs[1:])
    return out


def unset_paths(raw: str, paths: str) -> str:
    doc = loads(raw)
    for segs in orjson.loads(paths):
        doc = _unset(doc, tuple(segs))
    return json_text(doc)


@functools.lru_cache(maxsize=1024)
def _tree(paths: str) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for segs in orjson.loads(paths):
        node = tree
        for seg in segs[:-1]:
            nxt = node.get(seg)
            if nxt is True:
                break
            node = node.setdefault(seg, {})
        else:
            node[segs[-1]] = True
    return tree


def _keep(node: Any, tree: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            sub = tree.get(key)
            if sub is True:
                out[key] = value
            elif sub is not None:
                kept = _keep(value, sub)
                if kept is not _MISSING:
                    out[key] = kept
        return out
    if isinstance(node, list):
        kept_items = (_keep(v, tree) for v in node if isinstance(v, dict | list))
        return [v for v in kept_items if v is not _MISSING]
    return _MISSING


def keep_paths(raw: str, paths: str) -> str:
    """Inclusion ``$project`` of stored paths (arrays on the way: object elements kept)."""
    return json_text(_keep(loads(raw), _tree(paths)))


@functools.lru_cache(maxsize=256)
def _names(readable: str) -> frozenset[str]:
    return frozenset(orjson.loads(readable))


def _readable(doc: dict[str, Any], names: frozenset[str], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = prefix + key
        if is_listed(path, names):
            out[key] = value
        elif isinstance(value, dict):
            inner = _readable(value, names, path + ".")
            if inner:
                out[key] = inner
    return out


def readable_part(raw: str, readable: str) -> str:
    """The document as a caller with these readable fields sees it (``FieldRule.can_read``)."""
    return json_text(_readable(loads(raw), _names(readable), ""))


def jnum(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return orjson.dumps(value).decode()
    return str(int(value))


def sum_parts(high: int | None, low: int | None, doubles: float | None) -> str:
    """``$sum``: the integers summed exactly from their 32-bit halves (past 64 bits the sum
    is a double, as in MongoDB), plus the doubles; ``0`` of nothing."""
    total: int | float = (high or 0) * 2**32 + (low or 0)
    if not INT64_MIN <= total <= INT64_MAX:
        total = float(total)
    if doubles is not None:
        total += doubles
    return jnum(total) or "null"


def round_half_even(raw: str | None, place: int | None) -> str | None:
    if raw is None or place is None:
        return None
    value = loads(raw)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):
        return str(value if place >= 0 else round(value, place))
    return jnum(round(value, place))


def to_string(raw: str | None) -> str | None:
    """``$toString`` of a JSON number: integral values below 2^53 as digits."""
    if raw is None:
        return None
    value = loads(raw)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2**53:
            value = int(value)
        else:
            return orjson.dumps(repr(value)).decode()
    return orjson.dumps(str(value)).decode()


def to_double(text: Any) -> float | None:
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


class Helper(NamedTuple):
    name: str
    n_args: int
    fn: Callable[..., Any]


# all deterministic (FN_AGG_FAIL is registered apart: it must never be constant-folded)
HELPERS = tuple(
    Helper(*h)
    for h in (
        (FN_GET, 2, get_path),
        (FN_SET, 3, set_path),
        (FN_UNSET, 2, unset_paths),
        (FN_KEEP, 2, keep_paths),
        (FN_READABLE, 2, readable_part),
        (FN_JNUM, 1, jnum),
        (FN_ROUND, 2, round_half_even),
        (FN_TOSTR, 1, to_string),
        (FN_SUM, 3, sum_parts),
        (FN_TODOUBLE, 1, to_double),
    )
)
