"""All-or-nothing work: one database transaction around work, idempotent writes (the reply
stored with the write), batches, and interactive transactions' begin."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson

from proxy.backends.base import Backend, Documents, Transaction, TxKind, check_collection
from proxy.cache.read_through import ReadThrough
from proxy.config import Limits
from proxy.errors import BadRequest, CommitOutcomeUnknown, Forbidden
from proxy.pipeline.batch import (
    BatchTarget,
    charges,
    grants_of,
    parse_batch,
    parse_isolation,
    run_operations,
)
from proxy.pipeline.gate import OPEN, Caller, Gatekeeper
from proxy.pipeline.transactions import TransactionRegistry
from proxy.query.spec import StoredReply

T = TypeVar("T")

JSON = "application/json"


class AtomicOps:
    """transact / idempotent / run_batch / begin, over the default backend."""

    gate: Gatekeeper
    limits: Limits
    reads: ReadThrough
    transactions: TransactionRegistry
    backend: Callable[[], Backend]

    async def transact(
        self,
        isolation: str,
        work: Callable[[Transaction], Awaitable[T]],
        kind: TxKind = TxKind.SINGLE,
    ) -> T:
        tx = await self.backend().begin(isolation, kind)
        try:
            result = await work(tx)
            await tx.commit()
        except CommitOutcomeUnknown:
            await self.reads.after_commit(tx)  # it may have committed: invalidate anyway
            raise
        except BaseException:
            self.reads.forget_transaction(tx)
            await tx.rollback()  # no-op once committed; shielded from cancellation
            raise
        await self.reads.after_commit(tx)
        return result

    async def idempotent(
        self,
        key: str,
        fingerprint: str,
        produce: Callable[[Documents], Awaitable[StoredReply]],
        isolation: str = "read_committed",
        kind: TxKind = TxKind.SINGLE,
        *,
        caller: Caller = OPEN,
        grants: Sequence[tuple[str, str]] = (),
        charge: tuple[str, int] | None = None,
    ) -> tuple[StoredReply, bool]:
        """Run ``produce`` once per key: the reply is stored in the same transaction as the
        write, and a retry with the same key and request gets it back (replayed=True).
        Before a replay the policy is asked again (``grants``) and the replay is charged
        ``charge``; the fingerprint carries the policy's digest (docs/idempotency.md)."""
        if not key or len(key) > 255 or not key.isprintable():
            raise BadRequest(
                "Idempotency-Key must be 1-255 printable characters", code="invalid_idempotency_key"
            )
        for collection, operation in grants:
            check_collection(collection)
            caller.decisions.get(collection, operation).authorize()
        scoped = f"{caller.service}:{key}"  # service names hold no ':'
        ttl = self.limits.idempotency_ttl_seconds

        async def work(tx: Transaction) -> tuple[StoredReply, bool]:
            prior = await tx.idem_claim(scoped, fingerprint, ttl)
            if prior is not None:
                return prior, True
            reply = await produce(tx)
            await tx.idem_save(scoped, reply)
            return reply, False

        reply, replayed = await self.transact(isolation, work, kind)
        if replayed and charge is not None and caller.metered:
            await self.gate.admit(caller, charge[0], cost_units=charge[1])
        return reply, replayed

    # -- batches -----------------------------------------------------------------------

    async def run_batch(self, body: Any, caller: Caller = OPEN) -> list[Any]:
        """All or nothing: every operation's result, or the first failure (rolled back)."""
        req = parse_batch(body, self.limits.max_transaction_operations)
        caller = await self.admit_batch(req.operations, caller)
        target = self.batch_target()
        return await self.transact(
            req.isolation,
            lambda tx: run_operations(target, req.operations, tx, caller),
            TxKind.BATCH,
        )

    async def run_batch_once(
        self, body: Any, key: str, fingerprint: str, caller: Caller = OPEN
    ) -> tuple[StoredReply, bool]:
        """``run_batch`` under an Idempotency-Key: charged once, replay or not."""
        req = parse_batch(body, self.limits.max_transaction_operations)
        caller = await self.admit_batch(req.operations, caller)
        target = self.batch_target()

        async def produce(tx: Documents) -> StoredReply:
            results = await run_operations(target, req.operations, tx, caller)
            payload = orjson.dumps({"committed": True, "results": results})
            return StoredReply(200, payload, {"Content-Type": JSON})

        grants = tuple(grants_of(req.operations))
        return await self.idempotent(
            key, fingerprint, produce, req.isolation, TxKind.BATCH, caller=caller, grants=grants
        )

    async def admit_batch(self, operations: list[dict[str, Any]], caller: Caller) -> Caller:
        """Charge a batch's rate limits once; its operations then run with the returned
        (prepaid) caller."""
        rows = charges(operations, self.limits.default_limit)
        return await self.gate.admit_batch(caller, rows)

    def batch_target(self) -> BatchTarget:
        raise NotImplementedError  # the document operations (Core)

    # -- interactive transactions ------------------------------------------------------

    async def begin(self, caller: Caller, isolation: Any = None) -> str:
        """Open an interactive transaction owned by the caller's service."""
        if not caller.decisions.any_grant("transaction"):
            raise Forbidden(
                "service may not run transactions",
                code="permission_denied",
                details={"missing": {"operation": "transaction", "collection": "*"}},
            )
        if caller.metered:
            await self.gate.admit(caller, "transaction")
        entry = await self.transactions.begin(
            self.backend(),
            parse_isolation(isolation),
            caller.service,
            self.transactions_per_service(caller),
        )
        return entry.id

    def transactions_per_service(self, caller: Caller) -> int | None:
        """How many interactive transactions the caller's service may hold open (None:
        no policy, only the sidecar-wide cap)."""
        if caller.policy is None:
            return None
        own = caller.policy.limits.max_open_transactions
        return own if own is not None else self.limits.max_open_transactions_per_service
