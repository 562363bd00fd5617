"""A Collection Schema's ``partitioning`` declaration (issue 21): parsed and checked into a
frozen value, every bad part a 400 naming its place. Pure: no database, no I/O.

Strategies: ``hash {key, partitions}``, ``list {key, values: {partition: [values]},
default?}``, ``range {key, bounds: [b1, b2, ...]}`` and ``time {key, interval, premake,
retention}``. Partition names and the key's path segments are checked against fixed
patterns; values and bounds are JSON scalars that a backend binds as parameters."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Final

from proxy.errors import BadRequest

STRATEGIES: Final = ("hash", "list", "range", "time")
INTERVALS: Final = ("day", "week", "month")
UNIQUE_ID: Final = ("global", "per_key")
MAX_HASH_PARTITIONS: Final = 256
MAX_LIST_PARTITIONS: Final = 256
MAX_LIST_VALUES: Final = 1024
MAX_RANGE_BOUNDS: Final = 255
MAX_PREMAKE: Final = 60
MAX_RETENTION: Final = 10_000
_SEGMENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_PARTITION_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,29}")
_KEYS: Final = {
    "hash": frozenset({"strategy", "key", "partitions", "unique_id"}),
    "list": frozenset({"strategy", "key", "values", "default", "unique_id"}),
    "range": frozenset({"strategy", "key", "bounds", "unique_id"}),
    "time": frozenset({"strategy", "key", "interval", "premake", "retention", "unique_id"}),
}
_SYSTEM: Final = frozenset({"_id", "_version"})


def _invalid(message: str, where: str) -> BadRequest:
    return BadRequest(f"{where}: {message}", code="invalid_schema", details={"at": where})


@dataclass(frozen=True, slots=True)
class Partitioning:
    strategy: str
    key: tuple[str, ...]
    unique_id: str = "global"
    partitions: int = 0  # hash
    values: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # list: (partition, values)
    default: bool = False  # list
    bounds: tuple[Any, ...] = ()  # range: ascending, same kind
    interval: str = ""  # time
    premake: int = 0  # time
    retention: int | None = None  # time: intervals kept, None = forever

    @property
    def key_text(self) -> str:
        return ".".join(self.key)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "strategy": self.strategy,
            "key": self.key_text,
            "unique_id": self.unique_id,
        }
        if self.strategy == "hash":
            out["partitions"] = self.partitions
        elif self.strategy == "list":
            out["values"] = {name: list(vals) for name, vals in self.values}
            out["default"] = self.default
        elif self.strategy == "range":
            out["bounds"] = list(self.bounds)
        else:
            out.update(interval=self.interval, premake=self.premake, retention=self.retention)
        return out


def _scalar_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def _count(raw: Any, where: str, low: int, high: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise _invalid(f"must be an integer from {low} to {high}", where)
    return raw


def parse_partitioning(raw: Any, where: str = "schema.partitioning") -> Partitioning:
    """The declaration from its JSON form; a 400 ``invalid_schema`` naming the bad part."""
    if not isinstance(raw, dict):
        raise _invalid("must be an object", where)
    strategy = raw.get("strategy")
    if strategy not in STRATEGIES:
        raise _invalid(f"strategy must be one of {', '.join(STRATEGIES)}", f"{where}.strategy")
    unknown = sorted(set(raw) - _KEYS[strategy])
    if unknown:
        raise _invalid(f"unknown key {unknown[0]!r} for strategy {strategy}", where)
    key_raw = raw.get("key")
    if not isinstance(key_raw, str) or not key_raw:
        raise _invalid("must be a field path", f"{where}.key")
    key = tuple(key_raw.split("."))
    if len(key) > 8 or not all(_SEGMENT_RE.fullmatch(s) for s in key) or key_raw in _SYSTEM:
        raise _invalid("must be a declared-style field path, not a system field", f"{where}.key")
    unique_id = raw.get("unique_id", "global")
    if unique_id not in UNIQUE_ID:
        raise _invalid("must be global or per_key", f"{where}.unique_id")
    common: dict[str, Any] = {"strategy": strategy, "key": key, "unique_id": unique_id}
    if strategy == "hash":
        n = _count(raw.get("partitions"), f"{where}.partitions", 2, MAX_HASH_PARTITIONS)
        return Partitioning(**common, partitions=n)
    if strategy == "list":
        return Partitioning(**common, **_parse_list(raw, where))
    if strategy == "range":
        return Partitioning(**common, bounds=_parse_bounds(raw.get("bounds"), f"{where}.bounds"))
    interval = raw.get("interval")
    if interval not in INTERVALS:
        raise _invalid(f"must be one of {', '.join(INTERVALS)}", f"{where}.interval")
    premake = _count(raw.get("premake", 4), f"{where}.premake", 0, MAX_PREMAKE)
    retention_raw = raw.get("retention")
    retention = (
        None
        if retention_raw is None
        else _count(retention_raw, f"{where}.retention", 1, MAX_RETENTION)
    )
    return Partitioning(**common, interval=interval, premake=premake, retention=retention)


def _parse_list(raw: dict[str, Any], where: str) -> dict[str, Any]:
    values_raw = raw.get("values")
    at = f"{where}.values"
    if not isinstance(values_raw, dict) or not 1 <= len(values_raw) <= MAX_LIST_PARTITIONS:
        raise _invalid(f"must map 1 to {MAX_LIST_PARTITIONS} partition names to values", at)
    seen: set[tuple[str, Any]] = set()
    kinds: set[str] = set()
    total = 0
    out: list[tuple[str, tuple[Any, ...]]] = []
    for name, vals in values_raw.items():
        if not _PARTITION_RE.fullmatch(name) or name == "default":
            raise _invalid(f"partition name {name!r} must match [a-z][a-z0-9_]{{0,29}}", at)
        if not isinstance(vals, list) or not vals:
            raise _invalid("must be a non-empty list of strings or numbers", f"{at}.{name}")
        for v in vals:
            kind = _scalar_kind(v)
            if kind is None:
                raise _invalid("values must be strings or numbers", f"{at}.{name}")
            kinds.add(kind)
            if (kind, v) in seen:
                raise _invalid(f"value {v!r} is listed twice", f"{at}.{name}")
            seen.add((kind, v))
        total += len(vals)
        out.append((name, tuple(vals)))
    if len(kinds) > 1:
        raise _invalid("values must all be strings or all numbers", at)
    if total > MAX_LIST_VALUES:
        raise _invalid(f"at most {MAX_LIST_VALUES} values in all", at)
    default = raw.get("default", False)
    if not isinstance(default, bool):
        raise _invalid("must be true or false", f"{where}.default")
    return {"values": tuple(out), "default": default}


def _parse_bounds(raw: Any, at: str) -> tuple[Any, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_RANGE_BOUNDS:
        raise _invalid(f"must be a list of 1 to {MAX_RANGE_BOUNDS} ascending bounds", at)
    kinds = {_scalar_kind(b) for b in raw}
    if None in kinds or len(kinds) != 1:
        raise _invalid("bounds must be all strings or all numbers", at)
    if any(not a < b for a, b in itertools.pairwise(raw)):
        raise _invalid("bounds must be strictly ascending", at)
    return tuple(raw)


def check_unique_indexes(
    spec: Partitioning, unique_keys: list[tuple[str, tuple[tuple[str, ...], ...]]], where: str
) -> None:
    """PostgreSQL's rule for partitioned tables: a unique index must include the partition
    key. ``unique_keys`` holds (index name, its key paths) for every unique index."""
    for name, paths in unique_keys:
        if spec.key not in paths:
            raise BadRequest(
                f"{where}: unique index {name!r} must include the partition key "
                f"{spec.key_text!r} (a unique index on a partitioned collection is enforced "
                "per partition)",
                code="unique_index_without_partition_key",
                details={"at": where, "index": name, "partition_key": spec.key_text},
            )
