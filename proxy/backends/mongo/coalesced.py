"""Coalesced point reads on MongoDB: concurrent reads by id of one collection (under one read
preference) share one ``find({"_id": {"$in": [...]}})``, each caller getting its own document."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from proxy import context
from proxy.backends.coalesce import Coalescer, FetchMany
from proxy.backends.mongo.documents import Query, Session, body_of
from proxy.query.spec import WriteResult

# the backend's routed, breaker-guarded read: (collection, kind, query) -> result
Read = Callable[[str, str, Query[Any]], Awaitable[Any]]
MAX_COLLECTIONS = 10_000  # coalescers kept before they are all forgotten (names are bounded)


class PointReads:
    """One ``Coalescer`` per (collection, request read preference) over ``read``."""

    def __init__(self, read: Read) -> None:
        self._read = read
        self._coalescers: dict[tuple[str, str | None], Coalescer[str, WriteResult]] = {}

    async def get(self, collection: str, doc_id: str) -> WriteResult | None:
        key = (collection, context.current.get().read_preference)
        co = self._coalescers.get(key)
        if co is None:
            if len(self._coalescers) >= MAX_COLLECTIONS:
                self._coalescers.clear()
            co = self._coalescers[key] = Coalescer(self._fetcher(collection))
        return await co.get(doc_id)

    def _fetcher(self, collection: str) -> FetchMany[str, WriteResult]:
        async def fetch_many(ids: list[str]) -> dict[str, WriteResult]:
            async def run(coll: AsyncCollection[Any], session: Session) -> list[dict[str, Any]]:
                cursor = coll.find({"_id": {"$in": ids}}, session=session)
                return await cursor.to_list(None)

            docs = await self._read(collection, "point", run)
            return {d["_id"]: WriteResult(body_of(d), int(d["_version"])) for d in docs}

        return fetch_many
