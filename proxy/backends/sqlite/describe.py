"""What the schema endpoint reads from the embedded store: the declared schemas, and one
collection as the file has it (its indexes, its count, a bounded sample)."""

from __future__ import annotations

import sqlite3
from typing import Any

from proxy import numbers
from proxy.backends.sqlite.ddl import LOAD_SCHEMAS


def load_schemas(conn: sqlite3.Connection) -> dict[str, tuple[int, dict[str, Any]]]:
    try:
        rows = conn.execute(LOAD_SCHEMAS).fetchall()
    except sqlite3.OperationalError:  # a store from before schemas: none declared
        return {}
    return {r[0]: (int(r[2]), numbers.loads_stored(r[1])) for r in rows}


def describe_collection(conn: sqlite3.Connection, table: str, sample: int) -> dict[str, Any]:
    """``table`` is the quoted, checked table name of the collection."""
    bare = table.strip('"')
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1", (bare,)
    ).fetchone()
    if found is None:
        return {"exists": False, "indexes": [], "estimated_count": 0, "size_bytes": 0, "sample": []}
    indexes = []
    for row in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1 "
        "AND sql IS NOT NULL ORDER BY name",
        (bare,),
    ).fetchall():
        unique = bool(row[1]) and row[1].upper().startswith("CREATE UNIQUE")
        indexes.append(
            {
                "physical_name": row[0],
                "unique": unique,
                "valid": True,  # SQLite builds an index in its transaction: never half-built
                "size_bytes": _size(conn, row[0]),
                "definition": row[1],
            }
        )
    count = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    docs = (
        [
            numbers.loads_stored(r[0])
            for r in conn.execute(f"SELECT CAST(doc AS BLOB) FROM {table} LIMIT ?1", (sample,))
        ]
        if sample > 0
        else []
    )
    return {
        "exists": True,
        "indexes": indexes,
        "estimated_count": count,
        "size_bytes": _size(conn, bare),
        "sample": docs,
    }


def _size(conn: sqlite3.Connection, name: str) -> int | None:
    """Bytes of a table or index (None where SQLite was built without ``dbstat``)."""
    try:
        row = conn.execute("SELECT sum(pgsize) FROM dbstat WHERE name = ?1", (name,)).fetchone()
    except sqlite3.OperationalError:
        return None
    return int(row[0]) if row and row[0] is not None else 0
