"""Routed reads of the MongoDB backend: each read on the collection handle of its read
preference, behind that preference's breaker; reads carrying a consistency token in a
causally consistent session (afterClusterTime), else on the primary."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import pymongo
from bson import Timestamp
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure, PyMongoError
from pymongo.read_preferences import _ServerMode

from proxy import context
from proxy.backends.mongo.coalesced import PointReads
from proxy.backends.mongo.documents import MongoDocuments, Query, T
from proxy.backends.mongo.routing import PRIMARY, ReadRouting, after_of
from proxy.errors import ProxyError, Unavailable
from proxy.query.spec import WriteResult
from proxy.resilience.breaker import CircuitBreaker

# how long a token read waits for a secondary to reach the write before the primary answers
TOKEN_WAIT_SECONDS: Final = 0.5


class RoutedReads(MongoDocuments):
    """``_query`` and ``get`` for the backend (its transactions keep the plain ones)."""

    routing: ReadRouting
    breaker: CircuitBreaker  # the primary's: writes, transactions, primary reads
    read_breaker: CircuitBreaker  # reads the driver may send to a secondary
    client: AsyncMongoClient[Any] | None
    _points: PointReads | None
    token_wait = TOKEN_WAIT_SECONDS
    token_reads = 0  # reads that carried a token: on a secondary with afterClusterTime
    token_fallbacks = 0  # ... and those the primary answered instead

    async def _guarded(
        self,
        run: Callable[[], Awaitable[T]],
        *,
        updating: bool,
        breaker: CircuitBreaker | None = None,
    ) -> T:
        raise NotImplementedError

    def _breaker_of(self, mode: _ServerMode) -> CircuitBreaker:
        return self.breaker if mode is PRIMARY else self.read_breaker

    async def get(self, collection: str, doc_id: str) -> WriteResult | None:
        """By id; concurrent reads of one collection share one ``find`` (``PointReads``),
        except reads bound to a consistency token, which run alone."""
        if self._points is None or context.current.get().min_lsn is not None:
            return await super().get(collection, doc_id)
        return await self._points.get(collection, doc_id)

    async def _query(self, collection: str, kind: str, op: Query[T]) -> T:
        mode = self.routing.mode(kind, collection)
        min_lsn = context.current.get().min_lsn
        if min_lsn is not None:
            after = after_of(min_lsn)
            if mode is not PRIMARY and after is not None:
                return await self._token_query(collection, mode, after, op)
            mode = PRIMARY  # the primary holds every acknowledged write: always current
        coll = self.routing.collection(self.db, collection, mode)
        return await self._guarded(
            lambda: op(coll, None), updating=False, breaker=self._breaker_of(mode)
        )

    async def _token_query(
        self, collection: str, mode: _ServerMode, after: Timestamp, op: Query[T]
    ) -> T:
        """A read that must not be older than ``after``: where ``mode`` sends it, in a
        causally consistent session whose operation time is ``after`` (the driver sends
        ``readConcern: {afterClusterTime}``); a server that cannot reach it within
        ``token_wait`` (or refuses the time) leaves the read to the primary."""
        client = self.client
        if client is None:
            raise Unavailable("the MongoDB backend is not connected", retry_after=1)
        coll = self.routing.collection(self.db, collection, mode)
        self.token_reads += 1

        async def causal() -> T:
            try:
                async with client.start_session(causal_consistency=True) as session:
                    session.advance_operation_time(after)
                    with pymongo.timeout(self.token_wait):
                        return await op(coll, session)
            except PyMongoError as exc:
                if exc.timeout or (isinstance(exc, OperationFailure) and exc.code in _REFUSED):
                    raise _Behind("the server had not reached the write yet") from None
                raise

        try:
            return await self._guarded(causal, updating=False, breaker=self.read_breaker)
        except _Behind:
            pass
        self.token_fallbacks += 1
        primary = self.db[collection]
        return await self._guarded(lambda: op(primary, None), updating=False)


# the server would not read at the token's time: InvalidOptions (a time past its cluster
# time), MaxTimeMSExpired, ExceededTimeLimit
_REFUSED: Final = frozenset({72, 50, 262})


class _Behind(ProxyError):
    """The token read's server had not reached the token's time in the wait it had."""

    status = 504
    code = "token_wait"


__all__ = ["TOKEN_WAIT_SECONDS", "RoutedReads"]
