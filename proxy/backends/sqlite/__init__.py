"""Embedded SQLite backend: one JSON-text table per collection in one file, off the event loop."""

from proxy.backends.sqlite.backend import SqliteBackend
from proxy.backends.sqlite.ddl import DATA_FILE, check_location, sqlite_path, table_name

__all__ = ["DATA_FILE", "SqliteBackend", "check_location", "sqlite_path", "table_name"]
