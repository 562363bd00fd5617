"""Partitioning on MongoDB: hash and range map to shardCollection on a sharded cluster
(``hello`` answers ``msg: isdbgrid``); anything else is refused, naming the reason."""

from __future__ import annotations

from typing import Any

from pymongo.errors import PyMongoError

from proxy.backends.mongo.errors import translate
from proxy.errors import BadRequest
from proxy.schema.partitioning import Partitioning


def _refused(spec: Partitioning, reason: str, message: str) -> BadRequest:
    return BadRequest(
        message,
        code="unsupported_by_backend",
        details={"feature": "partitioning", "strategy": spec.strategy, "reason": reason},
    )


async def refuse_or_shard(host: Any, collection: str, spec: Partitioning) -> None:
    """shardCollection for hash/range on a sharded cluster (not verified: no sharded
    cluster here, see docs/scaling.md); 400 unsupported_by_backend otherwise."""
    if spec.strategy not in ("hash", "range"):
        raise _refused(
            spec, "strategy", f"MongoDB cannot partition by {spec.strategy!r} (hash or range can)"
        )
    try:
        hello = await host.db.command("hello")
    except PyMongoError as exc:
        raise translate(exc) from None
    if hello.get("msg") != "isdbgrid":
        raise _refused(
            spec,
            "not_sharded_cluster",
            "the MongoDB server is not a sharded cluster (mongos): hash and range partitioning "
            "map to shardCollection there",
        )
    key = {spec.key_text: "hashed" if spec.strategy == "hash" else 1}
    try:
        await host.client.admin.command(
            {"shardCollection": f"{host.db.name}.{collection}", "key": key}
        )
    except PyMongoError as exc:
        raise translate(exc) from None
