"""The operation pipeline: validate an operation, pick its backend, run it. Knows no HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from proxy import context, numbers
from proxy.backends.base import Backend, Documents, Transaction, TxKind, check_collection
from proxy.cache import Hit, TwoLevelCache
from proxy.config import Config
from proxy.errors import (
    BadRequest,
    CommitOutcomeUnknown,
    Forbidden,
    LimitExceeded,
    NotFound,
    ProxyError,
)
from proxy.pipeline import gate as guard
from proxy.pipeline.batch import charges, parse_batch, parse_isolation, run_operations
from proxy.pipeline.gate import OPEN, Caller, Gatekeeper
from proxy.pipeline.transactions import TransactionRegistry
from proxy.query.ast import And, Eq, FieldCond, Path
from proxy.query.parse import is_update_document, parse_fields, parse_filter, parse_update
from proxy.query.project import project
from proxy.query.spec import (
    Change,
    FindSpec,
    ItemResult,
    MergePatch,
    Modify,
    Page,
    Replace,
    StoredReply,
    WriteResult,
    build_find_spec,
    check_id,
)

T = TypeVar("T")
PlanNote = Callable[[bool, str], None]

log = logging.getLogger(__name__)

SYSTEM_FIELDS = ("_id", "_version")


class Core:
    """Runs document operations against the configured backends."""

    def __init__(
        self,
        config: Config,
        backends: Mapping[str, Backend],
        default: str,
        gate: Gatekeeper | None = None,
    ) -> None:
        self.config = config
        self.gate = gate or Gatekeeper(None)
        self.cache: TwoLevelCache | None = None
        self._tx_writes: dict[int, list[tuple[str, int]]] = {}
        # cache misses being filled, by key: concurrent misses of one key share one fill
        self._fills: dict[str, asyncio.Future[WriteResult | None]] = {}
        self._volume: dict[tuple[str, str], int] = {}
        self._last_explain = 0.0
        self._background: set[asyncio.Future[Any]] = set()
        self.limits = config.limits
        self.backends = dict(backends)
        self.default = default
        lim = config.limits
        self.transactions = TransactionRegistry(
            idle_timeout=lim.transaction_idle_timeout_seconds,
            max_lifetime=lim.transaction_max_lifetime_seconds,
            max_open=lim.max_open_transactions,
        )
        self.transactions.on_commit = self.after_commit
        self.transactions.on_end = self.forget_transaction

    def backend(self, database: str | None = None) -> Backend:
        name = database or self.default
        try:
            return self.backends[name]
        except KeyError:
            raise NotFound(f"no database named {name!r:.80}", code="unknown_database") from None

    # -- writes ----------------------------------------------------------------------

    async def create(
        self,
        collection: str,
        body: Any,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> WriteResult | list[ItemResult]:
        check_collection(collection)
        guard.authorize(caller, collection, "create")
        self._in_transaction(caller, collection, target)
        docs = target or self.backend()
        if isinstance(body, list):
            if not body:
                raise BadRequest("a bulk create needs at least one document", code="empty_batch")
            if len(body) > self.limits.max_batch_items:
                raise LimitExceeded(
                    f"at most {self.limits.max_batch_items} documents per request",
                    code="batch_too_large",
                )
            await self.gate.admit(caller, "create", cost_units=len(body))
            return await self._create_many(collection, body, docs, caller)
        await self.gate.admit(caller, "create")
        doc = self._new_document(body, collection, caller)
        return self._visible(caller, collection, await docs.insert_one(collection, doc))

    async def _create_many(
        self, collection: str, body: list[Any], docs_target: Documents, caller: Caller
    ) -> list[ItemResult]:
        docs: list[dict[str, Any]] = []
        slots: list[ItemResult | None] = []
        for item in body:
            try:
                docs.append(self._new_document(item, collection, caller))
                slots.append(None)
            except ProxyError as err:
                if err.status == 403:  # a forbidden item refuses the whole request
                    raise
                item_id = item.get("_id") if isinstance(item, dict) else None
                slots.append(
                    ItemResult(
                        err.status,
                        item_id if isinstance(item_id, str) else None,
                        error=err.to_dict(),
                    )
                )
        results = iter(await docs_target.insert_many(collection, docs) if docs else [])
        return [slot if slot is not None else next(results) for slot in slots]

    def _new_document(self, body: Any, collection: str, caller: Caller) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequest("a document must be a JSON object", code="invalid_document")
        if "_id" in body:
            check_id(body["_id"])
        _check_keys(body)
        if caller.policy is not None:
            guard.check_document_writable(caller, collection, body)
            guard.check_row_document(caller, collection, body)
        return {k: v for k, v in body.items() if k != "_version"}

    async def replace_or_update(
        self,
        collection: str,
        doc_id: str,
        body: Any,
        *,
        upsert: bool = False,
        if_match: int | None = None,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> WriteResult:
        self._check_write(collection, doc_id, "update", caller, target)
        if upsert:
            guard.authorize(caller, collection, "create")
        change: Change
        if is_update_document(body):
            update = parse_update(body, self.limits)
            if caller.policy is not None:
                guard.check_update_writable(caller, collection, update)
                guard.check_row_update(caller, collection, update, upsert)
            change = Modify(update)
        else:
            doc = self._replacement(body, doc_id, collection, caller)
            change = Replace(doc, guard.keep_spec(caller, collection))
        await self.gate.admit(caller, "update")
        result = await (target or self.backend()).change(
            collection,
            doc_id,
            change,
            upsert=upsert,
            if_match=if_match,
            guard=guard.row_guard(caller, collection),
        )
        await self._written(target, collection, doc_id, result.version)
        return self._visible(caller, collection, result)

    def _replacement(
        self, body: Any, doc_id: str, collection: str, caller: Caller
    ) -> dict[str, Any]:
        doc = self._new_document(body, collection, caller)
        if doc.pop("_id", doc_id) != doc_id:
            raise BadRequest("the body's _id differs from the URL's", code="id_mismatch")
        return doc

    async def merge_patch(
        self,
        collection: str,
        doc_id: str,
        body: Any,
        *,
        if_match: int | None = None,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> WriteResult:
        self._check_write(collection, doc_id, "update", caller, target)
        if not isinstance(body, dict):
            raise BadRequest("a merge patch must be a JSON object", code="invalid_patch")
        for key in SYSTEM_FIELDS:
            if key in body and not (key == "_id" and body[key] == doc_id):
                raise BadRequest(f"a merge patch cannot change {key}", code="immutable_field")
        patch = {k: v for k, v in body.items() if k not in SYSTEM_FIELDS}
        _check_keys(patch)
        if caller.policy is not None:
            guard.check_document_writable(caller, collection, patch)
            guard.check_row_patch(caller, collection, patch)
        await self.gate.admit(caller, "update")
        result = await (target or self.backend()).change(
            collection,
            doc_id,
            MergePatch(patch),
            if_match=if_match,
            guard=guard.row_guard(caller, collection),
        )
        await self._written(target, collection, doc_id, result.version)
        return self._visible(caller, collection, result)

    async def delete(
        self,
        collection: str,
        doc_id: str,
        *,
        if_match: int | None = None,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> int:
        self._check_write(collection, doc_id, "delete", caller, target)
        await self.gate.admit(caller, "delete")
        version = await (target or self.backend()).delete(
            collection, doc_id, if_match=if_match, guard=guard.row_guard(caller, collection)
        )
        await self._written(target, collection, doc_id, version + 1)
        return version

    # -- reads -----------------------------------------------------------------------

    async def get(
        self,
        collection: str,
        doc_id: str,
        fields: Any = None,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> WriteResult:
        check_collection(collection)
        check_id(doc_id)
        if caller.policy is not None:
            return await self._get_guarded(collection, doc_id, fields, target, caller)
        found = await self._cached_get(collection, doc_id, target)
        if found is None:
            raise NotFound("no document with this _id", details={"_id": doc_id})
        if fields:
            paths = parse_fields(fields, self.limits)
            assert paths is not None
            body = numbers.dumps_stored(project(numbers.loads_stored(found.body), paths))
            return WriteResult(body, found.version)
        return found

    async def _get_guarded(
        self,
        collection: str,
        doc_id: str,
        fields: Any,
        target: Documents | None,
        caller: Caller,
    ) -> WriteResult:
        """By id under a policy: row rules join the lookup (a row outside them is simply
        not found), and only readable fields come back."""
        assert caller.policy is not None
        entry = caller.policy.entry(collection)
        if (
            target is None
            and not fields
            and not entry.rows
            and (entry.fields is None or entry.fields.readable is None)
            and "read" in entry.operations
        ):  # the common case, in one policy lookup: granted, nothing to filter or hide
            await self.gate.admit(caller, "read")
            found = await self._cached_get(collection, doc_id, None)
            if found is None:
                raise NotFound("no document with this _id", details={"_id": doc_id})
            return found
        guard.authorize(caller, collection, "read")
        self._in_transaction(caller, collection, target)
        paths = parse_fields(fields, self.limits)
        guard.check_fields_readable(caller, collection, paths)
        await self.gate.admit(caller, "read")
        rows = guard.row_guard(caller, collection)
        docs = target or self.backend()
        if rows is None:
            found = await self._cached_get(collection, doc_id, target)
        else:  # row rules are checked by the database, never against a cached copy
            by_id = FieldCond(Path(("_id",)), (Eq(doc_id),))
            page = await docs.find(collection, FindSpec(filter=And((by_id, rows)), limit=1))
            found = WriteResult(page.items[0], 0) if page.items else None
            if found is not None:
                version = numbers.loads_stored(found.body)["_version"]
                found = WriteResult(found.body, int(version))
        if found is None:
            raise NotFound("no document with this _id", details={"_id": doc_id})
        if not paths and guard.readable_rule(caller, collection) is None:
            return found  # nothing to hide: send the stored JSON text as it is
        doc = guard.visible(caller, collection, numbers.loads_stored(found.body))
        if paths:
            doc = project(doc, paths)
        return WriteResult(numbers.dumps_stored(doc), found.version)

    def find_spec(self, raw: Mapping[str, Any], *, from_url: bool) -> FindSpec:
        return build_find_spec(raw, self.limits, from_url=from_url)

    async def find(
        self,
        collection: str,
        spec: FindSpec,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> Page:
        check_collection(collection)
        if caller.policy is not None:
            guard.authorize(caller, collection, "list")
            self._in_transaction(caller, collection, target)
            guard.check_filter_readable(caller, collection, spec.filter)
            guard.check_sort_readable(caller, collection, spec.sort)
            guard.check_fields_readable(caller, collection, spec.fields)
            guard.check_row_limit(self.gate, caller, spec.limit)
            await self.gate.admit(caller, "list", rows=spec.limit)
            rows = guard.row_guard(caller, collection)
            if rows is not None:
                spec = replace(spec, filter=And((spec.filter, rows)))
        page = await (target or self.backend()).find(collection, spec)
        if spec.fields is None and guard.readable_rule(caller, collection) is None:
            return page
        fields = spec.fields
        items = []
        for raw in page.items:
            doc = guard.visible(caller, collection, numbers.loads_stored(raw))
            items.append(numbers.dumps_stored(project(doc, fields) if fields else doc))
        return Page(items, page.next)

    async def count(
        self,
        collection: str,
        raw_filter: Any,
        target: Documents | None = None,
        caller: Caller = OPEN,
    ) -> int:
        check_collection(collection)
        flt = parse_filter(raw_filter, self.limits)
        if caller.policy is not None:
            guard.authorize(caller, collection, "count")
            self._in_transaction(caller, collection, target)
            guard.check_filter_readable(caller, collection, flt)
            await self.gate.admit(caller, "count")
            rows = guard.row_guard(caller, collection)
            if rows is not None:
                flt = And((flt, rows))
        return await (target or self.backend()).count(collection, flt)

    # -- the read cache -----------------------------------------------------------------

    def _cache_key(self, collection: str, doc_id: str) -> str:
        return f"d:{self.default}:{collection}:{doc_id}"

    async def _cached_get(
        self, collection: str, doc_id: str, target: Documents | None
    ) -> WriteResult | None:
        """By id through the two-level cache when the collection opts in. Transactions and
        consistency-token reads go to the database; a miss fills the cache under the
        cache's version protocol (a fill older than a concurrent write is refused)."""
        cache = self.cache
        ttl = self.config.cache.ttl(collection) if cache is not None else None
        if (
            cache is None
            or ttl is None
            or target is not None
            or context.current.get().min_lsn is not None
        ):
            return await (target or self.backend()).get(collection, doc_id)
        key = self._cache_key(collection, doc_id)
        hit = cache.near_hit(key)  # no await at all for what this process holds
        if hit is not None:
            return WriteResult(hit.value, hit.version)
        if not cache.usable:  # Redis away: no cache, no shared fills (no invalidations)
            cache.bypasses += 1
            return await self.backend().get(collection, doc_id)
        # Concurrent misses of one key share one fill. A fill is forgotten (no longer
        # joined) as soon as the key is invalidated, here or by another sidecar, before
        # that write is acknowledged: a read that starts after a write's response never
        # joins a fill that started before it. Without a lease, this process cannot tell
        # whether it has heard that invalidation yet: then it does not join.
        fill = self._fills.get(key)
        if fill is None or not cache.leased():  # the first miss does the work for all
            fill = self._fills[key] = asyncio.ensure_future(
                self._fill(cache, key, collection, doc_id, ttl)
            )
            fill.add_done_callback(lambda done: self._fill_done(key, done))
        return await asyncio.shield(fill)

    def _fill_done(self, key: str, done: asyncio.Future[WriteResult | None]) -> None:
        if self._fills.get(key) is done:
            del self._fills[key]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter got it already

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the background, kept alive until done (see ``settle``)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait until the background work started so far (cache fills, EXPLAINs) is over."""
        while self._background:
            await asyncio.wait(set(self._background))

    def forget_fills(self, keys: Sequence[str] | None) -> None:
        """Cache callback: these keys (None: all) were invalidated; start fresh fills."""
        if keys is None:
            self._fills.clear()
            return
        fills = self._fills
        for key in keys:
            fills.pop(key, None)

    async def _fill(
        self, cache: TwoLevelCache, key: str, collection: str, doc_id: str, ttl: float
    ) -> WriteResult | None:
        got = await cache.get(key)
        if isinstance(got, Hit):
            return WriteResult(got.value, got.version)
        found = await self.backend().get(collection, doc_id)
        if found is not None:
            # The answer does not wait for the fill: under load every await costs a whole
            # turn of a busy loop. The fill is conditional (its ticket), so landing late is
            # safe, and Redis runs it before any later lookup sent on the same connection.
            self._spawn(cache.put(key, found.body, found.version, got, ttl))
        return found

    async def _written(
        self, target: Documents | None, collection: str, doc_id: str, version: int
    ) -> None:
        """After a write: invalidate its cache entry now, or at the transaction's commit."""
        cache = self.cache
        if cache is None or self.config.cache.ttl(collection) is None:
            return
        key = self._cache_key(collection, doc_id)
        if target is None:
            await cache.invalidate(key, version)
        else:
            self._tx_writes.setdefault(id(target), []).append((key, version))

    async def after_commit(self, tx: Documents) -> None:
        """Invalidate what a transaction wrote (call after COMMIT, even an unknown one)."""
        entries = self._tx_writes.pop(id(tx), None)
        if entries and self.cache is not None:
            await self.cache.invalidate_many(entries)

    def forget_transaction(self, tx: Documents) -> None:
        self._tx_writes.pop(id(tx), None)

    # -- policy helpers ----------------------------------------------------------------

    def _visible(self, caller: Caller, collection: str, result: WriteResult) -> WriteResult:
        if guard.readable_rule(caller, collection) is None:
            return result
        doc = guard.visible(caller, collection, numbers.loads_stored(result.body))
        return WriteResult(numbers.dumps_stored(doc), result.version, result.created)

    def _check_write(
        self, collection: str, doc_id: str, operation: str, caller: Caller, target: Documents | None
    ) -> None:
        """Before any by-id write: valid names, the grant, and the transaction grant."""
        check_collection(collection)
        check_id(doc_id)
        guard.authorize(caller, collection, operation)
        self._in_transaction(caller, collection, target)

    @staticmethod
    def _in_transaction(caller: Caller, collection: str, target: Documents | None) -> None:
        """Inside a transaction every collection touched needs the transaction grant too."""
        if target is not None and caller.policy is not None:
            guard.authorize(caller, collection, "transaction")

    # -- transactions ------------------------------------------------------------------

    async def begin(self, caller: Caller, isolation: Any = None) -> str:
        """Open an interactive transaction owned by the caller's service."""
        policy = caller.policy
        if policy is not None and not any("transaction" in g.operations for g in policy.grants):
            raise Forbidden(
                "service may not run transactions",
                code="permission_denied",
                details={"missing": {"operation": "transaction", "collection": "*"}},
            )
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

    async def run_batch(self, body: Any, caller: Caller = OPEN) -> list[Any]:
        """All or nothing: every operation's result, or the first failure (rolled back)."""
        req = parse_batch(body, self.limits.max_transaction_operations)
        caller = await self.admit_batch(req.operations, caller)
        return await self.transact(
            req.isolation,
            lambda tx: run_operations(self, req.operations, tx, caller),
            TxKind.BATCH,
        )

    async def admit_batch(self, operations: list[dict[str, Any]], caller: Caller) -> Caller:
        """Charge a batch's rate limits once; its operations then run with the returned
        (prepaid) caller."""
        rows = charges(operations, self.limits.default_limit)
        return await self.gate.admit_batch(caller, rows)

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
            await self.after_commit(tx)  # it may have committed: invalidate anyway
            raise
        except BaseException:
            self.forget_transaction(tx)
            await tx.rollback()  # no-op once committed; shielded from cancellation
            raise
        await self.after_commit(tx)
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

        Keys belong to the caller's service. Before any replay the policy is asked again:
        ``grants`` (collection, operation) must all still hold, and a replay is charged
        ``charge`` (operation, units) like the request it repeats. The fingerprint carries
        the policy's digest, so a reply made under another policy is never sent back."""
        if not key or len(key) > 255 or not key.isprintable():
            raise BadRequest(
                "Idempotency-Key must be 1-255 printable characters", code="invalid_idempotency_key"
            )
        for collection, operation in grants:
            check_collection(collection)
            guard.authorize(caller, collection, operation)
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
        if replayed and charge is not None:
            await self.gate.admit(caller, charge[0], cost_units=charge[1])
        return reply, replayed

    async def maintain(self) -> None:
        for backend in self.backends.values():
            try:
                await backend.maintain()
            except ProxyError as err:
                log.warning("housekeeping of %s failed: %s", backend.name, err.code)

    # -- observability ------------------------------------------------------------------

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
        out = {}
        for name, backend in self.backends.items():
            out[name] = backend.connections()
        return out

    def explain_later(self, statement: tuple[str, tuple[Any, ...]], note: PlanNote) -> bool:
        """Look at a slow statement's plan in the background: at most one EXPLAIN per
        second, never on the request's own time."""
        now = time.monotonic()
        backend = self.backend()
        if now - self._last_explain < 1.0 or not backend.capabilities.explain:
            return False
        self._last_explain = now

        async def run() -> None:
            try:
                index_used, summary = await backend.explain(*statement)
            except ProxyError as err:
                log.debug("EXPLAIN failed: %s", err.code)
                return
            note(index_used, summary)

        self._spawn(run())
        return True

    def cache_counters(self) -> dict[str, Any]:
        if self.cache is None:
            return {}
        st = self.cache.stats()
        return {
            "near:hit": st["near_hits"],
            "redis:hit": st["remote_hits"],
            "any:miss": st["misses"],
            "any:bypass": st["bypasses"],
            "any:refused": st["refused"],
            "near:evict": st["evictions"],
            "any:invalidate": st["invalidations"],
            "redis:ack_timeout": st.get("remote_ack_timeouts", 0),
            "redis:unconfirmed": st.get("remote_unconfirmed", 0),
            "redis:flush": st.get("remote_flushes", 0),
            "near:unleased": st.get("unleased", 0),
        }

    # -- health ----------------------------------------------------------------------

    async def health(self) -> tuple[bool, dict[str, Any]]:
        databases = {name: await b.health() for name, b in self.backends.items()}
        ready = all(d.get("status") == "up" for d in databases.values())
        return ready, {"status": "ready" if ready else "unavailable", "databases": databases}


def _check_keys(doc: dict[str, Any]) -> None:
    """Top-level field names may not be empty or start with '$' (they would read as operators)."""
    for key in doc:
        if not key or key.startswith("$") or "\x00" in key:
            raise BadRequest(
                f"field name {key!r:.60} is not allowed (empty, NUL, or starting with '$')",
                code="invalid_field_name",
            )
