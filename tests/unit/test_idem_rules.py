"""Issue 13, items 1, 4, 5 (pure parts): what a replacement keeps, the policy digest and
row headers in the idempotency fingerprint, fingerprint comparison, batch grants, and the
audit scope of a monitoring caller."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import Conflict, Unprocessable
from proxy.pipeline.batch import grants_of
from proxy.pipeline.gate import Caller, audit_scope, keep_spec
from proxy.policy import FieldRule, Grant, Limits, RateSpec, RowRule, ServicePolicy
from proxy.query.spec import AuditScope, Keep, check_fingerprint, keep_protected

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def policy(fields: dict[str, FieldRule] | None = None, **kw: Any) -> ServicePolicy:
    grants = kw.pop("grants", (Grant(("c",), frozenset({"read", "update"})),))
    return ServicePolicy("svc", grants, fields=fields or {}, **kw)


KEEP_CASES = [
    # (readable, writable, stored, body, expected)
    (
        None,
        ["name"],
        {"_id": "x", "_version": 3, "name": "a", "secret": 1},
        {"name": "b"},
        {"name": "b", "secret": 1},
    ),
    (  # a writable field the body leaves out is removed; protected ones stay
        ["name", "note", "secret"],
        ["name", "note"],
        {"name": "a", "note": "n", "secret": 1},
        {"name": "b"},
        {"name": "b", "secret": 1},
    ),
    (  # hidden and so not writable (the loader sets writable = readable)
        ["name"],
        None,
        {"name": "a", "hidden": {"deep": 1}},
        {"name": "b"},
        {"name": "b", "hidden": {"deep": 1}},
    ),
    (  # a sub-field writable: the parent is merged, its other children kept
        ["name", "address"],
        ["name", "address.city"],
        {"name": "a", "address": {"city": "c", "zip": "z", "geo": {"lat": 1}}},
        {"name": "b", "address": {"city": "d"}},
        {"name": "b", "address": {"city": "d", "zip": "z", "geo": {"lat": 1}}},
    ),
    (  # the body leaves the partial parent out: only its protected children remain
        ["name", "address"],
        ["name", "address.city"],
        {"address": {"city": "c", "zip": "z"}},
        {"name": "b"},
        {"name": "b", "address": {"zip": "z"}},
    ),
    (  # the stored parent is not an object: kept as it is
        ["name", "address"],
        ["name", "address.city"],
        {"address": "somewhere"},
        {"name": "b"},
        {"name": "b", "address": "somewhere"},
    ),
    (  # readable sub-field only: the rest of the parent is hidden, so kept
        ["a.b"],
        None,
        {"a": {"b": 1, "c": 2}},
        {"a": {"b": 5}},
        {"a": {"b": 5, "c": 2}},
    ),
    (  # two levels down
        ["x"],
        ["x.y.z"],
        {"x": {"y": {"z": 1, "w": 2}, "v": 3}},
        {"x": {"y": {"z": 9}}},
        {"x": {"y": {"z": 9, "w": 2}, "v": 3}},
    ),
]


@pytest.mark.parametrize(("readable", "writable", "stored", "body", "expected"), KEEP_CASES)
def test_keep_protected(
    readable: list[str] | None,
    writable: list[str] | None,
    stored: dict[str, Any],
    body: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    rule = FieldRule(
        readable=None if readable is None else frozenset(readable),
        writable=None if writable is None else frozenset(writable),
    )
    keep = keep_spec(Caller("svc", policy({"c": rule})), "c")
    assert keep is not None
    assert keep_protected(stored, body, keep) == expected
    assert keep_protected(None, body, keep) == body  # an insert keeps nothing


def test_keep_spec_is_none_without_field_rules() -> None:
    assert keep_spec(Caller("svc"), "c") is None
    assert keep_spec(Caller("svc", policy()), "c") is None
    rule = FieldRule(readable=frozenset({"a"}), writable=frozenset({"a", "b.c"}))
    keep = keep_spec(Caller("svc", policy({"c": rule})), "c")
    assert keep == Keep(open=frozenset({"a"}), partial=frozenset({"b"}))


def test_policy_digest_covers_what_decides_visibility() -> None:
    base = policy({"c": FieldRule(readable=frozenset({"a", "b"}))})
    same = policy({"c": FieldRule(readable=frozenset({"b", "a"}))})
    fewer = policy({"c": FieldRule(readable=frozenset({"a"}))})
    rows = policy(
        {"c": FieldRule(readable=frozenset({"a", "b"}))},
        rows={"c": (RowRule("tenant", header="X-Tenant"),)},
    )
    limited = policy(
        {"c": FieldRule(readable=frozenset({"a", "b"}))},
        limits=Limits(rate=RateSpec(1.0, 2)),
    )
    granted = policy(
        {"c": FieldRule(readable=frozenset({"a", "b"}))},
        grants=(Grant(("c",), frozenset({"read"})),),
    )
    assert base.digest == same.digest == limited.digest  # limits decide no visibility
    assert len({base.digest, fewer.digest, rows.digest, granted.digest}) == 4
    assert rows.row_headers == ("x-tenant",) and base.row_headers == ()


def test_policy_digest_is_the_same_in_every_process() -> None:
    """Sidecars and workers must agree, whatever their hash seed."""
    code = (
        "import sys; from proxy.policy import load_policies; "
        f"p = load_policies({str(POLICIES)!r}); "
        "print(','.join(p.get(s).digest for s in sorted(p.services)))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outs) == 1 and len(outs.pop().split(",")) == 4


def test_check_fingerprint() -> None:
    check_fingerprint("abc/p1", "abc/p1")
    with pytest.raises(Conflict) as changed:
        check_fingerprint("abc/p1", "abc/p2")
    assert changed.value.status == 409 and changed.value.code == "idempotency_policy_changed"
    for other in ("abd/p1", "abd/p2", "ab"):
        with pytest.raises(Unprocessable) as reused:
            check_fingerprint("abc/p1", other)
        assert reused.value.status == 422 and reused.value.code == "idempotency_key_reused"


def test_grants_of_a_batch() -> None:
    ops = [
        {"op": "get", "collection": "a", "id": "1"},
        {"op": "replace", "collection": "b", "id": "1", "document": {}, "upsert": True},
        {"op": "query", "collection": "c"},
    ]
    assert grants_of(ops) == [
        ("a", "read"),
        ("a", "transaction"),
        ("b", "update"),
        ("b", "transaction"),
        ("b", "create"),
        ("c", "list"),
        ("c", "transaction"),
    ]


def test_audit_scope() -> None:
    assert audit_scope(Caller("open")) is None
    everything = policy(grants=(Grant(("*",), frozenset({"read", "monitor"})),))
    assert audit_scope(Caller("svc", everything)) is None
    some = policy(
        grants=(
            Grant(("a", "b_*"), frozenset({"read"})),
            Grant(("*",), frozenset({"monitor", "count"})),
            Grant(("c",), frozenset({"list"})),
        )
    )
    assert audit_scope(Caller("svc", some)) == AuditScope(("a",), ("b_*",), "svc")
