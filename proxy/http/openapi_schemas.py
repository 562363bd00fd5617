"""The schemas of the OpenAPI description's bodies (``components.schemas``)."""

from __future__ import annotations

from typing import Final

from proxy.http.openapi_parts import COLLECTION_PATTERN, Json, schema

# ---- schemas ---------------------------------------------------------------------------

_ANY_OBJECT: Final[Json] = {"type": "object", "additionalProperties": True}
_CURSOR: Final[Json] = {"type": ["string", "null"], "description": "the next page's cursor"}

SCHEMAS: Final[dict[str, Json]] = {
    "Error": {
        "type": "object",
        "description": "The one error envelope of every failure.",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "request_id"],
                "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
                    "message": {"type": "string"},
                    "request_id": {"type": "string"},
                    "details": _ANY_OBJECT,
                    "retryable": {"type": "boolean", "const": True},
                },
            }
        },
    },
    "Document": {
        "type": "object",
        "description": "A stored document: its fields, `_id` and `_version`.",
        "additionalProperties": True,
        "properties": {
            "_id": {"type": "string", "minLength": 1, "maxLength": 512},
            "_version": {"type": "integer", "minimum": 1},
        },
    },
    "NewDocument": {
        "type": "object",
        "description": "A document to store; `_id` is generated (time-ordered) when absent.",
        "additionalProperties": True,
        "properties": {"_id": {"type": "string", "minLength": 1, "maxLength": 512}},
    },
    "Update": {
        "type": "object",
        "description": "A whole document (replacement), or update operators only: "
        "`$set $unset $inc $mul $min $max $push $pull $addToSet $rename`.",
        "additionalProperties": True,
    },
    "MergePatch": {
        "type": "object",
        "description": "JSON merge patch (RFC 7396): null removes a field.",
        "additionalProperties": True,
    },
    "Filter": {
        "type": "object",
        "description": "A MongoDB-style filter (see the README's query language).",
        "additionalProperties": True,
    },
    "Sort": {
        "description": 'Like `-age,name`, or `{"age": -1, "name": 1}`.',
        "anyOf": [
            {"type": "string"},
            {"type": "object", "additionalProperties": {"type": "integer", "enum": [1, -1]}},
        ],
    },
    "Fields": {
        "description": "A projection: `name,age`, or a list of field paths.",
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    },
    "FindQuery": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "filter": schema("Filter"),
            "sort": schema("Sort"),
            "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
            "skip": {"type": "integer", "minimum": 0, "maximum": 1000000},
            "fields": schema("Fields"),
            "next": _CURSOR,
        },
    },
    "Page": {
        "type": "object",
        "required": ["items", "next"],
        "additionalProperties": False,
        "properties": {"items": {"type": "array", "items": schema("Document")}, "next": _CURSOR},
    },
    "Count": {
        "type": "object",
        "required": ["count"],
        "additionalProperties": False,
        "properties": {"count": {"type": "integer", "minimum": 0}},
    },
    "BulkResult": {
        "type": "object",
        "required": ["items", "created", "failed"],
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["status", "_id"],
                    "properties": {
                        "status": {"type": "integer"},
                        "_id": {"type": ["string", "null"]},
                        "_version": {"type": "integer"},
                        "error": _ANY_OBJECT,
                    },
                },
            },
            "created": {"type": "integer", "minimum": 0},
            "failed": {"type": "integer", "minimum": 0},
        },
    },
    "Deleted": {
        "type": "object",
        "required": ["deleted", "_id", "_version"],
        "properties": {
            "deleted": {"type": "boolean", "const": True},
            "_id": {"type": "string"},
            "_version": {"type": "integer"},
        },
    },
    "AggregateRequest": {
        "type": "object",
        "required": ["pipeline"],
        "additionalProperties": False,
        "properties": {
            "pipeline": {"type": "array", "items": _ANY_OBJECT, "maxItems": 50},
            "explain": {"type": "boolean"},
        },
    },
    "AggregateResult": {
        "description": 'The documents; with `"explain": true`, `{"sql", "plan"}` instead.',
        "anyOf": [
            {
                "type": "object",
                "required": ["items"],
                "additionalProperties": False,
                "properties": {"items": {"type": "array", "items": {}}},
            },
            {"type": "object", "required": ["plan"], "additionalProperties": True},
        ],
    },
    "SearchRequest": {
        "type": "object",
        "required": ["q"],
        "additionalProperties": False,
        "properties": {
            "q": {"type": "string", "minLength": 1},
            "collections": {
                "type": "array",
                "items": {"type": "string", "pattern": COLLECTION_PATTERN},
            },
            "filter": schema("Filter"),
            "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
            "next": _CURSOR,
            "highlight": {"type": "boolean"},
            "fields": {"type": "array", "items": {"type": "string"}},
            "total": {"type": "boolean"},
        },
    },
    "SearchResult": {
        "type": "object",
        "required": ["items", "next"],
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["collection", "_id", "score", "document"],
                    "properties": {
                        "collection": {"type": "string"},
                        "_id": {"type": "string"},
                        "score": {"type": "number"},
                        "highlights": _ANY_OBJECT,
                        "document": schema("Document"),
                    },
                },
            },
            "next": _CURSOR,
            "total": {"type": "integer"},
        },
    },
    "Isolation": {
        "type": "string",
        "enum": ["read_committed", "repeatable_read", "serializable"],
    },
    "BatchOperation": {
        "type": "object",
        "required": ["op", "collection"],
        "description": 'One operation of a batch; `{"$ref": 0}` is the `_id` of operation '
        "0's document.",
        "properties": {
            "op": {
                "type": "string",
                "enum": ["create", "get", "replace", "update", "patch", "delete", "query", "count"],
            },
            "collection": {"type": "string", "pattern": COLLECTION_PATTERN},
            "id": {},
            "document": _ANY_OBJECT,
            "update": _ANY_OBJECT,
            "patch": _ANY_OBJECT,
            "filter": schema("Filter"),
            "if_match": {"type": "integer"},
            "upsert": {"type": "boolean"},
        },
    },
    "TransactionRequest": {
        "description": "A batch (`operations`), or `action` begin, commit or rollback.",
        "anyOf": [
            {
                "type": "object",
                "title": "batch",
                "required": ["operations"],
                "additionalProperties": False,
                "properties": {
                    "operations": {
                        "type": "array",
                        "items": schema("BatchOperation"),
                        "minItems": 1,
                        "maxItems": 100,
                    },
                    "isolation": schema("Isolation"),
                },
            },
            {
                "type": "object",
                "title": "begin",
                "required": ["action"],
                "additionalProperties": False,
                "properties": {
                    "action": {"const": "begin"},
                    "isolation": schema("Isolation"),
                },
            },
            {
                "type": "object",
                "title": "commit or rollback",
                "required": ["action"],
                "additionalProperties": False,
                "properties": {
                    "action": {"enum": ["commit", "rollback"]},
                    "transaction_id": {"type": "string"},
                },
            },
        ],
    },
    "TransactionResult": {
        "anyOf": [
            {
                "type": "object",
                "title": "batch committed",
                "required": ["committed", "results"],
                "properties": {"committed": {"const": True}, "results": {"type": "array"}},
            },
            {
                "type": "object",
                "title": "ended",
                "required": ["transaction_id", "status"],
                "properties": {
                    "transaction_id": {"type": "string"},
                    "status": {"enum": ["committed", "rolled-back"]},
                },
            },
        ]
    },
    "TransactionBegun": {
        "type": "object",
        "required": ["transaction_id", "idle_timeout_seconds", "max_lifetime_seconds"],
        "properties": {
            "transaction_id": {"type": "string"},
            "idle_timeout_seconds": {"type": "number"},
            "max_lifetime_seconds": {"type": "number"},
        },
    },
    "Migration": {
        "type": "object",
        "required": ["id", "script"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.\\-]{0,127}$"},
            "name": {"type": "string"},
            "database": {"type": "string"},
            "collection_or_table": {"type": "string"},
            "description": {"type": "string"},
            "version": {"type": "integer"},
            "dependencies": {"type": "array", "items": {"type": "string"}},
            "script": {
                "type": "object",
                "required": ["operations"],
                "properties": {
                    "operations": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["op"],
                            "properties": {
                                "op": {
                                    "enum": [
                                        "create_collection",
                                        "set_schema",
                                        "create_index",
                                        "drop_index",
                                        "set_search",
                                        "rename_field",
                                        "backfill",
                                        "drop_collection",
                                        "sql",
                                        "alembic_upgrade",
                                    ]
                                },
                                "collection": {"type": "string", "pattern": COLLECTION_PATTERN},
                            },
                        },
                    }
                },
            },
        },
    },
    "MigrationRecord": {
        "type": "object",
        "description": "A migration's record: its model, state, progress and outcome.",
        "additionalProperties": True,
    },
    "MigrationList": {
        "type": "object",
        "required": ["items", "next"],
        "properties": {
            "items": {"type": "array", "items": schema("MigrationRecord")},
            "next": {"type": "null"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "databases"],
        "properties": {
            "status": {"enum": ["ready", "unavailable"]},
            "databases": _ANY_OBJECT,
            "policies": _ANY_OBJECT,
        },
    },
    "Object": _ANY_OBJECT,
    "AuditPage": {
        "type": "object",
        "required": ["items", "next"],
        "properties": {"items": {"type": "array", "items": _ANY_OBJECT}, "next": _CURSOR},
    },
}
