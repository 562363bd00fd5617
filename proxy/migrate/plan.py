"""A dry run's plan: each step, its SQL text where there is one, the documents it touches;
computed inside a transaction that is rolled back, so nothing changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from proxy.backends.migrations import MigrationSession, MigrationStore, MigrationTx
from proxy.migrate import steps
from proxy.migrate.ops import Migration, Operation
from proxy.migrate.steps import TxState


class DryRun(Exception):
    """Raised inside the plan's transaction to roll it back, carrying the plan."""

    def __init__(self, found: list[dict[str, Any]]) -> None:
        super().__init__("dry run")
        self.steps = found


async def plan(
    store: MigrationStore,
    session: MigrationSession,
    tx: MigrationTx,
    m: Migration,
    start: int,
    alembic: Callable[..., Any] | None,
) -> list[dict[str, Any]]:
    out = []
    state = TxState()
    for i, op in enumerate(m.operations):
        step: dict[str, Any] = {"step": i, "op": op.kind, "collection": op.collection}
        if i < start:
            step["done"] = True
            out.append(step)
            continue
        step.update(await _describe(store, session, tx, state, op, alembic))
        out.append(step)
    return out


async def _describe(
    store: MigrationStore,
    session: MigrationSession,
    tx: MigrationTx,
    state: TxState,
    op: Operation,
    alembic: Callable[..., Any] | None,
) -> dict[str, Any]:
    c = op.collection
    if op.kind in ("backfill", "rename_field"):
        assert c is not None
        return {
            "mode": "batches" if op.kind == "backfill" else "transaction",
            "batch_size": op.batch_size,
            "documents": await session.count(c, op.filter),
        }
    if op.kind == "create_index":
        assert c is not None and op.index is not None
        schema = await steps.current_schema(tx, state, c)
        kinds = steps.index_kinds(steps.with_index(schema, c, op.index) or schema)
        online = await tx.needs_online(c)
        return {
            "mode": "online" if online else "transaction",
            "sql": store.index_sql(c, op.index, kinds),
            "documents": await session.count(c, None),
        }
    if op.kind in ("create_collection", "set_schema"):
        assert c is not None
        enforced = op.schema is not None and op.schema.validation.enforced
        info: dict[str, Any] = {"mode": "transaction", "exists": await tx.table_exists(c)}
        if op.schema is not None:
            info["schema"] = op.schema.to_dict()
            info["documents_checked"] = await session.count(c, None) if enforced else 0
        return info
    if op.kind == "partition_collection":
        assert c is not None and op.partitioning is not None
        return {
            "mode": "copy",
            "partitioning": op.partitioning.to_dict(),
            "documents": await session.count(c, None),
            "batch_size": op.batch_size,
            "writes_during_copy": "refused: 503 collection_being_partitioned, Retry-After",
        }
    if op.kind == "drop_collection":
        assert c is not None
        return {"mode": "transaction", "documents": await session.count(c, None)}
    if op.kind == "sql":
        return {"mode": "transaction", "sql": op.sql}
    if op.kind == "alembic_upgrade":
        assert alembic is not None and op.revision is not None
        result = alembic(op.revision, True)
        if asyncio.iscoroutine(result):
            result = await result
        return {"mode": "alembic", "revision": op.revision, "plan": result}
    return {"mode": "transaction"}  # drop_index
