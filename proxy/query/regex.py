"""Regular expressions of the query language: validated once with RE2 (linear time), cached."""

from __future__ import annotations

import functools
import re
from typing import Any

import re2

from proxy.errors import InvalidQuery

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad pattern is the client's problem: no stderr line per request
_WHITESPACE = frozenset(" \t\n\r\f\v")


def strip_extended(pattern: str) -> str:
    """The ``x`` option done here: unescaped whitespace outside a character class and
    ``#`` comments to the end of the line are dropped (an escaped space stays a space)."""
    out: list[str] = []
    i, n, in_class = 0, len(pattern), False
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            out.append("\\x20" if nxt == " " else pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
            out.append(ch)
        elif ch == "[":
            in_class = True
            out.append(ch)
            if pattern.startswith("^", i + 1):
                out.append("^")
                i += 1
            if pattern.startswith("]", i + 1):  # a ']' first in a class is literal
                out.append("]")
                i += 1
        elif ch == "#":
            end = pattern.find("\n", i)
            i = n if end < 0 else end
            continue
        elif ch not in _WHITESPACE:
            out.append(ch)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def compile_regex(pattern: str, options: str) -> Any:
    """The RE2 program for ``pattern`` with ``options`` (i, m, s and x).

    400 ``unsupported_regex`` for what RE2 cannot run (backreferences, lookaround, atomic
    groups: the constructs that make backtracking engines exponential), 400
    ``invalid_regex`` for a pattern that is not a regular expression at all."""
    if "x" in options:
        pattern = strip_extended(pattern)
    flags = "".join(c for c in options if c in "ims")
    try:
        return re2.compile(f"(?{flags}){pattern}" if flags else pattern, _OPTIONS)
    except re2.error:
        pass
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError):
        raise InvalidQuery("invalid regular expression", code="invalid_regex") from None
    raise InvalidQuery(
        "this regular expression uses a construct dbproxy does not run (backreferences, "
        "lookahead, lookbehind, atomic groups, possessive quantifiers, \\Z and the like); "
        "patterns run in linear time (RE2 syntax)",
        code="unsupported_regex",
    )


def search(pattern: str, options: str, value: str) -> bool:
    return compile_regex(pattern, options).search(value) is not None
