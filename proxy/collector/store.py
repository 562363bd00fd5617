"""The collector's logic, free of any driver: a pushed batch as rollup rows, the fleet view
out of the merged rows, retention; the SQL is in ``proxy.backends.postgres.rollups``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import orjson

from proxy.collector.protocol import Batch
from proxy.observe.buckets import NUM_BUCKETS, summary

__all__ = ["CollectorStore", "FleetRows", "RollupDatabase", "rollup_rows", "slow_rows"]


class FleetRows(NamedTuple):
    """The rows of one fleet view, as the queries return them (records read by key)."""

    operations: list[Any]
    buckets: list[Any]
    patterns: list[Any]
    slow: list[Any]
    services: list[Any]


class RollupDatabase(Protocol):
    """Where the rollups persist (``proxy.backends.postgres.rollups.PostgresRollups``)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def health(self) -> dict[str, Any]: ...

    async def rotate_credentials(self, dsn: str) -> None: ...

    async def merge(
        self,
        batch: tuple[str, str, str],
        rollups: Sequence[tuple[Any, ...]],
        slow: Sequence[tuple[Any, ...]],
    ) -> bool: ...

    async def prune(self, batch_id_retention_seconds: float, slow_retention: int) -> None: ...

    async def instances(self) -> list[tuple[str, str]]: ...

    async def fleet(self, service: str | None, top: int, slow: int) -> FleetRows: ...


def rollup_rows(batch: Batch) -> list[tuple[Any, ...]]:
    """The pattern rows of ``batch``, in key order (one lock order: no deadlock)."""
    return [
        (
            batch.service,
            p.collection,
            p.operation,
            p.pattern,
            p.calls,
            sum(p.errors.values()),
            orjson.dumps(p.errors).decode(),
            p.total_ms,
            p.max_ms,
            p.documents,
            list(p.buckets),
            p.index_used,
        )
        for p in sorted(batch.patterns, key=lambda p: p.key)
    ]


def slow_rows(batch: Batch) -> list[tuple[Any, ...]]:
    """The slow-query rows of ``batch``."""
    return [
        (
            batch.service,
            batch.instance,
            s.query_id,
            s.timestamp,
            s.collection,
            s.operation,
            s.pattern,
            s.execution_time_ms,
            s.documents,
            s.success,
            s.error_code,
            s.index_used,
            s.plan,
        )
        for s in batch.slow
    ]


class CollectorStore:
    """The fleet rollups, merged additively so they survive restarts; ``start`` opens the
    database (retrying in the background while it is away)."""

    def __init__(
        self,
        database: RollupDatabase,
        *,
        slow_retention: int = 10_000,
        batch_id_retention_seconds: float = 86_400.0,
    ) -> None:
        self.database = database
        self.slow_retention = slow_retention
        self.batch_id_retention_seconds = batch_id_retention_seconds

    async def start(self) -> None:
        await self.database.start()

    async def close(self) -> None:
        await self.database.close()

    async def health(self) -> dict[str, Any]:
        return await self.database.health()

    async def rotate_credentials(self, dsn: str) -> None:
        """A secret of the database URL changed: reconnect with ``dsn``, gracefully."""
        await self.database.rotate_credentials(dsn)

    async def ingest(self, batch: Batch) -> bool:
        """Merge ``batch`` into the rollups, all or nothing. False (and nothing changed)
        when a batch with the same id was stored before: pushers retry after timeouts."""
        rollups, slow = rollup_rows(batch), slow_rows(batch)
        key = (batch.batch_id, batch.service, batch.instance)
        return await self.database.merge(key, rollups, slow)

    async def maintain(self) -> None:
        """Forget old batch ids and all but the newest ``slow_retention`` slow queries."""
        await self.database.prune(self.batch_id_retention_seconds, self.slow_retention)

    async def instances(self) -> list[tuple[str, str]]:
        """(service, instance) of every sidecar that ever pushed."""
        return await self.database.instances()

    async def fleet_performance(
        self, service: str | None = None, top: int = 20, slow: int = 50
    ) -> dict[str, Any]:
        """Fleet-wide percentiles per (operation, collection) from merged buckets, the top
        patterns by total time, the newest slow queries, and a per-service table."""
        rows = await self.database.fleet(service, top, slow)
        return {
            "scope": "fleet",
            "service": service,
            "operations": _operations(rows.operations, rows.buckets),
            "top_patterns": [_pattern_row(r) for r in rows.patterns],
            "slow_queries": [_slow_row(r) for r in rows.slow],
            "services": [_service_row(r) for r in rows.services],
        }


def _operations(rows: list[Any], buckets: list[Any]) -> list[dict[str, Any]]:
    dense: dict[tuple[str, str], list[int]] = {}
    for b in buckets:
        counts = dense.setdefault((b["operation"], b["collection"]), [0] * NUM_BUCKETS)
        if 0 <= b["bucket"] < NUM_BUCKETS:
            counts[b["bucket"]] += b["n"]
    out = []
    for r in rows:
        counts = dense.get((r["operation"], r["collection"]), [0] * NUM_BUCKETS)
        out.append(
            {
                "operation": r["operation"],
                "collection": r["collection"],
                **summary(r["calls"], r["errors"], r["total_ms"], r["max_ms"], counts),
                "documents": r["documents"],
                "services": r["services"],
            }
        )
    out.sort(key=lambda o: (-o["total_ms"], o["collection"], o["operation"]))
    return out


def _pattern_row(r: Any) -> dict[str, Any]:
    return {
        "collection": r["collection"],
        "operation": r["operation"],
        "pattern": r["pattern"],
        "calls": r["calls"],
        "errors": r["errors"],
        "total_ms": round(r["total_ms"], 3),
        "mean_ms": round(r["total_ms"] / r["calls"], 3) if r["calls"] else None,
        "max_ms": round(r["max_ms"], 3),
        "documents": r["documents"],
        "services": sorted(r["services"]),
        "index_used": r["index_used"],
    }


def _slow_row(r: Any) -> dict[str, Any]:
    return {
        "service_name": r["service"],
        "instance": r["instance"],
        "query_id": r["query_id"],
        "timestamp": r["timestamp"],
        "collection": r["collection"],
        "operation_type": r["operation"],
        "query_pattern": r["pattern"],
        "execution_time_ms": r["execution_time_ms"],
        "documents_processed": r["documents"],
        "success": r["success"],
        "error_code": r["error_code"],
        "index_used": r["index_used"],
        "plan": r["plan"],
    }


def _service_row(r: Any) -> dict[str, Any]:
    return {
        "service": r["service"],
        "instances": r["instances"],
        "batches": r["batches"],
        "last_seen": r["last_seen"],
        "calls": r["calls"],
        "errors": r["errors"],
        "total_ms": round(r["total_ms"], 3),
        "documents": r["documents"],
        "patterns": r["patterns"],
    }
