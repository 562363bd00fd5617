"""The Migration model and its operations, parsed and validated whole (every operation
before anything runs), and the checksum of its canonical JSON."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from proxy.backends.base import check_collection
from proxy.config import Limits
from proxy.errors import BadRequest, ProxyError
from proxy.query.ast import Filter, Update
from proxy.query.parse import parse_filter, parse_update
from proxy.schema.model import (
    INDEX_NAME_RE,
    CollectionSchema,
    IndexSpec,
    SearchDeclaration,
    parse_index,
    parse_path,
    parse_schema,
    parse_search,
)
from proxy.schema.partitioning import Partitioning, parse_partitioning

ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
MAX_OPERATIONS: Final = 100
MAX_DEPENDENCIES: Final = 100
MAX_BATCH: Final = 10_000
DEFAULT_BATCH: Final = 1000
MAX_SQL: Final = 100_000
MAX_TEXT: Final = 2000
_MODEL_KEYS: Final = frozenset(
    {
        "id",
        "name",
        "database",
        "collection_or_table",
        "description",
        "version",
        "dependencies",
        "script",
    }
)
# operation → (required keys, optional keys) besides "op"
OPERATION_KEYS: Final[dict[str, tuple[frozenset[str], frozenset[str]]]] = {
    "create_collection": (frozenset({"collection"}), frozenset({"schema"})),
    "set_schema": (frozenset({"collection", "schema"}), frozenset()),
    "create_index": (frozenset({"collection", "index"}), frozenset()),
    "drop_index": (frozenset({"collection", "name"}), frozenset()),
    "set_search": (frozenset({"collection", "search"}), frozenset()),
    "rename_field": (frozenset({"collection", "from", "to"}), frozenset()),
    "backfill": (frozenset({"collection", "filter", "update"}), frozenset({"batch_size"})),
    "drop_collection": (frozenset({"collection"}), frozenset()),
    "partition_collection": (frozenset({"collection", "partitioning"}), frozenset({"batch_size"})),
    "sql": (frozenset({"sql"}), frozenset()),
    "alembic_upgrade": (frozenset({"revision"}), frozenset()),
}
# the operations that need the permission migrate_sql (and name no collection)
SQL_OPERATIONS: Final = frozenset({"sql", "alembic_upgrade"})


def invalid(message: str, where: str, code: str = "invalid_migration") -> BadRequest:
    return BadRequest(f"{where}: {message}" if where else message, code=code, details={"at": where})


@dataclass(frozen=True, slots=True)
class Operation:
    """One validated operation. ``kind`` is its ``op``; the fields used depend on it."""

    kind: str
    collection: str | None = None  # None only for sql and alembic_upgrade
    schema: CollectionSchema | None = None  # create_collection, set_schema
    index: IndexSpec | None = None  # create_index
    search: SearchDeclaration | None = None  # set_search (None: the declaration removed)
    name: str | None = None  # drop_index
    source: tuple[str, ...] = ()  # rename_field
    target: tuple[str, ...] = ()  # rename_field
    filter: Filter | None = None  # backfill (rename_field: the documents holding ``source``)
    update: Update | None = None  # backfill, rename_field ($rename)
    batch_size: int = DEFAULT_BATCH
    sql: str | None = None
    revision: str | None = None
    partitioning: Partitioning | None = None  # partition_collection
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def changes_schema(self) -> bool:
        """Whether the collection's stored schema may change (checked at run time too)."""
        return self.kind in (
            "set_schema",
            "create_index",
            "drop_index",
            "set_search",
            "rename_field",
            "drop_collection",
            "partition_collection",
        ) or (self.kind == "create_collection" and self.schema is not None)


@dataclass(frozen=True, slots=True)
class Migration:
    id: str
    name: str
    database: str | None
    collection_or_table: str | None
    description: str
    version: int
    dependencies: tuple[str, ...]
    operations: tuple[Operation, ...]
    model: dict[str, Any]  # the model as submitted (its canonical JSON is checksummed)
    checksum: str

    def collections(self) -> list[str]:
        """The collections the operations name, in first-use order."""
        out: list[str] = []
        for op in self.operations:
            if op.collection is not None and op.collection not in out:
                out.append(op.collection)
        return out

    def needs_sql_permission(self) -> bool:
        return any(op.kind in SQL_OPERATIONS for op in self.operations)


def checksum(model: dict[str, Any]) -> str:
    """sha256 of the model's canonical JSON (keys sorted, no whitespace)."""
    return hashlib.sha256(orjson.dumps(model, option=orjson.OPT_SORT_KEYS)).hexdigest()


def parse_migration(raw: Any, limits: Limits | None = None) -> Migration:
    """A Migration from its JSON form; every operation is validated here (400s)."""
    limits = limits or Limits()
    if not isinstance(raw, dict):
        raise invalid("a migration must be a JSON object", "")
    unknown = sorted(str(k) for k in set(raw) - _MODEL_KEYS)
    if unknown:
        raise invalid(f"unknown key {unknown[0][:60]!r}", unknown[0][:60])
    mig_id = raw.get("id")
    if not isinstance(mig_id, str) or not ID_RE.fullmatch(mig_id):
        raise invalid("must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", "id")
    version = raw.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**63:
        raise invalid("must be a non-negative integer", "version")
    script = raw.get("script")
    if not isinstance(script, dict) or set(script) != {"operations"}:
        raise invalid('must be {"operations": [...]}', "script")
    ops_raw = script["operations"]
    if not isinstance(ops_raw, list) or not 1 <= len(ops_raw) <= MAX_OPERATIONS:
        raise invalid(f"must list 1 to {MAX_OPERATIONS} operations", "script.operations")
    default_coll = _optional_str(raw, "collection_or_table")
    if default_coll is not None:
        _collection(default_coll, "collection_or_table")
    operations = tuple(
        parse_operation(op, f"script.operations[{i}]", limits, default_coll)
        for i, op in enumerate(ops_raw)
    )
    return Migration(
        id=mig_id,
        name=_optional_str(raw, "name") or mig_id,
        database=_optional_str(raw, "database"),
        collection_or_table=default_coll,
        description=_optional_str(raw, "description") or "",
        version=version,
        dependencies=_dependencies(raw.get("dependencies", []), mig_id),
        operations=operations,
        model=raw,
        checksum=checksum(raw),
    )


def _optional_str(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise invalid(f"must be a string of at most {MAX_TEXT} characters", key)
    return value


def _dependencies(raw: Any, own: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_DEPENDENCIES:
        raise invalid(f"must be a list of at most {MAX_DEPENDENCIES} ids", "dependencies")
    for i, dep in enumerate(raw):
        if not isinstance(dep, str) or not ID_RE.fullmatch(dep):
            raise invalid("must be a migration id", f"dependencies[{i}]")
        if dep == own:
            raise invalid("a migration cannot depend on itself", f"dependencies[{i}]")
    if len(set(raw)) != len(raw):
        raise invalid("an id appears twice", "dependencies")
    return tuple(raw)


def _collection(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise invalid("must be a collection name", where)
    try:
        return check_collection(name)
    except ProxyError as err:
        raise invalid(err.message, where, code=err.code) from None


def parse_operation(
    raw: Any, where: str, limits: Limits, default_collection: str | None = None
) -> Operation:
    if not isinstance(raw, dict):
        raise invalid("an operation must be a JSON object", where)
    kind = raw.get("op")
    if kind not in OPERATION_KEYS:
        raise invalid(
            f"unknown operation {str(kind)[:60]!r} (one of {', '.join(OPERATION_KEYS)})",
            f"{where}.op",
            code="unknown_operation",
        )
    required, optional = OPERATION_KEYS[kind]
    body = {k: v for k, v in raw.items() if k != "op"}
    if "collection" in required and "collection" not in body and default_collection:
        body["collection"] = default_collection
    missing = sorted(required - set(body))
    if missing:
        raise invalid(f"{kind} needs {missing[0]!r}", f"{where}.{missing[0]}")
    extra = sorted(str(k) for k in set(body) - required - optional)
    if extra:
        raise invalid(f"unknown key {extra[0][:60]!r} for {kind}", f"{where}.{extra[0][:60]}")
    coll = _collection(body["collection"], f"{where}.collection") if "collection" in body else None
    try:
        return _build(kind, coll, body, where, limits, raw)
    except ProxyError as err:
        if err.status != 400:
            raise
        at = err.details.get("at") if err.details else None
        raise BadRequest(
            err.message if at else f"{where}: {err.message}",
            code=err.code,
            details={**err.details, "at": at if at else where},
        ) from None


def _build(
    kind: str,
    coll: str | None,
    body: dict[str, Any],
    where: str,
    limits: Limits,
    raw: dict[str, Any],
) -> Operation:
    if kind in ("create_collection", "set_schema"):
        schema_raw = body.get("schema")
        assert coll is not None
        schema = None if schema_raw is None else parse_schema(schema_raw, coll, f"{where}.schema")
        return Operation(kind, coll, schema=schema, raw=raw)
    if kind == "create_index":
        return Operation(kind, coll, index=parse_index(body["index"], f"{where}.index"), raw=raw)
    if kind == "set_search":
        raw_search = body["search"]
        search = None if raw_search is None else parse_search(raw_search, f"{where}.search")
        return Operation(kind, coll, search=search, raw=raw)
    if kind == "drop_index":
        name = body["name"]
        if not isinstance(name, str) or not INDEX_NAME_RE.fullmatch(name):
            raise invalid("must be an index name", f"{where}.name")
        return Operation(kind, coll, name=name, raw=raw)
    if kind == "rename_field":
        source = parse_path(body["from"], f"{where}.from")
        target = parse_path(body["to"], f"{where}.to")
        for path, key in ((source, "from"), (target, "to")):
            if path[0] == "_id":
                raise invalid("_id cannot be renamed", f"{where}.{key}")
        if source == target or source == target[: len(source)] or target == source[: len(target)]:
            raise invalid("from and to must be different, unnested paths", f"{where}.to")
        dotted_from, dotted_to = ".".join(source), ".".join(target)
        return Operation(
            kind,
            coll,
            source=source,
            target=target,
            filter=parse_filter({dotted_from: {"$exists": True}}, limits),
            update=parse_update({"$rename": {dotted_from: dotted_to}}, limits),
            raw=raw,
        )
    batch = body.get("batch_size", DEFAULT_BATCH)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise invalid(f"must be an integer from 1 to {MAX_BATCH}", f"{where}.batch_size")
    if kind == "partition_collection":
        spec = parse_partitioning(body["partitioning"], f"{where}.partitioning")
        return Operation(kind, coll, partitioning=spec, batch_size=batch, raw=raw)
    if kind == "backfill":
        return Operation(
            kind,
            coll,
            filter=_query_part(parse_filter, body["filter"], limits, f"{where}.filter"),
            update=_query_part(parse_update, body["update"], limits, f"{where}.update"),
            batch_size=batch,
            raw=raw,
        )
    if kind == "drop_collection":
        return Operation(kind, coll, raw=raw)
    if kind == "sql":
        sql = body["sql"]
        if not isinstance(sql, str) or not sql.strip() or len(sql) > MAX_SQL:
            raise invalid(f"must be SQL text of at most {MAX_SQL} characters", f"{where}.sql")
        return Operation(kind, None, sql=sql, raw=raw)
    assert kind == "alembic_upgrade"
    revision = body["revision"]
    if not isinstance(revision, str) or not re.fullmatch(r"[A-Za-z0-9_.:+@\-]{1,128}", revision):
        raise invalid("must be an Alembic revision (head, an id, ...)", f"{where}.revision")
    return Operation(kind, None, revision=revision, raw=raw)


def _query_part(parse: Any, raw: Any, limits: Limits, where: str) -> Any:
    try:
        return parse(raw, limits)
    except BadRequest as err:
        raise BadRequest(f"{where}: {err.message}", code=err.code, details={"at": where}) from None


# ---- a directory's migrations: dependency order -----------------------------------------


def order(migrations: list[Migration]) -> list[Migration]:
    """Dependency order (ties by version, then id); a cycle among them is a 400
    ``dependency_cycle``. Dependencies outside the list are the database's business."""
    by_id: dict[str, Migration] = {}
    for m in migrations:
        if m.id in by_id:
            raise invalid(f"two migrations have the id {m.id!r}", "id", code="duplicate_migration")
        by_id[m.id] = m
    done: list[Migration] = []
    placed: set[str] = set()
    waiting = sorted(migrations, key=lambda m: (m.version, m.id))
    while waiting:
        for i, m in enumerate(waiting):
            if all(d in placed or d not in by_id for d in m.dependencies):
                done.append(m)
                placed.add(m.id)
                del waiting[i]
                break
        else:
            ids = ", ".join(m.id for m in waiting[:10])
            raise BadRequest(
                f"the dependencies of these migrations form a cycle: {ids}",
                code="dependency_cycle",
                details={"ids": [m.id for m in waiting[:50]]},
            )
    return done
