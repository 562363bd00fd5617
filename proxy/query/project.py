"""Projection: keep only the requested paths of a document (plus ``_id`` and ``_version``)."""

from __future__ import annotations

from typing import Any

from proxy.query.ast import Path

ALWAYS = ("_id", "_version")


def project(doc: dict[str, Any], fields: tuple[Path, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {k: doc[k] for k in ALWAYS if k in doc}
    for path in fields:
        _copy(doc, out, path.segments)
    return out


def _copy(src: Any, dst: dict[str, Any], segs: tuple[str, ...]) -> None:
    head = segs[0]
    if not isinstance(src, dict) or head not in src:
        return
    value = src[head]
    if len(segs) == 1 or not isinstance(value, dict):
        # a leaf, or a path running through an array/scalar: keep the whole value
        if len(segs) == 1 or isinstance(value, list):
            dst[head] = value
        return
    child = dst.get(head)
    if not isinstance(child, dict):
        child = {}
        dst[head] = child
    _copy(value, child, segs[1:])
    if not child:
        del dst[head]
