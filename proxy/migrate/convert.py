"""``partition_collection``: an existing collection converted to a partitioned one, copied
in keyset batches with its progress in the migration record, its writes refused meanwhile."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from proxy.backends.migrations import MigrationSession
from proxy.errors import BadRequest, ProxyError
from proxy.migrate import steps
from proxy.migrate.ops import Migration
from proxy.schema.model import CollectionSchema, check_partitioned


async def partition_collection(
    session: MigrationSession,
    m: Migration,
    record: dict[str, Any],
    progress: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Begin (checks, writes refused, the empty copy), copy batch by batch (each its own
    transaction saving ``progress.after``), then swap the copy in with the schema; any
    failure removes the copy and lets writes through again."""
    i = record["step"]
    op = m.operations[i]
    assert op.collection is not None and op.partitioning is not None
    c, spec = op.collection, op.partitioning
    done = record.get("progress") or {}
    if done.get("step") != i:
        async with session.transaction() as tx:
            new = await _target(tx, c, spec)
            total = await tx.begin_partitioning(c, spec)
            done = {"step": i, "rows_done": 0, "rows_total": total, "after": ""}
            record["progress"] = done
            await tx.save(record)
    try:
        while True:
            async with session.transaction() as tx:
                n, last = await tx.copy_partition_batch(c, spec, done["after"], op.batch_size)
                if n:
                    done = {**done, "rows_done": done["rows_done"] + n, "after": last}
                record["progress"] = done
                await tx.save(record)
            if progress is not None:
                progress(record)
            if not n:
                break
        async with session.transaction() as tx:
            state = steps.TxState()
            new = await _target(tx, c, spec)
            await tx.finish_partitioning(c, spec, new.all_indexes(), steps.index_kinds(new))
            await steps.save_schema(tx, state, c, new)
            record["step"] = i + 1
            await tx.save(record)
    except (ProxyError, OSError):
        async with session.transaction() as tx:
            await tx.abandon_partitioning(c)
        raise


async def _target(tx: Any, collection: str, spec: Any) -> CollectionSchema:
    state = steps.TxState()
    schema = await steps.current_schema(tx, state, collection) or CollectionSchema(collection)
    if schema.search is not None:
        raise BadRequest(
            "a collection with full-text search cannot be partitioned yet",
            code="unsupported",
            details={"collection": collection, "feature": "partition_collection+search"},
        )
    new = dataclasses.replace(schema, partitioning=spec)
    check_partitioned(new, spec, "partition_collection")
    return new
