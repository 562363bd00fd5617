"""PostgreSQL backend: one jsonb table per collection, reached through asyncpg pools."""

from proxy.backends.postgres.backend import PostgresBackend
from proxy.backends.postgres.errors import dsn_database, translate
from proxy.backends.postgres.transaction import PostgresTransaction

__all__ = ["PostgresBackend", "PostgresTransaction", "dsn_database", "translate"]
