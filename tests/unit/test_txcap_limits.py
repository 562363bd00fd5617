"""Caps on open transactions (issue 13, item 2): the policy key, the sidecar default, the
JSON Schema, and the share of a pool that transactions may hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.backends.base import transaction_share
from proxy.config import Limits as SidecarLimits
from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.policy import load_policies
from tests.unit.test_policy import VALIDATOR

GRANTS = "grants: [{collections: [things], operations: [read, transaction]}]\n"


def policy(tmp_path: Path, name: str, limits: str) -> None:
    (tmp_path / f"{name}.yaml").write_text(f"service: {name}\n{GRANTS}limits: {limits}\n")


def test_policy_sets_its_open_transaction_cap(tmp_path: Path) -> None:
    policy(tmp_path, "a", "{max_open_transactions: 3}")
    policy(tmp_path, "b", "{max_rows: 10}")
    loaded = load_policies(tmp_path, max_open_transactions=64)
    assert loaded.services["a"].limits.max_open_transactions == 3
    assert loaded.services["b"].limits.max_open_transactions is None  # the sidecar's default


def test_bad_caps_are_listed_with_every_other_problem(tmp_path: Path) -> None:
    policy(tmp_path, "a", "{max_open_transactions: 0}")
    policy(tmp_path, "b", "{max_open_transactions: 1.5, max_rows: 0}")
    policy(tmp_path, "c", "{max_open_transactions: true}")
    policy(tmp_path, "d", "{max_open_transactions: 65}")
    policy(tmp_path, "e", "{max_open_transaction: 2}")
    with pytest.raises(ConfigError) as info:
        load_policies(tmp_path, max_open_transactions=64)
    assert info.value.problems == [
        "a.yaml: limits.max_open_transactions: must be >= 1 (got 0)",
        "b.yaml: limits.max_rows: must be >= 1 (got 0)",
        "b.yaml: limits.max_open_transactions: must be an integer, got number",
        "c.yaml: limits.max_open_transactions: must be an integer, got boolean",
        "d.yaml: limits.max_open_transactions: must be <= the sidecar's max_open_transactions (64)",
        "e.yaml: limits.max_open_transaction: unknown key (did you mean 'max_open_transactions'?)",
    ]


def test_schema_knows_the_cap() -> None:
    base = {"service": "s", "grants": [{"collections": ["t"], "operations": ["transaction"]}]}
    assert VALIDATOR.errors({**base, "limits": {"max_open_transactions": 2}}) == []
    assert VALIDATOR.errors({**base, "limits": {"max_open_transactions": 0}}) != []
    assert VALIDATOR.errors({**base, "limits": {"max_open_transactions": 1.5}}) != []


def test_sidecar_default_per_service(tmp_path: Path) -> None:
    assert SidecarLimits().max_open_transactions_per_service == 4
    path = tmp_path / "c.yaml"
    path.write_text("limits: {max_open_transactions_per_service: 9}\n")
    assert load_config(str(path), environ={}).limits.max_open_transactions_per_service == 9
    path.write_text("limits: {max_open_transactions_per_service: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert info.value.problems == ["limits.max_open_transactions_per_service: must be >= 1 (got 0)"]


@pytest.mark.parametrize(
    ("pool", "share"), [(1, 1), (2, 1), (3, 2), (4, 3), (5, 3), (8, 6), (10, 7), (64, 48)]
)
def test_transactions_leave_a_quarter_of_the_pool(pool: int, share: int) -> None:
    assert transaction_share(pool) == share
