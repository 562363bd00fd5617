"""Process configuration: the frozen settings dataclasses and their all-problems-at-once loader."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

import yaml

from proxy.errors import ConfigError

__all__ = [
    "DATABASE_TYPES",
    "DATABASE_URL_ENV",
    "DEFAULT_DATA_DIR",
    "READ_PREFERENCES",
    "REPLICA_ROLES",
    "URL_DATABASE_NAME",
    "Config",
    "DatabaseConfig",
    "Limits",
    "PoolSettings",
    "ReplicaConfig",
    "ServerConfig",
    "load_config",
    "redact_dsn",
]

DATABASE_TYPES: Final = ("postgresql", "mongodb", "redis", "sqlite")
READ_PREFERENCES: Final = ("primary", "secondary", "nearest")
REPLICA_ROLES: Final = ("replica", "analytics")
DATABASE_URL_ENV: Final = "DBPROXY_DATABASE_URL"
URL_DATABASE_NAME: Final = "default"
DEFAULT_DATA_DIR: Final = ".dbproxy"

# Accepted URL schemes per database type (first one is the canonical spelling).
_SCHEMES: Final[Mapping[str, tuple[str, ...]]] = {
    "postgresql": ("postgresql", "postgres"),
    "mongodb": ("mongodb", "mongodb+srv"),
    "redis": ("redis", "rediss"),
    "sqlite": ("sqlite",),
}
_TYPE_BY_SCHEME: Final = {s: t for t, schemes in _SCHEMES.items() for s in schemes}
# The types this build has a backend for: an unknown URL scheme (--database,
# $DBPROXY_DATABASE_URL) is answered with exactly their schemes (the others fail later,
# with "has no backend in this build").
URL_DATABASE_TYPES: Final = ("postgresql", "sqlite")
_URL_TYPE_BY_SCHEME: Final = {s: t for s, t in _TYPE_BY_SCHEME.items() if t in URL_DATABASE_TYPES}

_COLLECTION_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
_SCHEME_RE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_REFERENCE_RE: Final = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYWORD_DSN_RE: Final = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*=")
_KEYWORD_SECRET_RE: Final = re.compile(
    r"(?i)(\b(?:password|passwd|pwd|pass|sslpassword)\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)"
)
_HOST = r"(?:\[[0-9A-Fa-f:.%]*\]|[^:@,\[\]/?#]*)(?::\d*)?"
_HOST_LIST_RE: Final = re.compile(rf"{_HOST}(?:,{_HOST})*")
_SECRET_PARAM_WORDS: Final = ("password", "passwd", "secret", "token")
_SECRET_PARAMS: Final = frozenset({"pass", "pwd", "apikey", "api_key", "authmechanismproperties"})
_REDACTED: Final = "***"
_MAX_PORT: Final = 65535
_PLAIN_KEY_RE: Final = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class PoolSettings:
    min_connections: int = 2
    max_connections: int = 10
    timeout_seconds: float = 5.0  # how long an acquire may wait for a free connection


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    host: str
    port: int
    role: str = "replica"  # one of REPLICA_ROLES


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    name: str
    type: str  # one of DATABASE_TYPES
    connection_string: str = field(repr=False)  # secret: never in repr, str, logs or errors
    pool_settings: PoolSettings = field(default_factory=PoolSettings)
    read_preference: str = "primary"  # one of READ_PREFERENCES
    write_concern: str | int | None = None
    replicas: tuple[ReplicaConfig, ...] = ()

    def redacted_dsn(self) -> str:
        """The connection string with every password replaced by ``***`` (safe to log)."""
        return redact_dsn(self.connection_string)


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 1048576
    max_json_depth: int = 32
    max_filter_nodes: int = 200
    max_in_items: int = 1000
    max_regex_length: int = 256
    max_limit: int = 1000
    default_limit: int = 100
    max_path_segments: int = 16
    statement_timeout_seconds: float = 5.0
    max_batch_items: int = 1000
    max_transaction_operations: int = 100
    max_open_transactions: int = 64
    max_open_transactions_per_service: int = 4  # under a policy, unless it sets its own
    transaction_idle_timeout_seconds: float = 30.0
    transaction_max_lifetime_seconds: float = 300.0
    idempotency_ttl_seconds: float = 86400.0
    slow_query_ms: float = 200.0


@dataclass(frozen=True, slots=True)
class CollectionCache:
    enabled: bool = True
    ttl_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The read cache: an in-process near cache, in front of Redis when ``redis_url`` is
    set (shared by all sidecars, invalidated through pub/sub); per collection opt-in."""

    redis_url: str | None = None
    near_max_entries: int = 10_000
    near_max_bytes: int = 64 * 1024 * 1024
    redis_timeout_seconds: float = 0.05
    ack_timeout_seconds: float = 0.05  # a write waits this long at most for every sidecar
    collections: Mapping[str, CollectionCache] = field(default_factory=dict)

    def ttl(self, collection: str) -> float | None:
        """The TTL when by-id reads of ``collection`` are cached, else None."""
        entry = self.collections.get(collection)
        return entry.ttl_seconds if entry is not None and entry.enabled else None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8700
    # client connections: past the cap, health is still answered and the rest get 503
    max_connections: int = 4096
    header_timeout_seconds: float = 10.0  # from a request's first byte to its last header
    body_timeout_seconds: float = 30.0  # from the last header to the body's last byte
    idle_timeout_seconds: float = 60.0  # a keep-alive connection with no request is closed


@dataclass(frozen=True, slots=True)
class CollectorPush:
    """How stats batches are pushed to the collector (``collector_url``)."""

    interval_seconds: float = 2.0
    max_buffered_batches: int = 100  # while the collector is away; the oldest are dropped


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    databases: tuple[DatabaseConfig, ...] = ()
    limits: Limits = field(default_factory=Limits)
    default_database: str | None = None
    data_dir: str = DEFAULT_DATA_DIR  # home of the embedded store when no database is set
    collector_url: str | None = None
    collector_push: CollectorPush = field(default_factory=CollectorPush)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def database(self, name: str | None = None) -> DatabaseConfig:
        """The database called ``name`` (the default one when None); ConfigError if unknown."""
        wanted = self.default_database if name is None else name
        if wanted is None:
            raise ConfigError(["no database is configured"])
        for db in self.databases:
            if db.name == wanted:
                return db
        raise ConfigError([f"no database named {wanted!r}"])


# --------------------------------------------------------------------------- redaction


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its secrets replaced by ``***``: the password of ``user:pass@``, and
    query parameters such as ``?password=``. Never raises; an input it cannot make sense of
    is replaced by ``***`` as a whole, because it might be a secret itself."""
    if not dsn:
        return dsn
    match = _SCHEME_RE.match(dsn)
    if match is None:
        return _redact_keyword_dsn(dsn)
    authority, tail = _redact_authority(dsn[match.end() :])
    return dsn[: match.end()] + authority + _redact_query(tail)


def _redact_keyword_dsn(dsn: str) -> str:
    """libpq ``key=value`` form: redact password values; anything else is opaque."""
    if _KEYWORD_DSN_RE.match(dsn):
        return _KEYWORD_SECRET_RE.sub(lambda m: m.group(1) + _REDACTED, dsn)
    return _REDACTED


def _first_of(text: str, chars: str) -> int:
    positions = [i for i in (text.find(c) for c in chars) if i >= 0]
    return min(positions) if positions else len(text)


def _redact_userinfo(userinfo: str) -> str:
    user, colon, _ = userinfo.partition(":")
    return f"{user}:{_REDACTED}" if colon else user


def _redact_authority(rest: str) -> tuple[str, str]:
    """Split ``rest`` (after ``scheme://``) into redacted authority and the remaining tail.

    A password holding an unencoded ``/``, ``?`` or ``#`` would end the authority early, so
    when an ``@`` appears later we err towards redacting too much rather than too little."""
    end = _first_of(rest, "/?#")
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, _, hosts = authority.rpartition("@")
        return f"{_redact_userinfo(userinfo)}@{hosts}", tail
    at = rest.rfind("@")
    if authority and at >= 0 and ":" in rest[:at]:
        after = rest[at + 1 :]
        end = _first_of(after, "/?#")
        return f"{_redact_userinfo(rest[:at])}@{after[:end]}", after[end:]
    if not _HOST_LIST_RE.fullmatch(authority):
        return _redact_userinfo(authority), tail
    return authority, tail


def _is_secret_param(key: str) -> bool:
    lowered = key.lower()
    return lowered in _SECRET_PARAMS or any(word in lowered for word in _SECRET_PARAM_WORDS)


def _redact_query(tail: str) -> str:
    before, hash_sign, fragment = tail.partition("#")
    path, question, query = before.partition("?")
    if not question:
        return tail
    pieces = []
    for piece in query.split("&"):
        key, equals, _ = piece.partition("=")
        pieces.append(f"{key}={_REDACTED}" if equals and _is_secret_param(key) else piece)
    return f"{path}?{'&'.join(pieces)}{hash_sign}{fragment}"


# --------------------------------------------------------------------------- problem collection


class _Problems:
    """Every problem found so far, each prefixed with where it was found."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def _join(path: str, key: object) -> str:
    shown = key if isinstance(key, str) and _PLAIN_KEY_RE.fullmatch(key) else _show(str(key))
    return f"{path}.{shown}" if path else shown


def _type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return names.get(type(value), type(value).__name__)


def _show(value: str, limit: int = 64) -> str:
    """A user value for a message: quoted, cut to a readable length, and redacted if it looks
    like a connection string pasted into the wrong place."""
    if "://" in value or "@" in value:
        value = redact_dsn(value)
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _mapping(value: object, where: str, problems: _Problems) -> Mapping[Any, object] | None:
    """``value`` as a mapping ({} when absent/null); None (and a problem) otherwise."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    problems.add(where, f"must be a mapping, got {_type_name(value)}")
    return None


def _check_keys(
    raw: Mapping[Any, object], allowed: Collection[str], path: str, problems: _Problems
) -> None:
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(_join(path, key), f"unknown key{hint}")


def _check_int(value: object, where: str, problems: _Problems, low: int, high: int | None) -> bool:
    if not isinstance(value, int) or isinstance(value, bool):
        problems.add(where, f"must be an integer, got {_type_name(value)}")
        return False
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        problems.add(where, f"must be {bound} (got {value})")
        return False
    return True


def _int(
    raw: Mapping[Any, object],
    key: str,
    path: str,
    default: int | None,
    problems: _Problems,
    *,
    low: int = 1,
    high: int | None = None,
) -> int | None:
    """The integer at ``key``: ``default`` when absent, None (and a problem) when invalid."""
    if key not in raw:
        return default
    value = raw[key]
    if _check_int(value, _join(path, key), problems, low, high):
        assert isinstance(value, int)
        return value
    return None


def _positive_number(
    raw: Mapping[Any, object], key: str, path: str, default: float, problems: _Problems
) -> float | None:
    if key not in raw:
        return default
    value, where = raw[key], _join(path, key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        problems.add(where, f"must be a number, got {_type_name(value)}")
        return None
    if not math.isfinite(value) or value <= 0:
        problems.add(where, f"must be a positive number (got {value})")
        return None
    return float(value)


def _str(
    raw: Mapping[Any, object],
    key: str,
    path: str,
    default: str | None,
    problems: _Problems,
    *,
    choices: tuple[str, ...] = (),
) -> str | None:
    """The non-empty string at ``key``: ``default`` when absent (a problem when there is no
    default), None (and a problem) when invalid or not one of ``choices``."""
    where = _join(path, key)
    if key not in raw:
        if default is None:
            problems.add(where, "is required")
        return default
    value = raw[key]
    if not isinstance(value, str) or not value:
        problems.add(where, f"must be a non-empty string, got {_type_name(value)}")
        return None
    if choices and value not in choices:
        problems.add(where, f"must be one of {', '.join(choices)} (got {_show(value)})")
        return None
    return value


def _optional_str(
    raw: Mapping[Any, object], key: str, path: str, problems: _Problems
) -> str | None:
    value = raw.get(key)
    if value is None or (isinstance(value, str) and value):
        return value
    problems.add(_join(path, key), f"must be a non-empty string or null, got {_type_name(value)}")
    return None


# --------------------------------------------------------------------------- sections


def _numbers_section(
    value: object, cls: type[Any], path: str, problems: _Problems, low: Mapping[str, int]
) -> dict[str, Any]:
    """Read every (int or float) field of dataclass ``cls`` from ``value``; invalid ones None."""
    raw = _mapping(value, path, problems)
    if raw is None:
        return {f.name: None for f in fields(cls)}
    names = [f.name for f in fields(cls)]
    _check_keys(raw, names, path, problems)
    values: dict[str, Any] = {}
    for f in fields(cls):
        default = f.default
        if isinstance(default, float):
            values[f.name] = _positive_number(raw, f.name, path, default, problems)
        elif isinstance(default, int):
            values[f.name] = _int(raw, f.name, path, default, problems, low=low.get(f.name, 1))
    return values


def _build(cls: type[Any], values: Mapping[str, Any]) -> Any:
    return cls(**{k: v for k, v in values.items() if v is not None})


def _parse_pool(value: object, path: str, problems: _Problems) -> PoolSettings:
    values = _numbers_section(value, PoolSettings, path, problems, {"min_connections": 0})
    low, high = values["min_connections"], values["max_connections"]
    if low is not None and high is not None and high < low:
        problems.add(f"{path}.max_connections", f"must be >= min_connections ({low})")
    pool: PoolSettings = _build(PoolSettings, values)
    return pool


def _parse_limits(value: object, problems: _Problems) -> Limits:
    values = _numbers_section(value, Limits, "limits", problems, {})
    default, maximum = values["default_limit"], values["max_limit"]
    if default is not None and maximum is not None and default > maximum:
        problems.add("limits.default_limit", f"must be <= max_limit ({maximum})")
    limits: Limits = _build(Limits, values)
    return limits


def _parse_cache(value: object, problems: _Problems) -> CacheConfig:
    raw = _mapping(value, "cache", problems) if value is not None else {}
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
    _check_keys(raw, keys, "cache", problems)
    defaults = CacheConfig()
    redis_url = _optional_str(raw, "redis_url", "cache", problems)
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://")):
        problems.add("cache.redis_url", "must be a redis:// or rediss:// URL")
    entries = _int(raw, "near_max_entries", "cache", defaults.near_max_entries, problems, low=0)
    size = _int(raw, "near_max_bytes", "cache", defaults.near_max_bytes, problems, low=0)
    timeout = _positive_number(
        raw, "redis_timeout_seconds", "cache", defaults.redis_timeout_seconds, problems
    )
    ack = _positive_number(
        raw, "ack_timeout_seconds", "cache", defaults.ack_timeout_seconds, problems
    )
    collections: dict[str, CollectionCache] = {}
    coll_raw = _mapping(raw.get("collections", {}), "cache.collections", problems) or {}
    for name, spec in coll_raw.items():
        where = f"cache.collections.{name}"
        if not isinstance(name, str) or not _COLLECTION_RE.fullmatch(name):
            problems.add(where, "is not a valid collection name")
            continue
        body = _mapping(spec, where, problems)
        if body is None:
            continue
        _check_keys(body, ("enabled", "ttl_seconds"), where, problems)
        enabled = body.get("enabled", True)
        if not isinstance(enabled, bool):
            problems.add(f"{where}.enabled", "must be true or false")
            enabled = True
        ttl = _positive_number(body, "ttl_seconds", where, 60.0, problems)
        collections[name] = CollectionCache(enabled, ttl if ttl is not None else 60.0)
    return CacheConfig(
        redis_url=redis_url,
        near_max_entries=entries if entries is not None else defaults.near_max_entries,
        near_max_bytes=size if size is not None else defaults.near_max_bytes,
        redis_timeout_seconds=timeout if timeout is not None else defaults.redis_timeout_seconds,
        ack_timeout_seconds=ack if ack is not None else defaults.ack_timeout_seconds,
        collections=collections,
    )


def _parse_server(
    value: object, problems: _Problems, host: str | None, port: int | None
) -> ServerConfig:
    raw = _mapping(value, "server", problems) or {}
    _check_keys(raw, [f.name for f in fields(ServerConfig)], "server", problems)
    defaults = ServerConfig()
    file_host = _str(raw, "host", "server", defaults.host, problems)
    file_port = _int(raw, "port", "server", defaults.port, problems, high=_MAX_PORT)
    cap = _int(raw, "max_connections", "server", defaults.max_connections, problems)
    timeouts = {
        name: _positive_number(raw, name, "server", getattr(defaults, name), problems)
        for name in ("header_timeout_seconds", "body_timeout_seconds", "idle_timeout_seconds")
    }
    if host is not None and not host:
        problems.add("host", "must be a non-empty string")
        host = None
    if port is not None and not _check_int(port, "port", problems, 1, _MAX_PORT):
        port = None
    return ServerConfig(
        host=host or file_host or defaults.host,
        port=port or file_port or defaults.port,
        max_connections=cap or defaults.max_connections,
        **{k: v for k, v in timeouts.items() if v is not None},
    )


def _parse_replica(value: object, path: str, problems: _Problems) -> ReplicaConfig | None:
    raw = _mapping(value, path, problems)
    if raw is None:
        return None
    _check_keys(raw, ("host", "port", "role"), path, problems)
    host = _str(raw, "host", path, None, problems)
    port = _int(raw, "port", path, None, problems, high=_MAX_PORT)
    if "port" not in raw:
        problems.add(f"{path}.port", "is required")
    role = _str(raw, "role", path, "replica", problems, choices=REPLICA_ROLES)
    if host is None or port is None or role is None:
        return None
    return ReplicaConfig(host=host, port=port, role=role)


def _parse_replicas(value: object, path: str, problems: _Problems) -> tuple[ReplicaConfig, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.add(path, f"must be a list, got {_type_name(value)}")
        return ()
    replicas: list[ReplicaConfig] = []
    for index, item in enumerate(value):
        replica = _parse_replica(item, f"{path}[{index}]", problems)
        if replica is None:
            continue
        if any((r.host, r.port) == (replica.host, replica.port) for r in replicas):
            problems.add(
                f"{path}[{index}]", f"duplicate replica {_show(replica.host)} port {replica.port}"
            )
        replicas.append(replica)
    return tuple(replicas)


def _write_concern(raw: Mapping[Any, object], path: str, problems: _Problems) -> str | int | None:
    value = raw.get("write_concern")
    if value is None or (isinstance(value, str) and value):
        return value
    where = f"{path}.write_concern"
    if isinstance(value, int) and not isinstance(value, bool):
        return value if _check_int(value, where, problems, 0, None) else None
    problems.add(
        where,
        "must be a non-empty string (e.g. 'majority'), an integer >= 0 or null, "
        f"got {_type_name(value)}",
    )
    return None


# --------------------------------------------------------------------------- secrets


class _Secrets:
    """Resolves ``${VAR}`` (from the environment) and ``${file:/path}`` (file contents,
    stripped; a relative path is taken from the config file's directory)."""

    __slots__ = ("base_dir", "environ")

    def __init__(self, environ: Mapping[str, str], base_dir: Path | None) -> None:
        self.environ = environ
        self.base_dir = base_dir

    def resolve(self, template: str, where: str, problems: _Problems) -> str | None:
        """``template`` with references replaced; None (and problems) if any failed."""
        failed = False

        def replace(match: re.Match[str]) -> str:
            nonlocal failed
            value = self._reference(match.group(1), where, problems)
            failed = failed or value is None
            return value or ""

        resolved = _REFERENCE_RE.sub(replace, template)
        return None if failed else resolved

    def _reference(self, ref: str, where: str, problems: _Problems) -> str | None:
        if ref.startswith("file:"):
            return self._file(ref.removeprefix("file:").strip(), where, problems)
        if not _ENV_NAME_RE.fullmatch(ref):
            problems.add(where, "invalid ${...} reference (expected ${NAME} or ${file:/path})")
            return None
        value = self.environ.get(ref)
        if value is None:
            problems.add(where, f"environment variable {ref} is not set")
        return value

    def _file(self, name: str, where: str, problems: _Problems) -> str | None:
        if not name:
            problems.add(where, "empty ${file:} reference")
            return None
        path = Path(name)
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        try:
            return path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            problems.add(where, f"secret file {_show(str(path))} is not valid UTF-8")
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            problems.add(where, f"cannot read secret file {_show(str(path))}: {reason}")
        return None


def _expected_schemes(db_type: str) -> str:
    return " or ".join(f"{scheme}://" for scheme in _SCHEMES[db_type])


def _connection_string(
    raw: Mapping[Any, object],
    path: str,
    db_type: str | None,
    secrets: _Secrets,
    problems: _Problems,
) -> str | None:
    where = f"{path}.connection_string"
    if "connection_string" not in raw:
        problems.add(where, "is required")
        return None
    template = raw["connection_string"]
    if not isinstance(template, str) or not template:
        problems.add(where, f"must be a non-empty string, got {_type_name(template)}")
        return None
    dsn = secrets.resolve(template, where, problems)
    if dsn is None or db_type is None:
        return dsn
    match = _SCHEME_RE.match(dsn)
    if match is None or match.group(1).lower() not in _SCHEMES[db_type]:
        # Only a scheme written literally in the file is echoed, never resolved text.
        literal = _SCHEME_RE.match(template)
        got = f" (got {literal.group(1)}://)" if literal else ""
        problems.add(where, f"must start with {_expected_schemes(db_type)} for type {db_type}{got}")
        return None
    return dsn


# --------------------------------------------------------------------------- databases

_DATABASE_KEYS: Final = (
    "name",
    "type",
    "connection_string",
    "pool_settings",
    "read_preference",
    "write_concern",
    "replicas",
)


def _database_name(raw: Mapping[Any, object], path: str, problems: _Problems) -> str | None:
    name = _str(raw, "name", path, None, problems)
    if name is not None and not _NAME_RE.fullmatch(name):
        problems.add(
            f"{path}.name",
            "must be a letter followed by at most 62 letters, digits, '_' or '-' "
            f"(got {_show(name)})",
        )
        return None
    return name


def _parse_database(
    value: object, path: str, secrets: _Secrets, problems: _Problems
) -> tuple[str | None, DatabaseConfig | None]:
    """(the entry's name if valid, the entry if entirely valid)."""
    raw = _mapping(value, path, problems)
    if raw is None:
        return None, None
    _check_keys(raw, _DATABASE_KEYS, path, problems)
    name = _database_name(raw, path, problems)
    db_type = _str(raw, "type", path, None, problems, choices=DATABASE_TYPES)
    dsn = _connection_string(raw, path, db_type, secrets, problems)
    pool = _parse_pool(raw.get("pool_settings"), f"{path}.pool_settings", problems)
    read_preference = _str(
        raw, "read_preference", path, "primary", problems, choices=READ_PREFERENCES
    )
    write_concern = _write_concern(raw, path, problems)
    replicas = _parse_replicas(raw.get("replicas"), f"{path}.replicas", problems)
    if name is None or db_type is None or dsn is None or read_preference is None:
        return name, None
    return name, DatabaseConfig(
        name=name,
        type=db_type,
        connection_string=dsn,
        pool_settings=pool,
        read_preference=read_preference,
        write_concern=write_concern,
        replicas=replicas,
    )


def _parse_databases(
    value: object, secrets: _Secrets, problems: _Problems
) -> tuple[list[DatabaseConfig], list[str]]:
    """(valid databases, names of all entries with a valid name, in file order)."""
    if value is None:
        return [], []
    if not isinstance(value, list):
        problems.add("databases", f"must be a list, got {_type_name(value)}")
        return [], []
    databases: list[DatabaseConfig] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(value):
        path = f"databases[{index}]"
        name, database = _parse_database(item, path, secrets, problems)
        if name is not None and name in first_index:
            problems.add(
                f"{path}.name",
                f"duplicate database name {name!r} (also databases[{first_index[name]}])",
            )
        elif name is not None:
            first_index[name] = index
        if database is not None:
            databases.append(database)
    return databases, list(first_index)


def _parse_default(raw: Mapping[Any, object], names: list[str], problems: _Problems) -> str | None:
    value = raw.get("default_database")
    if value is None:
        return names[0] if names else None
    if not isinstance(value, str):
        problems.add("default_database", f"must be a string, got {_type_name(value)}")
        return None
    if value not in names:
        known = ", ".join(repr(n) for n in names) or "none"
        problems.add("default_database", f"no database named {_show(value)} (configured: {known})")
        return None
    return value


def _url_database(url: str, source: str, problems: _Problems) -> DatabaseConfig | None:
    """The database named "default" described by a bare URL (``--database`` or env)."""
    match = _SCHEME_RE.match(url)
    db_type = _TYPE_BY_SCHEME.get(match.group(1).lower()) if match else None
    if db_type is None:
        expected = ", ".join(f"{s}://" for s in _URL_TYPE_BY_SCHEME)
        problems.add(source, f"unsupported or missing URL scheme (expected one of {expected})")
        return None
    return DatabaseConfig(name=URL_DATABASE_NAME, type=db_type, connection_string=url)


def _with_url_database(
    databases: list[DatabaseConfig], url: DatabaseConfig
) -> tuple[DatabaseConfig, ...]:
    """``databases`` with ``url`` replacing the one of the same name, or appended."""
    names = [db.name for db in databases]
    if url.name in names:
        databases = list(databases)
        databases[names.index(url.name)] = url
        return tuple(databases)
    return (*databases, url)


# --------------------------------------------------------------------------- loading

_TOP_KEYS: Final = (
    "server",
    "limits",
    "cache",
    "data_dir",
    "collector_url",
    "collector_push",
    "default_database",
    "databases",
)


def _read_yaml(path: str, problems: _Problems) -> Mapping[Any, object]:
    """The top-level mapping of the YAML file at ``path``; {} (and a problem) if unusable."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except FileNotFoundError:
        problems.add(path, "config file not found")
        return {}
    except OSError as exc:
        problems.add(path, f"cannot read config file: {exc.strerror or type(exc).__name__}")
        return {}
    except UnicodeDecodeError:
        problems.add(path, "config file is not valid UTF-8")
        return {}
    except yaml.MarkedYAMLError as exc:
        # Built from parts: str(exc) may quote a line of the file, and that line may hold a secret.
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.add(path, f"invalid YAML{where}: {exc.problem or exc.context or 'syntax error'}")
        return {}
    except yaml.YAMLError as exc:
        problems.add(path, f"invalid YAML ({type(exc).__name__})")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.add(path, f"top level must be a mapping, got {_type_name(data)}")
        return {}
    return data


def _collector_url(value: str | None, where: str, problems: _Problems) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        problems.add(where, "must start with http:// or https://")
        return None
    return value


def _parse_locations(
    raw: Mapping[Any, object], data_dir: str | None, collector_url: str | None, problems: _Problems
) -> tuple[str, str | None]:
    """(data_dir, collector_url): the file's values, overridden by the explicit ones."""
    file_data_dir = _str(raw, "data_dir", "", DEFAULT_DATA_DIR, problems)
    if data_dir is not None and not data_dir:
        problems.add("data_dir", "must be a non-empty string")
    collector = _optional_str(raw, "collector_url", "", problems)
    collector = _collector_url(collector, "collector_url", problems)
    if collector_url is not None:
        collector = _collector_url(collector_url, "collector_url", problems)
    return data_dir or file_data_dir or DEFAULT_DATA_DIR, collector


def _parse_collector_push(value: object, problems: _Problems) -> CollectorPush:
    raw = _mapping(value, "collector_push", problems) if value is not None else {}
    if not raw:
        return CollectorPush()
    _check_keys(raw, ("interval_seconds", "max_buffered_batches"), "collector_push", problems)
    defaults = CollectorPush()
    interval = _positive_number(
        raw, "interval_seconds", "collector_push", defaults.interval_seconds, problems
    )
    buffered = _int(
        raw, "max_buffered_batches", "collector_push", defaults.max_buffered_batches, problems
    )
    return CollectorPush(
        interval if interval is not None else defaults.interval_seconds,
        buffered if buffered is not None else defaults.max_buffered_batches,
    )


def _parse_all_databases(
    raw: Mapping[Any, object],
    secrets: _Secrets,
    database_url: str | None,
    problems: _Problems,
) -> tuple[tuple[DatabaseConfig, ...], str | None]:
    """(databases, default database name): the file's, then the URL database on top."""
    databases, names = _parse_databases(raw.get("databases"), secrets, problems)
    default = _parse_default(raw, names, problems)
    url: str | None = database_url
    source = "database_url"
    if url is None:  # an empty environment variable counts as unset
        url, source = secrets.environ.get(DATABASE_URL_ENV) or None, DATABASE_URL_ENV
    if url == "":
        problems.add(source, "must not be empty")
    elif url is not None and (url_database := _url_database(url, source, problems)) is not None:
        return _with_url_database(databases, url_database), url_database.name
    return tuple(databases), default


def load_config(
    path: str | None = None,
    *,
    database_url: str | None = None,
    host: str | None = None,
    port: int | None = None,
    data_dir: str | None = None,
    collector_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read, resolve and validate the configuration; raise one ConfigError listing every
    problem. Keyword arguments (CLI flags) override the file; ``database_url`` (else
    ``$DBPROXY_DATABASE_URL``) adds or replaces a database named "default" and makes it the
    default. ``environ`` (default ``os.environ``) feeds ``${VAR}`` references."""
    problems = _Problems()
    raw = _read_yaml(path, problems) if path is not None else {}
    _check_keys(raw, _TOP_KEYS, "", problems)
    secrets = _Secrets(
        os.environ if environ is None else environ,
        Path(path).parent if path is not None else None,
    )
    server = _parse_server(raw.get("server"), problems, host, port)
    limits = _parse_limits(raw.get("limits"), problems)
    cache = _parse_cache(raw.get("cache"), problems)
    databases, default = _parse_all_databases(raw, secrets, database_url, problems)
    data_dir_value, collector = _parse_locations(raw, data_dir, collector_url, problems)
    push = _parse_collector_push(raw.get("collector_push"), problems)
    if problems.items:
        raise ConfigError(problems.items)
    return Config(
        server=server,
        databases=databases,
        limits=limits,
        default_database=default,
        data_dir=data_dir_value,
        collector_url=collector,
        collector_push=push,
        cache=cache,
    )
