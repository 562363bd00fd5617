"""List-query coalescing: concurrent finds of one shape (the same SQL text, different bound
values) answered by one statement, a lateral join over arrays of their parameters
(docs/postgres.md, "List-query coalescing")."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from proxy.backends.coalesce import Coalescer
from proxy.errors import ProxyError

# every placeholder of a compiled find is ``$n::cast`` (proxy.query.pg.Params.add)
_PLACEHOLDER = re.compile(r"\$(\d+)(::([a-z]+)(\[\])?)?")
_ARRAYABLE = frozenset({"text", "jsonb", "bigint", "int", "boolean"})
# the errors every caller of a batch would get alone too (the database or the deadline):
# all others may belong to one caller's values, so each then runs alone
_SHARED_STATUS = frozenset({503, 504})

Rows = list[Sequence[Any]]
Outcome = Rows | ProxyError
Read = Callable[..., Awaitable[Sequence[Sequence[Any]] | None]]


def batched_sql(sql: str, order_by: str) -> str | None:
    """The statement answering many finds of the shape ``sql`` at once: one row of
    parameter arrays unnested (``q``), the find run once per row (``LATERAL``), its rows
    tagged with the row's ordinal and kept in the find's order (``order_by`` over ``r``).
    None when a parameter cannot be arrayed (an array itself, or a placeholder without a
    scalar cast): such a find runs alone."""
    casts: dict[int, str] = {}
    for m in _PLACEHOLDER.finditer(sql):
        n, cast, is_array = int(m.group(1)), m.group(3), m.group(4)
        if cast is None or is_array or cast not in _ARRAYABLE or casts.get(n, cast) != cast:
            return None
        casts[n] = cast
    if not casts or sorted(casts) != list(range(1, len(casts) + 1)):
        return None
    inner = _PLACEHOLDER.sub(lambda m: f"q.p{m.group(1)}", sql)
    arrays = ", ".join(f"${n}::{casts[n]}[]" for n in sorted(casts))
    columns = ", ".join(f"p{n}" for n in sorted(casts))
    return (
        f"SELECT q.i, r.* FROM unnest({arrays}) WITH ORDINALITY AS q({columns}, i) "
        f"CROSS JOIN LATERAL ({inner}) r ORDER BY q.i, {order_by}"
    )


class FindCoalescer:
    """Finds of one shape on one collection (and read preference): arguments arriving
    while a batch of the shape is in flight ride in the next one (``Coalescer``'s model:
    bounded, adaptive, run in its first caller's context); identical arguments share one
    answer. Each caller gets its own rows, or its own error."""

    def __init__(
        self, read: Read, collection: str, sql: str, batched: str, max_batch: int = 64
    ) -> None:
        self._read = read
        self._collection = collection
        self._sql = sql
        self._batched = batched
        self.coalescer: Coalescer[tuple[Any, ...], Outcome] = Coalescer(
            self._fetch_many, max_batch=max_batch
        )

    async def rows(self, args: tuple[Any, ...]) -> Rows:
        outcome = await self.coalescer.get(args)
        if isinstance(outcome, ProxyError):
            raise outcome
        return outcome or []

    async def _fetch_many(self, keys: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], Outcome]:
        if len(keys) == 1:
            return {keys[0]: await self._alone(keys[0])}
        columns = [list(c) for c in zip(*keys, strict=True)]
        try:
            rows = await self._read(self._collection, self._batched, *columns)
        except ProxyError as err:
            if err.status in _SHARED_STATUS:
                raise
            # one caller's values may be what the database refused: each runs alone
            return {k: await self._alone(k) for k in keys}
        out: dict[tuple[Any, ...], Rows] = {k: [] for k in keys}
        for row in rows or ():
            out[keys[row[0] - 1]].append(tuple(row)[1:])
        return dict(out)

    async def _alone(self, args: tuple[Any, ...]) -> Outcome:
        try:
            return list(await self._read(self._collection, self._sql, *args) or ())
        except ProxyError as err:
            return err
