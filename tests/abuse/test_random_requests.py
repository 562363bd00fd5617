"""Randomized requests against every endpoint of a real ``dbproxy serve``: methods x paths of the
README's API table, random JSON bodies, query strings and headers (If-Match, Idempotency-Key and
X-Transaction-Id garbage included), on PostgreSQL and on the embedded store, open and with
policies. No answer may be a 5xx, and every 4xx carries the JSON error envelope."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import PG_ADMIN_DSN, _admin
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

POLICIES = Path(__file__).resolve().parents[2] / "policies"
EXAMPLES = 200  # per configuration; each example sends 1-3 requests (~20 s for all five)
REQUEST_TIMEOUT = 30.0  # seconds; a request that takes longer is a finding too
CODE_RE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
TOKENS = ["billing-dev-token", "admin-dev-token", "analytics-dev-token", "nope", ""]
TENANTS = ["t1", "t2", "", "' OR 1=1 --"]
SEED_IDS = ["seed1", "seed2"]

# -- strategies ----------------------------------------------------------------------------

OPERATORS = [
    "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$type", "$regex",
    "$options", "$all", "$size", "$elemMatch", "$not", "$and", "$or", "$nor", "$where", "$expr",
    "$set", "$unset", "$inc", "$mul", "$min", "$max", "$push", "$pull", "$addToSet", "$rename",
    "$each", "$ref", "$foo", "$",
]  # fmt: skip
FIELDS = [
    "name", "age", "tags", "a", "a.b", "a.0", "a.0.b", "tags.1", "_id", "_version", "tenant_id",
    "amount", "status", "secret_note", "password_hash", "region", "x.y.z", "", ".", "a..b",
    "a.$", "1", "a.99999999999999999999", "\u00e9", "a\u0000b", 'q"uote', "back\\slash",
]  # fmt: skip
NASTY_SCALARS = [
    2**63, 2**64, -(2**63) - 1, 10**30, 1e308, -1e308, 5e-324, 0.1, -0.0, 1099511627776,
    "", "\u0000", "\ud7ff", "'; DROP TABLE x; --", "(a+)+$", "^(a|aa)*$", "%", "_", "*",
    "2026-01-01T00:00:00Z", "9223372036854775813",
]  # fmt: skip


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], odds: int = 6) -> Any:
    """``good``, and one time in ``odds`` ``bad``."""
    return st.integers(0, odds - 1).flatmap(lambda i: bad if i == 0 else good)


keys = st.sampled_from(FIELDS + OPERATORS) | st.text(max_size=6)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.sampled_from(NASTY_SCALARS)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
QUERY_OPS = [o for o in OPERATORS if o not in ("$set", "$unset", "$rename", "$each")]
UPDATE_OPS = ["$set", "$unset", "$inc", "$mul", "$min", "$max", "$push", "$pull", "$addToSet",
              "$rename", "$setOnInsert", "$foo", "$each"]  # fmt: skip
SANE_FIELDS = ["name", "age", "tags", "n", "a.b", "a.0.b", "tenant_id", "amount", "status"]
numbers = st.sampled_from([1, -1, 0, 0.5, 1e308, -1e308, 2**63, 10**30, 1099511627776]) | (
    st.integers() | st.floats(allow_nan=False, allow_infinity=False)
)
operands = mostly(scalars | numbers, values, 3)
field_names = mostly(st.sampled_from(SANE_FIELDS), st.sampled_from(FIELDS) | st.text(max_size=6))
conditions = st.dictionaries(
    st.sampled_from(QUERY_OPS), operands, min_size=1, max_size=2
) | st.fixed_dictionaries(
    {"$regex": st.sampled_from(["^a", "a.*b", "(a+)+$", "[", "\\", ""]) | scalars},
    optional={"$options": st.sampled_from(["i", "imsx", "g", ""]) | scalars},
)
filters = st.recursive(
    st.dictionaries(field_names, operands | conditions, max_size=3),
    lambda inner: st.dictionaries(
        st.sampled_from(["$and", "$or", "$nor", "$not"]), st.lists(inner, max_size=3) | inner,
        min_size=1, max_size=2,
    ) | st.dictionaries(field_names, st.dictionaries(st.sampled_from(["$elemMatch", "$not"]),
                                                    inner, min_size=1), max_size=2),
    max_leaves=6,
)  # fmt: skip
documents = st.dictionaries(field_names, values, max_size=5)
updates = st.dictionaries(
    st.sampled_from(UPDATE_OPS),
    st.dictionaries(
        field_names, operands | conditions | st.fixed_dictionaries({"$each": values}), min_size=1
    ),
    min_size=1,
    max_size=2,
)


collections = mostly(
    st.sampled_from(["fz", "invoices", "users", "sessions", "payments_eu", "profile_a", "orders"]),
    st.sampled_from(["health", "transaction", "stats", "_bad", "a" * 64, "x-y", "..", "caf\u00e9"])
    | st.text(min_size=1, max_size=8),
)
ids = mostly(
    st.sampled_from([*SEED_IDS, "nope"]),
    st.sampled_from(["a/b", "..", "a" * 300, "9" * 5000, "%00"]) | st.text(min_size=1, max_size=12),
    odds=3,
)
sorts = (
    st.sampled_from(["-age,name", "name", "-_id", "a.b", "", ",", "-", "age,-age"])
    | st.dictionaries(field_names, st.sampled_from([1, -1, 0, 2, "x"]), max_size=2)
    | values
)
listing = st.fixed_dictionaries(
    {},
    optional={
        "filter": filters,
        "sort": sorts,
        "limit": st.integers(-2, 2000) | scalars,
        "skip": st.integers(-2, 2**40) | scalars,
        "fields": st.sampled_from(["name,age", "a.b", "", "_id", "secret_note"]) | values,
        "next": st.text(max_size=20) | scalars,
    },
)
transaction_ops = st.fixed_dictionaries(
    {"op": st.sampled_from(["create", "get", "replace", "update", "patch", "delete", "query",
                            "count", "drop", "", 1])},
    optional={
        "collection": collections,
        "id": ids | values,
        "document": documents | st.just({"$ref": 0}) | values,
        "update": updates,
        "patch": documents,
        "filter": filters,
        "if_match": st.integers(-1, 3) | scalars,
        "upsert": st.booleans() | scalars,
        "limit": scalars,
        "fields": values,
    },
)  # fmt: skip
batches = st.fixed_dictionaries(
    {"operations": st.lists(transaction_ops, max_size=4) | values},
    optional={"isolation": st.sampled_from(["serializable", "read_committed", "x"]) | scalars},
)
actions = st.fixed_dictionaries(
    {"action": st.sampled_from(["begin", "begin", "commit", "rollback", "abort", ""]) | scalars},
    optional={"transaction_id": ids | scalars, "isolation": scalars},
)
raw_bodies = st.binary(max_size=40) | st.sampled_from(
    [b"[]", b"{}", b"null", b"NaN", b"1e999", b'"\\ud800"', b'{"a":1,"a":2}', b"[" * 40 + b"]" * 40,
     b'{"a": "\\u0000"}', b"\xff\xfe", b'{"n": 123456789012345678901234567890}',
     b'{"$inc": {"n": 1e308}}', b'{"n": 1e400}']
)  # fmt: skip
any_body = st.none() | values | raw_bodies | documents | updates | batches | actions | listing
# the query string of a listing: JSON for filter/sort objects, as the README shows
listing_queries = listing.map(
    lambda d: {k: v if isinstance(v, str) else json.dumps(v) for k, v in d.items()}
)
any_query = st.dictionaries(
    st.sampled_from(["filter", "sort", "limit", "skip", "fields", "next", "upsert", "service",
                     "collection", "since", "until", "after", "scope", "x"]),
    values.map(json.dumps) | st.text(max_size=12),
    max_size=3,
)  # fmt: skip
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24
) | st.sampled_from(['"1"', '"0"', '"-1"', '"9223372036854775813"', "*", 'W/"1"', '"1", "2"'])
HEADER_VALUES: dict[str, st.SearchStrategy[str]] = {
    "If-Match": mostly(st.sampled_from(['"1"', '"2"', '"3"']), header_text, 3),
    "Idempotency-Key": mostly(st.sampled_from(["k1", "k2", "k3"]), header_text, 3),
    "X-Transaction-Id": header_text,
    "X-Read-Preference": mostly(st.sampled_from(["primary", "secondary", "nearest"]), header_text),
    "X-Consistency-Token": mostly(st.sampled_from(["0/0", "FFFFFFFF/FFFFFFFF"]), header_text),
    "X-Request-Id": header_text,
    "X-Tenant-Id": mostly(st.sampled_from(TENANTS), header_text),
    "Authorization": mostly(st.sampled_from([f"Bearer {t}" for t in TOKENS]), header_text),
    "Content-Type": mostly(st.sampled_from(["application/json", "text/plain"]), header_text),
}
headers = st.lists(st.sampled_from(list(HEADER_VALUES)), max_size=2, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({n: HEADER_VALUES[n] for n in names})
)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
MONITOR = ["health", "stats", "performance", "connections", "audit"]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any

    def target(self) -> str:
        return self.path + ("?" + urlencode(self.query) if self.query else "")

    def payload(self) -> bytes | None:
        if self.body is None:
            return None
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


def endpoint(
    draw: st.DrawFn, method: str, path: str, body: st.SearchStrategy[Any], query: Any = None
) -> Request:
    """One request aimed at an endpoint of the API table; now and then with a wrong method,
    body or query string."""
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(METHODS))
    chosen = draw(body if draw(st.integers(0, 5)) else any_body)
    if query is not None and draw(st.integers(0, 3)):
        q = draw(query)
    else:
        q = draw(mostly(st.just({}), any_query, 3))
    return Request(method, path, q, draw(headers), chosen)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    coll = quote(draw(collections), safe="")
    doc = f"/api/db/{coll}/{quote(draw(ids), safe='')}"
    kind = draw(st.integers(0, 13))
    if kind == 0:
        return endpoint(
            draw, "POST", f"/api/db/{coll}", documents | st.lists(documents, max_size=3)
        )
    if kind == 1:
        return endpoint(
            draw, "GET", doc, st.none(), st.fixed_dictionaries({"fields": values.map(str)})
        )
    if kind in (2, 3):
        q = st.fixed_dictionaries({"upsert": st.sampled_from(["true", "false", "1", "x"])})
        return endpoint(draw, "PUT", doc, updates | documents, q)
    if kind == 4:
        return endpoint(draw, "PATCH", doc, documents)
    if kind == 5:
        return endpoint(draw, "DELETE", doc, st.none())
    if kind in (6, 7):
        return endpoint(draw, "GET", f"/api/db/{coll}", st.none(), listing_queries)
    if kind == 8:
        return endpoint(draw, "POST", f"/api/db/{coll}/query", listing)
    if kind == 9:
        return endpoint(draw, "GET", f"/api/db/{coll}/count", st.none(), listing_queries)
    if kind == 10:
        return endpoint(draw, "POST", "/api/db/transaction", batches | actions)
    if kind == 11:
        path = draw(st.sampled_from([*(f"/api/db/{m}" for m in MONITOR), "/metrics"]))
        return endpoint(draw, "GET", path, st.none())
    if kind == 12:  # any path at all
        parts = draw(st.lists(st.text(max_size=6), max_size=4))
        return endpoint(draw, "GET", "/" + "/".join(quote(p, safe="") for p in parts), any_body)
    return endpoint(draw, draw(st.sampled_from(METHODS)), doc, any_body)


# -- the client ----------------------------------------------------------------------------


@dataclass
class Fuzzer:
    server: Server
    base_headers: dict[str, str]
    problems: list[str] = field(default_factory=list)
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    slowest: float = 0.0
    _conn: http.client.HTTPConnection | None = None

    def send(self, req: Request) -> tuple[int, bytes, dict[str, str]]:
        headers = {**self.base_headers, **req.headers}
        target, body = req.target(), req.payload()
        for attempt in range(2):
            if self._conn is None:
                parts = urlsplit(self.server.url)
                self._conn = http.client.HTTPConnection(
                    parts.hostname or "", parts.port, timeout=REQUEST_TIMEOUT
                )
            started = time.monotonic()
            try:
                self._conn.request(req.method, target, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.HTTPException) as exc:
                self._conn.close()
                self._conn = None
                if attempt == 0 and self.server.proc.poll() is None:
                    continue  # the server closed a kept-alive connection: once more
                self.problems.append(f"no answer ({exc!r}) to {req}")
                return 0, b"", {}
            except TimeoutError:
                self._conn.close()
                self._conn = None
                self.problems.append(f"no answer within {REQUEST_TIMEOUT} s to {req}")
                return 0, b"", {}
            took = time.monotonic() - started
            self.slowest = max(self.slowest, took)
            if resp.getheader("Connection", "").lower() == "close":
                self._conn.close()
                self._conn = None
            self.sent += 1
            self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
            self.check(req, resp.status, data, dict(resp.getheaders()))
            return resp.status, data, dict(resp.getheaders())
        raise AssertionError("unreachable")

    def check(self, req: Request, status: int, data: bytes, resp_headers: dict[str, str]) -> None:
        if status >= 500:
            self.problems.append(f"{status} {data[:300]!r} for {req}")
            return
        if status < 400 or req.method == "HEAD":
            return
        try:
            error = json.loads(data)["error"]
            code, message, rid = error["code"], error["message"], error["request_id"]
        except (ValueError, KeyError, TypeError):
            self.problems.append(f"{status} without the error envelope: {data[:200]!r} for {req}")
            return
        self.codes[str(code)] = self.codes.get(str(code), 0) + 1
        if not (isinstance(code, str) and CODE_RE.match(code)):
            self.problems.append(f"{status} with a code that is not snake_case: {code!r} for {req}")
        if not isinstance(message, str) or not message:
            self.problems.append(f"{status} {code} without a message for {req}")
        if not isinstance(rid, str) or not rid or rid != resp_headers.get("X-Request-Id", rid):
            self.problems.append(f"{status} {code} with request_id {rid!r} for {req}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def known_holes(home: str, number: str) -> list[Request]:
    """The inputs the adversarial review of issue 13 found (items 6 and 12), sent first, to a
    collection ``home`` the caller may use, ``number`` a field it may write."""
    j = {"Content-Type": "application/json"}
    coll, doc1, doc2 = f"/api/db/{home}", f"/api/db/{home}/seed1", f"/api/db/{home}/seed2"

    def query(flt: Any) -> Request:
        return Request("POST", f"{coll}/query", {}, j, {"filter": flt})

    return [
        query({"name": {"$options": None}}),
        query({"name": {"$not": {"$options": None}}}),
        query({"a": {"$elemMatch": {"$options": None}}}),
        Request("PUT", doc1, {}, j, {"$pull": {"tags": {"$options": None}}}),
        query({"a." + "9" * 5000: 1}),
        Request("GET", doc1, {"fields": "a." + "9" * 5000}, {}, None),
        query({"tags": {"$size": 1099511627776}}),
        Request("PUT", doc1, {}, {**j, "If-Match": '"9223372036854775813"'}, {"$set": {number: 1}}),
        *(Request("GET", doc2, {}, {}, None) for _ in range(4)),
        *(Request("PUT", doc2, {}, j, {"$inc": {number: 1e308}}) for _ in range(2)),
        Request("GET", doc2, {"fields": number}, {}, None),
        Request("GET", coll, {"fields": number}, {}, None),
        Request("GET", coll, {}, {}, None),
        Request("GET", f"{coll}/" + "x" * 20000, {}, {}, None),
        Request("GET", coll, {}, {"X-Big": "y" * 20000}, None),
    ]


def transaction_of(data: bytes) -> str | None:
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    tid = doc.get("transaction_id") if isinstance(doc, dict) else None
    return tid if isinstance(tid, str) else None


def fuzz(server: Server, base_headers: dict[str, str], home: str, number: str) -> Fuzzer:
    """Seed a few documents, send the known holes, then the random requests; returns what
    was found."""
    fuzzer = Fuzzer(server, base_headers)
    seed_headers = {"X-Tenant-Id": "t1", "Content-Type": "application/json"}
    shapes = [  # the first a policy lets the caller write is stored
        {"name": "s", "tenant_id": "t1", "region": "eu", "a": [{"b": 1}], "tags": ["x"], "n": 1},
        {"tenant_id": "t1", "amount": 1, "status": "open"},
        {"name": "s", "tenant_id": "t1", "age": 1, "tags": ["x"]},
    ]
    for coll in ("fz", "invoices", "users", "sessions", "payments_eu", "orders"):
        for sid in SEED_IDS:
            for shape in shapes:
                doc = {"_id": sid, **shape}
                status, _, _ = fuzzer.send(
                    Request("POST", f"/api/db/{coll}", {}, seed_headers, doc)
                )
                if status != 403:
                    break

    for req in known_holes(home, number):
        fuzzer.send(req)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # bounded: collect findings, no shrinking
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(requests(), min_size=1, max_size=3), st.booleans())
    def run(batch: list[Request], use_transaction: bool) -> None:
        opened: list[str] = []
        for req in batch:
            if use_transaction and opened:
                req.headers["X-Transaction-Id"] = opened[-1]
            status, data, _ = fuzzer.send(req)
            if req.path == "/api/db/transaction" and status == 201:
                tid = transaction_of(data)
                if tid is not None and tid.isascii() and tid.isprintable():
                    opened.append(tid)
        for tid in opened:  # never leave a begun transaction holding a connection
            fuzzer.send(
                Request(
                    "POST",
                    "/api/db/transaction",
                    {},
                    {"Content-Type": "application/json"},
                    {"action": "rollback", "transaction_id": tid},
                )
            )

    try:
        run()
        # and the server still answers plainly afterwards
        status, _, _ = fuzzer.send(Request("GET", "/api/db/health", {}, {}, None))
        if status != 200:
            fuzzer.problems.append(f"health answers {status} after the fuzzing")
    finally:
        fuzzer.close()
    if server.proc.poll() is not None:
        fuzzer.problems.append(f"the server exited ({server.proc.returncode})")
    return fuzzer


def report(fuzzer: Fuzzer) -> str:
    distinct: dict[str, str] = {}
    for p in fuzzer.problems:  # one line per kind of answer and request
        answer, _, req = p.partition(" for Request(")
        distinct.setdefault(answer[:24] + req[:90], p[:400])
    shown = "\n".join(list(distinct.values())[:12])
    return (
        f"{len(fuzzer.problems)} findings in {fuzzer.sent} requests "
        f"(statuses {sorted(fuzzer.statuses.items())}; codes "
        f"{sorted(fuzzer.codes.items(), key=lambda kv: -kv[1])}):\n{shown}"
    )


@pytest.fixture(scope="module")
def fuzz_dsn() -> Iterator[str]:
    """A database of the module's own on the machine's server (the fuzzer writes to the
    policies' collection names, which other e2e tests read), dropped afterwards."""
    name = f"dbproxy_fuzz_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_ADMIN_DSN.rpartition('/')[0]}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


BILLING = {"Authorization": "Bearer billing-dev-token", "X-Tenant-Id": "t1"}
CONFIGS: dict[str, tuple[list[str], dict[str, str], str, str]] = {  # args, headers, home, number
    "postgresql-open": ([], {}, "fz", "n"),
    "postgresql-sidecar-billing": (
        ["--service", "billing"],
        {"X-Tenant-Id": "t1"},
        "invoices",
        "amount",
    ),
    "embedded-open": ([], {}, "fz", "n"),
    "embedded-sidecar-users": (["--service", "users"], {}, "users", "age"),
    "postgresql-token": ([], BILLING, "invoices", "amount"),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_random_requests_never_answer_5xx(
    config: str, launch: Callable[..., Server], fuzz_dsn: str, tmp_path: Path
) -> None:
    extra, base_headers, home, number = CONFIGS[config]
    args = list(extra)
    if config.startswith("postgresql"):
        args += ["--database", fuzz_dsn]
    else:
        args += ["--data-dir", str(tmp_path / "data")]
    if "sidecar" in config or "token" in config:
        policies = tmp_path / "policies"
        shutil.copytree(POLICIES, policies)
        args += ["--policies", str(policies)]
    server = launch(*args, env={"DBPROXY_LOG_LEVEL": "WARNING"})
    fuzzer = fuzz(server, base_headers, home, number)
    assert fuzzer.sent >= EXAMPLES
    assert fuzzer.problems == [], report(fuzzer)
