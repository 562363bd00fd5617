"""The server's ``$jsonSchema`` validator made from a declared schema: looser than the
sidecar's own (types and required fields only), so it never refuses what the sidecar wrote."""

from __future__ import annotations

from typing import Any, Final

from proxy.schema.model import CollectionSchema

_NUMERIC: Final = ["int", "long", "double", "decimal"]
# integer is numeric here: 3.0 passes the sidecar as an integer and BSON keeps it a double
_BSON: Final[dict[str, list[str]]] = {
    "string": ["string"],
    "datetime": ["string"],
    "integer": _NUMERIC,
    "number": _NUMERIC,
    "boolean": ["bool"],
    "object": ["object"],
    "array": ["array"],
    "null": ["null"],
}


def collmod(collection: str, schema: CollectionSchema | None) -> dict[str, Any]:
    """The ``collMod`` that sets (or, with None or no fields, removes) the validator."""
    if schema is None or not schema.fields:
        return {"collMod": collection, "validator": {}}
    root: dict[str, Any] = {"bsonType": "object"}
    for f in schema.fields:
        node = root
        for seg in f.path[:-1]:
            node = node.setdefault("properties", {}).setdefault(seg, {})
        leaf = node.setdefault("properties", {}).setdefault(f.path[-1], {})
        if "any" not in f.types:
            kinds: list[str] = []
            for t in f.types:
                kinds += [k for k in _BSON[t] if k not in kinds]
            leaf["bsonType"] = kinds
        if f.required:
            node.setdefault("required", []).append(f.path[-1])
    return {
        "collMod": collection,
        "validator": {"$jsonSchema": root},
        "validationLevel": schema.validation.level,
        "validationAction": schema.validation.action,
    }
