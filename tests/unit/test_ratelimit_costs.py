"""Request costs against bucket sizes (issue 13, item 11): a cost above the burst is a 400
that names the limit, never a 429 whose Retry-After cannot come true; a batch is charged
once. Pure: the gatekeeper's local limiter on a fake clock, no I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.errors import LimitExceeded, RateLimited
from proxy.pipeline.gate import Gatekeeper
from proxy.policy import load_policies
from proxy.resilience.ratelimit import Rate


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fits_is_exact_at_the_burst() -> None:
    rate = Rate(20 / 60, 20)
    assert rate.fits(20) and rate.fits(19.5) and rate.fits(0)
    assert not rate.fits(21) and not rate.fits(20.001)


def gate(tmp_path: Path, clock: FakeClock) -> Gatekeeper:
    (tmp_path / "svc.yaml").write_text(
        "service: svc\n"
        "grants:\n  - collections: ['*']\n"
        "    operations: [read, list, count, create, update, delete, transaction]\n"
        "limits:\n"
        "  rate: {per_second: 1, burst: 10}\n"
        "  operations:\n    delete: {per_second: 1, burst: 3}\n"
    )
    return Gatekeeper(load_policies(tmp_path), sidecar_service="svc", clock=clock)


async def test_a_cost_above_the_burst_names_the_limit(tmp_path: Path) -> None:
    g = gate(tmp_path, FakeClock())
    caller = g.identify({})
    with pytest.raises(LimitExceeded) as info:
        await g.admit(caller, "create", cost_units=11)
    err = info.value
    assert (err.status, err.code, err.retry_after) == (400, "cost_exceeds_limit", None)
    assert err.details == {"limit": "rate", "burst": 10, "cost": 11.0}
    with pytest.raises(LimitExceeded) as info:
        await g.admit(caller, "list", rows=1000)  # 1 + 10 per 100 rows
    assert info.value.details["limit"] == "rate" and info.value.details["cost"] == 11.0
    # nothing was charged: the whole burst is still there
    await g.admit(caller, "create", cost_units=10)


async def test_a_batch_is_charged_once(tmp_path: Path) -> None:
    clock = FakeClock()
    g = gate(tmp_path, clock)
    caller = g.identify({})
    paid = await g.admit_batch(caller, [("create", 0)] * 8)
    assert paid.prepaid and paid.service == "svc"
    for _ in range(8):  # the operations themselves are not charged again
        await g.admit(paid, "create")
    await g.admit(caller, "read")
    await g.admit(caller, "read")  # 8 + 2 = the burst of 10
    with pytest.raises(RateLimited) as refused:
        await g.admit(caller, "read")
    assert refused.value.retry_after == 1.0  # a wait that will come true
    clock.now += 1.0
    await g.admit(caller, "read")


async def test_a_batch_over_an_operation_bucket_names_it(tmp_path: Path) -> None:
    g = gate(tmp_path, FakeClock())
    caller = g.identify({})
    with pytest.raises(LimitExceeded) as info:
        await g.admit_batch(caller, [("delete", 0)] * 4)
    assert info.value.details == {"limit": "operations.delete", "burst": 3, "cost": 4.0}
    with pytest.raises(LimitExceeded) as info:
        await g.admit_batch(caller, [("create", 0)] * 11)
    assert info.value.details == {"limit": "rate", "burst": 10, "cost": 11.0}
    await g.admit_batch(caller, [("delete", 0)] * 3 + [("create", 0)] * 7)  # all still there
