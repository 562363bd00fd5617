"""Read coalescing and write batching: keys arriving within one event-loop turn are answered
by one call, bounded and adaptive under load (docs/postgres.md)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

FetchMany = Callable[[list[K]], Awaitable[dict[K, V]]]


class Coalescer(Generic[K, V]):
    """Collects keys for one loop turn, then fetches them with one call."""

    def __init__(
        self, fetch_many: FetchMany[K, V], max_batch: int = 256, max_in_flight: int = 2
    ) -> None:
        self._fetch_many = fetch_many
        self.max_batch = max_batch
        # While this many batches are running, new keys wait for one of them to finish
        # (or for a full batch): under load batches grow instead of multiplying, and an
        # idle coalescer adds no wait at all.
        self.max_in_flight = max_in_flight
        self._pending: dict[K, list[asyncio.Future[V | None]]] = {}
        # the context of the pending batch's first caller: its batch runs in it (wherever
        # the flush comes from), so a batch held back behind running ones still ends by
        # that caller's deadline, not by a fresh one or by a finished batch's
        self._pending_context: contextvars.Context | None = None
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # fetch calls made
        self.keys = 0  # keys asked for (a key asked twice in one batch counts twice)

    async def get(self, key: K) -> V | None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[V | None] = loop.create_future()
        waiters = self._pending.get(key)
        if not self._pending:
            self._pending_context = contextvars.copy_context()
        if waiters is None:
            self._pending[key] = [fut]
        else:
            waiters.append(fut)  # single flight: the same key rides along
        self.keys += 1
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        if len(self._tasks) >= self.max_in_flight and len(self._pending) < self.max_batch:
            return  # a batch that finishes flushes these
        batch, self._pending = self._pending, {}
        ctx, self._pending_context = self._pending_context, None
        self.batches += 1
        task = asyncio.get_running_loop().create_task(self._run(batch), context=ctx)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._pending and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _run(self, batch: dict[K, list[asyncio.Future[V | None]]]) -> None:
        try:
            found = await self._fetch_many(list(batch))
        except BaseException as exc:
            for waiters in batch.values():
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for key, waiters in batch.items():
            value = found.get(key)
            for fut in waiters:
                if not fut.done():  # a cancelled request simply drops out
                    fut.set_result(value)


Item = TypeVar("Item")
R = TypeVar("R")


class Batcher(Generic[Item, R]):
    """Collects submitted items for one loop turn and runs them with one call, which
    returns one outcome per item (a value, or an exception for that item alone). Items
    whose ``key`` is already in the open batch start the next batch, so one batch never
    holds two items with the same key."""

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[list[R | BaseException]]],
        key: Callable[[Item], Hashable],
        max_batch: int = 256,
    ) -> None:
        self._run_batch = run
        self._key = key
        self.max_batch = max_batch
        self._items: list[Item] = []
        self._futures: list[asyncio.Future[R]] = []
        self._keys: set[Hashable] = set()
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.items = 0

    async def submit(self, item: Item) -> R:
        loop = asyncio.get_running_loop()
        key = self._key(item)
        if key in self._keys or len(self._items) >= self.max_batch:
            self._flush()
        fut: asyncio.Future[R] = loop.create_future()
        self._items.append(item)
        self._futures.append(fut)
        self._keys.add(key)
        self.items += 1
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        if not self._items:
            return
        items, futures = self._items, self._futures
        self._items, self._futures, self._keys = [], [], set()
        self.batches += 1
        task = asyncio.get_running_loop().create_task(self._run(items, futures))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[Item], futures: list[asyncio.Future[R]]) -> None:
        try:
            outcomes = await self._run_batch(items)
        except BaseException as exc:
            for fut in futures:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for fut, outcome in zip(futures, outcomes, strict=True):
            if fut.done():
                continue
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)
