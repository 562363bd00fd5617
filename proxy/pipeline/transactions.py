"""Interactive transactions: the registry of open ones, their owners, timeouts and ends.
Design notes: docs/pipeline.md."""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from proxy.backends.base import Backend, Transaction, TxKind
from proxy.errors import (
    CommitOutcomeUnknown,
    Conflict,
    NotFound,
    ProxyError,
    RateLimited,
    Unavailable,
)

log = logging.getLogger(__name__)


class TxState(enum.Enum):
    OPEN = "open"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    ABORTED = "aborted"  # a statement failed: rolled back by the sidecar
    EXPIRED = "expired"  # idle timeout or maximum lifetime: rolled back by the sidecar
    UNKNOWN = "outcome-unknown"  # the connection died while COMMIT was in flight


@dataclass(eq=False)
class OpenTransaction:
    id: str
    owner: str
    tx: Transaction
    created: float
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: TxState = TxState.OPEN


class TransactionRegistry:
    REMEMBER_ENDED = 10_000

    def __init__(
        self,
        *,
        idle_timeout: float,
        max_lifetime: float,
        max_open: int,
        clock: Callable[[], float] = time.monotonic,
        on_commit: Callable[[Transaction], Awaitable[None]] | None = None,
        on_end: Callable[[Transaction], None] | None = None,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self.max_open = max_open
        self.clock = clock
        self._open: dict[str, OpenTransaction] = {}
        self._owned: dict[str, int] = {}  # open (and starting) transactions per owner
        self._ended: OrderedDict[str, TxState] = OrderedDict()
        self._starting = 0
        # what to do after a commit (cache invalidation) or any other end
        self.on_commit = on_commit
        self.on_end = on_end
        self.counters = {"begun": 0, "committed": 0, "rolled_back": 0, "aborted": 0, "expired": 0}

    def __len__(self) -> int:
        return len(self._open)

    # -- life cycle of one transaction ---------------------------------------------------

    def owned(self, owner: str) -> int:
        return self._owned.get(owner, 0)

    async def begin(
        self, backend: Backend, isolation: str, owner: str, per_owner: int | None = None
    ) -> OpenTransaction:
        """Open one for ``owner``: at most ``per_owner`` of its own (429), at most
        ``max_open`` in all (503), and the backend's transaction share (503)."""
        held = self._owned.get(owner, 0)
        if per_owner is not None and held >= per_owner:
            raise RateLimited(
                f"this service already has {held} open transactions, its limit; commit or "
                "roll one back first",
                code="transaction_limit_exceeded",
                retry_after=1,
                details={"limit": per_owner},
            )
        if len(self._open) + self._starting >= self.max_open:
            raise Unavailable(
                f"too many open transactions (limit {self.max_open}); retry shortly",
                code="too_many_transactions",
                retry_after=1,
            )
        self._starting += 1
        self._owned[owner] = held + 1
        try:
            tx = await backend.begin(isolation, TxKind.INTERACTIVE)
        except BaseException:
            self._disown(owner)
            raise
        finally:
            self._starting -= 1
        now = self.clock()
        entry = OpenTransaction(secrets.token_urlsafe(24), owner, tx, now, now)
        self._open[entry.id] = entry
        self.counters["begun"] += 1
        return entry

    def lookup(self, tx_id: str, owner: str) -> OpenTransaction:
        entry = self._open.get(tx_id)
        if entry is not None and secrets.compare_digest(entry.owner, owner):
            return entry
        ended = self._ended.get(tx_id)
        if ended is not None:
            raise Conflict(
                f"transaction already ended ({ended.value})",
                code="transaction_closed",
                details={"state": ended.value},
            )
        # unknown, or another caller's: indistinguishable on purpose
        raise NotFound("no open transaction with this id", code="transaction_not_found")

    @asynccontextmanager
    async def use(self, tx_id: str, owner: str) -> AsyncIterator[Transaction]:
        """Run one request inside the transaction; a failed statement ends it."""
        entry = self.lookup(tx_id, owner)
        async with entry.lock:
            if entry.state is not TxState.OPEN:
                self.lookup(tx_id, owner)  # raises: it ended while we waited
            try:
                yield entry.tx
            finally:
                entry.last_used = self.clock()
                if entry.tx.failed is not None or entry.state is TxState.EXPIRED:
                    state = TxState.EXPIRED if entry.state is TxState.EXPIRED else TxState.ABORTED
                    await self._end(entry, state)

    async def commit(self, tx_id: str, owner: str) -> None:
        entry = self.lookup(tx_id, owner)
        async with entry.lock:
            self.lookup(tx_id, owner)
            if entry.tx.failed is not None:
                await self._end(entry, TxState.ABORTED)
                raise Conflict(
                    "an earlier statement failed; the transaction was rolled back",
                    code="transaction_aborted",
                )
            self._forget(entry, TxState.COMMITTED)
            try:
                await entry.tx.commit()
            except ProxyError as err:
                unknown = isinstance(err, CommitOutcomeUnknown)
                self._ended[entry.id] = TxState.UNKNOWN if unknown else TxState.ABORTED
                self.counters["aborted"] += 1
                if unknown and self.on_commit is not None:
                    await self.on_commit(entry.tx)
                elif self.on_end is not None:
                    self.on_end(entry.tx)
                raise
            self.counters["committed"] += 1
            if self.on_commit is not None:
                await self.on_commit(entry.tx)

    async def rollback(self, tx_id: str, owner: str) -> None:
        entry = self.lookup(tx_id, owner)
        async with entry.lock:
            self.lookup(tx_id, owner)
            await self._end(entry, TxState.ROLLED_BACK)

    async def _end(self, entry: OpenTransaction, state: TxState) -> None:
        if entry.id not in self._open:
            return
        self._forget(entry, state)
        self.counters["rolled_back" if state is TxState.ROLLED_BACK else state.name.lower()] += 1
        if self.on_end is not None:
            self.on_end(entry.tx)
        await entry.tx.rollback()

    def _disown(self, owner: str) -> None:
        left = self._owned.get(owner, 0) - 1
        if left > 0:
            self._owned[owner] = left
        else:
            self._owned.pop(owner, None)

    def _forget(self, entry: OpenTransaction, state: TxState) -> None:
        entry.state = state
        if self._open.pop(entry.id, None) is not None:
            self._disown(entry.owner)
        self._ended[entry.id] = state
        while len(self._ended) > self.REMEMBER_ENDED:
            self._ended.popitem(last=False)

    # -- the reaper ----------------------------------------------------------------------

    async def reap(self) -> int:
        """Roll back transactions idle too long or alive too long; returns how many."""
        now = self.clock()
        ended = 0
        for entry in list(self._open.values()):
            too_old = now - entry.created > self.max_lifetime
            idle = now - entry.last_used > self.idle_timeout
            if not (too_old or idle):
                continue
            if entry.lock.locked():
                if too_old:
                    entry.state = TxState.EXPIRED  # ended when the running request finishes
                continue
            log.info(
                "rolling back transaction %s… (%s)", entry.id[:6], "lifetime" if too_old else "idle"
            )
            await self._end(entry, TxState.EXPIRED)
            ended += 1
        return ended

    async def run_reaper(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap()
            except Exception:
                log.exception("transaction reaper failed")

    async def close_all(self) -> None:
        for entry in list(self._open.values()):
            await self._end(entry, TxState.ROLLED_BACK)
