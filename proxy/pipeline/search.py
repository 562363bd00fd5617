"""The search operation: ``POST /api/db/search`` through the policy (grant ``search`` per
collection, row rules inside the statement, hidden fields never searched, ranked on,
highlighted or returned), one backend call, keyset cursors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from proxy import numbers
from proxy.backends.base import Backend, Documents, Unsupported
from proxy.config import Limits
from proxy.pipeline.gate import OPEN, Caller, Gatekeeper
from proxy.pipeline.schemas import SchemaRegistry
from proxy.policy.decide import Decision
from proxy.query import cursor as cursors
from proxy.query.ast import MATCH_ALL, And, Filter
from proxy.query.project import project
from proxy.query.search import (
    Keyset,
    SearchHit,
    SearchRequest,
    SearchSpec,
    SearchTarget,
    parse_search_body,
)


class SearchOps:
    """Mixed into the core: ``gate``, ``limits``, ``schemas`` and ``backend`` are its."""

    gate: Gatekeeper
    limits: Limits
    schemas: SchemaRegistry
    backend: Callable[[], Backend]

    async def search(
        self, body: Any, caller: Caller = OPEN, target: Documents | None = None
    ) -> dict[str, Any]:
        """The answer's JSON: ``{"items", "next"}`` (and ``"total"`` when asked)."""
        spec = parse_search_body(body, self.limits)
        backend = self.backend()
        if not backend.capabilities.search:
            raise Unsupported.refusal("full-text search")
        if spec.collections is not None:  # named: each one granted, or 403
            names = sorted(spec.collections)
            decisions = [caller.decisions.get(n, "search") for n in names]
            for d in decisions:
                d.authorize(in_transaction=target is not None)
        else:  # every collection the caller may search; the others are simply left out
            every = await (target or backend).collection_names()
            decisions = [
                d
                for d in (caller.decisions.get(n, "search") for n in every)
                if d.granted and (target is None or d.in_transaction)
            ]
        targets = []
        for d in decisions:
            d.check_filter(spec.filter)  # a hidden field is no filter either: 403
            d.check_fields(spec.fields)
            active = await self.schemas.of(backend, d.collection)
            declared = active.schema.search if active is not None else None
            readable = d.readable.readable if d.readable is not None else None
            targets.append(SearchTarget(d.collection, _guard(d, spec, caller), readable, declared))
        tag = _tag(spec)
        after = _after(spec.cursor, tag)
        if caller.metered:  # after validation: bad input costs nothing
            await self.gate.admit(caller, "search")
        request = SearchRequest(
            spec.query, tuple(targets), spec.limit, after, spec.highlight, spec.total
        )
        found = await (target or backend).search(request)
        hits = found.hits[: spec.limit]
        by_name = {d.collection: d for d in decisions}
        out: dict[str, Any] = {
            "items": [_item(hit, by_name[hit.collection], spec) for hit in hits],
            "next": _encode(tag, hits[-1]) if len(found.hits) > spec.limit else None,
        }
        if spec.total:
            out["total"] = found.total
        return out


def _guard(d: Decision, spec: SearchSpec, caller: Caller) -> Filter | None:
    rows = d.row_filter(caller.headers)
    given = None if spec.filter == MATCH_ALL else spec.filter
    if rows is None or given is None:
        return rows if given is None else given
    return And((rows, given))


def _tag(spec: SearchSpec) -> str:
    """A cursor belongs to one query over the collections it names (or all of them: one
    created between two pages then takes part, its hits placed by the same keyset)."""
    named = sorted(spec.collections) if spec.collections is not None else None
    shape = orjson.dumps([spec.q, named, repr(spec.filter)])
    return cursors.sort_tag("search:" + shape.decode())


def _after(token: str | None, tag: str) -> Keyset | None:
    if token is None:
        return None
    score, collection, doc_id = cursors.decode(token, tag, [float, str, str])
    return (float(score), str(collection), str(doc_id))


def _encode(tag: str, hit: SearchHit) -> str:
    return cursors.encode(tag, [hit.score, hit.collection, hit.id])


def _item(hit: SearchHit, d: Decision, spec: SearchSpec) -> dict[str, Any]:
    doc = d.visible(numbers.loads_stored(hit.document))
    if spec.fields is not None:
        doc = project(doc, spec.fields)
    item: dict[str, Any] = {
        "collection": hit.collection,
        "_id": hit.id,
        "score": hit.score,
        "document": doc,
    }
    if spec.highlight:
        item["highlights"] = hit.highlights
    return item
