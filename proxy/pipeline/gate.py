"""The gate: who is asking (identity, with the service's compiled decisions) and how often
(rate limits, in-flight caps). The policy set is swapped as one reference on reload."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from proxy.errors import Forbidden, LimitExceeded, RateLimited, Unauthorized, Unavailable
from proxy.policy import PolicySet, ServicePolicy, load_policies
from proxy.policy.decide import OPEN_DECISIONS, Decision, Decisions, decisions_for, denial
from proxy.query.spec import AuditScope, Keep
from proxy.resilience import ratelimit
from proxy.resilience.ratelimit import ConcurrencyLimiter, LocalLimiter, Rate

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    """One request's identity and the policy that judges it (None: enforcement is off)."""

    service: str
    policy: ServicePolicy | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    prepaid: bool = False  # the rate limits were charged already (the operations of a batch)
    decisions: Decisions = OPEN_DECISIONS  # compiled from ``policy`` when not given
    metered: bool = field(init=False, default=False)  # rate limits still to be charged

    def __post_init__(self) -> None:
        if self.decisions is OPEN_DECISIONS and self.policy is not None:
            object.__setattr__(self, "decisions", decisions_for(self.policy))
        object.__setattr__(self, "metered", self.policy is not None and not self.prepaid)


OPEN = Caller("anonymous")


def decide(caller: Caller, collection: str, operation: str) -> Decision:
    """The compiled decision for the caller's service (one lookup)."""
    return caller.decisions.get(collection, operation)


def authorize(caller: Caller, collection: str, operation: str) -> None:
    caller.decisions.get(collection, operation).authorize()


def authorize_service_wide(caller: Caller, operation: str) -> None:
    if not caller.decisions.service_wide(operation):
        raise denial(operation, "*")


def audit_scope(caller: Caller) -> AuditScope | None:
    """The audit log a caller may read (see ``Decisions.audit_scope``)."""
    return caller.decisions.audit_scope(caller.service)


def keep_spec(caller: Caller, collection: str) -> Keep | None:
    """What a full replacement by this caller must keep of the stored document: every
    field it may not write or may not read (None: it may write and read everything)."""
    return caller.decisions.get(collection, "update").keep


# ---- rate limits and in-flight caps ---------------------------------------------------


class RemoteLimiter(Protocol):
    """What the gatekeeper needs of a shared (Redis) limiter."""

    async def check(self, key: str, rate: Rate, cost: float = 1.0) -> ratelimit.Decision: ...


@dataclass
class _ServiceLimits:
    rate: Rate | None
    operations: dict[str, Rate]
    costs: Mapping[str, float]
    in_flight: ConcurrencyLimiter | None
    fail_closed: bool
    key: str = ""  # the bucket of the service's overall rate
    op_keys: dict[str, str] = field(default_factory=dict)  # the per-operation buckets


def _compile_limits(policy: ServicePolicy) -> _ServiceLimits:
    lim = policy.limits
    service = policy.service
    return _ServiceLimits(
        rate=Rate(lim.rate.per_second, lim.rate.burst) if lim.rate else None,
        operations={op: Rate(s.per_second, s.burst) for op, s in lim.operations.items()},
        costs=lim.costs,
        in_flight=ConcurrencyLimiter(lim.max_in_flight) if lim.max_in_flight else None,
        fail_closed=lim.redis_failure == "fail_closed",
        key=f"{service}:*",
        op_keys={op: f"{service}:{op}" for op in lim.operations},
    )


class Gatekeeper:
    """Identity, policy set (hot-swappable), and rate limiting for one sidecar."""

    def __init__(
        self,
        policies: PolicySet | None,
        *,
        sidecar_service: str | None = None,
        remote: RemoteLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
        policy_dir: str | None = None,
        load_caps: Mapping[str, Any] | None = None,
    ) -> None:
        self.sidecar_service = sidecar_service
        self.remote = remote
        self.local = LocalLimiter(clock)
        self.policy_dir = policy_dir
        self._load_caps = dict(load_caps or {})
        self.policies: PolicySet | None = None
        self._limits: dict[str, _ServiceLimits] = {}
        self.reload_error: str | None = None
        self.counters = {"rate_limited": 0, "redis_failures": 0, "denied": 0, "reloads": 0}
        if policies is not None:
            self.install(policies)

    @property
    def enforcing(self) -> bool:
        return self.policies is not None

    @property
    def token_mode(self) -> bool:
        return self.enforcing and self.sidecar_service is None

    def install(self, policies: PolicySet) -> None:
        """Swap in a whole new policy set (one assignment: no request sees a mix)."""
        limits = {name: _compile_limits(p) for name, p in policies.services.items()}
        for policy in policies.services.values():
            decisions_for(policy)  # compiled now, not on a request
        self.policies, self._limits = policies, limits

    def reload(self) -> bool:
        """Re-read the policy directory; on any problem keep the current set and say why."""
        if self.policy_dir is None:
            return False
        try:
            fresh = load_policies(self.policy_dir, **self._load_caps)
        except Exception as exc:  # ConfigError lists every problem
            self.reload_error = str(exc)
            log.error("policy reload failed, keeping the previous policies: %s", exc)
            return False
        self.install(fresh)
        self.reload_error = None
        self.counters["reloads"] += 1
        log.info("policies reloaded: %s", ", ".join(sorted(fresh.services)))
        return True

    # -- identity ------------------------------------------------------------------------

    def identify(self, headers: Mapping[str, str]) -> Caller:
        policies = self.policies
        if policies is None:
            return Caller(self.sidecar_service or "anonymous", None, headers)
        if self.sidecar_service is not None:
            policy = policies.get(self.sidecar_service)
            if policy is None:
                raise Forbidden("this sidecar's service has no policy", code="no_policy")
            return Caller(policy.service, policy, headers)
        auth = headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send Authorization: Bearer <token>", code="missing_token")
        policy = policies.by_token(token.strip())
        if policy is None:
            raise Unauthorized("unknown token", code="invalid_token")
        return Caller(policy.service, policy, headers)

    # -- limits --------------------------------------------------------------------------

    def max_rows(self, caller: Caller) -> int | None:
        return caller.policy.limits.max_rows if caller.policy else None

    def check_row_limit(self, caller: Caller, limit: int) -> None:
        """A page larger than the service's ``max_rows`` is refused (400)."""
        cap = self.max_rows(caller)
        if cap is not None and limit > cap:
            raise LimitExceeded(
                f"limit may be at most {cap} for this service",
                code="limit_too_large",
                details={"max_rows": cap},
            )

    def statement_timeout(self, caller: Caller) -> float | None:
        return caller.policy.limits.statement_timeout_seconds if caller.policy else None

    def cost(self, caller: Caller, operation: str, rows: int = 0) -> float:
        lim = self._limits.get(caller.service)
        if lim is None:
            return 1.0
        cost = lim.costs.get(operation, 1.0)
        if operation == "list" and rows:
            cost += lim.costs.get("list_per_100_rows", 1.0) * math.ceil(rows / 100)
        return cost

    def enter(self, caller: Caller) -> ConcurrencyLimiter | None:
        """Take one of the service's in-flight slots (429 when all are taken). Returns the
        cap to ``release()`` when the request is over, or None when there is no cap."""
        if caller.policy is None:
            return None
        lim = self._limits.get(caller.service)
        cap = lim.in_flight if lim is not None else None
        if cap is None:
            return None
        if not cap.try_acquire():
            self.counters["rate_limited"] += 1
            raise RateLimited(
                "too many requests in flight for this service",
                code="too_many_in_flight",
                retry_after=1,
            )
        return cap

    async def admit(
        self, caller: Caller, operation: str, rows: int = 0, cost_units: int = 1
    ) -> None:
        """Charge the service's buckets (``cost_units`` items of the operation, e.g. a bulk
        create); 429 with RateLimit headers when over; 400 ``cost_exceeds_limit`` when the
        request costs more than a bucket holds (no wait would ever admit it)."""
        lim = self._limits.get(caller.service) if caller.policy and not caller.prepaid else None
        if lim is None:
            return
        op_rate = lim.operations.get(operation)
        units = float(cost_units)
        cost = self.cost(caller, operation, rows) * cost_units if lim.rate is not None else 0.0
        if lim.rate is not None and not lim.rate.fits(cost):
            raise _too_costly("rate", lim.rate, cost)
        if op_rate is not None and not op_rate.fits(units):
            raise _too_costly(f"operations.{operation}", op_rate, units)
        if self.remote is None:  # decided here and now: no awaits on the hot path
            local = self.local
            if lim.rate is not None and not local.take(lim.key, lim.rate, cost):
                self._refuse(local.check(lim.key, lim.rate, cost))
            if op_rate is not None:
                key = lim.op_keys[operation]
                if not local.take(key, op_rate, units):
                    self._refuse(local.check(key, op_rate, units))
            return
        if lim.rate is not None:
            await self._charge(lim, lim.key, lim.rate, cost)
        if op_rate is not None:
            await self._charge(lim, lim.op_keys[operation], op_rate, units)

    async def admit_batch(self, caller: Caller, operations: Sequence[tuple[str, int]]) -> Caller:
        """Charge a batch once, before any work: the ``rate`` bucket takes the sum of what
        each operation ((operation, rows) pairs) would cost alone, the ``transaction``
        bucket one token per operation, and each operation's own bucket one per use.
        Returns the caller to run the operations with: prepaid, so never charged again."""
        lim = self._limits.get(caller.service) if caller.policy and not caller.prepaid else None
        if lim is None:
            return caller
        charges: list[tuple[str, Rate, float, str]] = []
        if lim.rate is not None:
            cost = sum(self.cost(caller, op, rows) for op, rows in operations)
            charges.append((lim.key, lim.rate, cost, "rate"))
        counts = Counter(op for op, _ in operations)
        counts["transaction"] = len(operations)
        for op, n in counts.items():
            rate = lim.operations.get(op)
            if rate is not None:
                charges.append((lim.op_keys[op], rate, float(n), f"operations.{op}"))
        for _, rate, cost, where in charges:
            if not rate.fits(cost):
                raise _too_costly(where, rate, cost)
        for key, rate, cost, _ in charges:
            await self._charge(lim, key, rate, cost)
        return replace(caller, prepaid=True)

    def _refuse(self, decision: ratelimit.Decision) -> None:
        if decision.allowed:  # cannot happen: a refused take changes no state
            return
        self.counters["rate_limited"] += 1
        raise RateLimited(
            "rate limit exceeded",
            retry_after=max(1.0, decision.retry_after),
            headers=decision.headers(),
        )

    async def _charge(self, lim: _ServiceLimits, key: str, rate: Rate, cost: float) -> None:
        self._refuse(await self._decide(lim, key, rate, cost))

    async def _decide(
        self, lim: _ServiceLimits, key: str, rate: Rate, cost: float
    ) -> ratelimit.Decision:
        if self.remote is None:
            return self.local.check(key, rate, cost)
        try:
            return await self.remote.check(key, rate, cost)
        except Exception:  # RedisUnavailable: decided by the policy, counted
            self.counters["redis_failures"] += 1
            if lim.fail_closed:
                raise Unavailable(
                    "the shared rate limiter is unreachable",
                    code="rate_limiter_unavailable",
                    retry_after=1,
                ) from None
            return self.local.check(key, rate, cost)  # fail open: still bounded locally


def _too_costly(where: str, rate: Rate, cost: float) -> LimitExceeded:
    return LimitExceeded(
        f"this request costs {cost:g} tokens of the {where} limit, whose burst is "
        f"{rate.burst}: it can never be admitted; send it in smaller parts",
        code="cost_exceeds_limit",
        details={"limit": where, "burst": rate.burst, "cost": cost},
    )
