"""Shared set-up of the SQLite aggregation tests: a store file opened the way the backend
opens it, pipelines parsed by the front end and run as one statement."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.backends.sqlite.connection import ConnState, connect
from proxy.backends.sqlite.ddl import create_table, table_name
from proxy.config import Limits
from proxy.errors import InvalidQuery
from proxy.query.aggregate.ast import View
from proxy.query.aggregate.parse import parse_pipeline
from proxy.query.aggregate.sqlite import compile_pipeline

Docs = list[dict[str, Any]]


class Store:
    def __init__(self, path: Path) -> None:
        self.state = ConnState(timeout=10)
        self.conn = connect(str(path), self.state, writes=True, busy_ms=1000)
        self.tables: dict[str, str | None] = {}

    def put(self, collection: str, docs: Docs) -> None:
        create_table(self.conn, collection)
        self.tables[collection] = table_name(collection)
        for doc in docs:
            doc = {"_version": 1, **doc}
            self.conn.execute(
                f"INSERT INTO {table_name(collection)} (_id, doc) VALUES (?1, ?2)",
                (doc["_id"], orjson.dumps(doc).decode()),
            )

    def sql(
        self,
        raw: list[dict[str, Any]],
        collection: str = "items",
        *,
        cap: int = 1000,
        views: dict[str, View] | None = None,
    ) -> tuple[str, list[Any]]:
        pipeline = parse_pipeline(raw, Limits())
        views = views or {}
        base = views.get(collection, View(collection))
        lookups = {n: views.get(n, View(n)) for n in pipeline.lookups}
        tables = {n: self.tables.get(n) for n in (collection, *pipeline.lookups)}
        return compile_pipeline(pipeline, base, lookups, tables=tables, cap=cap)

    def run(self, raw: list[dict[str, Any]], collection: str = "items", **kw: Any) -> Docs:
        sql, args = self.sql(raw, collection, **kw)
        self.state.arm()
        try:
            return [orjson.loads(row[0]) for row in self.conn.execute(sql, args)]
        except sqlite3.Error:
            if self.state.failure is not None:
                raise self.state.failure from None
            raise
        finally:
            self.state.disarm()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "agg.sqlite3")
    try:
        yield s
    finally:
        s.conn.close()


def strip(docs: Docs) -> Docs:
    return [{k: v for k, v in d.items() if k != "_version"} for d in docs]


def fails(store: Store, raw: list[dict[str, Any]], word: str, collection: str = "items") -> None:
    with pytest.raises(InvalidQuery) as info:
        store.run(raw, collection)
    assert info.value.code == "expression_failed"
    assert word in str(info.value)
    assert "update" not in str(info.value)


PEOPLE = [
    {"_id": "p1", "name": "ann", "age": 31, "city": "oslo", "tags": ["a", "b"], "score": 2.5},
    {"_id": "p2", "name": "bob", "age": 25, "city": "rome", "tags": [], "score": 4},
    {"_id": "p3", "name": "cy", "age": 31, "city": "oslo", "tags": ["b"], "score": None},
    {"_id": "p4", "name": "di", "city": "rome", "tags": "solo", "score": "x"},
    {"_id": "p5", "name": "ed", "age": 40.0, "city": None},
]


@pytest.fixture
def people(store: Store) -> Store:
    store.put("items", PEOPLE)
    return store
