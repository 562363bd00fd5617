"""Opaque keyset cursors: the sort key of a page's last row, bound to the query's sort."""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

import orjson

from proxy.errors import InvalidQuery

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def sort_tag(sort_repr: str) -> str:
    """A short fingerprint of the sort spec, so a cursor can't be replayed on another sort."""
    return hashlib.blake2s(sort_repr.encode(), digest_size=6).hexdigest()


def encode(tag: str, values: list[Any]) -> str:
    raw = orjson.dumps([tag, values])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode(token: Any, tag: str, kinds: list[type]) -> list[Any]:
    """Decode and type-check a cursor; ``kinds`` gives the Python type of every value."""
    bad = InvalidQuery("next cursor is invalid or belongs to another query", code="invalid_cursor")
    if not isinstance(token, str) or len(token) > 8192:
        raise bad
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise bad from None
    if not (isinstance(data, list) and len(data) == 2 and data[0] == tag):
        raise bad
    values = data[1]
    if not isinstance(values, list) or len(values) != len(kinds):
        raise bad
    for v, kind in zip(values, kinds, strict=True):
        if isinstance(v, int) and not _INT32[0] <= v <= _INT32[1] and kind is int:
            raise bad  # an int kind is a type rank: a bound parameter of 32 bits
        if isinstance(v, int) and not _INT64[0] <= v <= _INT64[1]:
            raise bad
        if kind is object:
            continue
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise bad
    return values
