"""The central collector's logic: the push batch format (``protocol``) and rollups (``store``)."""

from proxy.collector.protocol import (
    MAX_BATCH_PATTERNS,
    MAX_BATCH_SLOW,
    Batch,
    PatternRollup,
    SlowQuery,
    parse_push_batch,
)
from proxy.collector.store import CollectorStore

__all__ = [
    "MAX_BATCH_PATTERNS",
    "MAX_BATCH_SLOW",
    "Batch",
    "CollectorStore",
    "PatternRollup",
    "SlowQuery",
    "parse_push_batch",
]
