"""The SQL primitives of aggregation on PostgreSQL: jsonb tests and casts the expression
compiler and the operators share, and what an operator asks of its compiler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from proxy.query.pg import Params


class OpCompiler(Protocol):
    """What an operator's SQL needs of the expression compiler."""

    p: Params  # the statement's bound values
    schema: str  # the quoted schema of the helper functions

    def fail(self, message: str) -> str: ...

    def lit(self, value: Any) -> str: ...

    def bind(self, parts: list[str], body: Callable[..., str]) -> str: ...


NULL = "'null'::jsonb"
TEXT = "#>> '{}'"  # a jsonb string as text
DEFAULT_CHARS = "DEFAULT"  # $trim without chars (never SQL: the operator replaces it)


def nullish(x: str) -> str:
    """``x`` is JSON null or missing."""
    return f"COALESCE(jsonb_typeof({x}), 'null') = 'null'"


def is_type(x: str, kind: str) -> str:
    return f"jsonb_typeof({x}) = '{kind}'"


def num(x: str) -> str:
    return f"({x})::numeric"


def txt(x: str) -> str:
    return f"({x} {TEXT})"


def truthy(x: str) -> str:
    """SQL boolean, never NULL: false, null, missing and 0 are false."""
    return f"COALESCE({x} NOT IN ('false'::jsonb, 'null'::jsonb, '0'::jsonb), false)"


def integral(x: str) -> str:
    """``x`` (known a number) is an integer: written without fraction or exponent (jsonb
    keeps ``1.0`` as written)."""
    return f"({x} {TEXT}) ~ '^-?[0-9]+$'"
