"""MongoDB read routing: the driver's read preference per request class, and consistency
tokens made of the session's operation time (README: Storage, MongoDB)."""

from __future__ import annotations

from typing import Any, Final

from bson import Timestamp
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.read_preferences import (
    Nearest,
    Primary,
    PrimaryPreferred,
    SecondaryPreferred,
    _ServerMode,
)

from proxy import context
from proxy.resilience.routing import WRITE_KINDS, format_lsn

__all__ = [
    "MAX_STALENESS_SECONDS",
    "PRIMARY",
    "UNKNOWN_TOKEN",
    "ReadRouting",
    "after_of",
    "note_write",
    "token_of",
]

# the driver's bound on a secondary's lag (the smallest MongoDB allows: 90 s; PostgreSQL's
# replicas are skipped past 5 s, measured)
MAX_STALENESS_SECONDS: Final = 90
PRIMARY: Final = Primary()
# dbproxy's names (config ``read_preference``, ``X-Read-Preference``) → the driver's modes.
# ``secondary`` is secondaryPreferred, as on PostgreSQL: a replica when one is usable, else
# the primary (never "no server"); MongoDB's strict ``secondary`` is not offered.
MODES: Final[dict[str, _ServerMode]] = {
    "primary": PRIMARY,
    "primaryPreferred": PrimaryPreferred(max_staleness=MAX_STALENESS_SECONDS),
    "secondary": SecondaryPreferred(max_staleness=MAX_STALENESS_SECONDS),
    "secondaryPreferred": SecondaryPreferred(max_staleness=MAX_STALENESS_SECONDS),
    "nearest": Nearest(max_staleness=MAX_STALENESS_SECONDS),
}
# the token of a write whose operation time is not known (the server sent none, or the write
# ran without an explicit session): a read that carries it goes to the primary
UNKNOWN_TOKEN: Final = "0/0"  # noqa: S105 (a consistency token, not a secret)
POINT: Final = "point"  # a read by id (the read cache fills with these)
_MAX_COLLECTIONS: Final = 10_000  # routed collection handles kept (names are bounded)


def token_of(operation_time: Timestamp | None) -> str:
    """A write's ``X-Consistency-Token``: its operation time (seconds, increment) written
    like a PostgreSQL LSN (``"<seconds hex>/<increment hex>"``), so one parser reads both."""
    if operation_time is None:
        return UNKNOWN_TOKEN
    return format_lsn((operation_time.time << 32) | operation_time.inc)


def after_of(min_lsn: int) -> Timestamp | None:
    """The operation time a token names; None for ``UNKNOWN_TOKEN`` (read the primary)."""
    seconds, inc = min_lsn >> 32, min_lsn & 0xFFFFFFFF
    if seconds == 0:  # no operation time is before 1970: not one of ours, read the primary
        return None
    return Timestamp(seconds, inc)


def note_write(operation_time: Timestamp | None) -> None:
    """The response's ``X-Consistency-Token`` for a committed write."""
    context.write_token.set(token_of(operation_time))


class ReadRouting:
    """The read preference of each operation: writes and transactions on the primary; reads
    by the request's ``X-Read-Preference``, else the database's ``read_preference``. Reads
    by id of the collections in ``primary_points`` (those the read cache fills from) stay on
    the primary: a cache fill must see every committed write, and the driver's staleness
    bound (90 s) is longer than the cache's fill window (5 s)."""

    def __init__(self, default: str, primary_points: frozenset[str] = frozenset()) -> None:
        if default not in MODES:
            raise ValueError(f"unknown read preference {default!r}")
        self.default = default
        self.primary_points = primary_points
        self._handles: dict[tuple[str, str], AsyncCollection[Any]] = {}

    @property
    def routes_reads(self) -> bool:
        """Some read may leave the primary (only then are tokens worth a session)."""
        return self.default != "primary"

    def mode(self, kind: str, collection: str | None = None) -> _ServerMode:
        """The driver's read preference for an operation of ``kind`` on ``collection``."""
        if kind in WRITE_KINDS:
            return PRIMARY
        if kind == POINT and collection in self.primary_points:
            return PRIMARY
        name = context.current.get().read_preference or self.default
        return MODES.get(name, PRIMARY)

    def collection(
        self, db: AsyncDatabase[Any], name: str, mode: _ServerMode
    ) -> AsyncCollection[Any]:
        """``db[name]`` read with ``mode`` (handles kept, so the hot path builds none)."""
        if mode is PRIMARY:
            return db[name]
        key = (name, mode.mongos_mode)
        handle = self._handles.get(key)
        if handle is None or handle.database is not db:
            if len(self._handles) >= _MAX_COLLECTIONS:
                self._handles.clear()
            handle = self._handles[key] = db.get_collection(name, read_preference=mode)
        return handle

    def snapshot(self) -> dict[str, Any]:
        """The mode each request class is given (for ``/api/db/connections``)."""
        default = MODES[self.default]
        return {
            "read_preference": self.default,
            "modes": {
                "write": PRIMARY.mongos_mode,
                "transaction": PRIMARY.mongos_mode,
                "read": default.mongos_mode,
                "count": default.mongos_mode,
                "cached_read_by_id": PRIMARY.mongos_mode,
            },
            "max_staleness_seconds": None if default is PRIMARY else MAX_STALENESS_SECONDS,
        }
