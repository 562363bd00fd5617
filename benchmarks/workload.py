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


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    collection: str
    method: str  # of the main request (mixed: of the read)
    reset: str | None  # before every round: "truncate" (table emptied) | "checkpoint" | None
    description: str
    baseline_sql: str


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
