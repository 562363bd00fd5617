"""The reusable parts of the OpenAPI description: schemas, parameters, headers and the error
responses with their codes (``proxy.http.openapi`` assembles the paths from them)."""

from __future__ import annotations

from typing import Any, Final

Json = dict[str, Any]

COLLECTION_PATTERN: Final = "^[A-Za-z][A-Za-z0-9_]{0,62}$"


def ref(kind: str, name: str) -> Json:
    return {"$ref": f"#/components/{kind}/{name}"}


def schema(name: str) -> Json:
    return ref("schemas", name)


def json_body(of: Json, description: str = "") -> Json:
    body: Json = {"content": {"application/json": {"schema": of}}}
    if description:
        body["description"] = description
    return body


# ---- the error codes, by status (README "Errors"; a unit test keeps the two equal) ------

_BAD_INPUT: Final = (
    "invalid_json too_deep invalid_collection_name reserved_collection_name invalid_id "
    "invalid_document invalid_field_name invalid_query invalid_field_path unknown_operator "
    "forbidden_operator invalid_operator_value filter_too_large in_list_too_long "
    "regex_too_long path_too_deep limit_too_large invalid_parameter unknown_parameter "
    "invalid_cursor invalid_regex invalid_update conflicting_update immutable_field "
    "update_type_mismatch id_mismatch invalid_patch invalid_if_match invalid_if_none_match "
    "invalid_header missing_body empty_batch batch_too_large invalid_value "
    "invalid_transaction invalid_operation invalid_reference invalid_isolation "
    "too_many_operations invalid_action nested_transaction invalid_idempotency_key "
    "idempotency_in_transaction unsupported_by_backend number_out_of_range cost_exceeds_limit "
    "transaction_id_mismatch unsupported_regex field_name_too_long array_index_too_large "
    "bad_http_request schema_violation invalid_schema unknown_constraint unsupported "
    "invalid_migration unknown_operation dependency_cycle field_indexed constraint_index "
    "sql_failed alembic_unavailable alembic_not_configured invalid_pipeline pipeline_too_long "
    "expression_too_large too_many_lookups nested_facet expression_failed result_too_large "
    "empty_query query_too_long invalid_search invalid_limit too_many_collections "
    "too_many_fields invalid_migration_id"
)

ERROR_CODES: Final[dict[int, tuple[str, ...]]] = {
    400: (
        *_BAD_INPUT.split(),
        "partition_key_missing",
        "partition_key_out_of_range",
        "unique_index_without_partition_key",
        "partitioning_change_unsupported",
    ),
    401: ("missing_token", "invalid_token"),
    403: (
        "permission_denied",
        "row_rule_violation",
        "missing_row_header",
        "field_not_readable",
        "field_not_writable",
    ),
    404: (
        "not_found",
        "no_such_endpoint",
        "transaction_not_found",
        "migration_not_found",
        "index_not_found",
        "unknown_database",
    ),
    405: ("method_not_allowed",),
    408: ("header_timeout", "body_timeout"),
    409: (
        "duplicate_id",
        "duplicate_key",
        "serialization_failure",
        "write_conflict",
        "transaction_aborted",
        "transaction_closed",
        "idempotency_policy_changed",
        "checksum_mismatch",
        "dependency_not_met",
        "existing_documents_invalid",
        "index_exists",
        "index_invalid",
        "alembic_failed",
    ),
    412: ("version_mismatch", "already_exists"),
    413: ("payload_too_large",),
    414: ("uri_too_long",),
    415: ("unsupported_media_type",),
    422: ("idempotency_key_reused",),
    429: ("rate_limited", "too_many_in_flight", "transaction_limit_exceeded"),
    431: ("header_too_large",),
    500: ("internal_error",),
    502: ("commit_outcome_unknown",),
    503: (
        "database_unavailable",
        "pool_exhausted",
        "too_many_transactions",
        "rate_limiter_unavailable",
        "writer_busy",
        "too_many_connections",
        "collection_being_partitioned",
        "partitioning_changed",
    ),
    504: ("statement_timeout", "database_timeout"),
}

_ERROR_TITLES: Final = {
    400: "Bad input: refused before any database work",
    401: "No or an unknown bearer token (policies in token mode)",
    403: "The policy does not allow it",
    404: "No such document, transaction, migration or endpoint",
    405: "Method not allowed",
    408: "The request's headers or body came too slowly",
    409: "Conflict",
    412: "A precondition (If-Match, If-None-Match) does not hold",
    413: "The body is larger than the configured limit",
    414: "The URL is too long",
    415: "Not JSON",
    422: "The Idempotency-Key was used with another request",
    429: "Rate or concurrency limit; retry after Retry-After",
    431: "A header, or the headers, too large",
    500: "Internal error (details only in the sidecar's log, under the request id)",
    502: "The outcome of a commit is unknown",
    503: "Unavailable for now; retry after Retry-After",
    504: "The database did not answer in time",
}

RETRY_AFTER: Final[frozenset[int]] = frozenset({429, 503})


def _error_response(status: int) -> Json:
    codes = ERROR_CODES[status]
    headers: Json = {"X-Request-Id": ref("headers", "X-Request-Id")}
    if status in RETRY_AFTER:
        headers["Retry-After"] = ref("headers", "Retry-After")
    return {
        "description": f"{_ERROR_TITLES[status]}. Codes: {', '.join(codes)}.",
        "headers": headers,
        "content": {"application/json": {"schema": schema("Error")}},
        "x-codes": list(codes),
    }


# every status a data operation can answer with an error
DATA_ERRORS: Final = (400, 401, 403, 404, 409, 412, 413, 415, 422, 429, 500, 502, 503, 504)
# the monitoring, migration and schema endpoints
ADMIN_ERRORS: Final = (400, 401, 403, 404, 409, 413, 415, 429, 500, 503, 504)
OPEN_ERRORS: Final = (500, 503)  # health, metrics: no identity, no input


def errors(statuses: tuple[int, ...]) -> Json:
    return {str(s): ref("responses", f"Error{s}") for s in statuses}


# ---- parameters and headers ------------------------------------------------------------


def _header(name: str, description: str, value: Json) -> Json:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": value,
    }


PARAMETERS: Final[dict[str, Json]] = {
    "collection": {
        "name": "collection",
        "in": "path",
        "required": True,
        "description": "A collection name; the endpoint names are reserved.",
        "schema": {"type": "string", "pattern": COLLECTION_PATTERN},
    },
    "id": {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "A document's `_id`.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 512},
    },
    "fields": {
        "name": "fields",
        "in": "query",
        "description": "Projection, like `name,age`.",
        "schema": {"type": "string"},
    },
    "If-Match": _header(
        "If-Match",
        'Write only if the document\'s version is still this one (`"3"`), else 412.',
        {"type": "string", "pattern": '^"[0-9]{1,19}"$'},
    ),
    "If-None-Match": _header(
        "If-None-Match",
        "`*`: create only, 412 `already_exists` when the id is taken.",
        {"type": "string", "const": "*"},
    ),
    "Idempotency-Key": _header(
        "Idempotency-Key",
        "Retry a write safely: the first reply is stored and replayed.",
        {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    ),
    "X-Transaction-Id": _header(
        "X-Transaction-Id",
        "Run inside an interactive transaction (from `action: begin`).",
        {"type": "string"},
    ),
    "X-Consistency-Token": _header(
        "X-Consistency-Token",
        "The token of an earlier write: read your own writes across replicas.",
        {"type": "string", "pattern": "^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"},
    ),
    "partition_key": {
        "name": "partition_key",
        "in": "query",
        "description": "A partitioned collection's key value: read only its partition.",
        "schema": {"type": "string", "maxLength": 1024},
    },
    "X-Partition-Key": _header(
        "X-Partition-Key",
        "A partitioned collection's key value: read only its partition.",
        {"type": "string", "maxLength": 1024},
    ),
    "X-Read-Preference": _header(
        "X-Read-Preference",
        "Where a read goes.",
        {"type": "string", "enum": ["primary", "secondary", "nearest"]},
    ),
    "X-Request-Id": _header(
        "X-Request-Id",
        "Echoed on the response (generated when absent).",
        {"type": "string", "maxLength": 128, "pattern": "^[!-~]+$"},
    ),
}

HEADERS: Final[dict[str, Json]] = {
    "X-Request-Id": {"description": "The request's id.", "schema": {"type": "string"}},
    "ETag": {
        "description": 'The document\'s version, `"<version>"`.',
        "schema": {"type": "string"},
    },
    "X-Consistency-Token": {
        "description": "After a write: send it with later reads to see that write.",
        "schema": {"type": "string"},
    },
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored reply of an Idempotency-Key.",
        "schema": {"type": "string"},
    },
    "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}},
}

RESPONSES: Final[dict[str, Json]] = {f"Error{s}": _error_response(s) for s in ERROR_CODES}

SECURITY_SCHEMES: Final[dict[str, Json]] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "Policies in token mode: the token names the calling service. "
        "Without token mode, no credentials are needed.",
    }
}
