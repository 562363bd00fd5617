"""``GET /api/db/openapi.json`` and ``GET /api/db/docs``: the OpenAPI 3.1 description of
every sidecar endpoint (assembled from ``openapi_parts``) and its HTML page."""

from __future__ import annotations

from functools import cache
from typing import Any, Final

import orjson
from aiohttp import web

from proxy.http import openapi_page
from proxy.http.openapi_parts import (
    ADMIN_ERRORS,
    DATA_ERRORS,
    HEADERS,
    OPEN_ERRORS,
    PARAMETERS,
    RESPONSES,
    SECURITY_SCHEMES,
    Json,
    errors,
    json_body,
    ref,
    schema,
)
from proxy.http.openapi_schemas import SCHEMAS

VERSION: Final = "0.1.0"
DOCUMENT_PATH: Final = "/api/db/openapi.json"
PAGE_PATH: Final = "/api/db/docs"

_READ_HEADERS: Final = ("X-Transaction-Id", "X-Read-Preference", "X-Consistency-Token")
_WRITE_HEADERS: Final = ("X-Transaction-Id", "Idempotency-Key")
_CONDITIONAL: Final = ("If-Match",)


def _params(*names: str) -> list[Json]:
    return [ref("parameters", n) for n in (*names, "X-Request-Id")]


def _query(name: str, description: str, value: Json) -> Json:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": value,
    }


def _ok(of: Json, description: str, *headers: str, media: str = "application/json") -> Json:
    response: Json = {
        "description": description,
        "headers": {h: ref("headers", h) for h in ("X-Request-Id", *headers)},
        "content": {media: {"schema": of}},
    }
    return response


def _op(
    op_id: str,
    tag: str,
    summary: str,
    responses: Json,
    *,
    params: list[Json] | None = None,
    body: Json | None = None,
    errs: tuple[int, ...] = DATA_ERRORS,
) -> Json:
    operation: Json = {
        "operationId": op_id,
        "tags": [tag],
        "summary": summary,
        "parameters": params if params is not None else _params(),
        "responses": {**responses, **errors(errs)},
    }
    if body is not None:
        operation["requestBody"] = {"required": True, **body}
    return operation


_WRITTEN: Final = ("ETag", "X-Consistency-Token", "Idempotent-Replayed")
_DOC: Final = schema("Document")
_FIND_PARAMS: Final = [
    _query("filter", "A filter as JSON text.", {"type": "string"}),
    _query("sort", "Like `-age,name`, or the /query body's object as JSON.", {"type": "string"}),
    _query("limit", "Page size (default 100).", {"type": "integer", "minimum": 1, "maximum": 1000}),
    _query("skip", "Documents to skip.", {"type": "integer", "minimum": 0, "maximum": 1000000}),
    ref("parameters", "fields"),
    _query("next", "The cursor of the previous page.", {"type": "string"}),
]
_DATABASE: Final = _query("database", "Which configured database.", {"type": "string"})


def _collection_paths() -> dict[str, Json]:
    return {**_create_list_paths(), **_document_paths(), **_collection_op_paths()}


def _create_list_paths() -> dict[str, Json]:
    c = ref("parameters", "collection")
    return {
        "/api/db/{collection}": {
            "post": _op(
                "create",
                "documents",
                "Create one document (object) or many (array, ≤ 1000)",
                {
                    "201": _ok({"anyOf": [_DOC, schema("BulkResult")]}, "Created", *_WRITTEN),
                    "207": _ok(
                        schema("BulkResult"),
                        "Some items failed (per-item results)",
                        "X-Consistency-Token",
                        "Idempotent-Replayed",
                    ),
                },
                params=[c, *_params(*_WRITE_HEADERS)],
                body=json_body(
                    {
                        "anyOf": [
                            schema("NewDocument"),
                            {"type": "array", "items": schema("NewDocument"), "maxItems": 1000},
                        ]
                    }
                ),
            ),
            "get": _op(
                "list",
                "documents",
                "List documents: filter, sort, page (follow `next`)",
                {"200": _ok(schema("Page"), "A page")},
                params=[c, *_FIND_PARAMS, *_params(*_READ_HEADERS)],
            ),
        },
    }


def _document_paths() -> dict[str, Json]:
    c = ref("parameters", "collection")
    i = ref("parameters", "id")
    return {
        "/api/db/{collection}/{id}": {
            "get": _op(
                "get",
                "documents",
                "One document; the ETag carries its version",
                {"200": _ok(_DOC, "The document", "ETag")},
                params=[
                    c,
                    i,
                    ref("parameters", "fields"),
                    ref("parameters", "partition_key"),
                    *_params(*_READ_HEADERS, "X-Partition-Key"),
                ],
            ),
            "put": _op(
                "replace",
                "documents",
                "Replace the document, or apply update operators (`$set`, `$inc`, …)",
                {
                    "200": _ok(_DOC, "Written", *_WRITTEN),
                    "201": _ok(_DOC, "Created (upsert, If-None-Match: *)", *_WRITTEN),
                },
                params=[
                    c,
                    i,
                    _query("upsert", "Create when absent.", {"type": "boolean"}),
                    *_params(*_CONDITIONAL, "If-None-Match", *_WRITE_HEADERS),
                ],
                body=json_body(schema("Update")),
            ),
            "patch": _op(
                "patch",
                "documents",
                "JSON merge patch (RFC 7396)",
                {"200": _ok(_DOC, "Written", *_WRITTEN)},
                params=[c, i, *_params(*_CONDITIONAL, *_WRITE_HEADERS)],
                body=json_body(schema("MergePatch")),
            ),
            "delete": _op(
                "delete",
                "documents",
                "Delete the document",
                {
                    "200": _ok(
                        schema("Deleted"), "Deleted", "X-Consistency-Token", "Idempotent-Replayed"
                    )
                },
                params=[c, i, *_params(*_CONDITIONAL, *_WRITE_HEADERS)],
            ),
        },
    }


def _collection_op_paths() -> dict[str, Json]:
    c = ref("parameters", "collection")
    return {
        "/api/db/{collection}/query": {
            "post": _op(
                "query",
                "documents",
                "Find with a JSON body (the list's parameters)",
                {"200": _ok(schema("Page"), "A page")},
                params=[c, *_params(*_READ_HEADERS)],
                body=json_body(schema("FindQuery")),
            )
        },
        "/api/db/{collection}/count": {
            "get": _op(
                "count",
                "documents",
                "Count the documents a filter matches",
                {"200": _ok(schema("Count"), "The count")},
                params=[c, _FIND_PARAMS[0], *_params(*_READ_HEADERS)],
            )
        },
        "/api/db/{collection}/aggregate": {
            "post": _op(
                "aggregate",
                "documents",
                "MongoDB aggregation pipeline, one statement",
                {"200": _ok(schema("AggregateResult"), "The documents (or the plan)")},
                params=[c, *_params(*_READ_HEADERS)],
                body=json_body(schema("AggregateRequest")),
            )
        },
        "/api/db/schema/{collection}": {
            "get": _op(
                "describe_schema",
                "schemas",
                "The declared (or inferred) schema, the indexes and estimates",
                {"200": _ok(schema("Object"), "The description")},
                params=[c, *_params()],
                errs=ADMIN_ERRORS,
            )
        },
    }


def _api_paths() -> dict[str, Json]:
    return {**_search_transaction_paths(), **_migration_paths()}


def _search_transaction_paths() -> dict[str, Json]:
    return {
        "/api/db/search": {
            "post": _op(
                "search",
                "search",
                "Full-text search over one, several or every collection",
                {"200": _ok(schema("SearchResult"), "The hits, best first")},
                params=_params(*_READ_HEADERS),
                body=json_body(schema("SearchRequest")),
            )
        },
        "/api/db/transaction": {
            "post": _op(
                "transaction",
                "transactions",
                "A batch (all or nothing), or begin / commit / rollback",
                {
                    "200": _ok(
                        schema("TransactionResult"),
                        "Committed, or ended",
                        "X-Consistency-Token",
                        "Idempotent-Replayed",
                    ),
                    "201": _ok(schema("TransactionBegun"), "Begun: send X-Transaction-Id"),
                },
                params=_params(*_WRITE_HEADERS),
                body=json_body(schema("TransactionRequest")),
            )
        },
    }


def _migration_paths() -> dict[str, Json]:
    return {
        "/api/db/migrations": {
            "post": _op(
                "submit_migration",
                "migrations",
                "Run a migration",
                {
                    "200": _ok(
                        schema("MigrationRecord"), "Applied already (a no-op), or a dry run"
                    ),
                    "201": _ok(schema("MigrationRecord"), "Ran now"),
                    "202": _ok(schema("MigrationRecord"), "Goes on in the background"),
                },
                params=[_query("dry_run", "Plan only.", {"type": "boolean"}), *_params()],
                body=json_body(schema("Migration")),
                errs=ADMIN_ERRORS,
            ),
            "get": _op(
                "list_migrations",
                "migrations",
                "The migration records",
                {"200": _ok(schema("MigrationList"), "The records")},
                params=[_DATABASE, *_params()],
                errs=ADMIN_ERRORS,
            ),
        },
        "/api/db/migrations/status": {
            "get": _op(
                "migration_status",
                "migrations",
                "Current version, counts, lock holder",
                {"200": _ok(schema("Object"), "The summary")},
                params=[_DATABASE, *_params()],
                errs=ADMIN_ERRORS,
            )
        },
        "/api/db/migrations/{id}": {
            "get": _op(
                "get_migration",
                "migrations",
                "One record with its progress",
                {"200": _ok(schema("MigrationRecord"), "The record")},
                params=[
                    {
                        **PARAMETERS["id"],
                        "description": "A migration id.",
                        "schema": SCHEMAS["Migration"]["properties"]["id"],
                    },
                    _DATABASE,
                    *_params(),
                ],
                errs=ADMIN_ERRORS,
            )
        },
    }


def _monitor_paths() -> dict[str, Json]:
    def monitor(op_id: str, summary: str, of: str, params: list[Json] | None = None) -> Json:
        return {
            "get": _op(
                op_id,
                "monitoring",
                summary,
                {"200": _ok(schema(of), summary)},
                params=[*(params or []), *_params()],
                errs=ADMIN_ERRORS,
            )
        }

    top = _query("top", "How many patterns.", {"type": "integer", "minimum": 1, "maximum": 200})
    number = {"type": "number"}
    audit = [
        _query("service", "Only this service's entries.", {"type": "string"}),
        _query("collection", "Only this collection's entries.", {"type": "string"}),
        _query("since", "From this Unix time.", number),
        _query("until", "Up to this Unix time.", number),
        _query("after", "The `next` of the previous page.", {"type": "integer"}),
        _query("limit", "Page size.", {"type": "integer", "minimum": 1, "maximum": 1000}),
    ]
    health = {
        "200": _ok(schema("Health"), "Ready"),
        "503": _ok(schema("Health"), "A database is not ready"),
    }
    return {
        "/api/db/health": {
            "get": _op(
                "health",
                "monitoring",
                "Liveness, per-database readiness, policy status",
                health,
                errs=(500,),
            )
        },
        "/api/db/stats": monitor("stats", "Tables, request totals, volume by service", "Object"),
        "/api/db/performance": monitor(
            "performance", "The slowest query patterns", "Object", [top]
        ),
        "/api/db/connections": monitor("connections", "Pools and transactions", "Object"),
        "/api/db/audit": monitor("audit", "The audit log, newest first", "AuditPage", audit),
        "/metrics": {
            "get": _op(
                "metrics",
                "monitoring",
                "Prometheus text format",
                {"200": _ok({"type": "string"}, "Metrics", media="text/plain")},
                errs=OPEN_ERRORS,
            )
        },
        DOCUMENT_PATH: {
            "get": _op(
                "openapi",
                "description",
                "This description (OpenAPI 3.1)",
                {"200": _ok(schema("Object"), "The document")},
                errs=(500,),
            )
        },
        PAGE_PATH: {
            "get": _op(
                "docs",
                "description",
                "This description as an HTML page",
                {"200": _ok({"type": "string"}, "The page", media="text/html")},
                errs=(500,),
            )
        },
    }


@cache
def document() -> Json:
    """The description (built once; callers must not change it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dbproxy sidecar API",
            "version": VERSION,
            "description": "A JSON document API over PostgreSQL or the embedded store, with "
            "per-service policies. Every error is the one envelope `Error` with a stable "
            "`code`. Served to any caller: it names no collection and no policy.",
        },
        "servers": [{"url": "http://127.0.0.1:8700"}],
        "security": [{}, {"bearer": []}],
        "tags": [{"name": t} for t in _TAGS],
        "paths": {**_collection_paths(), **_api_paths(), **_monitor_paths()},
        "components": {
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "headers": HEADERS,
            "responses": RESPONSES,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


_TAGS: Final = (
    "documents",
    "search",
    "transactions",
    "schemas",
    "migrations",
    "monitoring",
    "description",
)


@cache
def _document_bytes() -> bytes:
    return orjson.dumps(document())


@cache
def _page_bytes() -> bytes:
    return openapi_page.render(document()).encode()


async def openapi_json(_request: web.Request) -> web.Response:
    return web.Response(body=_document_bytes(), content_type="application/json")


async def docs(_request: web.Request) -> web.Response:
    return web.Response(body=_page_bytes(), content_type="text/html", charset="utf-8")


def install(router: web.UrlDispatcher) -> None:
    """The two routes; before the document routes (``/api/db/{collection}``)."""
    router.add_get(DOCUMENT_PATH, openapi_json)
    router.add_get(PAGE_PATH, docs)


def operations() -> list[tuple[str, str]]:
    """Every (METHOD, path) the description has."""
    doc: Any = document()
    return [(m.upper(), p) for p, item in doc["paths"].items() for m in item]
