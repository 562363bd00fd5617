"""The SQL helper functions of the PostgreSQL aggregation compiler (``AGGREGATE_FUNCTIONS``,
created in ``{schema}`` with the others by proxy.backends.postgres.ddl.create_schema)."""

from __future__ import annotations

_FUNCTIONS = """
CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_get(v jsonb, path text[]) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $f$
DECLARE e jsonb; r jsonb; acc jsonb := '[]'::jsonb;
BEGIN
  IF v IS NULL OR cardinality(path) = 0 THEN RETURN v; END IF;
  IF jsonb_typeof(v) = 'object' THEN
    RETURN {schema}.dbproxy_agg_get(v -> path[1], path[2:]);
  ELSIF jsonb_typeof(v) = 'array' THEN
    FOR e IN SELECT a FROM jsonb_array_elements(v) a LOOP
      IF jsonb_typeof(e) = 'object' THEN r := {schema}.dbproxy_agg_get(e -> path[1], path[2:]);
      ELSIF jsonb_typeof(e) = 'array' THEN r := {schema}.dbproxy_agg_get(e, path);
      ELSE r := NULL; END IF;
      IF r IS NOT NULL THEN acc := acc || jsonb_build_array(r); END IF;
    END LOOP;
    RETURN acc;
  END IF;
  RETURN NULL;
END $f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_cmp_arr(a jsonb, b jsonb) RETURNS int
LANGUAGE plpgsql IMMUTABLE AS $f$
DECLARE i int; c int; na int := jsonb_array_length(a); nb int := jsonb_array_length(b);
BEGIN
  FOR i IN 0 .. least(na, nb) - 1 LOOP
    c := {schema}.dbproxy_agg_cmp(a -> i, b -> i);
    IF c <> 0 THEN RETURN c; END IF;
  END LOOP;
  RETURN sign(na - nb)::int;
END $f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_cmp(a jsonb, b jsonb) RETURNS int
LANGUAGE sql IMMUTABLE AS $f$
  SELECT CASE
    WHEN a IS NULL OR b IS NULL THEN
      CASE WHEN a IS NULL AND b IS NULL THEN 0 WHEN a IS NULL THEN -1 ELSE 1 END
    WHEN jsonb_typeof(a) = 'array' AND jsonb_typeof(b) = 'array'
      THEN {schema}.dbproxy_agg_cmp_arr(a, b)
    ELSE {schema}.dbproxy_cmp(a, b) END
$f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_min_step(s jsonb, x jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $f$
  SELECT CASE WHEN x IS NULL THEN s WHEN s IS NULL OR {schema}.dbproxy_agg_cmp(x, s) < 0
    THEN x ELSE s END
$f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_max_step(s jsonb, x jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $f$
  SELECT CASE WHEN x IS NULL THEN s WHEN s IS NULL OR {schema}.dbproxy_agg_cmp(x, s) > 0
    THEN x ELSE s END
$f$;

CREATE OR REPLACE AGGREGATE {schema}.dbproxy_agg_min(jsonb)
  (SFUNC = {schema}.dbproxy_agg_min_step, STYPE = jsonb);

CREATE OR REPLACE AGGREGATE {schema}.dbproxy_agg_max(jsonb)
  (SFUNC = {schema}.dbproxy_agg_max_step, STYPE = jsonb);

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_sort_cands(v jsonb, path text[])
RETURNS SETOF jsonb LANGUAGE plpgsql IMMUTABLE AS $f$
DECLARE e jsonb; found boolean := false;
BEGIN
  -- the values a sort path reaches (docs/aggregation.md, $sort): SQL NULL is an empty
  -- array reached (below null), a dead end is null
  IF cardinality(path) = 0 THEN
    IF jsonb_typeof(v) = 'array' THEN
      IF jsonb_array_length(v) = 0 THEN RETURN NEXT NULL;
      ELSE RETURN QUERY SELECT jsonb_array_elements(v); END IF;
    ELSE RETURN NEXT COALESCE(v, 'null'::jsonb); END IF;
    RETURN;
  END IF;
  IF jsonb_typeof(v) = 'object' THEN
    RETURN QUERY SELECT * FROM {schema}.dbproxy_agg_sort_cands(v -> path[1], path[2:]);
    RETURN;
  END IF;
  IF jsonb_typeof(v) = 'array' THEN
    FOR e IN SELECT a FROM jsonb_array_elements(v) a WHERE jsonb_typeof(a) = 'object' LOOP
      found := true;
      RETURN QUERY SELECT * FROM {schema}.dbproxy_agg_sort_cands(e, path);
    END LOOP;
    IF found THEN RETURN; END IF;
  END IF;
  RETURN NEXT 'null'::jsonb;
END $f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_sortkey(d jsonb, path text[], descending boolean)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $f$
  SELECT c FROM {schema}.dbproxy_agg_sort_cands(d, path) c WHERE c IS NOT NULL ORDER BY
    CASE WHEN descending THEN {schema}.dbproxy_rank(c) END DESC,
    CASE WHEN descending THEN CASE WHEN jsonb_typeof(c) = 'string' THEN c #>> '{{}}' END
      END COLLATE "C" DESC,
    CASE WHEN descending THEN c END DESC,
    {schema}.dbproxy_rank(c),
    CASE WHEN jsonb_typeof(c) = 'string' THEN c #>> '{{}}' END COLLATE "C", c
  LIMIT 1
$f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_unset(d jsonb, path text[]) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $f$
DECLARE e jsonb; acc jsonb := '[]'::jsonb;
BEGIN
  IF jsonb_typeof(d) = 'array' THEN
    FOR e IN SELECT a FROM jsonb_array_elements(d) a LOOP
      acc := acc || jsonb_build_array({schema}.dbproxy_agg_unset(e, path));
    END LOOP;
    RETURN acc;
  END IF;
  IF jsonb_typeof(d) IS DISTINCT FROM 'object' OR NOT (d ? path[1]) THEN RETURN d; END IF;
  IF cardinality(path) = 1 THEN RETURN d - path[1]; END IF;
  RETURN d || jsonb_build_object(path[1], {schema}.dbproxy_agg_unset(d -> path[1], path[2:]));
END $f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_set(d jsonb, path text[], val jsonb)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $f$
DECLARE e jsonb; acc jsonb := '[]'::jsonb;
BEGIN
  IF val IS NULL THEN RETURN {schema}.dbproxy_agg_unset(d, path); END IF;
  IF jsonb_typeof(d) = 'array' THEN
    FOR e IN SELECT a FROM jsonb_array_elements(d) a LOOP
      acc := acc || jsonb_build_array({schema}.dbproxy_agg_set(e, path, val));
    END LOOP;
    RETURN acc;
  END IF;
  IF jsonb_typeof(d) IS DISTINCT FROM 'object' THEN d := '{{}}'::jsonb; END IF;
  IF cardinality(path) = 1 THEN RETURN d || jsonb_build_object(path[1], val); END IF;
  RETURN d || jsonb_build_object(path[1],
    {schema}.dbproxy_agg_set(d -> path[1], path[2:], val));
END $f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_keep(d jsonb, paths jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $f$
DECLARE k text; v jsonb; sub jsonb; acc jsonb;
BEGIN
  IF jsonb_typeof(d) = 'array' THEN
    acc := '[]'::jsonb;
    FOR v IN SELECT a FROM jsonb_array_elements(d) a LOOP
      IF jsonb_typeof(v) IN ('object', 'array') THEN
        acc := acc || jsonb_build_array({schema}.dbproxy_agg_keep(v, paths));
      END IF;
    END LOOP;
    RETURN acc;
  END IF;
  IF jsonb_typeof(d) IS DISTINCT FROM 'object' THEN RETURN NULL; END IF;
  acc := '{{}}'::jsonb;
  FOR k, v IN SELECT * FROM jsonb_each(d) LOOP
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(paths) p
               WHERE p ->> 0 = k AND jsonb_array_length(p) = 1) THEN
      acc := acc || jsonb_build_object(k, v);
    ELSIF jsonb_typeof(v) IN ('object', 'array') THEN
      SELECT jsonb_agg(p - 0) INTO sub FROM jsonb_array_elements(paths) p WHERE p ->> 0 = k;
      IF sub IS NOT NULL THEN
        acc := acc || jsonb_build_object(k, {schema}.dbproxy_agg_keep(v, sub));
      END IF;
    END IF;
  END LOOP;
  RETURN acc;
END $f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_readable(d jsonb, names text[], prefix text)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $f$
DECLARE k text; v jsonb; p text; inner_doc jsonb; acc jsonb := '{{}}'::jsonb;
BEGIN
  FOR k, v IN SELECT * FROM jsonb_each(d) LOOP
    p := prefix || k;
    IF split_part(p, '.', 1) IN ('_id', '_version')
       OR EXISTS (SELECT 1 FROM unnest(names) n WHERE p = n OR starts_with(p, n || '.')) THEN
      acc := acc || jsonb_build_object(k, v);
    ELSIF jsonb_typeof(v) = 'object' THEN
      inner_doc := {schema}.dbproxy_agg_readable(v, names, p || '.');
      IF inner_doc <> '{{}}'::jsonb THEN acc := acc || jsonb_build_object(k, inner_doc); END IF;
    END IF;
  END LOOP;
  RETURN acc;
END $f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_round(x numeric, p int) RETURNS numeric
LANGUAGE sql IMMUTABLE AS $f$
  SELECT CASE WHEN abs(x * s - trunc(x * s)) = 0.5
    THEN round((trunc(x * s) + CASE WHEN mod(trunc(x * s), 2) = 0 THEN 0 ELSE sign(x) END) / s,
               greatest(p, 0))
    ELSE round(x, p) END
  FROM (SELECT power(10::numeric, p) AS s) q
$f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_distinct(arr jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $f$
  SELECT COALESCE(jsonb_agg(q.e ORDER BY q.i), '[]'::jsonb) FROM (
    SELECT DISTINCT ON (a.e) a.e, a.i FROM jsonb_array_elements(arr) WITH ORDINALITY a(e, i)
    ORDER BY a.e, a.i) q
$f$;

CREATE OR REPLACE FUNCTION {schema}.dbproxy_agg_to_string(x jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $f$
  SELECT CASE jsonb_typeof(x)
    WHEN 'string' THEN x #>> '{{}}'
    WHEN 'boolean' THEN x #>> '{{}}'
    WHEN 'number' THEN CASE
      WHEN (x)::numeric = trunc((x)::numeric) AND abs((x)::numeric) < {two_53}
        THEN trunc((x)::numeric)::text
      ELSE x #>> '{{}}' END
  END
$f$;
"""

# format keeps {schema}; the range constants are written into the text first
AGGREGATE_FUNCTIONS = _FUNCTIONS.replace("{two_53}", str(2**53))
