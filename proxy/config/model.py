"""Process settings as frozen dataclasses, validated when loaded (``proxy.config.load``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from proxy.config.redact import redact_dsn
from proxy.config.secrets import SecretTemplate
from proxy.errors import ConfigError

DATABASE_TYPES: Final = ("postgresql", "mongodb", "redis", "sqlite")
READ_PREFERENCES: Final = ("primary", "secondary", "nearest")
# a mongodb database also takes two of MongoDB's own modes (proxy/backends/mongo/routing.py)
MONGO_READ_PREFERENCES: Final = (*READ_PREFERENCES, "primaryPreferred", "secondaryPreferred")
TIME_PARTITIONS: Final = ("pg_partman", "sidecar")
REPLICA_ROLES: Final = ("replica", "analytics")
URL_DATABASE_NAME: Final = "default"
DEFAULT_DATA_DIR: Final = ".dbproxy"


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
    read_preference: str = "primary"  # one of READ_PREFERENCES (MONGO_… for mongodb)
    write_concern: str | int | None = None
    replicas: tuple[ReplicaConfig, ...] = ()
    alembic_directory: str | None = None  # an Alembic environment (alembic_upgrade operations)
    # who keeps time partitions: pg_partman when the database has it, else (or "sidecar") us
    time_partitions: str = "pg_partman"  # one of TIME_PARTITIONS
    # how connection_string is rendered again when a ${file:} secret changes (None: no file)
    secret: SecretTemplate | None = field(default=None, repr=False, compare=False)

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
    max_pipeline_stages: int = 50  # aggregation: stages, $facet sub-stages included
    max_expression_nodes: int = 500  # aggregation: expression nodes over the whole pipeline
    max_lookups: int = 3  # aggregation: $lookup stages, inside $facet included
    max_aggregate_rows: int = 10_000  # aggregation output cap (a policy's max_rows is lower)
    max_aggregate_document_bytes: int = 16 * 1024 * 1024  # one output document (MongoDB's)


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
    ca_file: str | None = None  # an https:// collector_url verified against this CA


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
