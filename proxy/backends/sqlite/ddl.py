"""The store's file and tables: where the file lives, table names, DDL, the audit row's INSERT."""

from __future__ import annotations

import os
import sqlite3

from proxy.backends.base import check_collection

DATA_FILE = "dbproxy.sqlite3"
NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_IDEMPOTENCY_DDL = (
    "CREATE TABLE IF NOT EXISTS _idempotency (key TEXT PRIMARY KEY NOT NULL, "
    "fingerprint TEXT NOT NULL, status INTEGER, headers TEXT, body BLOB, "
    "expires_at REAL NOT NULL)"
)
_AUDIT_DDL = (
    "CREATE TABLE IF NOT EXISTS _audit (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "at REAL NOT NULL, service TEXT NOT NULL, operation TEXT NOT NULL, "
    "collection TEXT NOT NULL, ids TEXT NOT NULL, request_id TEXT NOT NULL, "
    "outcome TEXT NOT NULL DEFAULT 'committed')",
    "CREATE INDEX IF NOT EXISTS _audit_at ON _audit (at)",
)
# The declared schemas (written only by migrations); ``version`` grows on every change.
SCHEMAS_DDL = (
    "CREATE TABLE IF NOT EXISTS _schemas (collection TEXT PRIMARY KEY NOT NULL, "
    "schema TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 1, "
    f"updated_at TEXT NOT NULL DEFAULT ({NOW}))"
)
LOAD_SCHEMAS = "SELECT collection, schema, version FROM _schemas"
AUDIT_INSERT = (
    "INSERT INTO _audit (at, service, operation, collection, ids, request_id) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
)


def table_name(collection: str) -> str:
    """The quoted table of a collection. SQLite folds identifier case, so each capital is
    marked (``Users`` → ``"c_^Users"``) and ``Users`` and ``users`` stay apart; the prefix
    keeps clear of SQLite's reserved ``sqlite_`` names and of ``_idempotency``."""
    check_collection(collection)
    return '"c_' + "".join(f"^{ch}" if ch.isupper() else ch for ch in collection) + '"'


def sqlite_path(connection_string: str) -> str:
    """The file of a ``sqlite://`` URL: ``sqlite:///abs/file.sqlite3`` is absolute,
    ``sqlite://rel/file.sqlite3`` relative to the working directory; a directory (or a path
    ending in ``/``) holds ``dbproxy.sqlite3``."""
    rest = connection_string.split("://", 1)[1] if "://" in connection_string else ""
    path = rest.split("?", 1)[0].split("#", 1)[0]
    if not path:
        raise ValueError("the sqlite URL names no file")
    if path.endswith("/") or os.path.isdir(path):
        path = os.path.join(path, DATA_FILE)
    return path


def check_location(path: str) -> str | None:
    """Why the store cannot live at ``path`` (None when it can): its directory is created
    if missing and must be writable; an existing file must be a readable, writable file.
    For start-up validation, before the port is bound."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)  # created owner-only
    except OSError as exc:
        return f"cannot create directory {directory!r}: {exc.strerror or type(exc).__name__}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory!r} is not writable"
    if os.path.exists(path):
        if not os.path.isfile(path):
            return f"{path!r} is not a regular file"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{path!r} is not readable and writable"
    return None


def make_parent_dir(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)


def create_private(path: str) -> None:
    """Create the store's file readable by its owner only (0600), if it does not exist;
    SQLite gives its -wal and -shm files the same permissions."""
    if path.startswith(":") or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError:
        return  # sqlite reports the real problem when it opens the file
    os.close(fd)


def create_table(conn: sqlite3.Connection, collection: str) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {table_name(collection)} ("
        "_id TEXT PRIMARY KEY NOT NULL, doc TEXT NOT NULL, "
        "_version INTEGER NOT NULL DEFAULT 1, "
        f"created_at TEXT NOT NULL DEFAULT ({NOW}), "
        f"updated_at TEXT NOT NULL DEFAULT ({NOW}))"
    )


def create_housekeeping_tables(conn: sqlite3.Connection) -> None:
    conn.execute(_IDEMPOTENCY_DDL)
    conn.execute(SCHEMAS_DDL)
    for ddl in _AUDIT_DDL:
        conn.execute(ddl)
