"""The gate: identity modes, callers carrying their service's compiled decisions, what is
metered, and the row cap."""

from __future__ import annotations

import pytest

from proxy.errors import Forbidden, LimitExceeded, RateLimited, Unauthorized
from proxy.pipeline.gate import OPEN, Caller, Gatekeeper
from proxy.policy import Grant, PolicySet, RateSpec, ServicePolicy
from proxy.policy import Limits as PolicyLimits
from proxy.policy.decide import OPEN_DECISIONS, decisions_for

TOKEN = "a-token-of-enough-length"


def _policies() -> PolicySet:
    from proxy.policy import hash_token

    limits = PolicyLimits(rate=RateSpec(per_second=1, burst=2), max_rows=10)
    svc = ServicePolicy(
        "svc",
        (Grant(("c",), frozenset({"read"})),),
        token_hashes=frozenset({hash_token(TOKEN)}),
        limits=limits,
    )
    return PolicySet({"svc": svc})


def test_open_mode_caller_is_unmetered_and_decides_open() -> None:
    gate = Gatekeeper(None)
    who = gate.identify({})
    assert who.service == "anonymous" and who.policy is None
    assert who.decisions is OPEN_DECISIONS and not who.metered
    assert OPEN.decisions is OPEN_DECISIONS


def test_sidecar_mode_caller_carries_the_decisions_compiled_at_load() -> None:
    policies = _policies()
    gate = Gatekeeper(policies, sidecar_service="svc")
    who = gate.identify({})
    assert who.decisions is decisions_for(policies.services["svc"])
    assert who.metered
    assert who.decisions.get("c", "read").granted
    assert not who.decisions.get("c", "delete").granted


def test_sidecar_without_a_policy_for_its_service_refuses() -> None:
    gate = Gatekeeper(_policies(), sidecar_service="other")
    with pytest.raises(Forbidden) as info:
        gate.identify({})
    assert info.value.code == "no_policy"


def test_token_mode_identifies_by_bearer_token() -> None:
    gate = Gatekeeper(_policies())
    assert gate.token_mode
    with pytest.raises(Unauthorized) as missing:
        gate.identify({})
    assert missing.value.code == "missing_token"
    with pytest.raises(Unauthorized) as wrong:
        gate.identify({"Authorization": "Bearer nope"})
    assert wrong.value.code == "invalid_token"
    assert gate.identify({"Authorization": f"Bearer {TOKEN}"}).service == "svc"


async def test_prepaid_callers_are_not_charged_again() -> None:
    now = [0.0]
    gate = Gatekeeper(_policies(), sidecar_service="svc", clock=lambda: now[0])
    who = gate.identify({})
    prepaid = await gate.admit_batch(who, [("read", 0), ("read", 0)])
    assert prepaid.prepaid and not prepaid.metered
    assert prepaid.decisions is who.decisions
    await gate.admit(prepaid, "read")  # free: the batch paid
    with pytest.raises(RateLimited):
        await gate.admit(who, "read")  # the bucket (burst 2) is empty


def test_row_cap_is_the_policys_max_rows() -> None:
    gate = Gatekeeper(_policies(), sidecar_service="svc")
    who = gate.identify({})
    gate.check_row_limit(who, 10)
    with pytest.raises(LimitExceeded) as info:
        gate.check_row_limit(who, 11)
    assert info.value.code == "limit_too_large"
    gate.check_row_limit(Caller("anonymous"), 10_000)  # no policy: no cap here
