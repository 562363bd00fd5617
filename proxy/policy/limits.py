"""Parsing the limits section of a policy file: rates, costs and caps under global ceilings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from proxy.policy.model import (
    _LIMIT_KEYS,
    _RATE_KEYS,
    COST_KEYS,
    OPERATION_ORDER,
    REDIS_FAILURE_MODES,
    Limits,
    RateSpec,
)
from proxy.policy.sections import operation_problem
from proxy.problems import Problems, check_keys, hint, integer, mapping, number, show, type_name

_MAX_PER_SECOND: Final = 1_000_000.0  # what the limiter can time (1 us emission interval)
_MAX_BURST: Final = 1_000_000_000
_MAX_WINDOW_SECONDS: Final = 366 * 86400.0  # burst / per_second: the refill of an empty bucket


@dataclass(frozen=True, slots=True)
class Caps:
    """Global ceilings the policy caps must stay under (None: unchecked)."""

    statement_timeout_seconds: float | None = None
    max_rows: int | None = None
    max_open_transactions: int | None = None


def _rate_per_second(raw: Mapping[Any, object], where: str, problems: Problems) -> float | None:
    if ("per_second" in raw) == ("per_minute" in raw):
        problems.add(where, "must set exactly one of per_second or per_minute")
        return None
    if "per_second" in raw:
        return number(raw["per_second"], f"{where}.per_second", problems)
    per_minute = number(raw["per_minute"], f"{where}.per_minute", problems)
    return None if per_minute is None else per_minute / 60.0


def _parse_rate(value: object, where: str, problems: Problems) -> RateSpec | None:
    raw = mapping(value, where, problems)
    if raw is None:
        return None
    check_keys(raw, _RATE_KEYS, where, problems)
    per_second = _rate_per_second(raw, where, problems)
    if per_second is not None and per_second > _MAX_PER_SECOND:
        problems.add(where, f"must be at most {int(_MAX_PER_SECOND)} per second")
        per_second = None
    burst = None
    if "burst" not in raw:
        problems.add(f"{where}.burst", "is required")
    else:
        burst = integer(raw["burst"], f"{where}.burst", problems)
        if burst is not None and burst > _MAX_BURST:
            problems.add(f"{where}.burst", f"must be at most {_MAX_BURST}")
            burst = None
    if per_second is None or burst is None:
        return None
    if burst / per_second > _MAX_WINDOW_SECONDS:
        problems.add(where, "refills an empty bucket (burst / rate) in more than a year")
        return None
    return RateSpec(per_second=per_second, burst=burst)


def _parse_operation_rates(value: object, problems: Problems) -> dict[str, RateSpec]:
    where = "limits.operations"
    raw = mapping(value, where, problems)
    rates: dict[str, RateSpec] = {}
    for key, body in (raw or {}).items():
        at = problems.join(where, key)
        message = operation_problem(key) if isinstance(key, str) else "unknown operation"
        if message is not None:
            problems.add(at, message)
        elif (spec := _parse_rate(body, at, problems)) is not None:
            rates[key] = spec
    return rates


def _parse_costs(value: object, problems: Problems) -> dict[str, float]:
    where = "limits.costs"
    raw = mapping(value, where, problems)
    costs = dict.fromkeys(COST_KEYS, 1.0)
    for key, body in (raw or {}).items():
        at = problems.join(where, key)
        if key not in COST_KEYS:
            problems.add(at, f"unknown cost key{hint(str(key), COST_KEYS)}")
        elif (cost := number(body, at, problems, allow_zero=True)) is not None:
            costs[key] = cost
    return costs


def _parse_caps(raw: Mapping[Any, object], caps: Caps, problems: Problems) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if raw.get("max_in_flight") is not None:
        values["max_in_flight"] = integer(raw["max_in_flight"], "limits.max_in_flight", problems)
    if raw.get("statement_timeout_seconds") is not None:
        where = "limits.statement_timeout_seconds"
        timeout = number(raw["statement_timeout_seconds"], where, problems)
        cap = caps.statement_timeout_seconds
        if timeout is not None and cap is not None and timeout > cap:
            problems.add(
                where, f"must be <= the global statement timeout ({cap:g} s), got {timeout:g}"
            )
        values["statement_timeout_seconds"] = timeout
    if raw.get("max_rows") is not None:
        max_rows = integer(raw["max_rows"], "limits.max_rows", problems)
        if max_rows is not None and caps.max_rows is not None and max_rows > caps.max_rows:
            problems.add(
                "limits.max_rows", f"must be <= the global page size limit ({caps.max_rows})"
            )
        values["max_rows"] = max_rows
    if raw.get("max_open_transactions") is not None:
        where = "limits.max_open_transactions"
        cap = caps.max_open_transactions
        most = integer(raw["max_open_transactions"], where, problems)
        if most is not None and cap is not None and most > cap:
            problems.add(where, f"must be <= the sidecar's max_open_transactions ({cap})")
        values["max_open_transactions"] = most
    mode = raw.get("redis_failure", "fail_open")
    if mode not in REDIS_FAILURE_MODES:
        shown = show(mode) if isinstance(mode, str) else type_name(mode)
        problems.add("limits.redis_failure", f"must be fail_open or fail_closed (got {shown})")
    else:
        values["redis_failure"] = mode
    return values


def parse_limits(value: object, caps: Caps, problems: Problems) -> Limits:
    raw = mapping(value, "limits", problems)
    if raw is None:
        return Limits()
    check_keys(raw, _LIMIT_KEYS, "limits", problems)
    rate = None if raw.get("rate") is None else _parse_rate(raw["rate"], "limits.rate", problems)
    values = {k: v for k, v in _parse_caps(raw, caps, problems).items() if v is not None}
    costs = _parse_costs(raw.get("costs"), problems)
    if rate is not None:
        for key in OPERATION_ORDER:
            if costs[key] > rate.burst:
                problems.add(
                    f"limits.costs.{key}",
                    f"{costs[key]:g} is more than limits.rate.burst ({rate.burst}): "
                    "it could never be admitted",
                )
    return Limits(
        rate=rate,
        operations=MappingProxyType(_parse_operation_rates(raw.get("operations"), problems)),
        costs=MappingProxyType(costs),
        **values,
    )
