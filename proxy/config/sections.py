"""Parsing the server, limits, cache and collector sections of the config file."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Final

from proxy.config.model import (
    DEFAULT_DATA_DIR,
    CacheConfig,
    CollectionCache,
    CollectorPush,
    Limits,
    ServerConfig,
)
from proxy.config.values import (
    MAX_PORT,
    build,
    numbers_section,
    read_int,
    read_number,
    read_optional_str,
    read_str,
)
from proxy.problems import Problems, check_keys, integer, mapping

_COLLECTION_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")


def parse_limits(value: object, problems: Problems) -> Limits:
    values = numbers_section(value, Limits, "limits", problems, {})
    default, maximum = values["default_limit"], values["max_limit"]
    if default is not None and maximum is not None and default > maximum:
        problems.add("limits.default_limit", f"must be <= max_limit ({maximum})")
    limits: Limits = build(Limits, values)
    return limits


def parse_cache(value: object, problems: Problems) -> CacheConfig:
    raw = mapping(value, "cache", problems) if value is not None else {}
    if raw is None:
        return CacheConfig()
    keys = (
        "redis_url",
        "near_max_entries",
        "near_max_bytes",
        "redis_timeout_seconds",
        "ack_timeout_seconds",
        "collections",
    )
    check_keys(raw, keys, "cache", problems)
    defaults = CacheConfig()
    redis_url = read_optional_str(raw, "redis_url", "cache", problems)
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://")):
        problems.add("cache.redis_url", "must be a redis:// or rediss:// URL")
    entries = read_int(raw, "near_max_entries", "cache", defaults.near_max_entries, problems, low=0)
    size = read_int(raw, "near_max_bytes", "cache", defaults.near_max_bytes, problems, low=0)
    timeout = read_number(
        raw, "redis_timeout_seconds", "cache", defaults.redis_timeout_seconds, problems
    )
    ack = read_number(raw, "ack_timeout_seconds", "cache", defaults.ack_timeout_seconds, problems)
    collections: dict[str, CollectionCache] = {}
    coll_raw = mapping(raw.get("collections", {}), "cache.collections", problems) or {}
    for name, spec in coll_raw.items():
        where = f"cache.collections.{name}"
        if not isinstance(name, str) or not _COLLECTION_RE.fullmatch(name):
            problems.add(where, "is not a valid collection name")
            continue
        body = mapping(spec, where, problems)
        if body is None:
            continue
        check_keys(body, ("enabled", "ttl_seconds"), where, problems)
        enabled = body.get("enabled", True)
        if not isinstance(enabled, bool):
            problems.add(f"{where}.enabled", "must be true or false")
            enabled = True
        ttl = read_number(body, "ttl_seconds", where, 60.0, problems)
        collections[name] = CollectionCache(enabled, ttl if ttl is not None else 60.0)
    return CacheConfig(
        redis_url=redis_url,
        near_max_entries=entries if entries is not None else defaults.near_max_entries,
        near_max_bytes=size if size is not None else defaults.near_max_bytes,
        redis_timeout_seconds=timeout if timeout is not None else defaults.redis_timeout_seconds,
        ack_timeout_seconds=ack if ack is not None else defaults.ack_timeout_seconds,
        collections=collections,
    )


def parse_server(
    value: object, problems: Problems, host: str | None, port: int | None
) -> ServerConfig:
    raw = mapping(value, "server", problems) or {}
    check_keys(raw, [f.name for f in fields(ServerConfig)], "server", problems)
    defaults = ServerConfig()
    file_host = read_str(raw, "host", "server", defaults.host, problems)
    file_port = read_int(raw, "port", "server", defaults.port, problems, high=MAX_PORT)
    cap = read_int(raw, "max_connections", "server", defaults.max_connections, problems)
    timeouts = {
        name: read_number(raw, name, "server", getattr(defaults, name), problems)
        for name in ("header_timeout_seconds", "body_timeout_seconds", "idle_timeout_seconds")
    }
    if host is not None and not host:
        problems.add("host", "must be a non-empty string")
        host = None
    if port is not None:
        port = integer(port, "port", problems, high=MAX_PORT)
    return ServerConfig(
        host=host or file_host or defaults.host,
        port=port or file_port or defaults.port,
        max_connections=cap or defaults.max_connections,
        **{k: v for k, v in timeouts.items() if v is not None},
    )


def _collector_url(value: str | None, where: str, problems: Problems) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        problems.add(where, "must start with http:// or https://")
        return None
    return value


def parse_locations(
    raw: Mapping[Any, object], data_dir: str | None, collector_url: str | None, problems: Problems
) -> tuple[str, str | None]:
    """(data_dir, collector_url): the file's values, overridden by the explicit ones."""
    file_data_dir = read_str(raw, "data_dir", "", DEFAULT_DATA_DIR, problems)
    if data_dir is not None and not data_dir:
        problems.add("data_dir", "must be a non-empty string")
    collector = read_optional_str(raw, "collector_url", "", problems)
    collector = _collector_url(collector, "collector_url", problems)
    if collector_url is not None:
        collector = _collector_url(collector_url, "collector_url", problems)
    return data_dir or file_data_dir or DEFAULT_DATA_DIR, collector


def parse_collector_push(value: object, problems: Problems) -> CollectorPush:
    raw = mapping(value, "collector_push", problems) if value is not None else {}
    if not raw:
        return CollectorPush()
    check_keys(
        raw, ("interval_seconds", "max_buffered_batches", "ca_file"), "collector_push", problems
    )
    ca_file = read_optional_str(raw, "ca_file", "collector_push", problems)
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        problems.add("collector_push.ca_file", f"{problems.show(ca_file)} cannot be read")
    defaults = CollectorPush()
    interval = read_number(
        raw, "interval_seconds", "collector_push", defaults.interval_seconds, problems
    )
    buffered = read_int(
        raw, "max_buffered_batches", "collector_push", defaults.max_buffered_batches, problems
    )
    return CollectorPush(
        interval if interval is not None else defaults.interval_seconds,
        buffered if buffered is not None else defaults.max_buffered_batches,
        ca_file,
    )
