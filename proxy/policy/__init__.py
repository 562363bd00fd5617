"""Per-service policies: the frozen model, compiled lookup tables, and the all-problems loader."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import hmac
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import yaml

from proxy.errors import ConfigError, Forbidden

__all__ = [
    "ALWAYS_READABLE",
    "COST_KEYS",
    "GLOB_CACHE_SIZE",
    "OPERATIONS",
    "OPERATION_ORDER",
    "REDIS_FAILURE_MODES",
    "RESERVED_COLLECTIONS",
    "SERVICE_WIDE_PATTERN",
    "FieldRule",
    "Grant",
    "Limits",
    "PolicySet",
    "RateSpec",
    "RowRule",
    "ServicePolicy",
    "check_directory",
    "hash_token",
    "is_glob",
    "load_policies",
    "summarize",
]

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
    }
)

_COLLECTION_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
_GLOB_CHARS: Final = frozenset("*?[")
_NAME_CHAR_RE: Final = re.compile(r"[A-Za-z0-9_]")
_BRACKET_RE: Final = re.compile(r"\[(!?)([A-Za-z0-9_-]+)\]")
_MAX_PATTERN_LENGTH: Final = 128
_SERVICE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
_HEADER_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_HASH_PREFIX: Final = "sha256:"
_HASH_RE: Final = re.compile(r"sha256:[0-9a-fA-F]{64}")
_MAX_PATH_SEGMENTS: Final = 16
_MAX_PATH_LENGTH: Final = 256
_MAX_FILE_BYTES: Final = 1 << 20
_PLAIN_KEY_RE: Final = re.compile(r"[A-Za-z0-9_.*?!\[\]+-]{1,64}")
_POLICY_SUFFIXES: Final = (".yaml", ".yml")


# --------------------------------------------------------------------------- model


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


def _listed(path: str, names: frozenset[str]) -> bool:
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
        return self.readable is None or _listed(path, self.readable)

    def can_write(self, path: str) -> bool:
        return self.writable is None or _listed(path, self.writable)


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
    return _HASH_PREFIX + digest


# --------------------------------------------------------------------------- problems


class _Problems:
    """Every problem of one file, each prefixed with the file name and where it was found."""

    __slots__ = ("items", "prefix")

    def __init__(self, items: list[str], prefix: str) -> None:
        self.items = items
        self.prefix = prefix

    def add(self, where: str, message: str) -> None:
        self.items.append(
            f"{self.prefix}: {where}: {message}" if where else f"{self.prefix}: {message}"
        )


def _show(value: str, limit: int = 64) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _join(path: str, key: object) -> str:
    shown = key if isinstance(key, str) and _PLAIN_KEY_RE.fullmatch(key) else _show(str(key))
    return f"{path}.{shown}" if path else str(shown)


def _type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return names.get(type(value), type(value).__name__)


def _hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _mapping(value: object, where: str, problems: _Problems) -> Mapping[Any, object] | None:
    """``value`` as a mapping ({} when null); None (and a problem) otherwise."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    problems.add(where, f"must be a mapping, got {_type_name(value)}")
    return None


def _check_keys(
    raw: Mapping[Any, object],
    allowed: Collection[str],
    where: str,
    problems: _Problems,
    *,
    secret: bool = False,
) -> None:
    """Every key of ``raw`` not in ``allowed`` is a problem; in a ``secret`` section (where
    a token may have been pasted as a key) the key is shown cut to 8 characters."""
    for key in raw:
        if key in allowed:
            continue
        if secret:
            problems.add(f"{where}.{_show(str(key)[:8] + '...')}", "unknown key")
        else:
            problems.add(_join(where, key), f"unknown key{_hint(str(key), allowed)}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(
    value: object, where: str, problems: _Problems, *, allow_zero: bool = False
) -> float | None:
    """A finite number > 0 (>= 0 with ``allow_zero``); None (and a problem) otherwise."""
    if not _is_number(value):
        problems.add(where, f"must be a number, got {_type_name(value)}")
        return None
    assert isinstance(value, int | float)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "a number >= 0" if allow_zero else "a positive number"
        problems.add(where, f"must be {bound} (got {value})")
        return None
    return float(value)


def _integer(value: object, where: str, problems: _Problems) -> int | None:
    """An integer >= 1; None (and a problem) otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        problems.add(where, f"must be an integer, got {_type_name(value)}")
        return None
    if value < 1:
        problems.add(where, f"must be >= 1 (got {value})")
        return None
    return value


def _string_list(
    value: object,
    where: str,
    problems: _Problems,
    check: Callable[[str], str | None],
    *,
    allow_empty: bool = False,
) -> dict[str, int]:
    """The valid strings of the list ``value``, each with its index; every bad item,
    duplicate or an empty list (unless ``allow_empty``) is a problem. ``check`` returns a
    problem message or None."""
    if not isinstance(value, list):
        problems.add(where, f"must be a list, got {_type_name(value)}")
        return {}
    if not value and not allow_empty:
        problems.add(where, "must not be empty")
    items: dict[str, int] = {}
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(item, str):
            problems.add(at, f"must be a string, got {_type_name(item)}")
        elif (message := check(item)) is not None:
            problems.add(at, message)
        elif item in items:
            problems.add(at, f"duplicate {_show(item)} (also {where}[{items[item]}])")
        else:
            items[item] = index
    return items


# --------------------------------------------------------------------------- item checks


def _bracket_problem(pattern: str, start: int) -> tuple[int, str | None]:
    """(index after the ``[...]`` set at ``start``, problem or None)."""
    match = _BRACKET_RE.match(pattern, start)
    if match is None:
        return len(pattern), "a '[...]' set must be closed and hold only letters, digits, _ and -"
    body = match.group(2)
    for low, high in re.findall(r"(.)-(.)", body):
        if low > high:
            return match.end(), f"range {low}-{high} is reversed"
    return match.end(), None


def _pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid collection name or glob; None if it is."""
    if not is_glob(pattern):
        if not _COLLECTION_RE.fullmatch(pattern):
            return (
                f"invalid collection name {_show(pattern)} "
                "(names match ^[A-Za-z][A-Za-z0-9_]{0,62}$; globs may use * ? [...])"
            )
        if pattern in RESERVED_COLLECTIONS:
            return f"{pattern!r} is a reserved name, not a collection"
        return None
    if len(pattern) > _MAX_PATTERN_LENGTH:
        return f"glob longer than {_MAX_PATTERN_LENGTH} characters"
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "[":
            index, problem = _bracket_problem(pattern, index)
            if problem is not None:
                return f"invalid glob {_show(pattern)}: {problem}"
            continue
        if char not in "*?" and not _NAME_CHAR_RE.fullmatch(char):
            return f"invalid glob {_show(pattern)}: {char!r} cannot occur in a collection name"
        index += 1
    if _NAME_CHAR_RE.fullmatch(pattern[0]) and not pattern[0].isalpha():
        return f"glob {_show(pattern)} can never match (collection names start with a letter)"
    return None


def _operation_problem(operation: str) -> str | None:
    if operation in OPERATIONS:
        return None
    hint = _hint(operation, OPERATIONS) or f" (expected one of: {', '.join(OPERATION_ORDER)})"
    return f"unknown operation {_show(operation)}{hint}"


def _field_path_problem(path: str) -> str | None:
    if not path:
        return "field path must not be empty"
    if len(path) > _MAX_PATH_LENGTH:
        return f"field path longer than {_MAX_PATH_LENGTH} characters"
    segments = path.split(".")
    if len(segments) > _MAX_PATH_SEGMENTS:
        return f"field path {_show(path)} has more than {_MAX_PATH_SEGMENTS} segments"
    if any(not s or s.startswith("$") or "\x00" in s or s != s.strip() for s in segments):
        return (
            f"invalid field path {_show(path)} (dot-separated, non-empty segments, "
            "none starting with '$' or with surrounding spaces)"
        )
    return None


def _hash_problem(value: str) -> str | None:
    # Never show the value: it may be a token pasted where its hash belongs.
    if _HASH_RE.fullmatch(value):
        return None
    if not value.startswith(_HASH_PREFIX):
        return (
            "must be a token hash 'sha256:<64 hex digits>' (store the hash, never the token; "
            "see docs/policies.md)"
        )
    return "malformed token hash (expected 'sha256:' followed by 64 hex digits)"


# --------------------------------------------------------------------------- sections


def _parse_identity(value: object, problems: _Problems) -> list[tuple[str, str]]:
    """[(normalized token hash, where)] of the identity section."""
    raw = _mapping(value, "identity", problems)
    if raw is None:
        return []
    _check_keys(raw, ("tokens",), "identity", problems, secret=True)
    if raw.get("tokens") is None:
        return []
    tokens = raw["tokens"]
    if not isinstance(tokens, list):
        problems.add("identity.tokens", f"must be a list, got {_type_name(tokens)}")
        return []
    found: list[tuple[str, str]] = []
    for index, item in enumerate(tokens):
        where = f"identity.tokens[{index}]"
        if not isinstance(item, str):
            problems.add(where, f"must be a string, got {_type_name(item)}")
        elif (message := _hash_problem(item)) is not None:
            problems.add(where, message)
        else:  # duplicates, here or in another file, are found by _cross_file
            found.append((item.lower(), where))
    return found


def _parse_grant(value: object, where: str, problems: _Problems) -> Grant | None:
    raw = _mapping(value, where, problems)
    if raw is None:
        return None
    _check_keys(raw, ("collections", "operations"), where, problems)
    found: dict[str, dict[str, int]] = {}
    for key, check in (("collections", _pattern_problem), ("operations", _operation_problem)):
        if key not in raw:
            problems.add(_join(where, key), "is required")
        else:
            found[key] = _string_list(raw[key], _join(where, key), problems, check)
    if not found.get("collections") or not found.get("operations"):
        return None
    return Grant(tuple(found["collections"]), frozenset(found["operations"]))


def _parse_grants(value: object, problems: _Problems) -> tuple[Grant, ...]:
    if value is None:
        problems.add("grants", "is required (a list of {collections, operations})")
        return ()
    if not isinstance(value, list):
        problems.add("grants", f"must be a list, got {_type_name(value)}")
        return ()
    if not value:
        problems.add("grants", "must list at least one grant")
    grants = (_parse_grant(item, f"grants[{i}]", problems) for i, item in enumerate(value))
    return tuple(g for g in grants if g is not None)


def _covered(pattern: str, grants: Iterable[Grant]) -> bool:
    """True if some grant pattern covers ``pattern``: the same text, a glob matching the
    name, or (for a glob key) a grant glob matching the key's text."""
    for grant in grants:
        for granted in grant.collections:
            if granted == pattern or (is_glob(granted) and fnmatch.fnmatchcase(pattern, granted)):
                return True
    return False


def _rule_keys(
    value: object, section: str, grants: tuple[Grant, ...], problems: _Problems
) -> list[tuple[str, str, object]]:
    """[(collection pattern, where, body)] of a ``fields``/``rows`` section, keys checked."""
    raw = _mapping(value, section, problems)
    if raw is None:
        return []
    entries: list[tuple[str, str, object]] = []
    for key, body in raw.items():
        where = _join(section, key)
        if not isinstance(key, str):
            problems.add(where, f"must be a collection name or glob, got {_type_name(key)}")
        elif (message := _pattern_problem(key)) is not None:
            problems.add(where, message)
        else:
            if grants and not _covered(key, grants):
                problems.add(where, f"no grant covers collection {_show(key)}")
            entries.append((key, where, body))
    return entries


def _parse_field_rule(body: object, where: str, problems: _Problems) -> FieldRule | None:
    raw = _mapping(body, where, problems)
    if raw is None:
        return None
    _check_keys(raw, ("readable", "writable"), where, problems)
    lists: dict[str, frozenset[str] | None] = {}
    for key in ("readable", "writable"):
        value = raw.get(key)
        lists[key] = None
        if value is not None:
            at = _join(where, key)
            lists[key] = frozenset(
                _string_list(value, at, problems, _field_path_problem, allow_empty=True)
            )
    readable, writable = lists["readable"], lists["writable"]
    if readable is None and writable is None:
        problems.add(where, "must set readable and/or writable")
        return None
    if readable is not None and writable is not None:
        for name in sorted(writable):
            if not _listed(name, readable):
                problems.add(f"{where}.writable", f"{_show(name)} is writable but not readable")
    return FieldRule(readable=readable, writable=readable if writable is None else writable)


def _parse_fields(
    value: object, grants: tuple[Grant, ...], problems: _Problems
) -> dict[str, FieldRule]:
    rules: dict[str, FieldRule] = {}
    for pattern, where, body in _rule_keys(value, "fields", grants, problems):
        rule = _parse_field_rule(body, where, problems)
        if rule is not None:
            rules[pattern] = rule
    return rules


def _parse_row_rule(
    field_path: str, body: object, where: str, problems: _Problems
) -> RowRule | None:
    raw = _mapping(body, where, problems)
    if raw is None:
        return None
    _check_keys(raw, ("value", "header"), where, problems)
    if ("value" in raw) == ("header" in raw):
        problems.add(where, "must set exactly one of value or header")
        return None
    if "header" in raw:
        header = raw["header"]
        if not isinstance(header, str):
            problems.add(f"{where}.header", f"must be a header name, got {_type_name(header)}")
            return None
        if not _HEADER_RE.fullmatch(header):
            problems.add(f"{where}.header", f"invalid header name {_show(header)}")
            return None
        return RowRule(field_path, header=header)
    value = raw["value"]
    if not isinstance(value, str | int | float) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        problems.add(
            f"{where}.value",
            f"must be a string, a finite number or a boolean, got {_type_name(value)}",
        )
        return None
    return RowRule(field_path, value=value)


def _parse_row_fields(body: object, where: str, problems: _Problems) -> tuple[RowRule, ...]:
    raw = _mapping(body, where, problems)
    if raw is None:
        return ()
    if not raw:
        problems.add(where, "must name at least one field")
    rules: list[RowRule] = []
    for field_path, rule_body in raw.items():
        at = _join(where, field_path)
        if not isinstance(field_path, str):
            problems.add(at, f"must be a field path, got {_type_name(field_path)}")
        elif (message := _field_path_problem(field_path)) is not None:
            problems.add(at, message)
        elif (rule := _parse_row_rule(field_path, rule_body, at, problems)) is not None:
            rules.append(rule)
    return tuple(rules)


def _parse_rows(
    value: object, grants: tuple[Grant, ...], problems: _Problems
) -> dict[str, tuple[RowRule, ...]]:
    rules: dict[str, tuple[RowRule, ...]] = {}
    for pattern, where, body in _rule_keys(value, "rows", grants, problems):
        parsed = _parse_row_fields(body, where, problems)
        if parsed:
            rules[pattern] = parsed
    return rules


# --------------------------------------------------------------------------- limits

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
_MAX_PER_SECOND: Final = 1_000_000.0  # what the limiter can time (1 us emission interval)
_MAX_BURST: Final = 1_000_000_000
_MAX_WINDOW_SECONDS: Final = 366 * 86400.0  # burst / per_second: the refill of an empty bucket


@dataclass(frozen=True, slots=True)
class _Caps:
    """Global ceilings the policy caps must stay under (None: unchecked)."""

    statement_timeout_seconds: float | None = None
    max_rows: int | None = None
    max_open_transactions: int | None = None


def _rate_per_second(raw: Mapping[Any, object], where: str, problems: _Problems) -> float | None:
    if ("per_second" in raw) == ("per_minute" in raw):
        problems.add(where, "must set exactly one of per_second or per_minute")
        return None
    if "per_second" in raw:
        return _number(raw["per_second"], f"{where}.per_second", problems)
    per_minute = _number(raw["per_minute"], f"{where}.per_minute", problems)
    return None if per_minute is None else per_minute / 60.0


def _parse_rate(value: object, where: str, problems: _Problems) -> RateSpec | None:
    raw = _mapping(value, where, problems)
    if raw is None:
        return None
    _check_keys(raw, _RATE_KEYS, where, problems)
    per_second = _rate_per_second(raw, where, problems)
    if per_second is not None and per_second > _MAX_PER_SECOND:
        problems.add(where, f"must be at most {int(_MAX_PER_SECOND)} per second")
        per_second = None
    burst = None
    if "burst" not in raw:
        problems.add(f"{where}.burst", "is required")
    else:
        burst = _integer(raw["burst"], f"{where}.burst", problems)
        if burst is not None and burst > _MAX_BURST:
            problems.add(f"{where}.burst", f"must be at most {_MAX_BURST}")
            burst = None
    if per_second is None or burst is None:
        return None
    if burst / per_second > _MAX_WINDOW_SECONDS:
        problems.add(where, "refills an empty bucket (burst / rate) in more than a year")
        return None
    return RateSpec(per_second=per_second, burst=burst)


def _parse_operation_rates(value: object, problems: _Problems) -> dict[str, RateSpec]:
    where = "limits.operations"
    raw = _mapping(value, where, problems)
    rates: dict[str, RateSpec] = {}
    for key, body in (raw or {}).items():
        at = _join(where, key)
        message = _operation_problem(key) if isinstance(key, str) else "unknown operation"
        if message is not None:
            problems.add(at, message)
        elif (spec := _parse_rate(body, at, problems)) is not None:
            rates[key] = spec
    return rates


def _parse_costs(value: object, problems: _Problems) -> dict[str, float]:
    where = "limits.costs"
    raw = _mapping(value, where, problems)
    costs = dict.fromkeys(COST_KEYS, 1.0)
    for key, body in (raw or {}).items():
        at = _join(where, key)
        if key not in COST_KEYS:
            problems.add(at, f"unknown cost key{_hint(str(key), COST_KEYS)}")
        elif (cost := _number(body, at, problems, allow_zero=True)) is not None:
            costs[key] = cost
    return costs


def _parse_caps(raw: Mapping[Any, object], caps: _Caps, problems: _Problems) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if raw.get("max_in_flight") is not None:
        values["max_in_flight"] = _integer(raw["max_in_flight"], "limits.max_in_flight", problems)
    if raw.get("statement_timeout_seconds") is not None:
        where = "limits.statement_timeout_seconds"
        timeout = _number(raw["statement_timeout_seconds"], where, problems)
        cap = caps.statement_timeout_seconds
        if timeout is not None and cap is not None and timeout > cap:
            problems.add(
                where, f"must be <= the global statement timeout ({cap:g} s), got {timeout:g}"
            )
        values["statement_timeout_seconds"] = timeout
    if raw.get("max_rows") is not None:
        max_rows = _integer(raw["max_rows"], "limits.max_rows", problems)
        if max_rows is not None and caps.max_rows is not None and max_rows > caps.max_rows:
            problems.add(
                "limits.max_rows", f"must be <= the global page size limit ({caps.max_rows})"
            )
        values["max_rows"] = max_rows
    if raw.get("max_open_transactions") is not None:
        where = "limits.max_open_transactions"
        cap = caps.max_open_transactions
        most = _integer(raw["max_open_transactions"], where, problems)
        if most is not None and cap is not None and most > cap:
            problems.add(where, f"must be <= the sidecar's max_open_transactions ({cap})")
        values["max_open_transactions"] = most
    mode = raw.get("redis_failure", "fail_open")
    if mode not in REDIS_FAILURE_MODES:
        shown = _show(mode) if isinstance(mode, str) else _type_name(mode)
        problems.add("limits.redis_failure", f"must be fail_open or fail_closed (got {shown})")
    else:
        values["redis_failure"] = mode
    return values


def _parse_limits(value: object, caps: _Caps, problems: _Problems) -> Limits:
    raw = _mapping(value, "limits", problems)
    if raw is None:
        return Limits()
    _check_keys(raw, _LIMIT_KEYS, "limits", problems)
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


# --------------------------------------------------------------------------- files

_TOP_KEYS: Final = ("service", "description", "identity", "grants", "fields", "rows", "limits")


class _Loader(yaml.SafeLoader):
    """A safe loader that remembers duplicate mapping keys (YAML would keep the last one
    silently, dropping a rule without a word)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    self.duplicates.append((key_node.value, key_node.start_mark.line + 1))
                seen.add(key)
        return super().construct_mapping(node, deep)


_QUOTED_RE: Final = re.compile(r"'([^']{9,})'|\"([^\"]{9,})\"")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # Built from parts: str(exc) quotes the offending line, and it may hold a secret. The
    # parser's own sentence may quote a piece of the file too (an alias name, a tag): such
    # quotes are cut to their first 8 characters.
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "syntax error"
        what = _QUOTED_RE.sub(lambda m: repr((m.group(1) or m.group(2))[:8] + "..."), what)
        return f"invalid YAML{where}: {what}"
    return f"invalid YAML ({type(exc).__name__})"


def _read_yaml(path: Path, problems: _Problems) -> Mapping[Any, object] | None:
    """The top-level mapping of the policy file; None (and a problem) if unusable."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.add("", f"cannot read file: {exc.strerror or type(exc).__name__}")
        return None
    if len(data) > _MAX_FILE_BYTES:
        problems.add("", f"file larger than {_MAX_FILE_BYTES} bytes")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        problems.add("", "file is not valid UTF-8")
        return None
    loader = _Loader(text)
    try:
        loaded = loader.get_single_data()
    except yaml.YAMLError as exc:
        problems.add("", _yaml_problem(exc))
        return None
    finally:
        loader.dispose()
    for key, line in loader.duplicates:
        problems.add(f"line {line}", f"duplicate key {_show(key)}")
    if loaded is None:
        problems.add("", "file is empty (expected a mapping with service and grants)")
        return None
    if not isinstance(loaded, dict):
        problems.add("", f"top level must be a mapping, got {_type_name(loaded)}")
        return None
    return loaded


def _parse_service(raw: Mapping[Any, object], stem: str, problems: _Problems) -> str | None:
    if not _SERVICE_RE.fullmatch(stem):
        problems.add("", "file name must be <service>.yaml with a service name like 'billing'")
    name = raw.get("service")
    if name is None:
        problems.add("service", f"is required (and must be {stem!r}, the file name)")
        return None
    if not isinstance(name, str):
        problems.add("service", f"must be a string, got {_type_name(name)}")
        return None
    if name != stem:
        problems.add("service", f"{_show(name)} does not match the file name (expected {stem!r})")
        return None
    return name if _SERVICE_RE.fullmatch(name) else None


def _parse_description(raw: Mapping[Any, object], problems: _Problems) -> str:
    value = raw.get("description", "")
    if isinstance(value, str):
        return value
    problems.add("description", f"must be a string, got {_type_name(value)}")
    return ""


@dataclass(frozen=True, slots=True)
class _Parsed:
    name: str  # the file name, for cross-file messages
    service: str | None  # the declared service name, when valid
    policy: ServicePolicy | None
    tokens: list[tuple[str, str]]  # (hash, where)


def _parse_file(path: Path, caps: _Caps, items: list[str]) -> _Parsed:
    problems = _Problems(items, path.name)
    before = len(items)
    raw = _read_yaml(path, problems)
    if raw is None:
        return _Parsed(path.name, None, None, [])
    _check_keys(raw, _TOP_KEYS, "", problems)
    service = _parse_service(raw, path.stem, problems)
    description = _parse_description(raw, problems)
    tokens = _parse_identity(raw.get("identity"), problems)
    grants = _parse_grants(raw.get("grants"), problems)
    fields = _parse_fields(raw.get("fields"), grants, problems)
    rows = _parse_rows(raw.get("rows"), grants, problems)
    limits = _parse_limits(raw.get("limits"), caps, problems)
    if service is None or len(items) > before:
        return _Parsed(path.name, service, None, tokens)
    policy = ServicePolicy(
        service=service,
        grants=grants,
        token_hashes=frozenset(h for h, _ in tokens),
        fields=MappingProxyType(fields),
        rows=MappingProxyType(rows),
        limits=limits,
        description=description,
    )
    return _Parsed(path.name, service, policy, tokens)


def _policy_files(directory: Path, items: list[str]) -> list[Path]:
    if not directory.exists():
        items.append(f"{directory}: policy directory not found")
        return []
    if not directory.is_dir():
        items.append(f"{directory}: not a directory")
        return []
    files = sorted(
        p
        for p in directory.iterdir()
        if p.suffix in _POLICY_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        items.append(f"{directory}: no policy files (*.yaml, *.yml)")
    for path in files:
        if not path.is_file():
            items.append(f"{path.name}: not a regular file")
    return [p for p in files if p.is_file()]


def _cross_file(parsed: list[_Parsed], items: list[str]) -> dict[str, ServicePolicy]:
    """The policies by service; duplicate services and shared token hashes are problems."""
    services: dict[str, ServicePolicy] = {}
    origin: dict[str, str] = {}
    token_at: dict[str, str] = {}
    for entry in parsed:
        for token_hash, where in entry.tokens:
            here = f"{entry.name}: {where}"
            if token_hash in token_at:
                items.append(f"{here}: the same token hash is listed at {token_at[token_hash]}")
            else:
                token_at[token_hash] = here
        if entry.service is None:
            continue
        if entry.service in origin:
            items.append(
                f"{entry.name}: service: duplicate service {entry.service!r} "
                f"(also {origin[entry.service]})"
            )
            continue
        origin[entry.service] = entry.name
        if entry.policy is not None:
            services[entry.service] = entry.policy
    return services


def _load(
    directory: str | Path,
    max_statement_timeout_seconds: float | None,
    max_rows: int | None,
    max_open_transactions: int | None = None,
) -> tuple[PolicySet | None, list[str]]:
    items: list[str] = []
    caps = _Caps(max_statement_timeout_seconds, max_rows, max_open_transactions)
    parsed = [_parse_file(path, caps, items) for path in _policy_files(Path(directory), items)]
    services = _cross_file(parsed, items)
    if items:
        return None, items
    return PolicySet(MappingProxyType(dict(sorted(services.items())))), items


def load_policies(
    directory: str | Path,
    *,
    max_statement_timeout_seconds: float | None = None,
    max_rows: int | None = None,
    max_open_transactions: int | None = None,
) -> PolicySet:
    """Load every ``*.yaml``/``*.yml`` policy file of ``directory``.

    Raises one ConfigError listing every problem of every file (``<file>: <where>:
    <what>``). The optional keyword arguments are the process-wide ceilings the per-service
    caps must stay under (the config's statement timeout, maximum page size and open
    transactions)."""
    policies, problems = _load(
        directory, max_statement_timeout_seconds, max_rows, max_open_transactions
    )
    if policies is None:
        raise ConfigError(problems)
    return policies


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _service_summary(policy: ServicePolicy) -> str:
    patterns = {p for grant in policy.grants for p in grant.collections}
    globs = sum(1 for p in patterns if is_glob(p))
    rate = policy.limits.rate
    parts = [
        _plural(len(policy.grants), "grant"),
        f"{_plural(len(patterns), 'collection pattern')} ({_plural(globs, 'glob')})",
        _plural(len(policy.token_hashes), "token"),
        _plural(len(policy.fields), "field rule"),
        _plural(len(policy.rows), "row rule"),
        f"rate {rate.per_second:g}/s burst {rate.burst}" if rate else "no rate limit",
        f"redis {policy.limits.redis_failure}",
    ]
    return f"  {policy.service}: " + ", ".join(parts)


def summarize(policies: PolicySet) -> str:
    """A few lines describing ``policies``: totals, then one line per service."""
    services = list(policies.services.values())
    grants = sum(len(p.grants) for p in services)
    patterns = sum(len({c for g in p.grants for c in g.collections}) for p in services)
    tokens = sum(len(p.token_hashes) for p in services)
    head = (
        f"{_plural(len(services), 'service')}, {_plural(grants, 'grant')}, "
        f"{_plural(patterns, 'collection pattern')}, {_plural(tokens, 'token')}"
    )
    return "\n".join([head, *(_service_summary(p) for p in services)])


def check_directory(
    directory: str | Path,
    *,
    max_statement_timeout_seconds: float | None = None,
    max_rows: int | None = None,
    max_open_transactions: int | None = None,
) -> tuple[bool, str]:
    """For ``dbproxy policy check DIR``: (True, a summary) or (False, every problem, one a
    line)."""
    policies, problems = _load(
        directory, max_statement_timeout_seconds, max_rows, max_open_transactions
    )
    if policies is None:
        return False, "\n".join(problems)
    return True, summarize(policies)
