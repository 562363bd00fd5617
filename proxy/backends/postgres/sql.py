"""SQL text: the schema's DDL, the plpgsql functions, and the statements written once and
shared (the document insert, the audit insert, the audit-log and monitoring queries)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.backends.postgres.partitions import PartKey

# A full replacement keeping what the caller may not write: proxy.ops.keep_protected's twin.
KEEP_FUNCTION = """
CREATE OR REPLACE FUNCTION {schema}.dbproxy_keep(
  stored jsonb, body jsonb, open_paths text[], partial_paths text[], prefix text
) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $f$
DECLARE k text; v jsonb; result jsonb;
BEGIN
  IF stored IS NULL OR jsonb_typeof(stored) <> 'object' THEN RETURN body; END IF;
  SELECT body || coalesce(jsonb_object_agg(e.key, e.value), '{{}}'::jsonb) INTO result
    FROM jsonb_each(stored) e
   WHERE NOT (prefix = '' AND e.key IN ('_id', '_version')) AND NOT (body ? e.key)
     AND NOT ((prefix || e.key) = ANY(open_paths) OR (prefix || e.key) = ANY(partial_paths));
  FOR k, v IN SELECT e.key, e.value FROM jsonb_each(stored) e
   WHERE NOT (prefix = '' AND e.key IN ('_id', '_version'))
     AND (prefix || e.key) = ANY(partial_paths) AND NOT ((prefix || e.key) = ANY(open_paths))
  LOOP
    IF NOT (body ? k) THEN
      IF jsonb_typeof(v) = 'object' THEN
        v := {schema}.dbproxy_keep(v, '{{}}'::jsonb, open_paths, partial_paths, prefix || k || '.');
      END IF;
      result := result || jsonb_build_object(k, v);
    ELSIF jsonb_typeof(v) = 'object' AND jsonb_typeof(body -> k) = 'object' THEN
      result := result || jsonb_build_object(
        k, {schema}.dbproxy_keep(v, body -> k, open_paths, partial_paths, prefix || k || '.'));
    END IF;
  END LOOP;
  RETURN result;
END $f$;
"""
AUDIT_DDL = """
CREATE TABLE IF NOT EXISTS {schema}._audit (
  id bigserial PRIMARY KEY,
  at timestamptz NOT NULL DEFAULT clock_timestamp(),
  service text NOT NULL,
  operation text NOT NULL,
  collection text NOT NULL,
  ids text[] NOT NULL,
  request_id text NOT NULL,
  outcome text NOT NULL DEFAULT 'committed'
);
CREATE INDEX IF NOT EXISTS _audit_at ON {schema}._audit (at);
"""
IDEMPOTENCY_DDL = (
    "CREATE TABLE IF NOT EXISTS {schema}._idempotency ("
    "key text PRIMARY KEY, fingerprint text NOT NULL, status int, "
    "headers jsonb, body bytea, expires_at timestamptz NOT NULL)"
)
# The declared schemas (written only by migrations, read by every sidecar at start and on
# NOTIFY dbproxy_schemas); ``version`` grows on every change of a collection's schema.
SCHEMAS_DDL = (
    "CREATE TABLE IF NOT EXISTS {schema}._schemas ("
    'collection text COLLATE "C" PRIMARY KEY, schema jsonb NOT NULL, '
    "version bigint NOT NULL DEFAULT 1, updated_at timestamptz NOT NULL DEFAULT now())"
)
SCHEMAS_CHANNEL = "dbproxy_schemas"
LOAD_SCHEMAS = "SELECT collection, schema::text, version FROM {schema}._schemas"
TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS {table} ("
    '_id text COLLATE "C" PRIMARY KEY, doc jsonb NOT NULL, '
    "_version bigint NOT NULL DEFAULT 1, "
    "created_at timestamptz NOT NULL DEFAULT now(), "
    "updated_at timestamptz NOT NULL DEFAULT now())"
)
INDEX_DDL = 'CREATE INDEX IF NOT EXISTS "{index}" ON {table} USING gin (doc jsonb_path_ops)'
AUDIT_LOG = (
    "SELECT id, extract(epoch FROM at)::float8 AS at, service, operation, collection, "
    "ids, request_id, outcome FROM {schema}._audit "
    "WHERE ($1::text IS NULL OR service = $1) AND ($2::text IS NULL OR collection = $2) "
    "AND ($3::float8 IS NULL OR at >= to_timestamp($3)) "
    "AND ($4::float8 IS NULL OR at < to_timestamp($4)) "
    "AND ($5::bigint IS NULL OR id > $5) "
    "AND ($7::bool OR collection = ANY($8::text[]) "
    'OR collection COLLATE "C" ~ ANY($9::text[]) '
    "OR (collection = '*' AND service = $10)) "
    "ORDER BY id LIMIT $6"
)
DESCRIBE_COLLECTIONS = (
    "SELECT c.relname, c.reltuples::bigint, pg_table_size(c.oid), "
    "pg_indexes_size(c.oid), coalesce(s.n_dead_tup, 0), coalesce(s.n_live_tup, 0), "
    "c.relkind::text "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid "
    "WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
    "AND c.relname !~ '^_' ORDER BY c.relname"
)


def insert_documents(table: str, rows: str, key: PartKey | None = None) -> str:
    """The one document INSERT: ``rows`` (a VALUES or SELECT giving _id, doc, _version)
    into ``table``, an existing _id skipped, each inserted _id returned as ``audit_id``.
    With a partition ``key``, ``_pkey`` is taken from each document in the statement."""
    if key is not None:
        return (
            f"INSERT INTO {table} (_id, _pkey, doc, _version) "
            f"SELECT r.i, {key.of('r.d')}, r.d, r.v FROM ({rows}) AS r(i, d, v) "
            "ON CONFLICT (_pkey, _id) DO NOTHING RETURNING _id AS audit_id"
        )
    return (
        f"INSERT INTO {table} (_id, doc, _version) {rows} "
        "ON CONFLICT (_id) DO NOTHING RETURNING _id AS audit_id"
    )


def insert_audit(schema: str, rows: str) -> str:
    """The one audit INSERT: ``rows`` (a VALUES or SELECT giving service, operation,
    collection, ids, request_id) into ``schema``'s audit table."""
    return f"INSERT INTO {schema}._audit (service, operation, collection, ids, request_id) {rows}"


def with_audit(
    sql: str, schema: str, svc: str, op: str, coll: str, rid: str, ctes: str = ""
) -> str:
    """A write (whose RETURNING ends with ``audit_id``) and its one audit row in ONE
    statement; ``svc``, ``op``, ``coll``, ``rid`` are SQL expressions (placeholders).
    ``ctes``: data-modifying CTEs ``sql`` reads (they must stay at the top level)."""
    audit = insert_audit(
        schema,
        f"SELECT {svc}, {op}, {coll}, array_agg(w.audit_id), {rid} FROM w HAVING count(*) > 0",
    )
    return f"WITH {ctes + ', ' if ctes else ''}w AS ({sql}), a AS ({audit}) SELECT * FROM w"


def insert_batch(table: str, schema: str, audit: bool, key: PartKey | None = None) -> str:
    """Creates from many requests in one statement: $1.. $4 are the _ids, documents,
    services and request ids; with ``audit``, $5 is the collection and each created
    document gets its own request's audit row."""
    rows = "SELECT u.i, u.d, 1 FROM u"
    audited = insert_audit(
        schema, "SELECT u.svc, 'create', $5, ARRAY[u.i], u.rid FROM u JOIN w ON w.audit_id = u.i"
    )
    return (
        "WITH u AS (SELECT * FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::text[]) "
        f"AS u(i, d, svc, rid)), w AS ({insert_documents(table, rows, key)})"
        f"{f', a AS ({audited})' if audit else ''} SELECT audit_id FROM w"
    )


def glob_to_posix(glob: str) -> str:
    """A policy glob (name characters, ``*``, ``?``, ``[...]``, ``[!...]``) as an anchored
    POSIX regex (the policy loader allows nothing else in a glob)."""
    out = glob.replace("*", ".*").replace("?", ".").replace("[!", "[^")
    return f"^{out}$"
