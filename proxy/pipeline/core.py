"""The sidecar's core: the document and atomic operations over the configured databases,
with what the monitoring side reads (health, connections, volume, plans)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from proxy.backends.base import Backend
from proxy.cache import TwoLevelCache
from proxy.cache.read_through import Fills, ReadThrough
from proxy.config import Config
from proxy.errors import NotFound, ProxyError
from proxy.migrate.runner import MigrationRunner
from proxy.pipeline.aggregate import AggregateOps
from proxy.pipeline.atomic import AtomicOps
from proxy.pipeline.batch import BatchTarget
from proxy.pipeline.describe import SchemaOps
from proxy.pipeline.documents import DocumentOps
from proxy.pipeline.gate import Gatekeeper
from proxy.pipeline.schemas import SchemaRegistry
from proxy.pipeline.search import SearchOps
from proxy.pipeline.transactions import TransactionRegistry

PlanNote = Callable[[bool, str], None]

log = logging.getLogger(__name__)


class Core(DocumentOps, AtomicOps, SchemaOps, AggregateOps, SearchOps):
    """Runs document operations against the configured backends. Every collaborator comes
    in through the constructor (``proxy.wiring`` builds them); defaults make a bare core."""

    def __init__(
        self,
        config: Config,
        backends: Mapping[str, Backend],
        default: str,
        gate: Gatekeeper | None = None,
        *,
        cache: TwoLevelCache | None = None,
        fills: Fills | None = None,
        schemas: SchemaRegistry | None = None,
        migrations: MigrationRunner | None = None,
    ) -> None:
        self.config = config
        self.migrations = migrations  # the migration runner (None: not in this process)
        self.limits = config.limits
        self.gate = gate or Gatekeeper(None)
        self.backends = dict(backends)
        self.default = default
        self.reads = ReadThrough(cache, config.cache, default, fills)
        self.schemas = schemas or SchemaRegistry()
        lim = config.limits
        self.transactions = TransactionRegistry(
            idle_timeout=lim.transaction_idle_timeout_seconds,
            max_lifetime=lim.transaction_max_lifetime_seconds,
            max_open=lim.max_open_transactions,
            on_commit=self.reads.after_commit,
            on_end=self.reads.forget_transaction,
        )
        self._volume: dict[tuple[str, str], int] = {}
        self._last_explain = 0.0
        self._last_first_explain = 0.0

    def backend(self, database: str | None = None) -> Backend:
        name = database or self.default
        try:
            return self.backends[name]
        except KeyError:
            raise NotFound(f"no database named {name!r:.80}", code="unknown_database") from None

    def batch_target(self) -> BatchTarget:
        return self

    @property
    def cache(self) -> TwoLevelCache | None:
        return self.reads.cache

    @property
    def _fills(self) -> dict[str, Any]:  # the fills in flight, by key (tests look)
        return self.reads.fills.pending

    def _cache_key(self, collection: str, doc_id: str) -> str:
        return self.reads.key(collection, doc_id)

    async def settle(self) -> None:
        """Wait until the background work started so far (cache fills, EXPLAINs) is over."""
        await self.reads.settle()

    async def refresh_schemas(self, backend: str | None = None) -> None:
        """Load the declared schemas again (of one backend, or of all)."""
        for each in self.backends.values():
            if backend is None or each.name == backend:
                await self.schemas.refresh(each)

    async def watch_schemas(self, backend: Backend) -> None:
        """Keep ``backend``'s schemas current (until cancelled): another sidecar's migration
        is enforced here as soon as the backend reports it."""
        if backend.capabilities.schemas:
            await backend.watch_schemas(lambda: self.schemas.refresh(backend))

    async def maintain(self) -> None:
        for backend in self.backends.values():
            try:
                await backend.maintain()
            except ProxyError as err:
                log.warning("housekeeping of %s failed: %s", backend.name, err.code)

    # -- observability -----------------------------------------------------------------

    def count_request(self, service: str, operation: str, n: int = 1) -> None:
        key = (service, operation)
        if key in self._volume or len(self._volume) < 10_000:
            self._volume[key] = self._volume.get(key, 0) + n

    def volume_by_service(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (service, operation), n in self._volume.items():
            out.setdefault(service, {})[operation] = n
        return out

    def connections(self) -> dict[str, Any]:
        return {name: backend.connections() for name, backend in self.backends.items()}

    def explain_later(
        self, statement: tuple[str, tuple[Any, ...]], note: PlanNote, *, first_sight: bool = False
    ) -> bool:
        """Look at a statement's plan in the background (EXPLAIN, no ANALYZE), never on the
        request's own time: a slow one's, and (``first_sight``) the first runs of each
        shape's, each at most one EXPLAIN per second (their own budgets: the first sights
        of many shapes never crowd out a slow statement's)."""
        now = time.monotonic()
        last = self._last_first_explain if first_sight else self._last_explain
        if now - last < 1.0:
            return False
        backend = self.backend()
        if not backend.capabilities.explain:
            return False
        if first_sight:
            self._last_first_explain = now
        else:
            self._last_explain = now

        async def run() -> None:
            try:
                index_used, summary = await backend.explain(*statement)
            except ProxyError as err:
                log.debug("EXPLAIN failed: %s", err.code)
                return
            note(index_used, summary)

        self.reads.spawn(run())
        return True

    def cache_counters(self) -> dict[str, Any]:
        return self.reads.counters()

    async def health(self) -> tuple[bool, dict[str, Any]]:
        databases = {name: await b.health() for name, b in self.backends.items()}
        ready = all(d.get("status") == "up" for d in databases.values())
        return ready, {"status": "ready" if ready else "unavailable", "databases": databases}


__all__ = ["Core"]
