"""What each operation does inside a migration's transaction: the stored schema kept in step
with the database (indexes, renamed fields), existing documents checked against an enforced
schema, and the batches of backfills and renames."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.backends.migrations import MigrationTx
from proxy.errors import BadRequest, Conflict, NotFound
from proxy.migrate.ops import Operation
from proxy.schema.model import (
    CollectionSchema,
    FieldSpec,
    IndexSpec,
    SearchDeclaration,
    check_partitioned,
    parse_schema,
)
from proxy.schema.validate import SchemaValidator, compile_schema

MAX_LISTED: Final = 10  # invalid documents named in existing_documents_invalid
SCAN_BATCH: Final = 1000


@dataclass
class TxState:
    """What one transaction has read and changed: schemas by collection, and the
    collections whose schema changed (for NOTIFY and the ``schemas_changed`` hook)."""

    schemas: dict[str, CollectionSchema | None] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)


def invalid_documents(found: list[dict[str, Any]], collection: str) -> Conflict:
    return Conflict(
        f"{len(found)}{'+' if len(found) >= MAX_LISTED else ''} stored document(s) of "
        f"{collection!r} do not satisfy the schema",
        code="existing_documents_invalid",
        details={"collection": collection, "documents": found[:MAX_LISTED]},
    )


async def current_schema(
    tx: MigrationTx, state: TxState, collection: str
) -> CollectionSchema | None:
    if collection not in state.schemas:
        stored = await tx.stored_schema(collection)
        state.schemas[collection] = (
            None if stored is None else parse_schema(stored[1], collection, "stored schema")
        )
    return state.schemas[collection]


async def save_schema(
    tx: MigrationTx, state: TxState, collection: str, schema: CollectionSchema | None
) -> None:
    await tx.write_schema(collection, None if schema is None else schema.to_dict())
    state.schemas[collection] = schema
    state.changed.add(collection)


def index_kinds(schema: CollectionSchema | None) -> dict[tuple[str, ...], str]:
    """The declared kinds index expressions use (whatever the enforcement)."""
    return schema.scalar_kinds(enforced_only=False) if schema is not None else {}


def _key_kinds(ix: IndexSpec, kinds: dict[tuple[str, ...], str]) -> tuple[str | None, ...]:
    return tuple(kinds.get(k.path) for k in ix.keys)


async def reconcile_indexes(
    tx: MigrationTx, collection: str, old: CollectionSchema | None, new: CollectionSchema | None
) -> None:
    """Make the database's indexes those ``new`` declares: drop what went away or changed
    (definition, or the declared kind of a key, which changes its expression), create what
    is new or changed."""
    before = {ix.name: ix for ix in old.all_indexes()} if old is not None else {}
    after = {ix.name: ix for ix in new.all_indexes()} if new is not None else {}
    k_old, k_new = index_kinds(old), index_kinds(new)
    for name, ix in before.items():
        kept = after.get(name)
        if kept is None or kept != ix or _key_kinds(ix, k_old) != _key_kinds(kept, k_new):
            await tx.drop_index(collection, name)
    for name, ix in after.items():
        was = before.get(name)
        if was is None or was != ix or _key_kinds(was, k_old) != _key_kinds(ix, k_new):
            await tx.create_index(collection, ix, k_new)


async def check_existing(tx: MigrationTx, collection: str, schema: CollectionSchema) -> None:
    """Every stored document against an enforced schema (keyset batches); 409
    ``existing_documents_invalid`` naming up to 10 of them. Moderate or warn: no check."""
    if not schema.validation.enforced:
        return
    validator = compile_schema(schema)
    found: list[dict[str, Any]] = []
    after = ""
    while len(found) < MAX_LISTED:
        rows = await tx.scan(collection, after, SCAN_BATCH)
        if not rows:
            break
        for doc_id, doc in rows:
            if not validator.is_valid(doc):
                found.append({"_id": doc_id, "problems": validator.problems(doc)})
        after = rows[-1][0]
    if found:
        raise invalid_documents(found, collection)


def check_batch(
    validator: SchemaValidator | None, collection: str, docs: list[dict[str, Any]]
) -> None:
    if validator is None:
        return
    found = [
        {"_id": d.get("_id"), "problems": validator.problems(d)}
        for d in docs
        if not validator.is_valid(d)
    ]
    if found:
        raise invalid_documents(found, collection)


def enforced_validator(schema: CollectionSchema | None) -> SchemaValidator | None:
    if schema is None or not schema.validation.enforced:
        return None
    return compile_schema(schema)


# ---- the operations ----------------------------------------------------------------------


async def set_schema(
    tx: MigrationTx, state: TxState, collection: str, new: CollectionSchema
) -> None:
    old = await current_schema(tx, state, collection)
    new = await _place(tx, collection, new)
    await check_existing(tx, collection, new)
    await reconcile_indexes(tx, collection, old, new)
    if (old.search if old is not None else None) != new.search:
        await tx.set_search(collection, new.search)
    await save_schema(tx, state, collection, new)


async def _place(tx: MigrationTx, collection: str, new: CollectionSchema) -> CollectionSchema:
    """The collection's table as ``new`` lays it out (created, partitioned or not); a
    schema that omits the partitioning of a partitioned collection keeps it."""
    exists = await tx.table_exists(collection)
    current = await tx.partitioning(collection) if exists else None
    if not exists:
        if new.partitioning is not None:
            await tx.create_partitioned(collection, new.partitioning)
        else:
            await tx.create_collection(collection)
        return new
    if new.partitioning is None and current is not None:
        kept = dataclasses.replace(new, partitioning=current)
        check_partitioned(kept, current, "schema")
        return kept
    if new.partitioning != current:
        raise BadRequest(
            f"collection {collection!r} exists with another partitioning: convert it with "
            "partition_collection",
            code="partitioning_change_unsupported",
            details={"collection": collection},
        )
    return new


async def set_search(
    tx: MigrationTx, state: TxState, collection: str, declared: SearchDeclaration | None
) -> None:
    """Declare (or, with None, remove) what full-text search indexes; a rerun of the same
    declaration changes nothing."""
    old = await current_schema(tx, state, collection)
    if (old.search if old is not None else None) == declared:
        return
    await tx.set_search(collection, declared)
    base = old or CollectionSchema(collection)
    await save_schema(tx, state, collection, dataclasses.replace(base, search=declared))


def with_index(
    schema: CollectionSchema | None, collection: str, index: IndexSpec
) -> CollectionSchema | None:
    """``schema`` declaring ``index`` too; None when it declares it already (a rerun)."""
    base = schema or CollectionSchema(collection)
    existing = {ix.name: ix for ix in base.all_indexes()}
    if index.name in existing:
        if existing[index.name] == index:
            return None
        raise Conflict(
            f"collection {collection!r} already has an index named {index.name!r}",
            code="index_exists",
            details={"index": index.name},
        )
    new = dataclasses.replace(base, indexes=(*base.indexes, index))
    if new.partitioning is not None:
        check_partitioned(new, new.partitioning, "create_index")
    return new


async def drop_index(tx: MigrationTx, state: TxState, op: Operation) -> None:
    assert op.collection is not None and op.name is not None
    schema = await current_schema(tx, state, op.collection)
    declared = {ix.name for ix in schema.indexes} if schema is not None else set()
    if op.name not in declared:
        if schema is not None and op.name in {ix.name for ix in schema.all_indexes()}:
            raise BadRequest(
                f"index {op.name!r} belongs to a unique constraint: change the schema instead",
                code="constraint_index",
                details={"index": op.name},
            )
        raise NotFound(
            f"collection {op.collection!r} declares no index {op.name!r}",
            code="index_not_found",
            details={"index": op.name},
        )
    assert schema is not None
    await tx.drop_index(op.collection, op.name)
    kept = tuple(ix for ix in schema.indexes if ix.name != op.name)
    await save_schema(tx, state, op.collection, dataclasses.replace(schema, indexes=kept))


def renamed_schema(schema: CollectionSchema | None, op: Operation) -> CollectionSchema | None:
    """The schema after ``rename_field`` (declared fields under ``from`` move to ``to``);
    None when nothing declared changes. A renamed path that an index uses is a 400."""
    if schema is None:
        return None
    src, dst = op.source, op.target
    n = len(src)
    if schema.search is not None and any(p[:n] == src for p, _ in schema.search.fields):
        raise BadRequest(
            f"full-text search uses {'.'.join(src)!r}: change set_search before renaming it",
            code="field_indexed",
            details={"search": ".".join(src)},
        )
    moved = [f for f in schema.fields if f.path[:n] == src]
    if not moved:
        return None
    for ix in schema.all_indexes():
        if any(k.path[:n] == src for k in ix.keys):
            raise BadRequest(
                f"index {ix.name!r} uses {'.'.join(src)!r}: drop it before renaming the field",
                code="field_indexed",
                details={"index": ix.name},
            )
    if any(f.path[: len(dst)] == dst for f in schema.fields):
        raise BadRequest(f"the schema declares {'.'.join(dst)!r} already", code="invalid_migration")
    fields: list[FieldSpec] = []
    for f in schema.fields:
        if f.path[:n] == src:
            path = dst + f.path[n:]
            f = dataclasses.replace(f, name=".".join(path), path=path)
        fields.append(f)
    return dataclasses.replace(schema, fields=tuple(fields))


async def rename_field(tx: MigrationTx, state: TxState, op: Operation, audit: str) -> int:
    """Every document holding ``from``, in keyset batches inside this transaction; the
    stored schema follows. Returns the documents changed."""
    assert op.collection is not None and op.filter is not None and op.update is not None
    schema = await current_schema(tx, state, op.collection)
    new_schema = renamed_schema(schema, op)
    validator = enforced_validator(new_schema or schema)
    done, after = 0, ""
    while True:
        batch = await tx.apply_batch(
            op.collection, op.filter, op.update, after, op.batch_size, audit
        )
        if not batch.ids:
            break
        check_batch(validator, op.collection, batch.documents)
        done += len(batch.ids)
        after = batch.ids[-1]
    if new_schema is not None:
        await save_schema(tx, state, op.collection, new_schema)
    return done


async def drop_collection(tx: MigrationTx, state: TxState, collection: str) -> None:
    had = await current_schema(tx, state, collection)
    await tx.drop_collection(collection)
    if had is not None:
        await save_schema(tx, state, collection, None)
