"""The workloads, defined once: seeded documents, id distributions (uniform, Zipf), request mixes.

Every generator draws from these definitions: the wrk Lua script (which re-implements the
same distributions in Lua, see ``load.WRK_LUA``), the Python closed-loop and open-loop
generators (``load.py``, ``openloop.py``) and the direct asyncpg client (``direct.py``). The
streams are deterministic for a given seed; different generators draw different but
identically distributed sequences.

Seeded documents are ``doc-000001`` ... ``doc-<n>``; document ``i`` has ``group`` = ``"g%05d"`` of
``(i - 1) % groups`` with ``groups = max(1, n // 10)``, so every group value
matches exactly ten documents (a query with ``limit: 10`` returns ten rows), and ``n: 0``
(the counter the mixed load increments).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import os
import random
import time
from typing import Any

import orjson

from benchmarks import search

ID_PREFIX, ID_WIDTH = "doc-", 6
ZIPF_S = 1.1
WRITE_PCT = 20  # mixed load: share of writes (PUT $inc), the rest are GET by id
INC_BODY = '{"$inc":{"n":1}}'
CREATE_BODY = (
    '{"name":"bench user","age":42,"email":"bench@example.com","tags":["a","b"],"active":true}'
)
# create_schema6: a document of the 6-field schema of ``bench_create6`` (pgsetup.SCHEMA6)
CREATE6_BODY = (
    '{"name":"bench user","age":42,"email":"bench@example.com","active":true,'
    '"score":7.5,"city":"Lyon"}'
)
# list_indexed: LIST_DOCS documents {grp: 0..LIST_GROUPS-1, n: a permutation of 0..LIST_DOCS-1}
# in ``bench_list``, declared {grp: integer, n: integer} with an index on (grp, n); a query
# {"grp": g, "n": {"$gte": k}} sorted by n with k <= LIST_MAX_K always has >= 10 rows
LIST_DOCS = 50_000
LIST_GROUPS = 100
LIST_MAX_K = LIST_DOCS - 20 * LIST_GROUPS
# agg_group / agg_memory: AGG_DOCS (AGG_BIG_DOCS) documents of ``agg_doc`` in ``bench_agg``
# (``bench_agg_big``), aggregated through POST /api/db/{c}/aggregate (the baseline: the same
# aggregations written by hand in SQL, baseline.AGG_SQL)
AGG_DOCS = 100_000
AGG_BIG_DOCS = 1_000_000
AGG_GROUPS = 20
AGG_GROUP_PIPELINE: list[dict[str, Any]] = [
    {"$match": {"ok": True}},
    {
        "$group": {
            "_id": "$cat",
            "total": {"$sum": "$n"},
            "avg": {"$avg": "$price"},
            "max": {"$max": "$n"},
        }
    },
]
# agg_memory's second pipeline: the 1,000 most expensive ok documents (ties in _id order)
AGG_TOP_LIMIT = 1000
AGG_TOP_PIPELINE: list[dict[str, Any]] = [
    {"$match": {"ok": True}},
    {"$sort": {"price": -1}},
    {"$limit": AGG_TOP_LIMIT},
]
AGG_GROUP_BODY = orjson.dumps({"pipeline": AGG_GROUP_PIPELINE}).decode()
AGG_TOP_BODY = orjson.dumps({"pipeline": AGG_TOP_PIPELINE}).decode()
AGG_TOP_PCT = 50  # agg_memory: share of AGG_TOP_BODY requests, the rest AGG_GROUP_BODY
# the same two aggregations written by hand (the baseline and the direct client; {c} the
# collection): one row of JSON text per group / per document
AGG_GROUP_SQL = (  # the fields taken out once in a fenced subquery (OFFSET 0): the
    # planner then hashes 20 small rows per group instead of sorting whole documents (it
    # cannot know doc -> 'cat' has 20 values), about twice as fast as the flat GROUP BY
    "SELECT jsonb_build_object('_id', cat, 'total', sum(n), 'avg', avg(price), "
    "'max', max(n))::text FROM (SELECT doc -> 'cat' AS cat, (doc ->> 'n')::bigint AS n, "
    "(doc ->> 'price')::float8 AS price FROM dbproxy.\"{c}\" "
    "WHERE doc @> '{{\"ok\": true}}' OFFSET 0) AS d GROUP BY cat"
)
AGG_TOP_SQL = (
    'SELECT doc::text FROM dbproxy."{c}" WHERE doc @> \'{{"ok": true}}\' '
    f"ORDER BY doc -> 'price' DESC, _id LIMIT {AGG_TOP_LIMIT}"
)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    collection: str
    method: str  # of the main request (mixed: of the read)
    reset: str | None  # before every round: "truncate" (table emptied) | "checkpoint" | None
    description: str
    baseline_sql: str
    # heavy scenarios run at these connection counts instead of --connections (or at
    # --agg-connections when given)
    heavy_connections: tuple[int, ...] = ()
    # slow scenarios run only when --scenarios names them (not in the default list)
    slow: bool = False


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "get_uniform",
            "bench",
            "GET",
            None,
            "GET /api/db/bench/{id}, ids uniform over the seeded ids",
            "SELECT doc FROM dbproxy.bench WHERE _id = $1",
        ),
        Scenario(
            "get_zipf",
            "bench",
            "GET",
            None,
            f"GET /api/db/bench/{{id}}, ids Zipf-distributed (s={ZIPF_S}) over the seeded ids",
            "SELECT doc FROM dbproxy.bench WHERE _id = $1",
        ),
        Scenario(
            "query",
            "bench",
            "POST",
            None,
            'POST /api/db/bench/query {"filter": {"group": <random>}, "limit": 10} (10 rows)',
            "SELECT doc FROM dbproxy.bench WHERE doc @> $1 LIMIT 10",
        ),
        Scenario(
            "create",
            "bench_create",
            "POST",
            "truncate",
            "POST /api/db/bench_create, one 90-byte JSON object",
            "INSERT INTO dbproxy.bench_create (_id, doc, _version) VALUES ($1, $2, 1)",
        ),
        Scenario(
            "list_indexed",
            "bench_list",
            "POST",
            None,
            'POST /api/db/bench_list/query {"filter": {"grp": <0..99>, "n": {"$gte": <k>}}, '
            f'"sort": "n", "limit": 10}} over {LIST_DOCS:,} documents (declared, indexed)',
            "SELECT doc FROM dbproxy.bench_list WHERE doc->'grp' = $1 AND doc->'n' >= $2 "
            "ORDER BY doc->'n' LIMIT 10 (expression index on (doc->'grp', doc->'n'))",
        ),
        Scenario(
            "create_schema6",
            "bench_create6",
            "POST",
            "truncate",
            "POST /api/db/bench_create6, a document of its declared 6-field schema",
            "INSERT INTO dbproxy.bench_create6 (_id, doc, _version) VALUES ($1, $2, 1)",
        ),
        Scenario(
            "agg_group",
            "bench_agg",
            "POST",
            None,
            f"POST /api/db/bench_agg/aggregate {AGG_GROUP_BODY} over {AGG_DOCS:,} documents "
            f"({AGG_GROUPS} groups)",
            AGG_GROUP_SQL.format(c="bench_agg"),
            heavy_connections=(8,),
        ),
        Scenario(
            "agg_group_schema",
            "bench_agg_s",
            "POST",
            None,
            f"POST /api/db/bench_agg_s/aggregate {AGG_GROUP_BODY} over {AGG_DOCS:,} documents "
            f"({AGG_GROUPS} groups) of a declared schema (cat string, n integer, price number, "
            "ok boolean; all required)",
            AGG_GROUP_SQL.format(c="bench_agg_s"),
            heavy_connections=(8,),
        ),
        Scenario(
            "search",
            "bench_search",
            "POST",
            None,
            "POST /api/db/search, two words (the second a prefix), 20 hits with highlights, "
            "over 100,000 documents declared {title: A, body: C}, english",
            "tsvector @@ plainto_tsquery(w1) && to_tsquery(w2:*) ORDER BY ts_rank_cd LIMIT 20, "
            "ts_headline of title and body (the sidecar's stored vector and GIN index)",
            heavy_connections=(8,),
        ),
        Scenario(
            "agg_memory",
            "bench_agg_big",
            "POST",
            None,
            f"POST /api/db/bench_agg_big/aggregate over {AGG_BIG_DOCS:,} documents: "
            f"{100 - AGG_TOP_PCT}% the agg_group $group, {AGG_TOP_PCT}% "
            f"{AGG_TOP_BODY}; the sidecar's peak RSS",
            AGG_GROUP_SQL.format(c="bench_agg_big") + " / " + AGG_TOP_SQL.format(c="bench_agg_big"),
            heavy_connections=(4,),
            slow=True,
        ),
        Scenario(
            "mixed",
            "bench",
            "GET",
            "checkpoint",
            f"{100 - WRITE_PCT}% GET by id, {WRITE_PCT}% PUT {INC_BODY}, ids uniform",
            "SELECT as get_uniform / UPDATE ... SET doc = jsonb_set(doc, '{n}', n + 1) ...",
        ),
    )
}
ALIASES = {"get": "get_uniform"}
DEFAULT_SCENARIOS = [n for n, s in SCENARIOS.items() if not s.slow]


def doc_id(i: int) -> str:
    return f"{ID_PREFIX}{i:0{ID_WIDTH}d}"


def n_groups(n_docs: int) -> int:
    return max(1, n_docs // 10)


def group_value(g: int) -> str:
    """The g-th group value (0-based)."""
    return f"g{g:05d}"


def zipf_mult(n: int) -> int:
    """A multiplier coprime to n: rank r maps to id ((r - 1) * mult) % n + 1, so the hot ids
    are spread over the table instead of being its first rows (same map in Lua)."""
    m = max(1, int(n * 0.6180339887)) | 1
    for _ in range(n + 2):
        if math.gcd(m, n) == 1:
            return m
        m += 1
    return 1


def zipf_cdf(n: int, s: float = ZIPF_S) -> list[float]:
    weights = [k**-s for k in range(1, n + 1)]
    total = sum(weights)
    acc, out = 0.0, []
    for w in weights:
        acc += w
        out.append(acc / total)
    out[-1] = 1.0
    return out


def zipf_top_share(n: int, s: float = ZIPF_S, top: int = 100) -> float:
    """Share of requests that go to the `top` hottest ids (for the report)."""
    cdf = zipf_cdf(n, s)
    return cdf[min(top, n) - 1]


class IdPicker:
    """Seeded ids 1..n, uniform or Zipf(s) (rank permuted by ``zipf_mult``)."""

    def __init__(self, n: int, zipf: bool, seed: int, s: float = ZIPF_S) -> None:
        self.n = n
        self.rng = random.Random(seed)
        self.cdf = zipf_cdf(n, s) if zipf else None
        self.mult = zipf_mult(n)

    def index(self) -> int:
        if self.cdf is None:
            return self.rng.randint(1, self.n)
        rank = min(bisect.bisect_left(self.cdf, self.rng.random()), self.n - 1) + 1
        return ((rank - 1) * self.mult) % self.n + 1

    def id(self) -> str:
        return doc_id(self.index())


def seed_doc(i: int, rng: random.Random, groups: int) -> dict[str, Any]:
    return {
        "_id": doc_id(i),
        "_version": 1,
        "name": f"user {i}",
        "email": f"user{i}@example.com",
        "age": 18 + i % 60,
        "score": round(rng.random() * 100, 3),
        "active": i % 3 != 0,
        "tags": rng.sample(["red", "green", "blue", "vip", "new", "eu", "us"], 3),
        "address": {"city": rng.choice(["Berlin", "Lyon", "Oslo", "Porto"]), "zip": f"{i:05d}"},
        "group": group_value((i - 1) % groups),
        "n": 0,
    }


def query_body(group: str) -> str:
    return orjson.dumps({"filter": {"group": group}, "limit": 10}).decode()


def list_doc(i: int) -> dict[str, Any]:
    """The i-th document of ``bench_list`` (0-based)."""
    return {
        "_id": f"l-{i:06d}",
        "_version": 1,
        "grp": i % LIST_GROUPS,
        "n": (i * 7919) % LIST_DOCS,
        "name": f"item {i}",
    }


def list_body(grp: int, k: int) -> str:
    return orjson.dumps(
        {"filter": {"grp": grp, "n": {"$gte": k}}, "sort": "n", "limit": 10}
    ).decode()


def agg_id(i: int) -> str:
    return f"a-{i:07d}"


def agg_doc(i: int) -> dict[str, Any]:
    """The i-th document (1-based) of ``bench_agg`` / ``bench_agg_big``; ``AGG_DOC_SQL``
    builds the same in SQL from ``i`` (tests/unit/test_bench_agg.py checks they agree)."""
    return {
        "_id": agg_id(i),
        "_version": 1,
        "cat": f"c{i % AGG_GROUPS}",
        "n": (i * 7919) % 1000,
        "price": ((i * 37) % 4000) / 4 + 0.125,  # a multiple of 1/8, never integral
        "ok": i % 3 != 0,
    }


# agg_doc in SQL over ``i`` (a bigint): for INSERT ... SELECT ... FROM generate_series
AGG_DOC_SQL = (
    "jsonb_build_object('_id', 'a-' || lpad(i::text, 7, '0'), '_version', 1, "
    f"'cat', 'c' || (i % {AGG_GROUPS}), 'n', (i * 7919) % 1000, "
    "'price', (((i * 37) % 4000) / 4.0 + 0.125)::float8, 'ok', i % 3 <> 0)"
)


def agg_group_answer(n_docs: int) -> dict[str, dict[str, float]]:
    """The right answer of AGG_GROUP_PIPELINE over agg_doc(1..n_docs): {cat: fields}."""
    acc: dict[str, list[float]] = {}
    for i in range(1, n_docs + 1):
        d = agg_doc(i)
        if not d["ok"]:
            continue
        a = acc.setdefault(d["cat"], [0, 0.0, 0, -1])  # sum n, sum price, count, max n
        a[0] += d["n"]
        a[1] += d["price"]
        a[2] += 1
        a[3] = max(a[3], d["n"])
    return {k: {"total": a[0], "avg": a[1] / a[2], "max": a[3]} for k, a in acc.items()}


def agg_group_problems(items: Any, want: dict[str, dict[str, float]]) -> list[str]:
    """Differences between an aggregate answer's items and ``want``, compared as a set of
    groups with a relative numeric tolerance of 1e-9 (docs/aggregation.md)."""
    if not isinstance(items, list):
        return [f"items is not a list: {str(items)[:200]}"]
    got: dict[str, Any] = {}
    for it in items:
        if not isinstance(it, dict) or set(it) != {"_id", "total", "avg", "max"}:
            return [f"unexpected item {str(it)[:200]}"]
        if it["_id"] in got:
            return [f"group {it['_id']!r} answered twice"]
        got[str(it["_id"])] = it
    problems = []
    if set(got) != set(want):
        problems.append(f"groups {sorted(got)} instead of {sorted(want)}")
    for k in sorted(set(got) & set(want)):
        for f, v in want[k].items():
            g = got[k][f]
            if isinstance(g, bool) or not isinstance(g, int | float):
                problems.append(f"group {k}: {f} = {g!r} is not a number")
            elif abs(g - v) > 1e-9 * max(1.0, abs(v)):
                problems.append(f"group {k}: {f} = {g!r}, expected {v!r}")
    return problems


def agg_top_answer(n_docs: int) -> list[str]:
    """The _ids AGG_TOP_PIPELINE answers over agg_doc(1..n_docs), in order."""
    docs = (agg_doc(i) for i in range(1, n_docs + 1))
    ok = [(d["price"], d["_id"]) for d in docs if d["ok"]]
    ok.sort(key=lambda pd: pd[1])  # input order (_id), then a stable sort on price desc
    ok.sort(key=lambda pd: pd[0], reverse=True)
    return [i for _, i in ok[:AGG_TOP_LIMIT]]


_NEW_ID_PREFIX = os.urandom(3).hex()
_NEW_ID_COUNTER = itertools.count()


def new_id() -> str:
    """Time-ordered, process-unique id (hex nanoseconds + process prefix + counter)."""
    return f"{time.time_ns():x}{_NEW_ID_PREFIX}{next(_NEW_ID_COUNTER) & 0xFFFFFF:06x}"


# ---------------------------------------------------------------- HTTP requests (Python)


class RequestMaker:
    """Raw HTTP/1.1 requests of one scenario for the Python generators."""

    def __init__(
        self,
        scenario: str,
        collection: str,
        n_docs: int,
        seed: int,
        host: str,
        port: int,
        headers: tuple[str, ...] = (),
        body: str = CREATE_BODY,
    ) -> None:
        self.scenario = scenario
        self.collection = collection
        self.picker = IdPicker(n_docs, scenario == "get_zipf", seed)
        self.rng = random.Random(seed ^ 0x5EED)
        self.groups = n_groups(n_docs)
        self.head = f"Host: {host}:{port}\r\n" + "".join(f"{h}\r\n" for h in headers)
        if scenario == "create_schema6":
            body = CREATE6_BODY
        self.create = self._with_body("POST", f"/api/db/{collection}", body)
        agg = f"/api/db/{collection}/aggregate"
        self.agg_group = self._with_body("POST", agg, AGG_GROUP_BODY)
        self.agg_top = self._with_body("POST", agg, AGG_TOP_BODY)

    def _with_body(self, method: str, path: str, body: str) -> bytes:
        raw = body.encode()
        return (
            f"{method} {path} HTTP/1.1\r\n{self.head}Content-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n"
        ).encode() + raw

    def _get(self) -> bytes:
        path = f"/api/db/{self.collection}/{self.picker.id()}"
        return f"GET {path} HTTP/1.1\r\n{self.head}\r\n".encode()

    def next(self) -> bytes:
        sc = self.scenario
        if sc in ("get_uniform", "get_zipf"):
            return self._get()
        if sc in ("create", "create_schema6"):
            return self.create
        if sc in ("agg_group", "agg_group_schema"):
            return self.agg_group
        if sc == "agg_memory":
            return self.agg_top if self.rng.random() * 100 < AGG_TOP_PCT else self.agg_group
        if sc == "search":
            words = search.QUERY_WORDS
            body = search.body(self.rng.choice(words), self.rng.choice(words))
            return self._with_body("POST", "/api/db/search", body)
        if sc == "list_indexed":
            body = list_body(self.rng.randrange(LIST_GROUPS), self.rng.randint(0, LIST_MAX_K))
            return self._with_body("POST", f"/api/db/{self.collection}/query", body)
        if sc == "query":
            g = group_value(self.rng.randrange(self.groups))
            return self._with_body("POST", f"/api/db/{self.collection}/query", query_body(g))
        if sc == "mixed":
            if self.rng.random() * 100 < WRITE_PCT:
                path = f"/api/db/{self.collection}/{self.picker.id()}"
                return self._with_body("PUT", path, INC_BODY)
            return self._get()
        raise ValueError(f"unknown scenario {sc!r}")


def percentiles(sorted_vals: list[float], scale: float = 1e3) -> dict[str, float]:
    """Nearest-rank p50/p90/p99/p99.9/max/mean of sorted seconds, in ms (scale 1e3)."""

    def pct(p: float) -> float:
        if not sorted_vals:
            return 0.0
        k = min(len(sorted_vals) - 1, max(0, math.ceil(p / 100 * len(sorted_vals)) - 1))
        return sorted_vals[k] * scale

    n = len(sorted_vals)
    return {
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "p999_ms": pct(99.9),
        "max_ms": (sorted_vals[-1] if n else 0.0) * scale,
        "mean_ms": (sum(sorted_vals) / n if n else 0.0) * scale,
    }
