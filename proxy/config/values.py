"""Typed readers for config values: each reads one key, notes a problem, never raises."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Final

from proxy.config.redact import redact_dsn
from proxy.problems import Problems, check_keys, integer, mapping, number, type_name

MAX_PORT: Final = 65535
_PLAIN_KEY_RE: Final = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


def _redact_if_dsn(value: str) -> str:
    """``value`` redacted when it looks like a connection string pasted in the wrong place."""
    return redact_dsn(value) if "://" in value or "@" in value else value


def config_problems() -> Problems:
    """A problem list for the config file: values that look like a DSN are redacted."""
    return Problems(plain_key=_PLAIN_KEY_RE, redact=_redact_if_dsn)


def read_int(
    raw: Mapping[Any, object],
    key: str,
    path: str,
    default: int | None,
    problems: Problems,
    *,
    low: int = 1,
    high: int | None = None,
) -> int | None:
    """The integer at ``key``: ``default`` when absent, None (and a problem) when invalid."""
    if key not in raw:
        return default
    return integer(raw[key], problems.join(path, key), problems, low=low, high=high)


def read_number(
    raw: Mapping[Any, object], key: str, path: str, default: float, problems: Problems
) -> float | None:
    """The positive number at ``key``: ``default`` when absent, None (and a problem) when
    invalid."""
    if key not in raw:
        return default
    return number(raw[key], problems.join(path, key), problems)


def read_str(
    raw: Mapping[Any, object],
    key: str,
    path: str,
    default: str | None,
    problems: Problems,
    *,
    choices: tuple[str, ...] = (),
) -> str | None:
    """The non-empty string at ``key``: ``default`` when absent (a problem when there is no
    default), None (and a problem) when invalid or not one of ``choices``."""
    where = problems.join(path, key)
    if key not in raw:
        if default is None:
            problems.add(where, "is required")
        return default
    value = raw[key]
    if not isinstance(value, str) or not value:
        problems.add(where, f"must be a non-empty string, got {type_name(value)}")
        return None
    if choices and value not in choices:
        problems.add(where, f"must be one of {', '.join(choices)} (got {problems.show(value)})")
        return None
    return value


def read_optional_str(
    raw: Mapping[Any, object], key: str, path: str, problems: Problems
) -> str | None:
    value = raw.get(key)
    if value is None or (isinstance(value, str) and value):
        return value
    problems.add(
        problems.join(path, key), f"must be a non-empty string or null, got {type_name(value)}"
    )
    return None


def numbers_section(
    value: object, cls: type[Any], path: str, problems: Problems, low: Mapping[str, int]
) -> dict[str, Any]:
    """Read every (int or float) field of dataclass ``cls`` from ``value``; invalid ones None."""
    raw = mapping(value, path, problems)
    if raw is None:
        return {f.name: None for f in fields(cls)}
    names = [f.name for f in fields(cls)]
    check_keys(raw, names, path, problems)
    values: dict[str, Any] = {}
    for f in fields(cls):
        default = f.default
        if isinstance(default, float):
            values[f.name] = read_number(raw, f.name, path, default, problems)
        elif isinstance(default, int):
            values[f.name] = read_int(raw, f.name, path, default, problems, low=low.get(f.name, 1))
    return values


def build(cls: type[Any], values: Mapping[str, Any]) -> Any:
    return cls(**{k: v for k, v in values.items() if v is not None})
