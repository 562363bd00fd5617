"""Process configuration: the frozen settings (``model``) and the all-problems loader (``load``)."""

from proxy.config.load import DATABASE_URL_ENV, load_config, load_database_url
from proxy.config.model import (
    DATABASE_TYPES,
    DEFAULT_DATA_DIR,
    READ_PREFERENCES,
    REPLICA_ROLES,
    URL_DATABASE_NAME,
    CacheConfig,
    CollectionCache,
    CollectorPush,
    Config,
    DatabaseConfig,
    Limits,
    PoolSettings,
    ReplicaConfig,
    ServerConfig,
)
from proxy.config.redact import redact_dsn

__all__ = [
    "DATABASE_TYPES",
    "DATABASE_URL_ENV",
    "DEFAULT_DATA_DIR",
    "READ_PREFERENCES",
    "REPLICA_ROLES",
    "URL_DATABASE_NAME",
    "CacheConfig",
    "CollectionCache",
    "CollectorPush",
    "Config",
    "DatabaseConfig",
    "Limits",
    "PoolSettings",
    "ReplicaConfig",
    "ServerConfig",
    "load_config",
    "load_database_url",
    "redact_dsn",
]
