"""Per-service policies as values: the frozen rules, the compiled lookup tables, the vocabulary."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from proxy.errors import Forbidden

# The operation vocabulary, in the order the documentation lists it.
OPERATION_ORDER: Final[tuple[str, ...]] = (
    "read",
    "list",
    "count",
    "create",
    "update",
    "delete",
    "aggregate",
    "search",
    "transaction",
    "schema",
    "migrate",
    "migrate_sql",
    "monitor",
)
OPERATIONS: Final[frozenset[str]] = frozenset(OPERATION_ORDER)
COST_KEYS: Final[tuple[str, ...]] = (*OPERATION_ORDER, "list_per_100_rows")
REDIS_FAILURE_MODES: Final[tuple[str, ...]] = ("fail_open", "fail_closed")
ALWAYS_READABLE: Final[frozenset[str]] = frozenset({"_id", "_version"})
# A grant on this pattern also grants its operations service-wide (monitor, migrate, ...).
SERVICE_WIDE_PATTERN: Final = "*"
# Distinct collection names whose glob matches are remembered, per service.
GLOB_CACHE_SIZE: Final = 10_000
# Endpoint names under /api/db/ (kept equal to proxy.backends.base.RESERVED by a unit test).
RESERVED_COLLECTIONS: Final[frozenset[str]] = frozenset(
    {
        "health",
        "stats",
        "performance",
        "connections",
        "search",
        "transaction",
        "schema",
        "migrations",
        "audit",
        "metrics",
        "docs",
    }
)

# The keys a policy file may hold, per section (docs/policy.schema.json lists the same).
_TOP_KEYS: Final = ("service", "description", "identity", "grants", "fields", "rows", "limits")
_LIMIT_KEYS: Final = (
    "rate",
    "operations",
    "costs",
    "max_in_flight",
    "statement_timeout_seconds",
    "max_rows",
    "redis_failure",
    "max_open_transactions",
)
_RATE_KEYS: Final = ("per_second", "per_minute", "burst")
_GLOB_CHARS: Final = frozenset("*?[")
HASH_PREFIX: Final = "sha256:"


@dataclass(frozen=True, slots=True)
class RowRule:
    """One policy-injected filter condition: ``field`` must equal a fixed ``value`` or the
    value of the request header named ``header`` (exactly one of the two is set)."""

    field: str
    value: str | int | float | bool | None = None
    header: str | None = None

    def resolve(self, headers: Mapping[str, str]) -> Any:
        """The value ``field`` must have for this request; Forbidden when the header this
        rule takes its value from is absent or empty."""
        if self.header is None:
            return self.value
        value = _header_value(headers, self.header)
        if not value:
            raise Forbidden(
                f"the policy of this service requires the {self.header} request header",
                code="missing_row_header",
                details={"header": self.header},
            )
        return value


def _header_value(headers: Mapping[str, str], name: str) -> str | None:
    """``headers[name]``, case-insensitively even for a plain dict."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = headers.get(lowered)
        if value is None:
            for key, item in headers.items():
                if key.lower() == lowered:
                    return item
    return value


def is_listed(path: str, names: frozenset[str]) -> bool:
    """True if ``path`` or one of its dotted prefixes is in ``names`` (or it is _id/_version)."""
    if path in names:
        return True
    start = 0
    while (dot := path.find(".", start)) >= 0:
        if path[:dot] in names:
            return True
        start = dot + 1
    return path.partition(".")[0] in ALWAYS_READABLE


@dataclass(frozen=True, slots=True)
class FieldRule:
    """Which fields of a collection's documents a service may see and change.

    Names are top-level fields or dotted paths; listing a field covers everything under it
    (``address`` covers ``address.city``), listing a sub-field does not cover its parent.
    None means unrestricted. ``_id`` and ``_version`` always pass both checks (the backend
    refuses changes to them on its own)."""

    readable: frozenset[str] | None = None
    writable: frozenset[str] | None = None

    def can_read(self, path: str) -> bool:
        return self.readable is None or is_listed(path, self.readable)

    def can_write(self, path: str) -> bool:
        return self.writable is None or is_listed(path, self.writable)


@dataclass(frozen=True, slots=True)
class RateSpec:
    """A token bucket: refills ``per_second`` tokens a second, holds at most ``burst``."""

    per_second: float
    burst: int


def _default_costs() -> Mapping[str, float]:
    return MappingProxyType(dict.fromkeys(COST_KEYS, 1.0))


@dataclass(frozen=True, slots=True)
class Limits:
    """A service's rate limits and caps. ``costs`` holds every key of COST_KEYS (default 1)."""

    rate: RateSpec | None = None
    operations: Mapping[str, RateSpec] = field(default_factory=lambda: MappingProxyType({}))
    costs: Mapping[str, float] = field(default_factory=_default_costs)
    max_in_flight: int | None = None
    statement_timeout_seconds: float | None = None
    max_rows: int | None = None
    redis_failure: str = "fail_open"  # one of REDIS_FAILURE_MODES
    max_open_transactions: int | None = None  # interactive ones; None: the sidecar's default


@dataclass(frozen=True, slots=True)
class Grant:
    """``operations`` on every collection matched by one of ``collections`` (names or globs)."""

    collections: tuple[str, ...]
    operations: frozenset[str]


def is_glob(pattern: str) -> bool:
    """True if ``pattern`` holds a wildcard (``*``, ``?`` or ``[...]``)."""
    return not _GLOB_CHARS.isdisjoint(pattern)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True, slots=True)
class _Entry:
    """Everything the policy says about one collection name, resolved once."""

    operations: frozenset[str]
    rows: tuple[RowRule, ...]
    fields: FieldRule | None


class _Tables:
    """The compiled form of a policy: exact names in dicts, globs as regexes, and a bounded
    cache of glob results per distinct collection name."""

    __slots__ = (
        "cache",
        "exact",
        "field_exact",
        "field_globs",
        "grant_exact",
        "grant_globs",
        "row_exact",
        "row_globs",
        "service_wide",
    )

    def __init__(
        self,
        grants: Iterable[Grant],
        fields: Mapping[str, FieldRule],
        rows: Mapping[str, tuple[RowRule, ...]],
    ) -> None:
        exact_ops: dict[str, set[str]] = {}
        globs: list[tuple[re.Pattern[str], frozenset[str]]] = []
        service_wide: set[str] = set()
        for grant in grants:
            for pattern in grant.collections:
                if is_glob(pattern):
                    globs.append((_glob_regex(pattern), grant.operations))
                else:
                    exact_ops.setdefault(pattern, set()).update(grant.operations)
                if pattern == SERVICE_WIDE_PATTERN:
                    service_wide.update(grant.operations)
        self.grant_exact = {name: frozenset(ops) for name, ops in exact_ops.items()}
        self.grant_globs = tuple(globs)
        self.service_wide = frozenset(service_wide)
        self.field_exact = {k: v for k, v in fields.items() if not is_glob(k)}
        self.field_globs = tuple((_glob_regex(k), v) for k, v in fields.items() if is_glob(k))
        self.row_exact = {k: v for k, v in rows.items() if not is_glob(k)}
        self.row_globs = tuple((_glob_regex(k), v) for k, v in rows.items() if is_glob(k))
        self.cache: dict[str, _Entry] = {}
        names = {*self.grant_exact, *self.field_exact, *self.row_exact}
        self.exact = {name: self.resolve(name) for name in names}

    def resolve(self, name: str) -> _Entry:
        """Evaluate every grant and rule for ``name``: operations are the union over all
        matching grants; rows and fields come from the exact key, else the first matching
        glob key in file order."""
        operations = set(self.grant_exact.get(name, ()))
        for regex, granted in self.grant_globs:
            if regex.match(name):
                operations.update(granted)
        field_rule = self.field_exact.get(name)
        if field_rule is None:
            field_rule = next((rule for rx, rule in self.field_globs if rx.match(name)), None)
        rows = self.row_exact.get(name)
        if rows is None:
            rows = next((rules for rx, rules in self.row_globs if rx.match(name)), ())
        return _Entry(frozenset(operations), rows, field_rule)

    def entry(self, name: str) -> _Entry:
        found = self.exact.get(name)
        if found is not None:
            return found
        found = self.cache.get(name)
        if found is None:
            found = self.resolve(name)
            if len(self.cache) >= GLOB_CACHE_SIZE:
                with contextlib.suppress(StopIteration, RuntimeError, KeyError):
                    del self.cache[next(iter(self.cache))]  # the oldest name goes first
            self.cache[name] = found
        return found


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """What one service may do. Build it directly or with ``load_policies``; the lookup
    tables are compiled at construction, so every check is a dict lookup.

    ``fields`` and ``rows`` are keyed by collection name or glob, in file order."""

    service: str
    grants: tuple[Grant, ...]
    token_hashes: frozenset[str] = field(default=frozenset(), repr=False)
    fields: Mapping[str, FieldRule] = field(default_factory=lambda: MappingProxyType({}))
    rows: Mapping[str, tuple[RowRule, ...]] = field(default_factory=lambda: MappingProxyType({}))
    limits: Limits = field(default_factory=Limits)
    description: str = ""
    _tables: _Tables = field(init=False, repr=False, compare=False)
    # What decides what this service may see and do, hashed (grants, field and row rules;
    # not limits): equal in every process that loaded the same policy. Idempotent
    # replays are answered only under the digest their reply was made under.
    digest: str = field(init=False, repr=False, compare=False)
    # The request headers the row rules take values from (lower case, sorted).
    row_headers: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tables", _Tables(self.grants, self.fields, self.rows))
        object.__setattr__(self, "digest", _policy_digest(self))
        headers = {r.header.lower() for rules in self.rows.values() for r in rules if r.header}
        object.__setattr__(self, "row_headers", tuple(sorted(headers)))

    def allowed(self, collection: str, operation: str) -> bool:
        """True if some grant gives ``operation`` on ``collection``."""
        return operation in self._tables.entry(collection).operations

    def allowed_service_wide(self, operation: str) -> bool:
        """True if ``operation`` is granted on the pattern ``"*"`` (every collection): the
        check for endpoints that name no collection (``monitor``, ``migrate``, ...)."""
        return operation in self._tables.service_wide

    def operations(self, collection: str) -> frozenset[str]:
        """Every operation granted on ``collection``."""
        return self._tables.entry(collection).operations

    def entry(self, collection: str) -> _Entry:
        """Operations, row rules and field rule for ``collection``, in one lookup."""
        return self._tables.entry(collection)

    def row_rules(self, collection: str) -> tuple[RowRule, ...]:
        """The filters injected for ``collection`` (empty when none apply)."""
        return self._tables.entry(collection).rows

    def field_rule(self, collection: str) -> FieldRule | None:
        """The field rule for ``collection``; None when every field is open."""
        return self._tables.entry(collection).fields


def _policy_digest(policy: ServicePolicy) -> str:
    """A stable hash of what decides visibility: the reprs of strings, numbers, booleans
    and None, in file order, with every set sorted (no hash-seed dependence)."""

    def names(values: frozenset[str] | None) -> tuple[str, ...] | None:
        return None if values is None else tuple(sorted(values))

    canon = (
        policy.service,
        tuple((g.collections, names(g.operations)) for g in policy.grants),
        tuple((k, names(r.readable), names(r.writable)) for k, r in policy.fields.items()),
        tuple(
            (k, tuple((r.field, type(r.value).__name__, r.value, r.header) for r in rules))
            for k, rules in policy.rows.items()
        ),
    )
    return hashlib.sha256(repr(canon).encode()).hexdigest()[:32]


VERIFIED_TOKENS = 1024  # distinct valid tokens remembered per policy set


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every service's policy, by name and by token hash."""

    services: Mapping[str, ServicePolicy]
    _by_hash: Mapping[str, ServicePolicy] = field(init=False, repr=False, compare=False)
    # tokens already verified against a stored hash -> their policy: a token presented
    # again (every request of a service) costs a dict lookup, not a SHA-256. Bounded; it
    # belongs to this set, so a reload starts afresh. Never logged or exported.
    _verified: dict[str, ServicePolicy] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_hash: dict[str, ServicePolicy] = {}
        for policy in self.services.values():
            for token_hash in policy.token_hashes:
                other = by_hash.setdefault(token_hash.lower(), policy)
                if other is not policy:
                    raise ValueError(
                        f"services {other.service!r} and {policy.service!r} share a token hash"
                    )
        object.__setattr__(self, "_by_hash", by_hash)
        object.__setattr__(self, "_verified", {})

    @property
    def has_tokens(self) -> bool:
        """True if some service can be reached by a bearer token (token mode)."""
        return bool(self._by_hash)

    def get(self, service: str) -> ServicePolicy | None:
        return self.services.get(service)

    def by_token(self, token: str) -> ServicePolicy | None:
        """The service whose policy stores the hash of ``token``; None if no policy does."""
        if not token:
            return None
        known = self._verified.get(token)
        if known is not None:
            return known
        presented = hash_token(token)
        policy = self._by_hash.get(presented)
        if policy is None:
            return None
        # The dict lookup found an equal key; the constant-time comparison is the one the
        # decision rests on, so that it never depends on an early-exit string compare.
        for stored in policy.token_hashes:
            if hmac.compare_digest(stored.lower().encode(), presented.encode()):
                verified = self._verified
                if len(verified) >= VERIFIED_TOKENS:
                    verified.clear()
                verified[token] = policy
                return policy
        return None


def hash_token(token: str) -> str:
    """``"sha256:<hex>"`` of ``token`` (UTF-8): the form policy files store."""
    digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
    return HASH_PREFIX + digest
