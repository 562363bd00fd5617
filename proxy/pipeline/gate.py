"""The gatekeeper: who is asking (identity), what they may do (grants, row and field rules)
and how often (rate limits, in-flight caps) — the policy half of the operation pipeline.

The policy set is swapped as one reference on reload; a request takes its caller (and
so its policy) once, at identification, and is judged by that one policy to the end.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from proxy.errors import Forbidden, LimitExceeded, RateLimited, Unauthorized, Unavailable
from proxy.policy import (
    SERVICE_WIDE_PATTERN,
    FieldRule,
    PolicySet,
    ServicePolicy,
    is_glob,
    load_policies,
)
from proxy.query.ast import (
    And,
    ElemMatch,
    Eq,
    FieldCond,
    Filter,
    Nor,
    Not,
    Or,
    Path,
    Pred,
    SortKey,
    Update,
)
from proxy.query.spec import AuditScope, Keep
from proxy.resilience.ratelimit import ConcurrencyLimiter, Decision, LocalLimiter, Rate

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    """One request's identity and the policy that judges it (None: enforcement is off)."""

    service: str
    policy: ServicePolicy | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    prepaid: bool = False  # the rate limits were charged already (the operations of a batch)


OPEN = Caller("anonymous")


def _deny(operation: str, collection: str) -> Forbidden:
    return Forbidden(
        f"service may not {operation} on {collection!r}",
        code="permission_denied",
        details={"missing": {"operation": operation, "collection": collection}},
    )


# ---- grants, rows, fields -------------------------------------------------------------


def authorize(caller: Caller, collection: str, operation: str) -> None:
    policy = caller.policy
    if policy is not None and not policy.allowed(collection, operation):
        raise _deny(operation, collection)


def authorize_service_wide(caller: Caller, operation: str) -> None:
    policy = caller.policy
    if policy is not None and not policy.allowed_service_wide(operation):
        raise _deny(operation, "*")


def row_guard(caller: Caller, collection: str) -> Filter | None:
    """The policy's row rules as a filter (equality on each field), or None."""
    policy = caller.policy
    if policy is None:
        return None
    rules = policy.row_rules(collection)
    if not rules:
        return None
    conds = tuple(
        FieldCond(Path(tuple(r.field.split("."))), (Eq(r.resolve(caller.headers)),)) for r in rules
    )
    return conds[0] if len(conds) == 1 else And(conds)


def row_values(caller: Caller, collection: str) -> dict[str, Any]:
    policy = caller.policy
    if policy is None:
        return {}
    return {r.field: r.resolve(caller.headers) for r in policy.row_rules(collection)}


def _same(a: Any, b: Any) -> bool:
    return (type(a) is type(b) and a == b) or (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )


def _outside(field_name: str) -> Forbidden:
    return Forbidden(
        f"the write would put the document outside the service's rows ({field_name})",
        code="row_rule_violation",
        details={"field": field_name},
    )


def _lookup(doc: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    cur: Any = doc
    for seg in dotted.split("."):
        if not isinstance(cur, dict) or seg not in cur:
            return False, None
        cur = cur[seg]
    return True, cur


def check_row_document(caller: Caller, collection: str, doc: Mapping[str, Any]) -> None:
    """A created or replacing document must carry the row rules' values."""
    for name, value in row_values(caller, collection).items():
        present, actual = _lookup(doc, name)
        if not present or not _same(actual, value):
            raise _outside(name)


def check_row_update(caller: Caller, collection: str, update: Update, upsert: bool) -> None:
    """Update operators may touch a row-rule field only to $set it to the rule's value."""
    values = row_values(caller, collection)
    if not values:
        return
    set_by_update: set[str] = set()
    for op in update.ops:
        touched = [op.path.dotted] + ([op.value.dotted] if op.op == "rename" else [])
        for name, value in values.items():
            for path in touched:
                if path == name or path.startswith(name + ".") or name.startswith(path + "."):
                    if op.op == "set" and path == name and _same(op.value, value):
                        set_by_update.add(name)
                        continue
                    raise _outside(name)
    if upsert:
        for name in values:
            if name not in set_by_update:
                raise Forbidden(
                    f"an upsert must $set {name} to the service's row value",
                    code="row_rule_violation",
                    details={"field": name},
                )


def check_row_patch(caller: Caller, collection: str, patch: Mapping[str, Any]) -> None:
    """A merge patch may leave a row-rule field alone or set it to the rule's value."""
    for name, value in row_values(caller, collection).items():
        node: Any = patch
        for seg in name.split("."):
            if not isinstance(node, dict):
                raise _outside(name)  # a parent replaced by a non-object (or null)
            if seg not in node:
                break  # untouched
            node = node[seg]
        else:
            if not _same(node, value):
                raise _outside(name)


def _hidden(path: str) -> Forbidden:
    return Forbidden(
        f"the service may not read field {path!r}",
        code="field_not_readable",
        details={"field": path},
    )


def readable_rule(caller: Caller, collection: str) -> FieldRule | None:
    policy = caller.policy
    if policy is None:
        return None
    rule = policy.field_rule(collection)
    return rule if rule is not None and rule.readable is not None else None


def check_filter_readable(caller: Caller, collection: str, flt: Filter | None) -> None:
    """Filtering on a hidden field is refused outright: no oracle by binary search."""
    rule = readable_rule(caller, collection)
    if rule is None or flt is None:
        return
    for path in filter_paths(flt, ""):
        if not rule.can_read(path):
            raise _hidden(path)


def check_sort_readable(caller: Caller, collection: str, sort: tuple[SortKey, ...]) -> None:
    rule = readable_rule(caller, collection)
    if rule is None:
        return
    for key in sort:
        if not rule.can_read(key.path.dotted):
            raise _hidden(key.path.dotted)


def check_fields_readable(caller: Caller, collection: str, fields: tuple[Path, ...] | None) -> None:
    rule = readable_rule(caller, collection)
    if rule is None or fields is None:
        return
    for path in fields:
        if not rule.can_read(path.dotted):
            raise _hidden(path.dotted)


def filter_paths(flt: Filter, prefix: str) -> Iterator[str]:
    if isinstance(flt, FieldCond):
        full = prefix + flt.path.dotted
        yield full
        for pred in flt.preds:
            yield from _pred_paths(pred, full + ".")
    elif isinstance(flt, And | Or | Nor):
        for child in flt.children:
            yield from filter_paths(child, prefix)


def _pred_paths(pred: Pred, prefix: str) -> Iterator[str]:
    if isinstance(pred, ElemMatch):
        if pred.filter is not None:
            yield from filter_paths(pred.filter, prefix)
        for p in pred.preds or ():
            yield from _pred_paths(p, prefix)
    elif isinstance(pred, Not):
        for p in pred.preds:
            yield from _pred_paths(p, prefix)


def visible(caller: Caller, collection: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The document as the caller may see it: only readable fields."""
    rule = readable_rule(caller, collection)
    if rule is None:
        return doc
    return _project_readable(doc, rule, "")


def _project_readable(doc: dict[str, Any], rule: FieldRule, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = prefix + key
        if rule.can_read(path):
            out[key] = value
        elif isinstance(value, dict):
            inner = _project_readable(value, rule, path + ".")
            if inner:
                out[key] = inner
    return out


def _writable_rule(caller: Caller, collection: str) -> FieldRule | None:
    policy = caller.policy
    if policy is None:
        return None
    rule = policy.field_rule(collection)
    return rule if rule is not None and rule.writable is not None else None


def _not_writable(path: str) -> Forbidden:
    return Forbidden(
        f"the service may not write field {path!r}",
        code="field_not_writable",
        details={"field": path},
    )


def check_document_writable(caller: Caller, collection: str, doc: Mapping[str, Any]) -> None:
    rule = _writable_rule(caller, collection)
    if rule is not None:
        _check_tree(doc, rule, "")


def _check_tree(doc: Mapping[str, Any], rule: FieldRule, prefix: str) -> None:
    assert rule.writable is not None
    for key, value in doc.items():
        path = prefix + key
        if (key in ("_id", "_version") and not prefix) or rule.can_write(path):
            continue
        deeper = any(w.startswith(path + ".") for w in rule.writable)
        if deeper and isinstance(value, dict):
            _check_tree(value, rule, path + ".")
            continue
        raise _not_writable(path)


def audit_scope(caller: Caller) -> AuditScope | None:
    """The audit log a caller may read: changes to the collections it is granted ``read``
    on (None: all of it, when read is granted on every collection or nothing enforces)."""
    policy = caller.policy
    if policy is None:
        return None
    patterns = {p for g in policy.grants if "read" in g.operations for p in g.collections}
    if SERVICE_WIDE_PATTERN in patterns:
        return None
    names = tuple(sorted(p for p in patterns if not is_glob(p)))
    return AuditScope(names, tuple(sorted(p for p in patterns if is_glob(p))), caller.service)


def keep_spec(caller: Caller, collection: str) -> Keep | None:
    """What a full replacement by this caller must keep of the stored document: every
    field it may not write or may not read (None: it may write and read everything)."""
    policy = caller.policy
    if policy is None:
        return None
    rule = policy.field_rule(collection)
    if rule is None or (rule.readable is None and rule.writable is None):
        return None
    return _keep_of(rule)


@functools.lru_cache(maxsize=1024)
def _keep_of(rule: FieldRule) -> Keep:
    """A field rule's open paths (listed as writable and readable, by either list) and
    the paths above any listed one (replacement descends into those)."""
    open_paths = {p for p in rule.writable or () if rule.can_read(p)}
    open_paths |= {p for p in rule.readable or () if rule.can_write(p)}
    partial: set[str] = set()
    for path in (*(rule.writable or ()), *(rule.readable or ())):
        parts = path.split(".")
        partial.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return Keep(frozenset(open_paths), frozenset(partial - open_paths))


def check_update_writable(caller: Caller, collection: str, update: Update) -> None:
    rule = _writable_rule(caller, collection)
    if rule is None:
        return
    for op in update.ops:
        for path in [op.path.dotted] + ([op.value.dotted] if op.op == "rename" else []):
            if not rule.can_write(path):
                raise _not_writable(path)


# ---- rate limits and in-flight caps ---------------------------------------------------


class RemoteLimiter(Protocol):
    """What the gatekeeper needs of a shared (Redis) limiter."""

    async def check(self, key: str, rate: Rate, cost: float = 1.0) -> Decision: ...


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

    def _refuse(self, decision: Decision) -> None:
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

    async def _decide(self, lim: _ServiceLimits, key: str, rate: Rate, cost: float) -> Decision:
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


def check_row_limit(gate: Gatekeeper, caller: Caller, limit: int) -> None:
    cap = gate.max_rows(caller)
    if cap is not None and limit > cap:
        raise LimitExceeded(
            f"limit may be at most {cap} for this service",
            code="limit_too_large",
            details={"max_rows": cap},
        )
