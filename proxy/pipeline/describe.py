"""``describe_schema`` (GET /api/db/schema/{collection}): the declared schema, the indexes as
the database has them, the estimates, and for an undeclared collection the field types
inferred from what the caller may list."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from proxy import numbers
from proxy.backends.base import Backend, check_collection
from proxy.backends.migrations import physical_index_name as index_name
from proxy.errors import UnsupportedByBackend
from proxy.pipeline.gate import OPEN, Caller, Gatekeeper
from proxy.pipeline.schemas import ActiveSchema, SchemaRegistry
from proxy.policy.decide import Decision
from proxy.query.ast import MATCH_ALL, Filter
from proxy.query.spec import FindSpec
from proxy.schema.infer import infer_fields
from proxy.schema.model import IndexSpec

INFER_SAMPLE: Final = 200  # documents read to infer the fields of an undeclared collection


class SchemaOps:
    """``describe_schema``: the declared schema, the indexes as the database has them, the
    estimates, and for an undeclared collection the field types inferred from a sample."""

    schemas: SchemaRegistry
    backend: Callable[[], Backend]
    gate: Gatekeeper

    async def describe_schema(self, collection: str, caller: Caller = OPEN) -> dict[str, Any]:
        check_collection(collection)
        d = caller.decisions.get(collection, "schema")
        d.authorize()
        if caller.metered:
            await self.gate.admit(caller, "schema")
        backend = self.backend()
        if not backend.capabilities.schemas:
            raise UnsupportedByBackend("this database keeps no collection schemas")
        active = await self.schemas.of(backend, collection)
        # what the caller may read decides what the sample (and the estimates) may show
        listing = caller.decisions.get(collection, "list")
        rows = listing.row_filter(caller.headers) if listing.granted else None
        seen = await backend.describe_collection(collection, 0)
        out: dict[str, Any] = {
            "collection": collection,
            "database": backend.name,
            "declared": active is not None,
            "version": active.version if active is not None else None,
            "schema": active.schema.to_dict() if active is not None else None,
            "exists": seen["exists"],
            "indexes": _indexes(active, seen["indexes"]),
        }
        parts = seen.get("partitions") or []
        if listing.granted and not listing.rows:
            out["estimated_count"] = seen["estimated_count"]
            out["size_bytes"] = seen["size_bytes"]
            if parts:
                out["partitions"] = parts
        else:  # row rules (or no list grant): the totals would tell what may not be read
            out["estimated_count"] = out["size_bytes"] = None
            if parts:  # the declaration's partitions, without what they hold
                out["partitions"] = [{"name": p["name"], "bounds": p["bounds"]} for p in parts]
        if active is None:
            out["inferred"] = await self._inferred(backend, collection, listing, rows)
        return out

    async def _inferred(
        self, backend: Backend, collection: str, listing: Decision, rows: Filter | None
    ) -> dict[str, Any]:
        if not listing.granted:
            return {"fields": [], "sample_size": 0, "note": "inference needs the list grant"}
        spec = FindSpec(filter=rows if rows is not None else MATCH_ALL, limit=INFER_SAMPLE)
        page = await backend.find(collection, spec)
        docs = [listing.visible(numbers.loads_stored(raw)) for raw in page.items]
        return {"fields": infer_fields(docs), "sample_size": len(docs)}


def _indexes(active: ActiveSchema | None, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The indexes as they exist, each with its declared name and fields where a declared
    index (or a unique constraint's) built it."""
    declared: dict[str, IndexSpec] = {}
    if active is not None:
        for ix in active.schema.all_indexes():
            declared[index_name(active.schema.name, ix.name)] = ix
    out = []
    for row in found:
        spec = declared.get(row["physical_name"])
        out.append(
            {
                "name": spec.name if spec is not None else row["physical_name"],
                "fields": [k.text for k in spec.keys] if spec is not None else None,
                "unique": row["unique"],
                "valid": row["valid"],
                "size_bytes": row["size_bytes"],
                "declared": spec is not None,
            }
        )
    return out
