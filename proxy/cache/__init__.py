"""The document cache: an in-process LRU (near) in front of a shared remote level, kept coherent."""

from proxy.cache.near import ENTRY_OVERHEAD, NearCache
from proxy.cache.protocol import (
    CacheUnavailable,
    Clock,
    Hit,
    InvalidateCallback,
    RemoteCache,
    RemoteHit,
    ResyncCallback,
    Ticket,
)
from proxy.cache.two_level import Miss, TwoLevelCache

__all__ = [
    "ENTRY_OVERHEAD",
    "CacheUnavailable",
    "Clock",
    "Hit",
    "InvalidateCallback",
    "Miss",
    "NearCache",
    "RemoteCache",
    "RemoteHit",
    "ResyncCallback",
    "Ticket",
    "TwoLevelCache",
]
