"""Partitioned collections on PostgreSQL: the ``_pkey`` column's type and expression, the
table and partition DDL of each strategy, and the key conditions that prune a filter."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import orjson

from proxy import numbers
from proxy.backends.migrations import declared_index_name
from proxy.query.ast import And, Cmp, Eq, FieldCond, Filter, In
from proxy.query.pg import Params
from proxy.schema.partitioning import Partitioning

# the key's SQL type and the plpgsql function that takes it from the document (NULL when the
# document has no key of that kind: the NOT NULL column then refuses the write)
_NUMBER_FN: Final = "dbproxy_pkey_number"
_TEXT_FN: Final = "dbproxy_pkey_text"
_HASH_FN: Final = "dbproxy_pkey_hash"
_TIME_FN: Final = "dbproxy_pkey_time"
RFC3339: Final = r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
_RFC3339_RE: Final = re.compile(RFC3339)
# a string comparison on an RFC 3339 key implies a time comparison within this margin
# (offsets up to a day, fractions sorting before "Z"): the pruning condition is widened by it
TIME_MARGIN: Final = dt.timedelta(days=1)
FUNCTIONS: Final = """
CREATE OR REPLACE FUNCTION {schema}.dbproxy_pkey_number(v jsonb) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$f$ SELECT CASE WHEN jsonb_typeof(v) = 'number' THEN (v #>> '{{}}')::numeric END $f$;
CREATE OR REPLACE FUNCTION {schema}.dbproxy_pkey_text(v jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$f$ SELECT CASE WHEN jsonb_typeof(v) = 'string' THEN v #>> '{{}}' END $f$;
CREATE OR REPLACE FUNCTION {schema}.dbproxy_pkey_hash(v jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$f$ SELECT CASE jsonb_typeof(v) WHEN 'string' THEN 's' || (v #>> '{{}}')
  WHEN 'number' THEN 'n' || trim_scale((v #>> '{{}}')::numeric)::text END $f$;
CREATE OR REPLACE FUNCTION {schema}.dbproxy_pkey_time(v jsonb) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $f$
BEGIN
  IF jsonb_typeof(v) = 'string' AND (v #>> '{{}}') ~ '{rfc3339}' THEN
    RETURN (v #>> '{{}}')::timestamptz;
  END IF;
  RETURN NULL;
EXCEPTION WHEN others THEN RETURN NULL;
END $f$;
CREATE TABLE IF NOT EXISTS {schema}._ids (
  collection text COLLATE "C" NOT NULL, _id text COLLATE "C" NOT NULL,
  PRIMARY KEY (collection, _id));
CREATE OR REPLACE FUNCTION {schema}.dbproxy_ids_in() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  INSERT INTO {schema}._ids (collection, _id) VALUES (TG_ARGV[0], NEW._id)
    ON CONFLICT DO NOTHING;
  IF NOT FOUND THEN RETURN NULL; END IF;
  RETURN NEW;
END $f$;
CREATE OR REPLACE FUNCTION {schema}.dbproxy_ids_out() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  DELETE FROM {schema}._ids WHERE collection = TG_ARGV[0] AND _id = OLD._id;
  RETURN OLD;
END $f$;
"""
KEY_CHECK: Final = "_pkey_matches_doc"  # the CHECK constraint: _pkey is the document's key


@dataclass(frozen=True, slots=True)
class PartKey:
    """How one partitioned collection's ``_pkey`` is typed and computed."""

    spec: Partitioning
    schema_ident: str

    @property
    def kind(self) -> str:
        """number | text | hash | time"""
        s = self.spec
        if s.strategy == "hash":
            return "hash"
        if s.strategy == "time":
            return "time"
        sample = s.bounds[0] if s.strategy == "range" else s.values[0][1][0]
        return "text" if isinstance(sample, str) else "number"

    @property
    def sql_type(self) -> str:
        return {
            "number": "numeric",
            "text": 'text COLLATE "C"',
            "hash": 'text COLLATE "C"',
            "time": "timestamptz",
        }[self.kind]

    @property
    def function(self) -> str:
        name = {"number": _NUMBER_FN, "text": _TEXT_FN, "hash": _HASH_FN, "time": _TIME_FN}
        return f"{self.schema_ident}.{name[self.kind]}"

    def of(self, doc: str) -> str:
        """The key of the document expression ``doc`` (segments passed the path pattern)."""
        steps = "".join(f" -> '{seg}'" for seg in self.spec.key)
        return f"{self.function}(({doc}){steps})"

    def value(self, params: Params, value: Any) -> str:
        """A bound JSON value as the key's SQL value (NULL when of another kind)."""
        return f"{self.function}({params.add(numbers.dumps_document(value).decode(), 'jsonb')})"

    def registered(self) -> bool:
        return self.spec.unique_id == "global"


def parent_name(collection: str) -> str:
    return "_p_" + hashlib.blake2s(collection.encode(), digest_size=8).hexdigest()


def partition_table(schema_ident: str, collection: str, name: str) -> str:
    return f'{schema_ident}."{parent_name(collection)}_{name}"'


# ---- pruning -----------------------------------------------------------------------------


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _kind_fits(key: PartKey, value: Any) -> bool:
    if key.kind in ("text", "time"):
        return isinstance(value, str)
    if key.kind == "number":
        return _is_scalar(value) and not isinstance(value, str)
    return _is_scalar(value)


def parse_time(value: Any) -> dt.datetime | None:
    """An RFC 3339 string as an aware datetime (None when it is not one Python reads)."""
    if not isinstance(value, str) or not _RFC3339_RE.fullmatch(value):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.upper())
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


_OPS: Final = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _pred_sql(key: PartKey, pred: Any, params: Params) -> str | None:
    col = "t._pkey"
    if isinstance(pred, Eq) and _kind_fits(key, pred.value):
        if key.kind == "time":
            when = parse_time(pred.value)
            return None if when is None else f"{col} = {params.add(when, 'timestamptz')}"
        return f"{col} = {key.value(params, pred.value)}"
    if isinstance(pred, In) and pred.values and all(_kind_fits(key, v) for v in pred.values):
        if key.kind == "time":
            times = [parse_time(v) for v in pred.values]
            if any(t is None for t in times):
                return None
            return f"{col} = ANY({params.add(times, 'timestamptz[]')})"
        items = ", ".join(key.value(params, v) for v in pred.values)
        return f"{col} IN ({items})"
    if isinstance(pred, Cmp) and key.kind != "hash" and _kind_fits(key, pred.value):
        if key.kind == "time":
            when = parse_time(pred.value)
            if when is None:
                return None
            when = when - TIME_MARGIN if pred.op in ("gt", "gte") else when + TIME_MARGIN
            return f"{col} {_OPS[pred.op]} {params.add(when, 'timestamptz')}"
        return f"{col} {_OPS[pred.op]} {key.value(params, pred.value)}"
    return None


def prune(key: PartKey, flt: Filter, params: Params) -> str | None:
    """Conditions on ``_pkey`` implied by ``flt`` (its top-level conjunction on the key
    path), so the planner skips partitions; None when the filter implies none."""
    conds: list[str] = []
    nodes = flt.children if isinstance(flt, And) else (flt,)
    for node in nodes:
        if isinstance(node, And):
            inner = prune(key, node, params)
            if inner:
                conds.append(inner)
        elif isinstance(node, FieldCond) and node.path.segments == key.spec.key:
            for pred in node.preds:
                sql = _pred_sql(key, pred, params)
                if sql is not None:
                    conds.append(sql)
    return " AND ".join(conds) if conds else None


# ---- DDL ---------------------------------------------------------------------------------


async def _literal(conn: asyncpg.Connection, value: Any, kind: str) -> str:
    """A declared value as a literal the server itself quoted (DDL binds no parameters)."""
    if kind == "number":
        text = await conn.fetchval("SELECT quote_literal(($1::numeric)::text)", str(value))
        return f"{text}::numeric"
    return str(await conn.fetchval("SELECT quote_literal($1::text)", value))


def period_start(when: dt.datetime, interval: str) -> dt.datetime:
    """The start (UTC midnight) of the day, ISO week or month holding ``when``."""
    day = when.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "week":
        return day - dt.timedelta(days=day.weekday())
    if interval == "month":
        return day.replace(day=1)
    return day


def next_period(start: dt.datetime, interval: str, n: int = 1) -> dt.datetime:
    if interval == "day":
        return start + dt.timedelta(days=n)
    if interval == "week":
        return start + dt.timedelta(weeks=n)
    months = start.year * 12 + start.month - 1 + n
    return start.replace(year=months // 12, month=months % 12 + 1)


def time_partition_name(start: dt.datetime) -> str:
    return "t" + start.strftime("%Y%m%d")


def time_bounds(start: dt.datetime, interval: str) -> str:
    end = next_period(start, interval)
    return f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"


_TIME_CHILDREN: Final = (
    "SELECT c.relname, b.m[1]::timestamptz, b.m[2]::timestamptz FROM pg_inherits i "
    "JOIN pg_class c ON c.oid = i.inhrelid, LATERAL (SELECT regexp_match("
    "pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)') AS m) b "
    "WHERE i.inhparent = to_regclass($1) AND b.m IS NOT NULL"
)


async def time_children(
    conn: asyncpg.Connection, table: str
) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """A time-partitioned table's partitions, default aside: relation name → (from, to), the
    bounds read from the catalog (names differ: ours ``t…``, pg_partman's ``p…``)."""
    rows = await conn.fetch(_TIME_CHILDREN, table)
    return {r[0]: (r[1], r[2]) for r in rows}


async def partition_clauses(
    conn: asyncpg.Connection, key: PartKey, now: dt.datetime
) -> list[tuple[str, str]]:
    """(partition name, its FOR VALUES clause) of a new partitioned collection."""
    s = key.spec
    if s.strategy == "hash":
        return [
            (f"h{i}", f"FOR VALUES WITH (MODULUS {s.partitions}, REMAINDER {i})")
            for i in range(s.partitions)
        ]
    if s.strategy == "list":
        out = []
        for name, values in s.values:
            items = [await _literal(conn, v, key.kind) for v in values]
            out.append((name, f"FOR VALUES IN ({', '.join(items)})"))
        if s.default:
            out.append(("default", "DEFAULT"))
        return out
    if s.strategy == "range":
        lits = [await _literal(conn, b, key.kind) for b in s.bounds]
        edges = ["MINVALUE", *lits, "MAXVALUE"]
        return [
            (f"r{i}", f"FOR VALUES FROM ({edges[i]}) TO ({edges[i + 1]})")
            for i in range(len(edges) - 1)
        ]
    start = period_start(now, s.interval)
    out = [("default", "DEFAULT")]
    for i in range(s.premake + 1):
        p = next_period(start, s.interval, i)
        out.append((time_partition_name(p), time_bounds(p, s.interval)))
    return out


async def create_partitioned(
    conn: asyncpg.Connection,
    table: str,
    collection: str,
    key: PartKey,
    now: dt.datetime,
    *,
    partitions: bool = True,
) -> None:
    """The partitioned table, its partitions (``partitions=False``: none, pg_partman makes
    them), indexes and (global _id) registry triggers."""
    s = key.spec
    method = {"hash": "HASH", "list": "LIST", "range": "RANGE", "time": "RANGE"}[s.strategy]
    await conn.execute(
        f"CREATE TABLE {table} ("
        '_id text COLLATE "C" NOT NULL, '
        f"_pkey {key.sql_type} NOT NULL, doc jsonb NOT NULL, "
        "_version bigint NOT NULL DEFAULT 1, "
        "created_at timestamptz NOT NULL DEFAULT now(), "
        "updated_at timestamptz NOT NULL DEFAULT now(), "
        "PRIMARY KEY (_pkey, _id), "
        f'CONSTRAINT "{KEY_CHECK}" CHECK (_pkey = {key.of("doc")})'
        f") PARTITION BY {method} (_pkey)"
    )
    ident = key.schema_ident
    for name, clause in await partition_clauses(conn, key, now) if partitions else ():
        await conn.execute(
            f"CREATE TABLE {partition_table(ident, collection, name)} PARTITION OF {table} {clause}"
        )
    short = parent_name(collection)
    await conn.execute(f'CREATE INDEX "{short}_id" ON {table} (_id)')
    await conn.execute(f'CREATE INDEX "{short}_gin" ON {table} USING gin (doc jsonb_path_ops)')
    if key.registered():
        await conn.execute(
            f'CREATE TRIGGER "{short}_ids_in" BEFORE INSERT ON {table} '
            f"FOR EACH ROW EXECUTE FUNCTION {ident}.dbproxy_ids_in('{collection}')"
        )
        await conn.execute(
            f'CREATE TRIGGER "{short}_ids_out" BEFORE DELETE ON {table} '
            f"FOR EACH ROW EXECUTE FUNCTION {ident}.dbproxy_ids_out('{collection}')"
        )


def stale_layout(exc: BaseException, partitioned: bool) -> bool:
    """Whether a write failed for being built for the table's other layout (a plain
    statement on a partitioned table or the reverse, or a key out of step)."""
    if isinstance(exc, asyncpg.CheckViolationError):
        return getattr(exc, "constraint_name", None) == KEY_CHECK
    if partitioned:
        return isinstance(exc, asyncpg.UndefinedColumnError) and "_pkey" in str(exc)
    if isinstance(exc, asyncpg.InvalidColumnReferenceError):  # ON CONFLICT (_id)
        return True
    return (
        isinstance(exc, asyncpg.NotNullViolationError)
        and getattr(exc, "column_name", None) == "_pkey"
    )


# ---- statements --------------------------------------------------------------------------


def key_condition(key: PartKey, params: Params, given: str) -> str:
    """``t._pkey`` equal to a key given as text (``?partition_key=``, ``X-Partition-Key``):
    a number for number keys, an RFC 3339 time for time keys, for hash keys JSON when it
    reads as a string or number (``5`` the number, ``"5"`` the string), else the text."""
    value: Any = given
    if key.kind == "time":
        when = parse_time(given)
        return "false" if when is None else f"t._pkey = {params.add(when, 'timestamptz')}"
    if key.kind in ("number", "hash"):
        try:
            parsed = orjson.loads(given)
        except orjson.JSONDecodeError:
            parsed = None
        if _is_scalar(parsed) and (key.kind == "hash" or not isinstance(parsed, str)):
            value = parsed
        elif key.kind == "number":
            return "false"
    return f"t._pkey = {key.value(params, value)}"


def partitioned_upsert(
    table: str, key: PartKey, set_clause: str, conds: str, first: str
) -> tuple[str, str]:
    """An upsert by _id on a partitioned table (ON CONFLICT cannot move a row, nor see an
    _id in another partition): the UPDATE, else the INSERT, as top-level CTEs and the
    statement reading them. ``$1`` is the _id."""
    where = f" AND {conds}" if conds else ""
    ctes = (
        f"u AS (UPDATE {table} AS t SET {set_clause} WHERE t._id = $1{where} "
        "RETURNING t.doc::text AS d, t._version AS v, false AS created, t._id AS audit_id), "
        f"i AS (INSERT INTO {table} AS t (_id, _pkey, doc, _version) "
        f"SELECT $1, {key.of('x.d')}, x.d, 1 FROM (SELECT {first} || "
        "jsonb_build_object('_id', $1::text, '_version', 1) AS d) x "
        f"WHERE NOT EXISTS (SELECT 1 FROM u) AND NOT EXISTS (SELECT 1 FROM {table} WHERE _id = $1) "
        "ON CONFLICT (_pkey, _id) DO NOTHING "
        "RETURNING t.doc::text, t._version, true, t._id)"
    )
    return ctes, "SELECT * FROM u UNION ALL SELECT * FROM i"


async def name_child_indexes(conn: asyncpg.Connection, schema_ident: str, table: str) -> None:
    """Each partition's copy of a declared index renamed ``<declared>__<hash>``, so a unique
    violation raised by a partition names the declared index (PostgreSQL names copies
    after the partition)."""
    found = await conn.fetch(
        "SELECT pc.relname, cc.relname FROM pg_index pi "
        "JOIN pg_class pc ON pc.oid = pi.indexrelid "
        "JOIN pg_inherits i ON i.inhparent = pc.oid JOIN pg_class cc ON cc.oid = i.inhrelid "
        "WHERE pi.indrelid = to_regclass($1)",
        table,
    )
    for parent, child in found:
        declared = declared_index_name(parent)
        if declared is None or declared_index_name(child) == declared:
            continue
        digest = hashlib.blake2s(f"{parent}\0{child}".encode(), digest_size=6).hexdigest()
        await conn.execute(f'ALTER INDEX {schema_ident}."{child}" RENAME TO "{declared}__{digest}"')
