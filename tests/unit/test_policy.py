"""Tests of proxy/policy.py: the example policies, the compiled lookups, the loader's problems."""

from __future__ import annotations

import fnmatch
import json
import math
import re
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import ConfigError, Forbidden
from proxy.policy import (
    COST_KEYS,
    GLOB_CACHE_SIZE,
    OPERATION_ORDER,
    OPERATIONS,
    REDIS_FAILURE_MODES,
    RESERVED_COLLECTIONS,
    FieldRule,
    Grant,
    Limits,
    PolicySet,
    RateSpec,
    RowRule,
    ServicePolicy,
    check_directory,
    hash_token,
    is_glob,
    load_policies,
)
from proxy.policy import model as policy_module

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
SCHEMA = json.loads((ROOT / "docs" / "policy.schema.json").read_text(encoding="utf-8"))

# The example tokens (their hashes are in policies/*.yaml).
TOKENS = {
    "billing": ["billing-dev-token"],
    "analytics": ["analytics-dev-token", "analytics-next-token"],
    "admin": ["admin-dev-token"],
    "users": [],
}


@pytest.fixture(scope="module")
def examples() -> PolicySet:
    return load_policies(POLICIES)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(directory: Path, **caps: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_policies(directory, **caps)
    return info.value.problems


MINIMAL = """
service: {name}
grants:
  - collections: [things]
    operations: [read]
"""
S = MINIMAL.format(name="s")


# --------------------------------------------------------------------------- the examples


def test_examples_load(examples: PolicySet) -> None:
    assert sorted(examples.services) == ["admin", "analytics", "billing", "users"]
    for name, policy in examples.services.items():
        assert policy.service == name
        assert examples.get(name) is policy
        assert len(policy.token_hashes) == len(TOKENS[name])
    assert examples.get("nobody") is None
    assert examples.has_tokens


def test_example_limits(examples: PolicySet) -> None:
    billing = examples.services["billing"].limits
    assert billing.rate == RateSpec(per_second=50.0, burst=100)
    assert dict(billing.operations) == {"aggregate": RateSpec(per_second=2.0, burst=5)}
    assert billing.costs["aggregate"] == 10
    assert billing.costs["search"] == 5
    assert billing.costs["list_per_100_rows"] == 1
    assert billing.costs["read"] == 1
    assert set(billing.costs) == set(COST_KEYS)
    assert billing.max_in_flight == 32
    assert billing.statement_timeout_seconds == 2.0
    assert billing.max_rows == 500
    assert billing.redis_failure == "fail_open"
    analytics = examples.services["analytics"].limits
    assert analytics.rate == RateSpec(per_second=10.0, burst=50)  # per_minute: 600
    assert analytics.operations["search"] == RateSpec(per_second=2.0, burst=5)
    assert examples.services["users"].limits.redis_failure == "fail_closed"
    admin = examples.services["admin"].limits
    assert dict(admin.costs) == dict.fromkeys(COST_KEYS, 1.0)
    assert admin.operations == {}


def test_example_descriptions(examples: PolicySet) -> None:
    assert examples.services["billing"].description.startswith("Invoicing")


# The expected decision for every example service x collection x operation. X = allowed.
# Columns: read list count create update delete aggregate search transaction schema migrate
# migrate_sql monitor (OPERATION_ORDER).
GRID = """
service   collection    read list cnt  crt  upd  del  agg  srch txn  schm migr msql mon
billing   invoices      X    X    X    X    X    X    X    .    X    .    .    .    .
billing   payments_eu   X    X    X    X    X    X    .    .    X    .    .    .    .
billing   payments      .    .    .    .    .    .    .    .    .    .    .    .    .
billing   users         X    X    .    .    .    .    .    .    .    .    .    .    .
billing   sessions      .    .    .    .    .    .    .    .    .    .    .    .    .
billing   events_web    .    .    .    .    .    .    .    .    .    .    .    .    .
billing   profile_main  .    .    .    .    .    .    .    .    .    .    .    .    .
billing   orders        .    .    .    .    .    .    .    .    .    .    .    .    .
billing   Invoices      .    .    .    .    .    .    .    .    .    .    .    .    .
users     invoices      .    .    .    .    .    .    .    .    .    .    .    .    .
users     payments_eu   .    .    .    .    .    .    .    .    .    .    .    .    .
users     payments      .    .    .    .    .    .    .    .    .    .    .    .    .
users     users         X    X    X    X    X    X    .    X    X    X    .    .    .
users     sessions      X    X    X    X    X    X    .    X    X    .    .    .    .
users     events_web    .    .    .    .    .    .    .    .    .    .    .    .    .
users     profile_main  X    X    .    X    X    X    .    .    .    .    .    .    .
users     orders        .    .    .    .    .    .    .    .    .    .    .    .    .
users     Invoices      .    .    .    .    .    .    .    .    .    .    .    .    .
analytics invoices      .    X    X    .    .    .    X    .    .    .    .    .    X
analytics payments_eu   .    X    X    .    .    .    X    .    .    .    .    .    X
analytics payments      .    .    .    .    .    .    .    .    .    .    .    .    X
analytics users         .    .    X    .    .    .    X    .    .    .    .    .    X
analytics sessions      .    .    .    .    .    .    .    .    .    .    .    .    X
analytics events_web    X    X    X    .    .    .    X    X    .    .    .    .    X
analytics profile_main  .    .    .    .    .    .    .    .    .    .    .    .    X
analytics orders        .    .    .    .    .    .    .    .    .    .    .    .    X
analytics Invoices      .    .    .    .    .    .    .    .    .    .    .    .    X
admin     invoices      .    .    X    .    .    .    .    .    .    X    X    .    X
admin     payments_eu   .    .    X    .    .    .    .    .    .    X    X    .    X
admin     payments      .    .    X    .    .    .    .    .    .    X    X    .    X
admin     users         X    X    X    .    .    .    .    .    .    X    X    .    X
admin     sessions      .    .    X    .    .    .    .    .    .    X    X    .    X
admin     events_web    .    .    X    .    .    .    .    .    .    X    X    .    X
admin     profile_main  .    .    X    .    .    .    .    .    .    X    X    .    X
admin     orders        .    .    X    .    .    .    .    .    .    X    X    .    X
admin     Invoices      .    .    X    .    .    .    .    .    .    X    X    .    X
"""
COLUMNS = (
    "read",
    "list",
    "cnt",
    "crt",
    "upd",
    "del",
    "agg",
    "srch",
    "txn",
    "schm",
    "migr",
    "msql",
    "mon",
)


def _grid() -> list[tuple[str, str, str, bool]]:
    lines = [line.split() for line in GRID.strip().splitlines()]
    header, rows = lines[0], lines[1:]
    assert tuple(header[2:]) == COLUMNS and len(COLUMNS) == len(OPERATION_ORDER)
    cells = []
    for service, collection, *marks in rows:
        assert len(marks) == len(OPERATION_ORDER) and set(marks) <= {"X", "."}
        for operation, mark in zip(OPERATION_ORDER, marks, strict=True):
            cells.append((service, collection, operation, mark == "X"))
    return cells


CELLS = _grid()


def test_grid_covers_every_service_and_collection(examples: PolicySet) -> None:
    services = {s for s, _, _, _ in CELLS}
    collections = {c for _, c, _, _ in CELLS}
    assert services == set(examples.services)
    assert len(CELLS) == len(services) * len(collections) * len(OPERATIONS)


@pytest.mark.parametrize(("service", "collection", "operation", "expected"), CELLS)
def test_grid(
    examples: PolicySet, service: str, collection: str, operation: str, expected: bool
) -> None:
    policy = examples.services[service]
    assert policy.allowed(collection, operation) is expected
    assert policy.allowed(collection, operation) is expected  # second time from the tables
    assert (operation in policy.operations(collection)) is expected


def test_unknown_operation_is_never_allowed(examples: PolicySet) -> None:
    for policy in examples.services.values():
        assert not policy.allowed("users", "drop")
        assert not policy.allowed("users", "")


@pytest.mark.parametrize(
    ("service", "allowed"),
    [
        ("billing", set()),
        ("users", set()),
        ("analytics", {"monitor"}),
        ("admin", {"count", "schema", "migrate", "monitor"}),
    ],
)
def test_service_wide_operations(examples: PolicySet, service: str, allowed: set[str]) -> None:
    policy = examples.services[service]
    assert {op for op in OPERATIONS if policy.allowed_service_wide(op)} == allowed


# --------------------------------------------------------------------------- globs


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("payments_*", "payments_eu", True),
        ("payments_*", "payments_", True),
        ("payments_*", "payments", False),
        ("payments_*", "Payments_eu", False),
        ("events_??", "events_eu", True),
        ("events_??", "events_e", False),
        ("events_??", "events_eur", False),
        ("log_[a-c]*", "log_b2", True),
        ("log_[a-c]*", "log_d2", False),
        ("log_[!a-c]*", "log_d2", True),
        ("log_[!a-c]*", "log_a", False),
        ("*", "anything", True),
        ("*_archive", "orders_archive", True),
        ("*_archive", "orders_archive2", False),
    ],
)
def test_globs(pattern: str, name: str, matches: bool) -> None:
    policy = ServicePolicy("svc", (Grant((pattern,), frozenset({"read"})),))
    assert policy.allowed(name, "read") is matches
    assert policy.allowed(name, "list") is False


def test_grants_add_up_over_exact_names_and_globs() -> None:
    policy = ServicePolicy(
        "svc",
        (
            Grant(("invoices",), frozenset({"read"})),
            Grant(("inv*",), frozenset({"list"})),
            Grant(("*",), frozenset({"count"})),
        ),
    )
    assert policy.operations("invoices") == {"read", "list", "count"}
    assert policy.operations("inventory") == {"list", "count"}
    assert policy.operations("orders") == {"count"}


def test_is_glob() -> None:
    assert is_glob("a*") and is_glob("a?") and is_glob("[ab]")
    assert not is_glob("invoices")


def test_glob_cache_is_bounded_and_each_name_is_matched_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    resolve = policy_module._Tables.resolve

    def counting(self: Any, name: str) -> Any:
        calls.append(name)
        return resolve(self, name)

    policy = ServicePolicy(
        "svc",
        (Grant(("events_*",), frozenset({"read"})), Grant(("users",), frozenset({"read"}))),
    )
    monkeypatch.setattr(policy_module._Tables, "resolve", counting)
    for _ in range(3):
        assert policy.allowed("events_a", "read")
        assert policy.allowed("users", "read")  # exact: compiled at load, never resolved
        assert not policy.allowed("orders", "read")
    assert calls == ["events_a", "orders"]

    names = [f"events_{i}" for i in range(GLOB_CACHE_SIZE + 500)]
    for name in names:
        assert policy.allowed(name, "read")
    cache = policy._tables.cache
    assert len(cache) == GLOB_CACHE_SIZE
    assert "events_0" not in cache  # the oldest went first
    assert names[-1] in cache
    assert "users" not in cache
    # evicted names still answer right (resolved again)
    assert policy.allowed("events_0", "read")
    assert not policy.allowed("nothing_here", "read")
    assert len(cache) == GLOB_CACHE_SIZE


# --------------------------------------------------------------------------- rules


def test_row_rules_from_a_header(examples: PolicySet) -> None:
    (rule,) = examples.services["billing"].row_rules("invoices")
    assert rule == RowRule("tenant_id", header="X-Tenant-Id")
    assert rule.resolve({"X-Tenant-Id": "t-1"}) == "t-1"
    assert rule.resolve({"x-tenant-id": "t-2"}) == "t-2"  # plain dict, other case
    assert rule.resolve({"Accept": "*/*", "X-TENANT-ID": "t-3"}) == "t-3"
    for headers in ({}, {"X-Tenant-Id": ""}, {"X-Tenant": "t-1"}):
        with pytest.raises(Forbidden) as info:
            rule.resolve(headers)
        assert info.value.status == 403
        assert info.value.code == "missing_row_header"
        assert "X-Tenant-Id" in info.value.message


def test_row_rules_fixed_values(examples: PolicySet) -> None:
    billing = examples.services["billing"]
    assert billing.row_rules("payments_eu") == (RowRule("region", value="eu"),)
    assert billing.row_rules("payments_eu")[0].resolve({}) == "eu"
    assert billing.row_rules("payments") == ()
    assert billing.row_rules("orders") == ()
    analytics = examples.services["analytics"]
    assert analytics.row_rules("events_web") == (RowRule("environment", value="production"),)
    assert examples.services["users"].row_rules("users") == ()


def test_rule_precedence_exact_then_first_glob(tmp_path: Path) -> None:
    write(
        tmp_path,
        "svc.yaml",
        """
        service: svc
        grants:
          - collections: ["*"]
            operations: [read]
        rows:
          "inv*": {a: {value: 1}}
          "*": {b: {value: 2}}
          invoices: {c: {value: 3}}
          "*_x": {d: {value: 4}}
        fields:
          "*": {readable: [star]}
          "inv*": {readable: [inv]}
          invoices: {readable: [exact]}
        """,
    )
    policy = load_policies(tmp_path).services["svc"]
    assert policy.row_rules("invoices") == (RowRule("c", value=3),)
    assert policy.row_rules("inventory") == (RowRule("a", value=1),)
    assert policy.row_rules("orders") == (RowRule("b", value=2),)
    assert policy.row_rules("orders_x") == (RowRule("b", value=2),)  # "*" is listed first
    assert policy.field_rule("invoices") == FieldRule(frozenset({"exact"}), frozenset({"exact"}))
    assert policy.field_rule("inventory") == FieldRule(frozenset({"star"}), frozenset({"star"}))


def test_field_rule_readable_only(examples: PolicySet) -> None:
    rule = examples.services["billing"].field_rule("users")
    assert rule is not None
    assert rule.readable == frozenset({"_id", "name", "email", "tenant_id"})
    assert rule.writable == rule.readable  # writable defaults to readable
    for path in ("name", "email", "tenant_id", "_id", "_version", "name.first"):
        assert rule.can_read(path), path
    for path in ("address", "address.city", "password_hash", "names", "nam", ""):
        assert not rule.can_read(path), path
    assert rule.can_write("name")
    assert not rule.can_write("password_hash")


def test_field_rule_writable_only(examples: PolicySet) -> None:
    rule = examples.services["billing"].field_rule("invoices")
    assert rule is not None and rule.readable is None
    assert rule.can_read("anything.at.all")
    assert rule.can_write("amount")
    assert rule.can_write("lines.0.qty")
    assert not rule.can_write("notes")
    assert not rule.can_write("tenant")


def test_field_rule_sub_fields(examples: PolicySet) -> None:
    rule = examples.services["analytics"].field_rule("users")
    assert rule is not None
    assert rule.can_read("address.country")
    assert rule.can_read("address.country.code")
    assert not rule.can_read("address")  # would show address.city too
    assert not rule.can_read("address.city")
    assert not rule.can_read("name")


def test_field_rule_globs_and_absence(examples: PolicySet) -> None:
    users = examples.services["users"]
    rule = users.field_rule("profile_main")
    assert rule is not None
    assert rule.can_read("settings.theme") and not rule.can_read("email")
    assert rule.can_write("avatar") and not rule.can_write("_owner")
    assert users.field_rule("sessions") is None
    assert examples.services["billing"].field_rule("payments_eu") is None


def test_field_rule_unrestricted() -> None:
    rule = FieldRule()
    assert rule.can_read("x.y") and rule.can_write("x.y")


def test_empty_readable_shows_only_id_and_version() -> None:
    rule = FieldRule(readable=frozenset(), writable=frozenset())
    assert rule.can_read("_id") and rule.can_read("_version")
    assert not rule.can_read("name")
    assert not rule.can_write("name")


# --------------------------------------------------------------------------- tokens


def test_hash_token() -> None:
    assert (
        hash_token("password")
        == "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    )


@pytest.mark.parametrize(
    ("service", "token"), [(s, t) for s, tokens in TOKENS.items() for t in tokens]
)
def test_token_lookup(examples: PolicySet, service: str, token: str) -> None:
    policy = examples.by_token(token)
    assert policy is not None and policy.service == service
    assert hash_token(token) in policy.token_hashes


@pytest.mark.parametrize(
    "token",
    [
        "",
        "wrong",
        "billing-dev-token ",
        " billing-dev-token",
        "Billing-dev-token",
        "billing-dev-toke",
        "users-dev-token",  # users has no token: sidecar mode only
        hash_token("billing-dev-token"),  # the hash is not the token
        "fc0190e2449cb4e3a240e925996688bf63ab6306e827a9613d07a6d2a8f75a8a",
    ],
)
def test_wrong_or_unknown_tokens(examples: PolicySet, token: str) -> None:
    assert examples.by_token(token) is None


def test_token_mode_is_optional() -> None:
    policies = PolicySet({"svc": ServicePolicy("svc", (Grant(("a",), frozenset({"read"})),))})
    assert not policies.has_tokens
    assert policies.by_token("anything") is None


def test_policy_set_refuses_a_shared_hash() -> None:
    shared = frozenset({hash_token("t")})
    grants = (Grant(("a",), frozenset({"read"})),)
    with pytest.raises(ValueError, match="share a token hash"):
        PolicySet(
            {
                "a": ServicePolicy("a", grants, token_hashes=shared),
                "b": ServicePolicy("b", grants, token_hashes=shared),
            }
        )


def test_upper_case_hashes_are_accepted(tmp_path: Path) -> None:
    upper = hash_token("tok").upper().replace("SHA256:", "sha256:")
    write(
        tmp_path,
        "svc.yaml",
        f"""
        service: svc
        identity: {{tokens: [{upper}]}}
        grants: [{{collections: [a], operations: [read]}}]
        """,
    )
    policies = load_policies(tmp_path)
    assert policies.by_token("tok") is policies.services["svc"]


def test_verified_tokens_are_remembered_and_wrong_ones_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(
        tmp_path,
        "svc.yaml",
        f"""
        service: svc
        identity: {{tokens: ["{hash_token("tok")}"]}}
        grants: [{{collections: [a], operations: [read]}}]
        """,
    )
    policies = load_policies(tmp_path)
    hashed: list[str] = []
    real = policy_module.hash_token
    monkeypatch.setattr(policy_module, "hash_token", lambda t: hashed.append(t) or real(t))
    for _ in range(3):
        assert policies.by_token("tok") is policies.services["svc"]
        assert policies.by_token("tok2") is None
    assert hashed == ["tok", "tok2", "tok2", "tok2"]  # the valid one hashed once
    fresh = load_policies(tmp_path)  # a reload starts with nothing remembered
    assert fresh.by_token("tok") is fresh.services["svc"]
    assert hashed[-1] == "tok"


# --------------------------------------------------------------------------- the loader


BAD_BILLING = """
service: biling
colour: blue
identity:
  tokens:
    - sha256:abc
grants:
  - collections: [invoices, "1abc", "pay[z-a]*", stats, in-voices, "pay[a-"]
    operations: [read, raed, list, list, true, frobnicate]
  - collections: []
    operations: [read]
  - {}
  - collections: [users]
    operations: []
  - collections: users
    operations: [read]
fields:
  orders: {readable: [a]}
  invoices: {readable: [a.b], writable: [a, "$x", a.b.c]}
  "inv*": {}
  "pay*": {readable: [x], writble: [x]}
rows:
  invoices:
    tenant_id: {header: "X Tenant"}
    region: {value: null}
    x: {value: 1, header: Y}
    "": {value: 1}
  "inv*": {}
  users: {tenant_id: {header: X-Tenant-Id}}
limits:
  rate: {per_second: 0, burst: true}
  operations:
    aggregat: {per_minute: 1, burst: 1}
    search: {per_second: 1, per_minute: 60, burst: 1}
    list: {per_second: .inf, burst: 1.5}
  costs: {aggregate: -1, foo: 2, search: "5"}
  max_in_flight: 0
  statement_timeout_seconds: 10
  max_rows: 5000
  redis_failure: fail_never
  extra: 1
"""

BAD_USERS = """
service: users
grants: [{collections: [users], operations: [read]}]
rows:
  users: {a: {value: 1}}
  users: {b: {value: 2}}
limits:
  rate: {per_second: 1, burst: 2}
  costs: {aggregate: 3}
"""


def test_every_problem_of_every_file_at_once(tmp_path: Path) -> None:
    write(tmp_path, "billing.yaml", BAD_BILLING)
    write(tmp_path, "users.yaml", BAD_USERS)
    write(tmp_path, "users.yml", MINIMAL.format(name="users"))
    write(tmp_path, "broken.yaml", "service: broken\ngrants: [\n")
    write(tmp_path, "list.yaml", "- a\n- b\n")
    write(tmp_path, "empty.yaml", "")
    write(tmp_path, "my policy.yaml", MINIMAL.format(name="my policy"))
    write(tmp_path, "README.md", "not a policy")
    write(tmp_path, ".hidden.yaml", "not: [valid")
    problems = problems_of(tmp_path, max_statement_timeout_seconds=5, max_rows=1000)
    expected = [
        "billing.yaml: colour: unknown key",
        "billing.yaml: service: 'biling' does not match the file name (expected 'billing')",
        "billing.yaml: identity.tokens[0]: malformed token hash "
        "(expected 'sha256:' followed by 64 hex digits)",
        "billing.yaml: grants[0].collections[1]: invalid collection name '1abc' "
        "(names match ^[A-Za-z][A-Za-z0-9_]{0,62}$; globs may use * ? [...])",
        "billing.yaml: grants[0].collections[2]: invalid glob 'pay[z-a]*': range z-a is reversed",
        "billing.yaml: grants[0].collections[3]: 'stats' is a reserved name, not a collection",
        "billing.yaml: grants[0].collections[4]: invalid collection name 'in-voices' "
        "(names match ^[A-Za-z][A-Za-z0-9_]{0,62}$; globs may use * ? [...])",
        "billing.yaml: grants[0].collections[5]: invalid glob 'pay[a-': a '[...]' set must be "
        "closed and hold only letters, digits, _ and -",
        "billing.yaml: grants[0].operations[1]: unknown operation 'raed' (did you mean 'read'?)",
        "billing.yaml: grants[0].operations[3]: duplicate 'list' (also grants[0].operations[2])",
        "billing.yaml: grants[0].operations[4]: must be a string, got boolean",
        "billing.yaml: grants[0].operations[5]: unknown operation 'frobnicate' (expected one "
        "of: read, list, count, create, update, delete, aggregate, search, transaction, "
        "schema, migrate, migrate_sql, monitor)",
        "billing.yaml: grants[1].collections: must not be empty",
        "billing.yaml: grants[2].collections: is required",
        "billing.yaml: grants[2].operations: is required",
        "billing.yaml: grants[3].operations: must not be empty",
        "billing.yaml: grants[4].collections: must be a list, got string",
        "billing.yaml: fields.orders: no grant covers collection 'orders'",
        "billing.yaml: fields.invoices.writable[1]: invalid field path '$x' (dot-separated, "
        "non-empty segments, none starting with '$' or with surrounding spaces)",
        "billing.yaml: fields.invoices.writable: 'a' is writable but not readable",
        "billing.yaml: fields.inv*: must set readable and/or writable",
        "billing.yaml: fields.inv*: no grant covers collection 'inv*'",
        "billing.yaml: rows.inv*: no grant covers collection 'inv*'",
        "billing.yaml: rows.users: no grant covers collection 'users'",  # grants[3] is invalid
        "billing.yaml: fields.pay*: no grant covers collection 'pay*'",
        "billing.yaml: fields.pay*.writble: unknown key (did you mean 'writable'?)",
        "billing.yaml: rows.invoices.tenant_id.header: invalid header name 'X Tenant'",
        "billing.yaml: rows.invoices.region.value: must be a string, a finite number or a "
        "boolean, got null",
        "billing.yaml: rows.invoices.x: must set exactly one of value or header",
        "billing.yaml: rows.invoices.'': field path must not be empty",
        "billing.yaml: rows.inv*: must name at least one field",
        "billing.yaml: limits.extra: unknown key",
        "billing.yaml: limits.rate.per_second: must be a positive number (got 0)",
        "billing.yaml: limits.rate.burst: must be an integer, got boolean",
        "billing.yaml: limits.max_in_flight: must be >= 1 (got 0)",
        "billing.yaml: limits.statement_timeout_seconds: must be <= the global statement "
        "timeout (5 s), got 10",
        "billing.yaml: limits.max_rows: must be <= the global page size limit (1000)",
        "billing.yaml: limits.redis_failure: must be fail_open or fail_closed (got 'fail_never')",
        "billing.yaml: limits.costs.aggregate: must be a number >= 0 (got -1)",
        "billing.yaml: limits.costs.foo: unknown cost key",
        "billing.yaml: limits.costs.search: must be a number, got string",
        "billing.yaml: limits.operations.aggregat: unknown operation 'aggregat' "
        "(did you mean 'aggregate'?)",
        "billing.yaml: limits.operations.search: must set exactly one of per_second or per_minute",
        "billing.yaml: limits.operations.list.per_second: must be a positive number (got inf)",
        "billing.yaml: limits.operations.list.burst: must be an integer, got number",
        "broken.yaml: invalid YAML at line 3, column 1: expected the node content, but found "
        "'<stream ...'",
        "empty.yaml: file is empty (expected a mapping with service and grants)",
        "list.yaml: top level must be a mapping, got list",
        "my policy.yaml: file name must be <service>.yaml with a service name like 'billing'",
        "users.yaml: line 6: duplicate key 'users'",
        "users.yaml: limits.costs.aggregate: 3 is more than limits.rate.burst (2): it could "
        "never be admitted",
        "users.yml: service: duplicate service 'users' (also users.yaml)",
    ]
    missing = [p for p in expected if p not in problems]
    unexpected = [p for p in problems if p not in expected]
    assert not missing and not unexpected, (missing, unexpected)


def test_the_error_lists_every_problem(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "service: a\ngrants: []\n")
    write(tmp_path, "b.yaml", "service: b\n")
    with pytest.raises(ConfigError) as info:
        load_policies(tmp_path)
    assert info.value.problems == [
        "a.yaml: grants: must list at least one grant",
        "b.yaml: grants: is required (a list of {collections, operations})",
    ]
    for problem in info.value.problems:
        assert problem in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("service: s\n", "s.yaml: grants: is required (a list of {collections, operations})"),
        (
            "grants: [{collections: [a], operations: [read]}]\n",
            "s.yaml: service: is required (and must be 's', the file name)",
        ),
        (MINIMAL.format(name=1), "s.yaml: service: must be a string, got integer"),
        (S + "description: 3\n", "s.yaml: description: must be a string, got integer"),
        (S + "fields: []\n", "s.yaml: fields: must be a mapping, got list"),
        (S + "rows: {things: [a]}\n", "s.yaml: rows.things: must be a mapping, got list"),
        (
            S + "identity: {tokens: x}\n",
            "s.yaml: identity.tokens: must be a list, got string",
        ),
        (S + "limits: 5\n", "s.yaml: limits: must be a mapping, got integer"),
        (
            S + "limits: {rate: {per_second: true, burst: 1}}\n",
            "s.yaml: limits.rate.per_second: must be a number, got boolean",
        ),
        (
            S + "limits: {rate: {per_second: -2, burst: 1}}\n",
            "s.yaml: limits.rate.per_second: must be a positive number (got -2)",
        ),
        (
            S + "limits: {rate: {per_second: 1}}\n",
            "s.yaml: limits.rate.burst: is required",
        ),
        (
            S + "limits: {rate: {burst: 1}}\n",
            "s.yaml: limits.rate: must set exactly one of per_second or per_minute",
        ),
        (
            S + "limits: {rate: {per_second: 2000000, burst: 1}}\n",
            "s.yaml: limits.rate: must be at most 1000000 per second",
        ),
        (
            S + "limits: {rate: {per_minute: 0.001, burst: 1000}}\n",
            "s.yaml: limits.rate: refills an empty bucket (burst / rate) in more than a year",
        ),
        (
            S + "limits: {statement_timeout_seconds: 0}\n",
            "s.yaml: limits.statement_timeout_seconds: must be a positive number (got 0)",
        ),
        (
            S + "limits: {max_rows: 1.5}\n",
            "s.yaml: limits.max_rows: must be an integer, got number",
        ),
        (
            S + "limits: {redis_failure: true}\n",
            "s.yaml: limits.redis_failure: must be fail_open or fail_closed (got boolean)",
        ),
        (
            S.replace("[things]", '["9*"]'),
            "s.yaml: grants[0].collections[0]: glob '9*' can never match "
            "(collection names start with a letter)",
        ),
        (
            S.replace("[things]", '["a.b*"]'),
            "s.yaml: grants[0].collections[0]: invalid glob 'a.b*': '.' cannot occur in a "
            "collection name",
        ),
        (
            S.replace("[things]", "[" + "a" * 64 + "]"),
            "s.yaml: grants[0].collections[0]: invalid collection name '"
            + "a" * 64
            + "' (names match ^[A-Za-z][A-Za-z0-9_]{0,62}$; globs may use * ? [...])",
        ),
        (
            S + "fields: {things: {readable: [a, a]}}\n",
            "s.yaml: fields.things.readable[1]: duplicate 'a' (also fields.things.readable[0])",
        ),
        (
            S + "fields: {things: {readable: [' a']}}\n",
            "s.yaml: fields.things.readable[0]: invalid field path ' a' (dot-separated, "
            "non-empty segments, none starting with '$' or with surrounding spaces)",
        ),
        (
            S + "fields: {things: {readable: [a..b]}}\n",
            "s.yaml: fields.things.readable[0]: invalid field path 'a..b' (dot-separated, "
            "non-empty segments, none starting with '$' or with surrounding spaces)",
        ),
        (
            S + "fields: {things: {readable: [" + ".".join("a" * 17) + "]}}\n",
            "s.yaml: fields.things.readable[0]: field path '"
            + ".".join("a" * 17)
            + "' has more than 16 segments",
        ),
        (
            S + "rows: {things: {t: {header: 5}}}\n",
            "s.yaml: rows.things.t.header: must be a header name, got integer",
        ),
        (
            S + "rows: {things: {t: {value: [1]}}}\n",
            "s.yaml: rows.things.t.value: must be a string, a finite number or a boolean, got list",
        ),
        (
            S + "rows: {things: {t: {value: 1, colour: 2}}}\n",
            "s.yaml: rows.things.t.colour: unknown key",
        ),
        (
            S + "fields: {5: {readable: [a]}}\n",
            "s.yaml: fields.'5': must be a collection name or glob, got integer",
        ),
    ],
)
def test_single_problems(tmp_path: Path, text: str, problem: str) -> None:
    write(tmp_path, "s.yaml", text)
    assert problems_of(tmp_path) == [problem]


def test_directory_problems(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert problems_of(missing) == [f"{missing}: policy directory not found"]
    assert problems_of(tmp_path) == [f"{tmp_path}: no policy files (*.yaml, *.yml)"]
    a_file = write(tmp_path, "file.txt", "x")
    assert problems_of(a_file) == [f"{a_file}: not a directory"]
    (tmp_path / "sub.yaml").mkdir()
    assert problems_of(tmp_path) == ["sub.yaml: not a regular file"]


def test_yml_files_and_hidden_files(tmp_path: Path) -> None:
    write(tmp_path, "one.yml", MINIMAL.format(name="one"))
    write(tmp_path, ".two.yaml", "garbage: [")
    (tmp_path / "nested").mkdir()
    write(tmp_path / "nested", "three.yaml", "garbage: [")
    assert list(load_policies(tmp_path).services) == ["one"]


def test_caps_against_the_global_limits() -> None:
    problems = problems_of(POLICIES, max_statement_timeout_seconds=1.5, max_rows=600)
    assert problems == [
        "admin.yaml: limits.statement_timeout_seconds: must be <= the global statement "
        "timeout (1.5 s), got 5",
        "analytics.yaml: limits.statement_timeout_seconds: must be <= the global statement "
        "timeout (1.5 s), got 5",
        "analytics.yaml: limits.max_rows: must be <= the global page size limit (600)",
        "billing.yaml: limits.statement_timeout_seconds: must be <= the global statement "
        "timeout (1.5 s), got 2",
        "users.yaml: limits.max_rows: must be <= the global page size limit (600)",
    ]
    assert load_policies(POLICIES, max_statement_timeout_seconds=5, max_rows=1000)


def test_glob_rule_keys_need_a_covering_grant(tmp_path: Path) -> None:
    write(
        tmp_path,
        "s.yaml",
        """
        service: s
        grants:
          - collections: ["pay*", orders]
            operations: [read]
        fields:
          "payments_*": {readable: [a]}     # matched as text by "pay*"
          orders: {readable: [a]}
          "ord*": {readable: [a]}           # a wider glob than any grant
          paychecks: {readable: [a]}        # matched by "pay*"
        """,
    )
    assert problems_of(tmp_path) == ["s.yaml: fields.ord*: no grant covers collection 'ord*'"]


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "s.yaml", "service: !!python/object/apply:os.system ['true']\n")
    (problem,) = problems_of(tmp_path)
    assert problem.startswith("s.yaml: invalid YAML at line 1, column 10: ")


# --------------------------------------------------------------------------- secrets

SECRET = "sk_live_Zq8V2mA7yLw4Rt9e"


def test_secrets_never_appear_in_problems(tmp_path: Path) -> None:
    shared = hash_token("shared-token")
    write(
        tmp_path,
        "a.yaml",
        f"""
        service: a
        identity:
          tokens:
            - {SECRET}
            - "sha256:{SECRET}"
            - {shared}
            - {shared}
            - 12345
          {SECRET}: 1
        grants: [{{collections: [x], operations: [read]}}]
        """,
    )
    write(
        tmp_path,
        "b.yaml",
        f"""
        service: b
        identity: {{tokens: ["{shared}"]}}
        grants: [{{collections: [x], operations: [read]}}]
        """,
    )
    write(tmp_path, "c.yaml", f"service: c\nidentity:\n  tokens: [{SECRET}: [\n")
    write(tmp_path, "d.yaml", f"service: d\nidentity:\n  tokens: [*{SECRET}]\n")
    problems = problems_of(tmp_path)
    text = "\n".join(problems)
    assert SECRET not in text
    assert SECRET[8:] not in text
    assert shared[7:] not in text and shared[15:23] not in text
    assert "shared-token" not in text
    assert "a.yaml: identity.tokens[0]: must be a token hash" in text
    assert "a.yaml: identity.tokens[1]: malformed token hash" in text
    assert (
        "a.yaml: identity.tokens[3]: the same token hash is listed at a.yaml: identity.tokens[2]"
        in problems
    )
    assert (
        "b.yaml: identity.tokens[0]: the same token hash is listed at a.yaml: identity.tokens[2]"
        in problems
    )
    assert "a.yaml: identity.tokens[4]: must be a string, got integer" in problems
    assert any(p.startswith("c.yaml: invalid YAML at line ") for p in problems)
    assert any(p.startswith("d.yaml: invalid YAML at line ") for p in problems)


def test_duplicate_hashes_within_a_file_show_no_value(tmp_path: Path) -> None:
    shared = hash_token("tok")
    write(
        tmp_path,
        "a.yaml",
        f"""
        service: a
        identity: {{tokens: [{shared}, "{shared.upper().replace("SHA256", "sha256")}"]}}
        grants: [{{collections: [x], operations: [read]}}]
        """,
    )
    assert problems_of(tmp_path) == [
        "a.yaml: identity.tokens[1]: the same token hash is listed at a.yaml: identity.tokens[0]"
    ]


def test_reprs_hold_no_token_hash() -> None:
    token_hash = hash_token("tok")
    policy = ServicePolicy(
        "s", (Grant(("a",), frozenset({"read"})),), token_hashes=frozenset({token_hash})
    )
    assert token_hash[7:] not in repr(policy)
    assert token_hash[7:] not in repr(PolicySet({"s": policy}))
    assert "_tables" not in repr(policy)


# --------------------------------------------------------------------------- check_directory


def test_check_directory_ok() -> None:
    ok, summary = check_directory(POLICIES)
    assert ok
    lines = summary.splitlines()
    assert lines[0] == "4 services, 12 grants, 13 collection patterns, 4 tokens"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "admin",
        "analytics",
        "billing",
        "users",
    ]
    assert "billing: 3 grants, 3 collection patterns (1 glob), 1 token" in summary
    for tokens in TOKENS.values():
        for token in tokens:
            assert token not in summary
            assert hash_token(token)[7:15] not in summary


def test_check_directory_problems(tmp_path: Path) -> None:
    write(tmp_path, "billing.yaml", BAD_BILLING)
    ok, text = check_directory(tmp_path)
    assert not ok
    assert text.splitlines() == problems_of(tmp_path)
    assert len(text.splitlines()) > 30
    ok, text = check_directory(tmp_path / "missing")
    assert (ok, text) == (False, f"{tmp_path / 'missing'}: policy directory not found")


# --------------------------------------------------------------------------- properties


def naive_allowed(grants: tuple[Grant, ...], collection: str, operation: str) -> bool:
    return any(
        operation in grant.operations
        and any(fnmatch.fnmatchcase(collection, pattern) for pattern in grant.collections)
        for grant in grants
    )


def naive_rule(rules: Mapping[str, Any], collection: str) -> Any:
    if collection in rules and not is_glob(collection):
        return rules[collection]
    for pattern, rule in rules.items():
        if is_glob(pattern) and fnmatch.fnmatchcase(collection, pattern):
            return rule
    return None


PATTERNS = [
    "*",
    "a*",
    "ab",
    "abc",
    "a?",
    "?b*",
    "*_x",
    "a[bc]*",
    "[!a]*",
    "b[a-c]_?",
    "ba_1",
    "x*1",
    "events_*",
    "events_web",
]
names = st.one_of(
    st.sampled_from(["ab", "abc", "ba_1", "events_web", "events_", "x_x", "Ab", "a"]),
    st.from_regex(r"[abx][abcx_1]{0,5}", fullmatch=True),
    st.from_regex(r"events_[a-z]{0,4}", fullmatch=True),
    st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,62}", fullmatch=True),
)
operations = st.sampled_from([*OPERATION_ORDER, "bogus"])
grant_lists = st.lists(
    st.builds(
        Grant,
        st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=4, unique=True).map(tuple),
        st.frozensets(st.sampled_from(OPERATION_ORDER), min_size=1, max_size=5),
    ),
    min_size=1,
    max_size=5,
)
rule_maps = st.dictionaries(
    st.sampled_from(PATTERNS),
    st.integers(0, 99).map(lambda n: (RowRule(f"f{n}", value=n),)),
    max_size=5,
)


@given(grants=grant_lists, rows=rule_maps, queries=st.lists(st.tuples(names, operations)))
def test_lookups_equal_the_naive_reference(
    grants: list[Grant], rows: dict[str, tuple[RowRule, ...]], queries: list[tuple[str, str]]
) -> None:
    policy = ServicePolicy("svc", tuple(grants), rows=rows)
    for _ in range(2):  # the second round answers from the tables and the cache
        for collection, operation in queries:
            expected = naive_allowed(policy.grants, collection, operation)
            assert policy.allowed(collection, operation) is expected
            assert policy.row_rules(collection) == (naive_rule(rows, collection) or ())


@given(queries=st.lists(st.tuples(names, operations), max_size=20))
def test_examples_equal_the_naive_reference(
    examples: PolicySet, queries: list[tuple[str, str]]
) -> None:
    for policy in examples.services.values():
        for collection, operation in queries:
            expected = naive_allowed(policy.grants, collection, operation)
            assert policy.allowed(collection, operation) is expected
            assert policy.field_rule(collection) == naive_rule(policy.fields, collection)


# --------------------------------------------------------------------------- schema

_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
}
_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "$comment"}


class TinyValidator:
    """The subset of JSON Schema 2020-12 that docs/policy.schema.json uses; any other
    keyword fails loudly, so the schema cannot grow past what is checked here."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def errors(self, value: Any, schema: dict[str, Any] | None = None, at: str = "") -> list[str]:
        schema = self.root if schema is None else schema
        found: list[str] = []
        for keyword, arg in schema.items():
            if keyword in _ANNOTATIONS:
                continue
            check = getattr(self, "_" + keyword.lstrip("$"), None)
            if check is None:
                raise AssertionError(f"TinyValidator does not know {keyword!r}")
            found.extend(check(value, arg, schema, at))
        return found

    def valid(self, value: Any, schema: dict[str, Any]) -> bool:
        return not self.errors(value, schema)

    def _ref(self, value: Any, arg: str, _: Any, at: str) -> list[str]:
        assert arg.startswith("#/$defs/")
        return self.errors(value, self.root["$defs"][arg.removeprefix("#/$defs/")], at)

    def _type(self, value: Any, arg: Any, _: Any, at: str) -> list[str]:
        types = [arg] if isinstance(arg, str) else arg
        return [] if any(_TYPES[t](value) for t in types) else [f"{at}: not {types}"]

    def _enum(self, value: Any, arg: list[Any], _: Any, at: str) -> list[str]:
        ok = any(value == a and type(value) is type(a) for a in arg)
        return [] if ok else [f"{at}: not in enum"]

    def _not(self, value: Any, arg: dict[str, Any], _: Any, at: str) -> list[str]:
        return [f"{at}: matches 'not'"] if self.valid(value, arg) else []

    def _anyOf(self, value: Any, arg: list[Any], _: Any, at: str) -> list[str]:
        return [] if any(self.valid(value, s) for s in arg) else [f"{at}: no anyOf matches"]

    def _oneOf(self, value: Any, arg: list[Any], _: Any, at: str) -> list[str]:
        count = sum(self.valid(value, s) for s in arg)
        return [] if count == 1 else [f"{at}: {count} oneOf branches match"]

    def _pattern(self, value: Any, arg: str, _: Any, at: str) -> list[str]:
        if isinstance(value, str) and not re.search(arg, value):
            return [f"{at}: does not match {arg}"]
        return []

    def _minLength(self, value: Any, arg: int, _: Any, at: str) -> list[str]:
        return [f"{at}: too short"] if isinstance(value, str) and len(value) < arg else []

    def _maxLength(self, value: Any, arg: int, _: Any, at: str) -> list[str]:
        return [f"{at}: too long"] if isinstance(value, str) and len(value) > arg else []

    def _number_bound(self, value: Any, ok: Any, at: str) -> list[str]:
        if _TYPES["number"](value) and not ok(value):
            return [f"{at}: out of range"]
        return []

    def _minimum(self, value: Any, arg: float, _: Any, at: str) -> list[str]:
        return self._number_bound(value, lambda v: v >= arg, at)

    def _maximum(self, value: Any, arg: float, _: Any, at: str) -> list[str]:
        return self._number_bound(value, lambda v: v <= arg, at)

    def _exclusiveMinimum(self, value: Any, arg: float, _: Any, at: str) -> list[str]:
        return self._number_bound(value, lambda v: v > arg, at)

    def _minItems(self, value: Any, arg: int, _: Any, at: str) -> list[str]:
        return [f"{at}: too few items"] if isinstance(value, list) and len(value) < arg else []

    def _uniqueItems(self, value: Any, arg: bool, _: Any, at: str) -> list[str]:
        if arg and isinstance(value, list) and len(set(map(repr, value))) != len(value):
            return [f"{at}: duplicate items"]
        return []

    def _items(self, value: Any, arg: dict[str, Any], _: Any, at: str) -> list[str]:
        if not isinstance(value, list):
            return []
        return [e for i, item in enumerate(value) for e in self.errors(item, arg, f"{at}[{i}]")]

    def _required(self, value: Any, arg: list[str], _: Any, at: str) -> list[str]:
        if not isinstance(value, dict):
            return []
        return [f"{at}.{key}: required" for key in arg if key not in value]

    def _minProperties(self, value: Any, arg: int, _: Any, at: str) -> list[str]:
        return [f"{at}: too few keys"] if isinstance(value, dict) and len(value) < arg else []

    def _properties(self, value: Any, arg: dict[str, Any], _: Any, at: str) -> list[str]:
        if not isinstance(value, dict):
            return []
        return [
            e
            for key, sub in arg.items()
            if key in value
            for e in self.errors(value[key], sub, f"{at}.{key}")
        ]

    def _additionalProperties(
        self, value: Any, arg: Any, schema: dict[str, Any], at: str
    ) -> list[str]:
        if not isinstance(value, dict):
            return []
        extra = [k for k in value if k not in schema.get("properties", {})]
        if arg is False:
            return [f"{at}.{k}: not allowed" for k in extra]
        return [e for k in extra for e in self.errors(value[k], arg, f"{at}.{k}")]

    def _propertyNames(self, value: Any, arg: dict[str, Any], _: Any, at: str) -> list[str]:
        if not isinstance(value, dict):
            return []
        return [e for key in value for e in self.errors(key, arg, f"{at}.<{key}>")]


VALIDATOR = TinyValidator(SCHEMA)


def example_documents() -> Iterator[tuple[str, Any]]:
    for path in sorted(POLICIES.glob("*.yaml")):
        yield path.name, yaml.safe_load(path.read_text(encoding="utf-8"))


def test_schema_declares_its_draft() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize(("name", "document"), list(example_documents()))
def test_examples_match_the_schema(name: str, document: Any) -> None:
    assert VALIDATOR.errors(document) == [], name


def test_minimal_document_matches_the_schema() -> None:
    assert VALIDATOR.errors(yaml.safe_load(MINIMAL.format(name="s"))) == []


BASE: dict[str, Any] = {
    "service": "s",
    "grants": [{"collections": ["things"], "operations": ["read"]}],
}


def _with(**changes: Any) -> dict[str, Any]:
    return {**BASE, **changes}


GRANT = {"collections": ["things"], "operations": ["read"]}
# Documents both the loader and the schema must refuse.
INVALID = [
    _with(colour="blue"),
    {"service": "s"},
    _with(service="1s"),
    _with(grants=[]),
    _with(grants=[{"collections": ["things"]}]),
    _with(grants=[{"collections": [], "operations": ["read"]}]),
    _with(grants=[{"collections": ["things"], "operations": ["raed"]}]),
    _with(grants=[{"collections": ["things"], "operations": ["read", "read"]}]),
    _with(grants=[{"collections": ["stats"], "operations": ["read"]}]),
    _with(grants=[{"collections": ["in-voices"], "operations": ["read"]}]),
    _with(grants=[{"collections": ["9*"], "operations": ["read"]}]),
    _with(grants=[{"collections": ["pay[a-"], "operations": ["read"]}]),
    _with(grants=[{"collections": ["a" * 64], "operations": ["read"]}]),
    _with(grants=[{**GRANT, "extra": 1}]),
    _with(identity={"tokens": ["plain-token"]}),
    _with(identity={"tokens": ["sha256:abc"]}),
    _with(identity={"token": []}),
    _with(fields={"things": {}}),
    _with(fields={"things": {"readable": ["$a"]}}),
    _with(fields={"things": {"readable": ["a..b"]}}),
    _with(fields={"things": {"readable": ["a", "a"]}}),
    _with(fields={"things": {"visible": ["a"]}}),
    _with(rows={"things": {}}),
    _with(rows={"things": {"t": {}}}),
    _with(rows={"things": {"t": {"value": 1, "header": "X-T"}}}),
    _with(rows={"things": {"t": {"header": "X T"}}}),
    _with(rows={"things": {"t": {"value": None}}}),
    _with(rows={"things": {"t": {"value": [1]}}}),
    _with(limits={"rate": {"per_second": 0, "burst": 1}}),
    _with(limits={"rate": {"per_second": True, "burst": 1}}),
    _with(limits={"rate": {"per_second": 1}}),
    _with(limits={"rate": {"burst": 1}}),
    _with(limits={"rate": {"per_second": 1, "per_minute": 60, "burst": 1}}),
    _with(limits={"rate": {"per_second": 1, "burst": 0}}),
    _with(limits={"rate": {"per_second": 1, "burst": 1.5}}),
    _with(limits={"rate": {"per_second": 2_000_000, "burst": 1}}),
    _with(limits={"operations": {"aggregat": {"per_second": 1, "burst": 1}}}),
    _with(limits={"costs": {"foo": 1}}),
    _with(limits={"costs": {"read": -1}}),
    _with(limits={"max_in_flight": 0}),
    _with(limits={"max_rows": True}),
    _with(limits={"statement_timeout_seconds": 0}),
    _with(limits={"redis_failure": "fail_never"}),
    _with(limits={"extra": 1}),
    _with(description=3),
]


@pytest.mark.parametrize("document", INVALID, ids=lambda d: json.dumps(d)[:70])
def test_invalid_documents_are_refused_by_loader_and_schema(
    tmp_path: Path, document: dict[str, Any]
) -> None:
    assert VALIDATOR.errors(document) != []
    write(tmp_path, "s.yaml", yaml.safe_dump(document))
    assert problems_of(tmp_path)


def _properties(ref: str) -> set[str]:
    return set(SCHEMA["$defs"][ref]["properties"])


def test_schema_keys_equal_the_loader_keys() -> None:
    assert set(SCHEMA["properties"]) == set(policy_module._TOP_KEYS)
    assert set(SCHEMA["required"]) == {"service", "grants"}
    assert set(SCHEMA["properties"]["identity"]["properties"]) == {"tokens"}
    assert _properties("grant") == {"collections", "operations"}
    assert _properties("fieldRule") == {"readable", "writable"}
    assert _properties("limits") == set(policy_module._LIMIT_KEYS)
    assert _properties("rate") == set(policy_module._RATE_KEYS)
    assert set(SCHEMA["$defs"]["limits"]["properties"]["costs"]["properties"]) == set(COST_KEYS)
    assert SCHEMA["$defs"]["operation"]["enum"] == list(OPERATION_ORDER)
    assert SCHEMA["$defs"]["limits"]["properties"]["redis_failure"]["enum"] == list(
        REDIS_FAILURE_MODES
    )
    assert set(SCHEMA["$defs"]["collectionName"]["not"]["enum"]) == RESERVED_COLLECTIONS
    row_rule_keys = {
        k for branch in SCHEMA["$defs"]["rowRule"]["oneOf"] for k in branch["properties"]
    }
    assert row_rule_keys == {"value", "header"}


def test_reserved_names_equal_the_backends() -> None:
    from proxy.backends.base import RESERVED

    assert RESERVED == RESERVED_COLLECTIONS


def test_limits_defaults() -> None:
    limits = Limits()
    assert limits.rate is None and limits.max_rows is None
    assert limits.redis_failure == "fail_open"
    assert dict(limits.costs) == dict.fromkeys(COST_KEYS, 1.0)
