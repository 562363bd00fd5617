"""What the schema endpoint reads from MongoDB: the declared schemas (``_schemas``), and one
collection as the server has it (its indexes, estimated count and size, a bounded sample)."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.backends.mongo.migrations import SCHEMAS


async def load_schemas(db: Any) -> dict[str, tuple[int, dict[str, Any]]]:
    rows = await db[SCHEMAS].find({}).to_list()
    return {r["_id"]: (int(r["version"]), orjson.loads(r["schema"])) for r in rows}


async def describe_collection(db: Any, collection: str, sample: int) -> dict[str, Any]:
    if collection not in await db.list_collection_names(filter={"name": collection}):
        return {"exists": False, "indexes": [], "estimated_count": 0, "size_bytes": 0, "sample": []}
    stats = await db.command({"collStats": collection})
    sizes = stats.get("indexSizes") or {}
    cur = await db[collection].list_indexes()
    indexes = [
        {
            "physical_name": ix["name"],
            "unique": bool(ix.get("unique")),
            "valid": True,  # createIndexes answers once the index is built
            "size_bytes": int(sizes[ix["name"]]) if ix["name"] in sizes else None,
            "definition": orjson.dumps(
                {k: ix[k] for k in ("key", "unique", "partialFilterExpression") if k in ix}
            ).decode(),
        }
        for ix in await cur.to_list()
        if ix["name"] != "_id_"
    ]
    docs = await db[collection].find({}).limit(sample).to_list() if sample > 0 else []
    return {
        "exists": True,
        "indexes": indexes,
        "estimated_count": int(await db[collection].estimated_document_count()),
        "size_bytes": int(stats.get("size", 0)) + int(stats.get("totalIndexSize", 0)),
        "sample": [dict(d) for d in docs],
    }
