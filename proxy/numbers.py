"""The numbers dbproxy stores, signed 64-bit integers and finite doubles: the checks at every way
in, and the decoder that keeps a stored number outside that range readable (docs/numbers.md)."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import orjson

from proxy.errors import InvalidQuery, NumberOutOfRange

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
DOUBLE_MAX = sys.float_info.max
DOUBLE_MAX_EXACT = int(DOUBLE_MAX)  # the largest finite double as an exact integer (309 digits)
_UINT64_END = 2**64  # orjson reads integers up to here as int, longer ones as float

# An integer outside signed 64 bits has 19 digits or more: every digit maps to b"0", so one
# `in` over the translated bytes (C speed) rules such integers out before any exact parse.
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


def _shown(literal: str) -> str:
    return literal if len(literal) <= 40 else f"{literal[:20]}...({len(literal)} characters)"


def integer_error(literal: str) -> NumberOutOfRange:
    return NumberOutOfRange(
        f"integer {_shown(literal)} does not fit in signed 64 bits ({INT64_MIN} to "
        f"{INT64_MAX}); send it as a string, or as a float if it may be rounded",
        details={"min": INT64_MIN, "max": INT64_MAX},
    )


def double_error(literal: str) -> NumberOutOfRange:
    return NumberOutOfRange(
        f"number {_shown(literal)} is beyond the range of a double "
        f"(finite, at most {DOUBLE_MAX!r} in magnitude)",
        details={"max_magnitude": DOUBLE_MAX},
    )


def _int_text(n: int) -> str:
    return str(n) if n.bit_length() <= 256 else f"of {n.bit_length()} bits"


class Unrepresentable:
    """A stored number beyond double range (written around dbproxy), kept as its JSON text:
    ``dumps_stored`` sends it digit for digit, and no write path accepts it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Unrepresentable({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unrepresentable) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


# ---- request text ---------------------------------------------------------------------


def _checked_int(literal: str) -> int:
    if len(literal) - literal.startswith("-") > 19:  # before int(): no 5,000-digit parse
        raise integer_error(literal)
    n = int(literal)
    if not INT64_MIN <= n <= INT64_MAX:
        raise integer_error(literal)
    return n


def _checked_float(literal: str) -> float:
    x = float(literal)
    if math.isinf(x):
        raise double_error(literal)
    return x


def _no_constant(name: str) -> None:
    raise ValueError(name)  # NaN / Infinity are not JSON


def check_request_text(text: str | bytes) -> None:
    """Raise ``NumberOutOfRange`` if ``text``, which orjson has parsed, holds an integer outside
    signed 64 bits: orjson reads one silently as a float (or, up to 2**64, as an int). Costs one
    translate and one search unless the text holds a run of 19 digits."""
    raw = text.encode() if isinstance(text, str) else text
    if _LONG_RUN in raw.translate(_DIGITS):
        json.loads(raw, parse_int=_checked_int)


def decode_failure(text: str | bytes) -> NumberOutOfRange | None:
    """orjson refused ``text``: the error to answer when that is a number beyond double range
    (orjson reports those as syntax errors) or an integer outside 64 bits; None otherwise."""
    try:
        json.loads(
            text, parse_int=_checked_int, parse_float=_checked_float, parse_constant=_no_constant
        )
    except NumberOutOfRange as err:
        return err
    except (ValueError, RecursionError):  # invalid JSON after all (JSONDecodeError is one)
        return None
    return None


# ---- Python values (update operands, filter values, documents from any caller) ----------


def check_number(value: Any) -> None:
    """Raise ``NumberOutOfRange`` if the scalar ``value`` is a number JSON cannot carry."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise integer_error(_int_text(value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise double_error(repr(value))
    elif isinstance(value, Unrepresentable):
        raise double_error(value.text)


def check_value(value: Any) -> None:
    """``check_number`` on every scalar of ``value`` (iterative: no recursion limit)."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or item is None or kind is bool:
            continue
        if kind is dict:
            stack.extend(item.values())
        elif kind is list or kind is tuple:
            stack.extend(item)
        elif kind is int:
            if not INT64_MIN <= item <= INT64_MAX:
                raise integer_error(_int_text(item))
        elif kind is float:
            if item - item != 0.0:  # NaN or infinite
                raise double_error(repr(item))
        elif isinstance(item, dict):  # subclasses, the rare case
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        else:
            check_number(item)


def check_dumped(value: Any, body: bytes) -> None:
    """``value`` was written by orjson as ``body``: refuse it if orjson wrote it unfaithfully.
    orjson writes a NaN or infinite float as ``null`` and accepts integers up to 2**64, so only
    a body holding ``null`` or a 19-digit run needs the walk."""
    if b"null" in body or _LONG_RUN in body.translate(_DIGITS):
        check_value(value)


def encode_failure(value: Any) -> NumberOutOfRange | None:
    """orjson could not write ``value``: the error to answer when a number is the cause."""
    try:
        check_value(value)
    except NumberOutOfRange as err:
        return err
    return None


# ---- stored JSON --------------------------------------------------------------------------


def _stored_int(literal: str) -> int | float | Unrepresentable:
    digits = len(literal) - literal.startswith("-")
    if digits <= 20:
        n = int(literal)
        if INT64_MIN <= n < _UINT64_END:
            return n
    x = float(literal)  # like orjson: past 64 bits an integer reads as the nearest double
    return Unrepresentable(literal) if math.isinf(x) else x


def _stored_float(literal: str) -> float | Unrepresentable:
    x = float(literal)
    return Unrepresentable(literal) if math.isinf(x) else x


def loads_stored(raw: bytes | str) -> Any:
    """Decode a stored document. orjson, as everywhere; only when it fails, which for JSON the
    database wrote means a number beyond double range, the slow decoder keeps such numbers as
    ``Unrepresentable`` (everything else decodes as orjson would)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw, parse_int=_stored_int, parse_float=_stored_float)


def _render(value: Any) -> Any:
    if isinstance(value, Unrepresentable):
        return orjson.Fragment(value.text)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def dumps_stored(value: Any) -> bytes:
    """orjson.dumps for (parts of) stored documents: an ``Unrepresentable`` number is written
    as it was stored."""
    return orjson.dumps(value, default=_render)


def dumps_document(value: dict[str, Any]) -> bytes:
    """A document, replacement or patch as JSON text for a backend: numbers outside the
    range are refused (orjson writes inf as null and accepts 2**63..2**64)."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        out_of_range = encode_failure(value)
        if out_of_range is not None:
            raise out_of_range from None
        raise InvalidQuery(
            "the document has a value JSON cannot carry", code="invalid_value"
        ) from None
    check_dumped(value, text)
    return text
