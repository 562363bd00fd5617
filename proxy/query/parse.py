"""Front end of the query language: JSON → validated AST, with every limit checked first."""

from __future__ import annotations

from typing import Any

from proxy import numbers
from proxy.config import Limits
from proxy.errors import ForbiddenOperator, InvalidQuery, LimitExceeded
from proxy.query import regex
from proxy.query.ast import (
    MATCH_ALL,
    And,
    Cmp,
    ElemMatch,
    Eq,
    Exists,
    FieldCond,
    Filter,
    In,
    Never,
    Nor,
    Not,
    Or,
    Path,
    Pred,
    Regex,
    Size,
    SortKey,
    TypeIs,
    Update,
    UpdateOp,
)

FORBIDDEN = frozenset(
    {"$where", "$function", "$accumulator", "$expr", "$jsonSchema", "$eval", "$code"}
)
TYPE_NAMES = {
    "null": "null",
    "number": "number",
    "double": "number",
    "int": "number",
    "long": "number",
    "decimal": "number",
    "string": "string",
    "object": "object",
    "array": "array",
    "bool": "bool",
    "boolean": "bool",
}
REGEX_OPTIONS = frozenset("imsx")
MAX_SEGMENT_CHARS = 256  # a field name in a path; also keeps int() of a numeric one cheap
MAX_SIZE = 2**31 - 1  # $size: no array is longer
UPDATE_OPERATORS = frozenset(
    {"$set", "$unset", "$inc", "$mul", "$min", "$max", "$push", "$pull", "$addToSet", "$rename"}
)


def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


class _Budget:
    """Counts filter nodes as they are parsed, so an oversized filter fails early."""

    __slots__ = ("limits", "nodes")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.nodes = 0

    def spend(self, where: str) -> None:
        self.nodes += 1
        if self.nodes > self.limits.max_filter_nodes:
            raise LimitExceeded(
                f"filter has more than {self.limits.max_filter_nodes} nodes (at {where})",
                code="filter_too_large",
            )


def parse_path(raw: Any, limits: Limits, *, allow_id: bool = True) -> Path:
    if not isinstance(raw, str) or not raw:
        raise InvalidQuery(f"field path must be a non-empty string, got {raw!r:.80}")
    segments = tuple(raw.split("."))
    if len(segments) > limits.max_path_segments:
        raise LimitExceeded(
            f"field path {raw[:80]!r} has more than {limits.max_path_segments} segments",
            code="path_too_deep",
        )
    for seg in segments:
        if not seg:
            raise InvalidQuery(f"field path {raw[:80]!r} has an empty segment")
        if len(seg) > MAX_SEGMENT_CHARS:
            raise LimitExceeded(
                f"field path {raw[:80]!r}: a field name is longer than {MAX_SEGMENT_CHARS} "
                "characters",
                code="field_name_too_long",
            )
        if seg.startswith("$"):
            raise InvalidQuery(
                f"field path {raw[:80]!r} has a segment starting with '$'",
                code="invalid_field_path",
            )
        if "\x00" in seg:
            raise InvalidQuery("field path contains a NUL character", code="invalid_field_path")
    return Path(segments)


def parse_filter(raw: Any, limits: Limits) -> Filter:
    if raw is None:
        return MATCH_ALL
    if not isinstance(raw, dict):
        raise InvalidQuery("filter must be a JSON object")
    return _parse_doc_filter(raw, limits, _Budget(limits), "")


def _parse_doc_filter(raw: dict[str, Any], limits: Limits, budget: _Budget, at: str) -> Filter:
    parts: list[Filter] = []
    for key, value in raw.items():
        where = f"{at}.{key}" if at else key
        budget.spend(where)
        if key.startswith("$"):
            parts.append(_parse_logical(key, value, limits, budget, where))
        else:
            path = parse_path(key, limits)
            parts.append(FieldCond(path, _parse_field_value(value, limits, budget, where)))
    if len(parts) == 1:
        return parts[0]
    return And(tuple(parts))


def _parse_logical(op: str, value: Any, limits: Limits, budget: _Budget, where: str) -> Filter:
    if op not in ("$and", "$or", "$nor"):
        _unknown_operator(op, where)
    if not isinstance(value, list) or not value:
        raise InvalidQuery(f"{op} needs a non-empty array of filters (at {where})")
    children = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidQuery(f"{op} items must be objects (at {where}[{i}])")
        children.append(_parse_doc_filter(item, limits, budget, f"{where}[{i}]"))
    kids = tuple(children)
    if op == "$and":
        return And(kids)
    if op == "$or":
        return Or(kids)
    return Nor(kids)


def _unknown_operator(op: str, where: str) -> None:
    if op in FORBIDDEN:
        raise ForbiddenOperator(
            f"operator {op} is not allowed (at {where})", details={"operator": op, "path": where}
        )
    raise InvalidQuery(
        f"unknown operator {op} (at {where})",
        code="unknown_operator",
        details={"operator": op, "path": where},
    )


def _is_operator_object(value: Any, where: str) -> bool:
    if not isinstance(value, dict) or not value:
        return False
    dollar = [k.startswith("$") for k in value]
    if all(dollar):
        return True
    if any(dollar):
        raise InvalidQuery(f"object mixes operators and field names (at {where})")
    return False


def _parse_field_value(value: Any, limits: Limits, budget: _Budget, where: str) -> tuple[Pred, ...]:
    if _is_operator_object(value, where):
        return _parse_operators(value, limits, budget, where)
    _check_literal(value, limits, where)
    return (Eq(value),)


def _check_literal(value: Any, limits: Limits, where: str) -> None:
    if isinstance(value, float) and value != value:  # NaN never compares sanely
        raise InvalidQuery(f"NaN is not a valid value (at {where})")
    if isinstance(value, dict):
        for v in value.values():
            _check_literal(v, limits, where)
    elif isinstance(value, list):
        for v in value:
            _check_literal(v, limits, where)
    else:
        numbers.check_number(value)


def _parse_operators(
    ops: dict[str, Any], limits: Limits, budget: _Budget, where: str
) -> tuple[Pred, ...]:
    preds: list[Pred] = []
    if "$options" in ops and "$regex" not in ops:
        raise InvalidQuery(f"$options without $regex (at {where})")
    for op, arg in ops.items():
        at = f"{where}.{op}"
        budget.spend(at)
        if op == "$options":
            continue
        if op == "$all":
            preds.extend(_parse_all(arg, limits, at))
            continue
        preds.append(_parse_operator(op, arg, ops, limits, budget, at))
    return tuple(preds)


def _parse_operator(
    op: str, arg: Any, ops: dict[str, Any], limits: Limits, budget: _Budget, at: str
) -> Pred:
    if op == "$eq":
        _check_literal(arg, limits, at)
        return Eq(arg)
    if op == "$ne":
        _check_literal(arg, limits, at)
        return Not((Eq(arg),))
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return _parse_cmp(op[1:], arg, at)
    if op in ("$in", "$nin"):
        pred = _parse_in(op, arg, limits, at)
        return pred if op == "$in" else Not((pred,))
    if op == "$exists":
        if not isinstance(arg, bool | int) or isinstance(arg, float):
            raise InvalidQuery(f"$exists needs a boolean (at {at})")
        return Exists(bool(arg))
    if op == "$type":
        return _parse_type(arg, at)
    if op == "$regex":
        return _parse_regex(arg, ops.get("$options", ""), limits, at)
    if op == "$size":
        if isinstance(arg, float) and arg.is_integer():
            arg = int(arg)
        if isinstance(arg, bool) or not isinstance(arg, int) or arg < 0:
            raise InvalidQuery(f"$size needs a non-negative integer (at {at})")
        if arg > MAX_SIZE:
            raise InvalidQuery(
                f"$size may be at most {MAX_SIZE} (at {at})", code="invalid_operator_value"
            )
        return Size(arg)
    if op == "$elemMatch":
        return _parse_elem_match(arg, limits, budget, at)
    if op == "$not":
        return _parse_not(arg, limits, budget, at)
    _unknown_operator(op, at)
    raise AssertionError("unreachable")


def _parse_cmp(op: str, arg: Any, at: str) -> Pred:
    if arg is None:
        return Eq(None) if op in ("gte", "lte") else Never()
    if not isinstance(arg, str | int | float | bool):
        raise InvalidQuery(
            f"${op} takes a number, string, boolean or null (at {at})",
            code="invalid_operator_value",
        )
    if isinstance(arg, float) and arg != arg:
        raise InvalidQuery(f"NaN is not a valid value (at {at})")
    numbers.check_number(arg)
    return Cmp(op, arg)


def _parse_in(op: str, arg: Any, limits: Limits, at: str) -> Pred:
    if not isinstance(arg, list):
        raise InvalidQuery(f"{op} needs an array (at {at})")
    if len(arg) > limits.max_in_items:
        raise LimitExceeded(
            f"{op} has more than {limits.max_in_items} items (at {at})", code="in_list_too_long"
        )
    for v in arg:
        if isinstance(v, dict) and any(str(k).startswith("$") for k in v):
            raise InvalidQuery(f"operators are not allowed inside {op} (at {at})")
        _check_literal(v, limits, at)
    if not arg:
        return Never()
    return In(tuple(arg))


def _parse_type(arg: Any, at: str) -> Pred:
    names = arg if isinstance(arg, list) else [arg]
    if not names:
        raise InvalidQuery(f"$type needs a type name (at {at})")
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or name not in TYPE_NAMES:
            raise InvalidQuery(
                f"$type: unknown type {name!r:.40} (at {at}); known: {', '.join(TYPE_NAMES)}",
                code="invalid_operator_value",
            )
        canon = TYPE_NAMES[name]
        if canon not in out:
            out.append(canon)
    return TypeIs(tuple(sorted(out)))


def _parse_regex(pattern: Any, options: Any, limits: Limits, at: str) -> Pred:
    if not isinstance(pattern, str):
        raise InvalidQuery(f"$regex needs a string (at {at})")
    if len(pattern) > limits.max_regex_length:
        raise LimitExceeded(
            f"$regex longer than {limits.max_regex_length} characters (at {at})",
            code="regex_too_long",
        )
    if not isinstance(options, str) or not set(options) <= REGEX_OPTIONS:
        raise InvalidQuery(f"$options may only contain i, m, s, x (at {at})")
    if "\x00" in pattern:
        raise InvalidQuery(f"$regex contains a NUL character (at {at})")
    if "x" in options:  # extended syntax is stripped here, the same for every backend
        pattern = regex.strip_extended(pattern)
        options = options.replace("x", "")
    flags = "".join(sorted(set(options)))
    regex.compile_regex(pattern, flags)  # unsupported_regex / invalid_regex before any I/O
    return Regex(pattern, flags)


def _parse_all(arg: Any, limits: Limits, at: str) -> list[Pred]:
    if not isinstance(arg, list) or not arg:
        raise InvalidQuery(f"$all needs a non-empty array (at {at})")
    if len(arg) > limits.max_in_items:
        raise LimitExceeded(
            f"$all has more than {limits.max_in_items} items (at {at})", code="in_list_too_long"
        )
    for v in arg:
        if isinstance(v, dict) and any(str(k).startswith("$") for k in v):
            raise InvalidQuery(f"operators inside $all are not supported (at {at})")
        _check_literal(v, limits, at)
    # {$all: [a, b]} is {$eq: a} AND {$eq: b}
    return [Eq(v) for v in arg]


def _parse_elem_match(arg: Any, limits: Limits, budget: _Budget, at: str) -> Pred:
    if not isinstance(arg, dict):
        raise InvalidQuery(f"$elemMatch needs an object (at {at})")
    if not arg:  # document form matching any object element
        return ElemMatch(None, MATCH_ALL)
    if _is_operator_object(arg, at) and not any(k in ("$and", "$or", "$nor") for k in arg):
        return ElemMatch(_parse_operators(arg, limits, budget, at), None)
    return ElemMatch(None, _parse_doc_filter(arg, limits, budget, at))


def _parse_not(arg: Any, limits: Limits, budget: _Budget, at: str) -> Pred:
    if isinstance(arg, str):
        return Not((_parse_regex(arg, "", limits, at),))
    if not _is_operator_object(arg, at):
        raise InvalidQuery(f"$not needs an operator object or a regex (at {at})")
    return Not(_parse_operators(arg, limits, budget, at))


# ---- sort, projection ----


def parse_sort(raw: Any, limits: Limits) -> tuple[SortKey, ...]:
    """``-age,name`` | ``{"age": -1, "name": 1}`` | ``[["age", -1], ...]`` | None."""
    if raw is None or raw == "":
        return ()
    items: list[tuple[str, bool]] = []
    if isinstance(raw, str):
        for part in raw.split(","):
            part = part.strip()
            desc = part.startswith("-")
            name = part[1:] if part[:1] in "+-" and part else part
            items.append((name, desc))
    elif isinstance(raw, dict):
        for name, direction in raw.items():
            items.append((name, _direction(direction, name)))
    elif isinstance(raw, list):
        for entry in raw:
            if not (isinstance(entry, list) and len(entry) == 2):
                raise InvalidQuery("sort list items must be [field, 1|-1]")
            items.append((entry[0], _direction(entry[1], str(entry[0]))))
    else:
        raise InvalidQuery("sort must be a string like '-age,name' or an object")
    if len(items) > 8:
        raise LimitExceeded("at most 8 sort fields", code="sort_too_large")
    keys: list[SortKey] = []
    seen: set[str] = set()
    for name, desc in items:
        path = parse_path(name, limits)
        if path.dotted in seen:
            raise InvalidQuery(f"sort field {path.dotted!r} given twice")
        seen.add(path.dotted)
        keys.append(SortKey(path, desc))
    # _id is the final tie-break anyway; an explicit trailing ascending _id adds nothing
    if keys and keys[-1].path.segments == ("_id",) and not keys[-1].descending:
        keys.pop()
    return tuple(keys)


def _direction(value: Any, name: str) -> bool:
    if value in (1, -1) and not isinstance(value, bool):
        return bool(value == -1)
    if value in ("asc", "desc"):
        return bool(value == "desc")
    raise InvalidQuery(f"sort direction of {name!r:.60} must be 1 or -1")


def parse_fields(raw: Any, limits: Limits) -> tuple[Path, ...] | None:
    if raw is None or raw == "":
        return None
    names = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidQuery("fields must be a comma-separated string or an array of strings")
    if len(names) > 100:
        raise LimitExceeded("at most 100 fields", code="too_many_fields")
    return tuple(parse_path(n.strip(), limits) for n in names)


# ---- updates ----


def is_update_document(body: Any) -> bool:
    """True when the body's keys are update operators (``$set`` ...)."""
    return isinstance(body, dict) and bool(body) and any(str(k).startswith("$") for k in body)


def parse_update(raw: Any, limits: Limits) -> Update:
    if not isinstance(raw, dict) or not raw:
        raise InvalidQuery("update must be a non-empty object of operators", code="invalid_update")
    ops: list[UpdateOp] = []
    touched: list[tuple[str, ...]] = []
    for op, fields in raw.items():
        if op not in UPDATE_OPERATORS:
            if not op.startswith("$"):
                raise InvalidQuery(
                    f"update mixes operators and plain fields ({op!r:.60})", code="invalid_update"
                )
            _unknown_operator(op, op)
        if not isinstance(fields, dict) or not fields:
            raise InvalidQuery(f"{op} needs a non-empty object of fields", code="invalid_update")
        for name, value in fields.items():
            path = parse_path(name, limits)
            _check_protected(path, op)
            upd = _parse_update_op(op[1:], path, value, limits)
            ops.append(upd)
            touched.append(path.segments)
            if upd.op == "rename":
                touched.append(upd.value.segments)
    _check_conflicts(touched)
    if len(ops) > limits.max_filter_nodes:
        raise LimitExceeded("update has too many fields", code="update_too_large")
    return Update(tuple(ops))


def _check_protected(path: Path, op: str) -> None:
    if path.segments[0] in ("_id", "_version"):
        raise InvalidQuery(f"{op} cannot change {path.segments[0]}", code="immutable_field")


def _check_conflicts(paths: list[tuple[str, ...]]) -> None:
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            n = min(len(a), len(b))
            if a[:n] == b[:n]:
                raise InvalidQuery(
                    f"update paths {'.'.join(a)!r} and {'.'.join(b)!r} conflict",
                    code="conflicting_update",
                )


def _parse_update_op(op: str, path: Path, value: Any, limits: Limits) -> UpdateOp:
    if op in ("inc", "mul"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidQuery(f"${op} needs a number for {path.dotted!r}", code="invalid_update")
        numbers.check_number(value)
        return UpdateOp(op, path, value)
    if op in ("push", "addToSet"):
        if isinstance(value, dict) and any(k.startswith("$") for k in value):
            if set(value) != {"$each"} or not isinstance(value["$each"], list):
                raise InvalidQuery(
                    f"${op} supports only {{'$each': [...]}} modifiers", code="invalid_update"
                )
            items = tuple(value["$each"])
        else:
            items = (value,)
        if len(items) > limits.max_in_items:
            raise LimitExceeded(f"${op} $each too long", code="in_list_too_long")
        numbers.check_value(items)
        return UpdateOp(op, path, items)
    if op == "pull":
        if isinstance(value, dict) and _is_operator_object(value, path.dotted):
            return UpdateOp(op, path, _parse_operators(value, limits, _Budget(limits), path.dotted))
        numbers.check_value(value)
        return UpdateOp(op, path, value)
    if op == "rename":
        if not isinstance(value, str):
            raise InvalidQuery("$rename needs a target field name", code="invalid_update")
        target = parse_path(value, limits)
        _check_protected(target, "$rename")
        if target == path:
            raise InvalidQuery("$rename source and target are the same", code="invalid_update")
        return UpdateOp(op, path, target)
    if op == "unset":
        return UpdateOp(op, path, None)
    if op in ("min", "max") and isinstance(value, float) and value != value:
        raise InvalidQuery("NaN is not a valid value", code="invalid_update")
    numbers.check_value(value)  # $set, $min, $max: what they may store
    return UpdateOp(op, path, value)
