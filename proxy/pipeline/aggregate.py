"""Aggregation through the one pipeline sequence: parse → decide (the collection's and each
looked-up one's) → validate the paths named → limit → one statement → the row cap."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from proxy.backends.base import Backend, Documents, Unsupported, check_collection
from proxy.config import Limits
from proxy.errors import BadRequest
from proxy.pipeline.gate import OPEN, Caller, Gatekeeper
from proxy.pipeline.schemas import ActiveSchema, SchemaRegistry
from proxy.policy.decide import Decision, denial
from proxy.query.aggregate.ast import Aggregated, AggregateSpec, FieldPath, View
from proxy.query.aggregate.parse import foreign_paths, parse_body, source_paths


class AggregateOps:
    """``aggregate``: mixed into the core next to the document operations."""

    gate: Gatekeeper
    limits: Limits
    schemas: SchemaRegistry
    backend: Callable[[], Backend]

    async def aggregate(
        self,
        collection: str,
        body: Any,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> Aggregated:
        check_collection(collection)
        d = caller.decisions.get(collection, "aggregate")
        d.authorize(in_transaction=target is not None)
        pipeline, explain = parse_body(body, self.limits)
        if explain and not caller.decisions.service_wide("monitor"):
            # a plan shows the whole table's estimates, rows the caller may not read included
            raise denial("monitor", "*")
        if not self.backend().capabilities.aggregate:
            raise Unsupported.refusal("aggregation")
        d.check_paths(".".join(p) for p, _ in source_paths(pipeline))
        foreign = foreign_paths(pipeline)
        views = tuple(_lookup_view(n, foreign.get(n, ()), caller, target) for n in pipeline.lookups)
        active = await self.schemas.of(self.backend(), collection)
        spec = AggregateSpec(
            pipeline,
            _view(d, collection, caller, active),
            views,
            self._cap(caller),
            explain,
            self.limits.max_aggregate_document_bytes,
        )
        if caller.metered:  # after validation: bad input costs nothing
            await self.gate.admit(caller, "aggregate")
        docs = target if target is not None else self.backend()
        result = await docs.aggregate(collection, spec)
        if len(result.items) > spec.cap:
            raise BadRequest(
                f"the pipeline gives more than {spec.cap} documents; narrow it with $match "
                "or $limit",
                code="result_too_large",
                details={"max_rows": spec.cap},
            )
        return result

    def _cap(self, caller: Caller) -> int:
        cap = self.limits.max_aggregate_rows
        policy_cap = self.gate.max_rows(caller)
        return cap if policy_cap is None else min(cap, policy_cap)


def _lookup_view(
    name: str,
    paths: Iterable[tuple[FieldPath, str]],
    caller: Caller,
    target: Documents | None,
) -> View:
    """A looked-up collection as the caller may read it (``read`` granted, or 403), the
    fields the pipeline matches on in it readable."""
    ld = caller.decisions.get(check_collection(name), "read")
    ld.authorize(in_transaction=target is not None)
    ld.check_paths(".".join(p) for p, _ in paths)
    return _view(ld, name, caller)


def _view(d: Decision, collection: str, caller: Caller, active: ActiveSchema | None = None) -> View:
    readable = d.readable.readable if d.readable is not None else None
    if active is None or not active.kinds:
        return View(collection, d.row_filter(caller.headers), readable)
    never_null = active.schema.never_null()
    return View(
        collection,
        d.row_filter(caller.headers),
        readable,
        scalars=frozenset(path for path, _ in active.kinds),
        numbers=frozenset(p for p, kind in active.kinds if kind == "number" and p in never_null),
    )
