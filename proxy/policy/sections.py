"""Parsing the identity, grants, fields and rows sections of a policy file, item by item."""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterable
from typing import Final

from proxy.policy.model import (
    HASH_PREFIX,
    OPERATION_ORDER,
    OPERATIONS,
    RESERVED_COLLECTIONS,
    FieldRule,
    Grant,
    RowRule,
    is_glob,
    is_listed,
)
from proxy.problems import Problems, check_keys, hint, mapping, show, type_name

_COLLECTION_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
_NAME_CHAR_RE: Final = re.compile(r"[A-Za-z0-9_]")
_BRACKET_RE: Final = re.compile(r"\[(!?)([A-Za-z0-9_-]+)\]")
_MAX_PATTERN_LENGTH: Final = 128
_HEADER_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_HASH_RE: Final = re.compile(r"sha256:[0-9a-fA-F]{64}")
_MAX_PATH_SEGMENTS: Final = 16
_MAX_PATH_LENGTH: Final = 256


def _string_list(
    value: object,
    where: str,
    problems: Problems,
    check: Callable[[str], str | None],
    *,
    allow_empty: bool = False,
) -> dict[str, int]:
    """The valid strings of the list ``value``, each with its index; every bad item,
    duplicate or an empty list (unless ``allow_empty``) is a problem. ``check`` returns a
    problem message or None."""
    if not isinstance(value, list):
        problems.add(where, f"must be a list, got {type_name(value)}")
        return {}
    if not value and not allow_empty:
        problems.add(where, "must not be empty")
    items: dict[str, int] = {}
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(item, str):
            problems.add(at, f"must be a string, got {type_name(item)}")
        elif (message := check(item)) is not None:
            problems.add(at, message)
        elif item in items:
            problems.add(at, f"duplicate {show(item)} (also {where}[{items[item]}])")
        else:
            items[item] = index
    return items


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
                f"invalid collection name {show(pattern)} "
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
                return f"invalid glob {show(pattern)}: {problem}"
            continue
        if char not in "*?" and not _NAME_CHAR_RE.fullmatch(char):
            return f"invalid glob {show(pattern)}: {char!r} cannot occur in a collection name"
        index += 1
    if _NAME_CHAR_RE.fullmatch(pattern[0]) and not pattern[0].isalpha():
        return f"glob {show(pattern)} can never match (collection names start with a letter)"
    return None


def operation_problem(operation: str) -> str | None:
    if operation in OPERATIONS:
        return None
    close = hint(operation, OPERATIONS) or f" (expected one of: {', '.join(OPERATION_ORDER)})"
    return f"unknown operation {show(operation)}{close}"


def _field_path_problem(path: str) -> str | None:
    if not path:
        return "field path must not be empty"
    if len(path) > _MAX_PATH_LENGTH:
        return f"field path longer than {_MAX_PATH_LENGTH} characters"
    segments = path.split(".")
    if len(segments) > _MAX_PATH_SEGMENTS:
        return f"field path {show(path)} has more than {_MAX_PATH_SEGMENTS} segments"
    if any(not s or s.startswith("$") or "\x00" in s or s != s.strip() for s in segments):
        return (
            f"invalid field path {show(path)} (dot-separated, non-empty segments, "
            "none starting with '$' or with surrounding spaces)"
        )
    return None


def _hash_problem(value: str) -> str | None:
    # Never show the value: it may be a token pasted where its hash belongs.
    if _HASH_RE.fullmatch(value):
        return None
    if not value.startswith(HASH_PREFIX):
        return (
            "must be a token hash 'sha256:<64 hex digits>' (store the hash, never the token; "
            "see docs/policies.md)"
        )
    return "malformed token hash (expected 'sha256:' followed by 64 hex digits)"


def parse_identity(value: object, problems: Problems) -> list[tuple[str, str]]:
    """[(normalized token hash, where)] of the identity section."""
    raw = mapping(value, "identity", problems)
    if raw is None:
        return []
    check_keys(raw, ("tokens",), "identity", problems, secret=True)
    if raw.get("tokens") is None:
        return []
    tokens = raw["tokens"]
    if not isinstance(tokens, list):
        problems.add("identity.tokens", f"must be a list, got {type_name(tokens)}")
        return []
    found: list[tuple[str, str]] = []
    for index, item in enumerate(tokens):
        where = f"identity.tokens[{index}]"
        if not isinstance(item, str):
            problems.add(where, f"must be a string, got {type_name(item)}")
        elif (message := _hash_problem(item)) is not None:
            problems.add(where, message)
        else:  # duplicates, here or in another file, are found by _cross_file
            found.append((item.lower(), where))
    return found


def _parse_grant(value: object, where: str, problems: Problems) -> Grant | None:
    raw = mapping(value, where, problems)
    if raw is None:
        return None
    check_keys(raw, ("collections", "operations"), where, problems)
    found: dict[str, dict[str, int]] = {}
    for key, check in (("collections", _pattern_problem), ("operations", operation_problem)):
        if key not in raw:
            problems.add(problems.join(where, key), "is required")
        else:
            found[key] = _string_list(raw[key], problems.join(where, key), problems, check)
    if not found.get("collections") or not found.get("operations"):
        return None
    return Grant(tuple(found["collections"]), frozenset(found["operations"]))


def parse_grants(value: object, problems: Problems) -> tuple[Grant, ...]:
    if value is None:
        problems.add("grants", "is required (a list of {collections, operations})")
        return ()
    if not isinstance(value, list):
        problems.add("grants", f"must be a list, got {type_name(value)}")
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
    value: object, section: str, grants: tuple[Grant, ...], problems: Problems
) -> list[tuple[str, str, object]]:
    """[(collection pattern, where, body)] of a ``fields``/``rows`` section, keys checked."""
    raw = mapping(value, section, problems)
    if raw is None:
        return []
    entries: list[tuple[str, str, object]] = []
    for key, body in raw.items():
        where = problems.join(section, key)
        if not isinstance(key, str):
            problems.add(where, f"must be a collection name or glob, got {type_name(key)}")
        elif (message := _pattern_problem(key)) is not None:
            problems.add(where, message)
        else:
            if grants and not _covered(key, grants):
                problems.add(where, f"no grant covers collection {show(key)}")
            entries.append((key, where, body))
    return entries


def _parse_field_rule(body: object, where: str, problems: Problems) -> FieldRule | None:
    raw = mapping(body, where, problems)
    if raw is None:
        return None
    check_keys(raw, ("readable", "writable"), where, problems)
    lists: dict[str, frozenset[str] | None] = {}
    for key in ("readable", "writable"):
        value = raw.get(key)
        lists[key] = None
        if value is not None:
            at = problems.join(where, key)
            lists[key] = frozenset(
                _string_list(value, at, problems, _field_path_problem, allow_empty=True)
            )
    readable, writable = lists["readable"], lists["writable"]
    if readable is None and writable is None:
        problems.add(where, "must set readable and/or writable")
        return None
    if readable is not None and writable is not None:
        for name in sorted(writable):
            if not is_listed(name, readable):
                problems.add(f"{where}.writable", f"{show(name)} is writable but not readable")
    return FieldRule(readable=readable, writable=readable if writable is None else writable)


def parse_fields(
    value: object, grants: tuple[Grant, ...], problems: Problems
) -> dict[str, FieldRule]:
    rules: dict[str, FieldRule] = {}
    for pattern, where, body in _rule_keys(value, "fields", grants, problems):
        rule = _parse_field_rule(body, where, problems)
        if rule is not None:
            rules[pattern] = rule
    return rules


def _parse_row_rule(
    field_path: str, body: object, where: str, problems: Problems
) -> RowRule | None:
    raw = mapping(body, where, problems)
    if raw is None:
        return None
    check_keys(raw, ("value", "header"), where, problems)
    if ("value" in raw) == ("header" in raw):
        problems.add(where, "must set exactly one of value or header")
        return None
    if "header" in raw:
        header = raw["header"]
        if not isinstance(header, str):
            problems.add(f"{where}.header", f"must be a header name, got {type_name(header)}")
            return None
        if not _HEADER_RE.fullmatch(header):
            problems.add(f"{where}.header", f"invalid header name {show(header)}")
            return None
        return RowRule(field_path, header=header)
    value = raw["value"]
    if not isinstance(value, str | int | float) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        problems.add(
            f"{where}.value",
            f"must be a string, a finite number or a boolean, got {type_name(value)}",
        )
        return None
    return RowRule(field_path, value=value)


def _parse_row_fields(body: object, where: str, problems: Problems) -> tuple[RowRule, ...]:
    raw = mapping(body, where, problems)
    if raw is None:
        return ()
    if not raw:
        problems.add(where, "must name at least one field")
    rules: list[RowRule] = []
    for field_path, rule_body in raw.items():
        at = problems.join(where, field_path)
        if not isinstance(field_path, str):
            problems.add(at, f"must be a field path, got {type_name(field_path)}")
        elif (message := _field_path_problem(field_path)) is not None:
            problems.add(at, message)
        elif (rule := _parse_row_rule(field_path, rule_body, at, problems)) is not None:
            rules.append(rule)
    return tuple(rules)


def parse_rows(
    value: object, grants: tuple[Grant, ...], problems: Problems
) -> dict[str, tuple[RowRule, ...]]:
    rules: dict[str, tuple[RowRule, ...]] = {}
    for pattern, where, body in _rule_keys(value, "rows", grants, problems):
        parsed = _parse_row_fields(body, where, problems)
        if parsed:
            rules[pattern] = parsed
    return rules
