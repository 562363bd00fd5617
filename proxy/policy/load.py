"""Loading a directory of policy files: every problem of every file at once, then a PolicySet."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from proxy.errors import ConfigError
from proxy.policy.limits import Caps, parse_limits
from proxy.policy.model import _TOP_KEYS, PolicySet, ServicePolicy, is_glob
from proxy.policy.sections import parse_fields, parse_grants, parse_identity, parse_rows
from proxy.problems import Problems, check_keys, read_yaml, show, type_name

_SERVICE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
_POLICY_SUFFIXES: Final = (".yaml", ".yml")
_EMPTY: Final = "file is empty (expected a mapping with service and grants)"


def _parse_service(raw: Mapping[Any, object], stem: str, problems: Problems) -> str | None:
    if not _SERVICE_RE.fullmatch(stem):
        problems.add("", "file name must be <service>.yaml with a service name like 'billing'")
    name = raw.get("service")
    if name is None:
        problems.add("service", f"is required (and must be {stem!r}, the file name)")
        return None
    if not isinstance(name, str):
        problems.add("service", f"must be a string, got {type_name(name)}")
        return None
    if name != stem:
        problems.add("service", f"{show(name)} does not match the file name (expected {stem!r})")
        return None
    return name if _SERVICE_RE.fullmatch(name) else None


def _parse_description(raw: Mapping[Any, object], problems: Problems) -> str:
    value = raw.get("description", "")
    if isinstance(value, str):
        return value
    problems.add("description", f"must be a string, got {type_name(value)}")
    return ""


@dataclass(frozen=True, slots=True)
class _Parsed:
    name: str  # the file name, for cross-file messages
    service: str | None  # the declared service name, when valid
    policy: ServicePolicy | None
    tokens: list[tuple[str, str]]  # (hash, where)


def _parse_file(path: Path, caps: Caps, items: list[str]) -> _Parsed:
    problems = Problems(items, path.name)
    before = len(items)
    raw = read_yaml(path, problems, empty=_EMPTY)
    if raw is None:
        return _Parsed(path.name, None, None, [])
    check_keys(raw, _TOP_KEYS, "", problems)
    service = _parse_service(raw, path.stem, problems)
    description = _parse_description(raw, problems)
    tokens = parse_identity(raw.get("identity"), problems)
    grants = parse_grants(raw.get("grants"), problems)
    fields = parse_fields(raw.get("fields"), grants, problems)
    rows = parse_rows(raw.get("rows"), grants, problems)
    limits = parse_limits(raw.get("limits"), caps, problems)
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
    caps = Caps(max_statement_timeout_seconds, max_rows, max_open_transactions)
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
