"""Front end of aggregation expressions: JSON → validated Expr (operators, arities, variables,
paths), every node counted against ``limits.max_expression_nodes`` as it is built."""

from __future__ import annotations

import re
from typing import Any, NoReturn

from proxy import numbers
from proxy.config import Limits
from proxy.errors import ForbiddenOperator, InvalidQuery, LimitExceeded
from proxy.query.aggregate.ast import (
    Arr,
    Call,
    Expr,
    Field,
    FieldPath,
    Iterate,
    Lit,
    Obj,
    Switch,
    Var,
)

# Server-side code or writes: refused wherever they appear (stage, operator, accumulator, filter).
FORBIDDEN = frozenset({"$out", "$merge", "$function", "$accumulator", "$where"})
VAR_RE = re.compile(r"[a-z][A-Za-z0-9_]*")
MAX_SEGMENT_CHARS = 256
MAX_DEPTH = 100  # expression nesting; deeper is expression_too_large (keeps recursion bounded)

# Generic operators: (fewest, most) arguments; None: any number.
ARITY: dict[str, tuple[int, int | None]] = {
    **{op: (0, None) for op in ("add", "multiply", "and", "or", "concat", "concatArrays")},
    "ifNull": (2, None),
    **{
        op: (2, 2)
        for op in (
            [
                "subtract",
                "divide",
                "mod",
                "eq",
                "ne",
                "gt",
                "gte",
                "lt",
                "lte",
                "cmp",
                "split",
                "arrayElemAt",
                "in",
            ]
        )
    },
    **{
        op: (1, 1)
        for op in (
            [
                "abs",
                "floor",
                "ceil",
                "toLower",
                "toUpper",
                "strLenCP",
                "size",
                "type",
                "toString",
                "toInt",
                "toDouble",
                "not",
            ]
        )
    },
    "substrCP": (3, 3),
    "slice": (2, 3),
}
SPECIAL = frozenset({"cond", "round", "trim", "switch", "filter", "map", "literal"})
OPERATORS = frozenset(ARITY) | SPECIAL


def invalid(message: str, at: str, **details: Any) -> InvalidQuery:
    return InvalidQuery(
        f"{message} (at {at})", code="invalid_pipeline", details={"at": at, **details}
    )


def refuse_operator(op: str, at: str, kind: str = "operator") -> NoReturn:
    """``op`` (with its ``$``) is not one dbproxy runs: forbidden or unknown."""
    if op in FORBIDDEN:
        raise ForbiddenOperator(
            f"{op} is not allowed (at {at})", details={"operator": op, "at": at}
        )
    raise InvalidQuery(
        f"unknown {kind} {op[:60]} (at {at})",
        code="unknown_operator",
        details={"operator": op[:100], "at": at},
    )


def check_name(name: Any, at: str, what: str = "field name") -> str:
    """An output field name: a non-empty string without '.', not starting with '$'."""
    if not isinstance(name, str) or not name:
        raise invalid(f"a {what} must be a non-empty string", at)
    if "." in name or name.startswith("$") or "\x00" in name:
        raise invalid(f"{what} {name[:60]!r} may not contain '.' or start with '$'", at)
    if len(name) > MAX_SEGMENT_CHARS:
        raise invalid(f"{what} longer than {MAX_SEGMENT_CHARS} characters", at)
    return name


def parse_path(text: Any, limits: Limits, at: str) -> FieldPath:
    """A dotted field path without its ``$`` (``"a.b"`` → ``("a", "b")``)."""
    if not isinstance(text, str) or not text:
        raise invalid("a field path must be a non-empty string", at)
    segments = tuple(text.split("."))
    if len(segments) > limits.max_path_segments:
        raise invalid(
            f"field path {text[:60]!r} has more than {limits.max_path_segments} segments", at
        )
    for seg in segments:
        if not seg:
            raise invalid(f"field path {text[:60]!r} has an empty segment", at)
        if seg.startswith("$") or "\x00" in seg:
            raise invalid(f"field path {text[:60]!r}: a segment may not start with '$'", at)
        if len(seg) > MAX_SEGMENT_CHARS:
            raise invalid(f"field path {text[:60]!r}: a segment is too long", at)
    return segments


def as_int(value: Any) -> int | None:
    """``value`` as an integer when it is one (integral doubles too, bools never)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def is_operator_object(raw: Any, at: str) -> bool:
    """An object with exactly one key, starting with '$'; several keys with a '$' one fail."""
    if not isinstance(raw, dict) or not raw:
        return False
    if len(raw) == 1:
        return str(next(iter(raw))).startswith("$")
    if any(str(k).startswith("$") for k in raw):
        raise invalid("an operator object must have exactly one key", at)
    return False


class ExprParser:
    """Parses expressions of one pipeline, sharing its node budget across all of them."""

    __slots__ = ("limits", "nodes")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.nodes = 0

    def spend(self, at: str) -> None:
        self.nodes += 1
        if self.nodes > self.limits.max_expression_nodes:
            raise LimitExceeded(
                f"the pipeline has more than {self.limits.max_expression_nodes} expression "
                f"nodes (at {at})",
                code="expression_too_large",
                details={"at": at},
            )

    def parse(self, raw: Any, at: str, scope: tuple[str, ...] = (), depth: int = 0) -> Expr:
        if depth > MAX_DEPTH:
            raise LimitExceeded(
                f"expression nested deeper than {MAX_DEPTH} (at {at})",
                code="expression_too_large",
                details={"at": at},
            )
        self.spend(at)
        if isinstance(raw, str):
            return self._string(raw, at, scope)
        if raw is None or isinstance(raw, bool | int | float):
            numbers.check_number(raw)
            return Lit(raw)
        if isinstance(raw, list):
            return Arr(
                tuple(self.parse(v, f"{at}[{i}]", scope, depth + 1) for i, v in enumerate(raw))
            )
        if isinstance(raw, dict):
            if is_operator_object(raw, at):
                ((op, arg),) = raw.items()
                return self._operator(op, arg, at, scope, depth + 1)
            fields = []
            for k, v in raw.items():
                name = check_name(k, at)
                fields.append((name, self.parse(v, f"{at}.{name}", scope, depth + 1)))
            return Obj(tuple(fields))
        raise invalid(f"not a JSON value: {type(raw).__name__}", at)

    def _string(self, raw: str, at: str, scope: tuple[str, ...]) -> Expr:
        if not raw.startswith("$"):
            return Lit(raw)
        if not raw.startswith("$$"):
            return Field(parse_path(raw[1:], self.limits, at))
        name, _, rest = raw[2:].partition(".")
        path = parse_path(rest, self.limits, at) if rest or raw.endswith(".") else ()
        if name in ("ROOT", "CURRENT"):
            return Field(path)
        if name in scope:
            return Var(name, path)
        raise invalid(f"unknown variable $${name[:60]}", at, variable=f"$${name[:60]}")

    def _args(self, op: str, arg: Any, at: str, scope: tuple[str, ...], depth: int) -> list[Expr]:
        fewest, most = ARITY[op]
        items = arg if isinstance(arg, list) else [arg]
        if not fewest <= len(items) <= (most if most is not None else len(items)):
            want = f"{fewest}" if fewest == most else f"{fewest} to {most or 'any'}"
            raise invalid(
                f"${op} takes {want} argument(s), got {len(items)}", at, operator=f"${op}"
            )
        return [self.parse(v, f"{at}.${op}[{i}]", scope, depth) for i, v in enumerate(items)]

    def _operator(self, op: str, arg: Any, at: str, scope: tuple[str, ...], depth: int) -> Expr:
        name = op[1:]
        if name not in OPERATORS:
            refuse_operator(op, at)
        if name == "literal":
            numbers.check_value(arg)
            return Lit(arg)
        if name in SPECIAL:
            return self._special(name, arg, at, scope, depth)
        args = self._args(name, arg, at, scope, depth)
        _check_constants(name, args, at)
        return Call(name, tuple(args))

    def _special(self, op: str, arg: Any, at: str, scope: tuple[str, ...], depth: int) -> Expr:
        here = f"{at}.${op}"
        if op == "cond":
            if isinstance(arg, dict):
                spec = _keys(arg, ("if", "then", "else"), (), here)
                arg = [spec["if"], spec["then"], spec["else"]]
            if not isinstance(arg, list) or len(arg) != 3:
                raise invalid("$cond takes [if, then, else] or {if, then, else}", at)
            return Call("cond", tuple(self._each(arg, here, scope, depth)))
        if op == "round":
            items = arg if isinstance(arg, list) else [arg]
            if not 1 <= len(items) <= 2:
                raise invalid("$round takes x or [x, place]", at, operator="$round")
            args = self._each(items, here, scope, depth)
            if len(args) == 1:
                self.spend(here)
                args.append(Lit(0))
            args[1] = _int_param(args[1], -20, 100, f"{here}[1]", "$round place")
            return Call("round", tuple(args))
        if op == "trim":
            spec = _keys(arg, ("input",), ("chars",), here)
            chars = spec.get("chars")
            args = [self.parse(spec["input"], f"{here}.input", scope, depth)]
            args.append(self.parse(chars, f"{here}.chars", scope, depth))
            chars_arg = args[1]
            if isinstance(chars_arg, Arr | Obj) or (
                isinstance(chars_arg, Lit) and not isinstance(chars_arg.value, str | None)
            ):
                raise invalid("$trim chars must be a string", f"{here}.chars")
            return Call("trim", tuple(args))
        if op == "switch":
            return self._switch(arg, here, scope, depth)
        return self._iterate(op, arg, here, scope, depth)

    def _each(self, items: list[Any], at: str, scope: tuple[str, ...], depth: int) -> list[Expr]:
        return [self.parse(v, f"{at}[{i}]", scope, depth) for i, v in enumerate(items)]

    def _switch(self, arg: Any, at: str, scope: tuple[str, ...], depth: int) -> Expr:
        spec = _keys(arg, ("branches",), ("default",), at)
        branches = spec["branches"]
        if not isinstance(branches, list) or not branches:
            raise invalid("$switch branches must be a non-empty array", f"{at}.branches")
        out = []
        for i, branch in enumerate(branches):
            where = f"{at}.branches[{i}]"
            b = _keys(branch, ("case", "then"), (), where)
            out.append(
                (
                    self.parse(b["case"], f"{where}.case", scope, depth),
                    self.parse(b["then"], f"{where}.then", scope, depth),
                )
            )
        default = None
        if "default" in spec:
            default = self.parse(spec["default"], f"{at}.default", scope, depth)
        return Switch(tuple(out), default)

    def _iterate(self, op: str, arg: Any, at: str, scope: tuple[str, ...], depth: int) -> Expr:
        body_key = "cond" if op == "filter" else "in"
        optional = ("as", "limit") if op == "filter" else ("as",)
        spec = _keys(arg, ("input", body_key), optional, at)
        var = spec.get("as", "this")
        if not isinstance(var, str) or not VAR_RE.fullmatch(var):
            raise invalid("as must be a variable name ([a-z][A-Za-z0-9_]*)", f"{at}.as")
        source = self.parse(spec["input"], f"{at}.input", scope, depth)
        inner = (*(s for s in scope if s != var), var)
        body = self.parse(spec[body_key], f"{at}.{body_key}", inner, depth)
        limit = None
        if "limit" in spec:
            limit = self.parse(spec["limit"], f"{at}.limit", scope, depth)
            if isinstance(limit, Lit):
                limit = (
                    None
                    if limit.value is None
                    else _int_param(limit, 1, numbers.INT64_MAX, f"{at}.limit", "limit")
                )
        return Iterate(op, source, var, body, limit)


def _keys(
    arg: Any, required: tuple[str, ...], optional: tuple[str, ...], at: str
) -> dict[str, Any]:
    """``arg`` as an object with exactly the ``required`` keys and some ``optional`` ones."""
    if not isinstance(arg, dict):
        raise invalid(f"needs an object with {', '.join(required + optional)}", at)
    for key in arg:
        if key not in required and key not in optional:
            raise invalid(f"unknown argument {str(key)[:60]!r}", at)
    for key in required:
        if key not in arg:
            raise invalid(f"missing argument {key!r}", at)
    return arg


def _int_param(expr: Expr, low: int, high: int, at: str, what: str) -> Expr:
    """A constant integer parameter in ``low..high`` (null passes: it gives null)."""
    if isinstance(expr, Arr | Obj):
        raise invalid(f"{what} must be an integer, not an array or object", at)
    if not isinstance(expr, Lit) or expr.value is None:
        return expr
    n = as_int(expr.value)
    if n is None or not low <= n <= high:
        raise invalid(f"{what} must be an integer in {low}..{high}", at)
    return Lit(n)


def _check_constants(op: str, args: list[Expr], at: str) -> None:
    """Refuse constant arguments that could never work; integral doubles become integers."""
    here = f"{at}.${op}"
    if op == "substrCP":
        for i in (1, 2):
            if isinstance(args[i], Lit):
                if args[i].value is None:  # type: ignore[union-attr]
                    raise invalid("$substrCP start and count must be integers", f"{here}[{i}]")
                args[i] = _int_param(args[i], 0, numbers.INT64_MAX, f"{here}[{i}]", "$substrCP")
    elif op == "split":
        sep = args[1]
        if isinstance(sep, Arr | Obj) or (
            isinstance(sep, Lit)
            and sep.value is not None
            and (not isinstance(sep.value, str) or not sep.value)
        ):
            raise invalid("$split separator must be a non-empty string", f"{here}[1]")
    elif op == "in":
        arr = args[1]
        if isinstance(arr, Obj) or (isinstance(arr, Lit) and not isinstance(arr.value, list)):
            raise invalid("$in needs an array as its second argument", f"{here}[1]")
    elif op == "arrayElemAt":
        args[1] = _int_param(
            args[1], numbers.INT64_MIN, numbers.INT64_MAX, f"{here}[1]", "$arrayElemAt index"
        )
    elif op == "slice":
        for i in range(1, len(args)):
            args[i] = _int_param(
                args[i], numbers.INT64_MIN, numbers.INT64_MAX, f"{here}[{i}]", "$slice"
            )
        n = args[-1]
        if len(args) == 3 and isinstance(n, Lit) and n.value is not None and n.value <= 0:
            raise invalid("$slice with a position needs n > 0", f"{here}[2]")
