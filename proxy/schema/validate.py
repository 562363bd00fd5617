"""A Collection Schema compiled into one jsonschema-rs validator: ``is_valid`` is one call into
Rust, ``problems`` lists every problem, computed only for an invalid document."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

import jsonschema_rs

from proxy.errors import BadRequest, SchemaViolation
from proxy.schema.model import MISSING, CollectionSchema, FieldSpec, invalid

log = logging.getLogger(__name__)

INT64_MIN: Final = -(2**63)
INT64_END: Final = 2**63  # exclusive
MAX_PROBLEMS_SHOWN: Final = 100
HIDDEN_MESSAGE: Final = "does not match the collection's schema (a field this service may not read)"
# Rust's `regex` engine (linear time, no lookaround or backreferences; the same family as the
# query language's RE2) rather than jsonschema-rs's default fancy-regex (backtracking).
_PATTERN_OPTIONS: Final = jsonschema_rs.RegexOptions(size_limit=1 << 20, dfa_size_limit=1 << 20)
_INT64_MARK: Final = "allOf"  # the only allOf in a compiled schema: an integer's 64-bit range
_RULES: Final = {
    "type": "type",
    "format": "type",  # datetime: an RFC 3339 string
    "required": "required",
    "minimum": "min",
    "maximum": "max",
    "minLength": "min_length",
    "minItems": "min_length",
    "maxLength": "max_length",
    "maxItems": "max_length",
    "pattern": "pattern",
    "enum": "enum",
}
_RULE_ORDER: Final = {
    r: i
    for i, r in enumerate(
        ("required", "type", "min", "max", "min_length", "max_length", "pattern", "enum")
    )
}


def compile_schema(schema: CollectionSchema) -> SchemaValidator:
    """The compiled validator of ``schema``; a pattern the engine refuses, a default that its
    own field refuses or an ``_id`` that cannot be a string is ``400 invalid_schema``."""
    return SchemaValidator(schema)


def violation(problems: list[dict[str, str]]) -> SchemaViolation:
    n = len(problems)
    return SchemaViolation(
        f"the document does not match the collection's schema ({n} problem{'' if n == 1 else 's'})",
        details={
            "problems": problems[:MAX_PROBLEMS_SHOWN],
            "truncated": n > MAX_PROBLEMS_SHOWN,
        },
    )


def redact(problems: list[dict[str, str]], can_read: Callable[[str], bool]) -> list[dict[str, str]]:
    """``problems`` as a caller that may read only some fields may see them: a problem on a
    path it cannot read keeps the path (the declared schema names it) and becomes one
    ``hidden`` problem, without the rule, the value's type or the limit, which would tell
    it about the stored value (``$rename`` from a write-only field, ``$inc`` on one)."""
    out: list[dict[str, str]] = []
    hidden: set[str] = set()
    for p in problems:
        if can_read(p["path"]):
            out.append(p)
        elif p["path"] not in hidden:
            hidden.add(p["path"])
            out.append(_p(p["path"], "hidden", HIDDEN_MESSAGE))
    return out


class SchemaValidator:
    """``schema`` compiled; safe to share between tasks (it holds no per-document state)."""

    __slots__ = ("_defaults", "_fields", "_validator", "immutable_paths", "schema")

    def __init__(self, schema: CollectionSchema) -> None:
        self.schema = schema
        self._fields: dict[tuple[str, ...], FieldSpec] = {f.path: f for f in schema.fields}
        for i, spec in enumerate(schema.fields):
            _check_field(spec, f"schema.fields[{i}]")
        self._validator = _compile(to_json_schema(schema), "schema")
        self._defaults: tuple[tuple[tuple[str, ...], Any], ...] = tuple(
            (f.path, f.default) for f in schema.fields if f.default is not MISSING
        )
        self.immutable_paths: tuple[tuple[str, ...], ...] = tuple(
            f.path for f in schema.fields if f.immutable
        )

    def is_valid(self, doc: Mapping[str, Any]) -> bool:
        return self._validator.is_valid(doc)  # type: ignore[no-any-return]

    def problems(self, doc: Mapping[str, Any]) -> list[dict[str, str]]:
        """Every problem of ``doc``, sorted by path then rule; ``[]`` when it is valid. A value
        of the wrong type has that one problem (its constraints are about values of its type)."""
        if self._validator.is_valid(doc):
            return []
        found = {}
        for err in self._errors(doc):
            p = self._problem(err)
            found[(p["path"], p["rule"], p["message"])] = p
        if not found:  # the engine could not list them: the document is still refused
            return [_p("", "schema", "does not match the collection's schema")]
        wrong_type = {p["path"] for p in found.values() if p["rule"] == "type"}
        out = [  # a value of the wrong type has only that problem: its other rules are moot
            p for p in found.values() if p["rule"] == "type" or p["path"] not in wrong_type
        ]
        out.sort(key=lambda p: (p["path"], _RULE_ORDER.get(p["rule"], 99), p["message"]))
        return out

    def _errors(self, doc: Mapping[str, Any]) -> list[Any]:
        """jsonschema-rs's errors of an invalid document. Its iterator has been seen to
        raise ``ValueError: Recursion limit reached`` once for a shallow document that the
        same call then listed fine: asked again once, and never a 500 either way."""
        for _ in range(2):
            try:
                return list(self._validator.iter_errors(doc))
            except ValueError:
                continue
        log.warning("the schema validator could not list the problems of a document")
        return []

    def with_defaults(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``doc`` with each absent field that declares a ``default_value`` filled
        in; a nested field's parent object is created when absent, and left alone (the default
        not applied) when present but not an object. Nothing present is overwritten."""
        out = dict(doc)
        for path, value in self._defaults:
            _set_default(out, path, value)
        return out

    def immutable_problems(
        self, old: Mapping[str, Any], new: Mapping[str, Any]
    ) -> list[dict[str, str]]:
        """A problem per ``immutable`` field that had a value in ``old`` (``null`` included)
        and has another one, or none, in ``new``. Setting a field that was absent is allowed."""
        out: list[dict[str, str]] = []
        for path in self.immutable_paths:
            before = _get(old, path)
            if before is MISSING:
                continue
            after = _get(new, path)
            if after is MISSING or not json_equal(before, after):
                out.append(
                    {
                        "path": ".".join(path),
                        "rule": "immutable",
                        "message": "is immutable: once set it cannot be "
                        + ("removed" if after is MISSING else "changed"),
                    }
                )
        return out

    def check(
        self, doc: Mapping[str, Any], old: Mapping[str, Any] | None = None
    ) -> list[dict[str, str]]:
        out = self.problems(doc)
        if old is not None and self.immutable_paths:
            out.extend(self.immutable_problems(old, doc))
        return out

    # ---- one error → one problem ------------------------------------------------------------

    def _problem(self, err: Any) -> dict[str, str]:
        keyword = err.kind.name
        at = [str(p) for p in err.instance_path]
        if keyword == "required":
            at.append(str(err.kind.property))
        path = ".".join(at)
        spec = self._fields.get(tuple(at))
        if _INT64_MARK in err.schema_path:
            return _p(path, "type", "must be an integer within signed 64 bits")
        rule = _RULES.get(keyword, keyword)
        return _p(path, rule, _message(rule, keyword, err, spec))


def _p(path: str, rule: str, message: str) -> dict[str, str]:
    return {"path": path, "rule": rule, "message": message}


def _message(rule: str, keyword: str, err: Any, spec: FieldSpec | None) -> str:
    if rule == "required":
        return "is required"
    if keyword == "format":
        return "must be an RFC 3339 date-time string (like 2024-05-01T12:00:00Z)"
    if rule == "type":
        wanted = " or ".join(spec.types) if spec is not None else "another type"
        return f"must be of type {wanted} (is {json_kind(err.instance)})"
    limit = err.kind.limit if rule in ("min", "max", "min_length", "max_length") else None
    if rule == "min":
        return f"must be at least {limit}"
    if rule == "max":
        return f"must be at most {limit}"
    if rule in ("min_length", "max_length"):
        unit = "item" if keyword.endswith("Items") else "character"
        side = "at least" if rule == "min_length" else "at most"
        return f"must have {side} {limit} {unit}{'' if limit == 1 else 's'}"
    if rule == "pattern":
        c = spec.constraint("pattern") if spec is not None else None
        return f"must match the pattern {json.dumps(c.value if c is not None else '')}"
    if rule == "enum":
        c = spec.constraint("enum") if spec is not None else None
        values = list(c.value) if c is not None else []
        shown = ", ".join(_short(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        return f"must be one of {shown}"
    return f"fails {keyword}"  # pragma: no cover - the compiled schema uses no other keyword


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def json_kind(value: Any) -> str:
    """The JSON kind of a decoded value, named like the schema's types."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: numbers by value (``1 == 1.0``, as PostgreSQL's jsonb), a
    boolean never equal to a number (unlike Python's ``True == 1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# ---- paths ------------------------------------------------------------------------------------


def _get(doc: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = doc
    for seg in path:
        if not isinstance(cur, Mapping):
            return MISSING
        cur = cur.get(seg, MISSING)
        if cur is MISSING:
            return MISSING
    return cur


def _set_default(out: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    cur: Any = out
    for seg in path[:-1]:  # read first: copy nothing when the field is present
        if not isinstance(cur, Mapping):
            return
        cur = cur.get(seg, MISSING)
        if cur is MISSING:
            break
    else:
        if not isinstance(cur, Mapping) or path[-1] in cur:
            return
    container = out
    for seg in path[:-1]:
        child = container.get(seg, MISSING)
        if child is MISSING:
            child = {}
        elif isinstance(child, Mapping):
            child = dict(child)  # copy on write: the caller's nested objects stay unchanged
        else:  # pragma: no cover - ruled out by the read above
            return
        container[seg] = child
        container = child
    container[path[-1]] = copy.deepcopy(value) if isinstance(value, dict | list) else value


# ---- compiling ---------------------------------------------------------------------------------


def field_keywords(spec: FieldSpec) -> dict[str, Any]:
    """The JSON Schema keywords of one field's own rules (its type and constraints)."""
    kw: dict[str, Any] = {}
    types = spec.types
    if "any" not in types:
        json_types = sorted({"string" if t == "datetime" else t for t in types})
        kw["type"] = json_types[0] if len(json_types) == 1 else json_types
        if "datetime" in types and "string" not in types:
            kw["format"] = "date-time"
        if "integer" in types and "number" not in types:
            kw[_INT64_MARK] = [{"minimum": INT64_MIN, "exclusiveMaximum": INT64_END}]
    for c in spec.constraints:
        if c.kind == "min":
            kw["minimum"] = c.value
        elif c.kind == "max":
            kw["maximum"] = c.value
        elif c.kind in ("min_length", "max_length"):
            side = "min" if c.kind == "min_length" else "max"
            if {"string", "datetime", "any"} & set(types):
                kw[f"{side}Length"] = c.value  # code points
            if {"array", "any"} & set(types):
                kw[f"{side}Items"] = c.value
        elif c.kind == "pattern":
            kw["pattern"] = c.value
        elif c.kind == "enum":
            values = list(c.value)
            if "null" in types and not any(v is None for v in values):
                values.append(None)  # a nullable field's null is not held to its enum
            kw["enum"] = values
    return kw


def to_json_schema(schema: CollectionSchema) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``schema``: one subschema per object level, each
    field's ``required`` on its parent's subschema (MongoDB's $jsonSchema shape), open objects
    (undeclared fields allowed), arrays not descended."""
    root: dict[str, Any] = {}
    nodes: dict[tuple[str, ...], dict[str, Any]] = {(): root}

    def node(path: tuple[str, ...]) -> dict[str, Any]:
        if path not in nodes:
            parent = node(path[:-1])
            nodes[path] = parent.setdefault("properties", {}).setdefault(path[-1], {})
        return nodes[path]

    for spec in schema.fields:
        node(spec.path).update(field_keywords(spec))
        if spec.required:
            node(spec.path[:-1]).setdefault("required", []).append(spec.path[-1])
    return root


def _compile(json_schema: dict[str, Any], where: str) -> Any:
    try:
        return jsonschema_rs.validator_for(
            json_schema, validate_formats=True, pattern_options=_PATTERN_OPTIONS
        )
    except (jsonschema_rs.ValidationError, ValueError) as err:
        raise invalid(f"cannot be compiled: {str(err).splitlines()[0][:200]}", where) from None


def _check_field(spec: FieldSpec, where: str) -> None:
    if spec.path == ("_id",) and not {"string", "any"} & set(spec.types):
        raise invalid("_id is a string (dbproxy generates string ids)", f"{where}.type")
    for j, c in enumerate(spec.constraints):
        if c.kind == "pattern":
            try:
                jsonschema_rs.validator_for(
                    {"pattern": c.value}, validate_formats=True, pattern_options=_PATTERN_OPTIONS
                )
            except (jsonschema_rs.ValidationError, ValueError):
                raise BadRequest(
                    f"{where}.constraints[{j}]: pattern {c.value[:80]!r} is not a regular "
                    "expression dbproxy accepts (ECMA 262 syntax run by a linear-time engine: "
                    "no lookaround, no backreferences, bounded size)",
                    code="invalid_schema",
                    details={"at": f"{where}.constraints[{j}]"},
                ) from None
    if spec.default is not MISSING:
        own = _compile(field_keywords(spec), where)
        if not own.is_valid(spec.default):
            raise invalid(
                "the default_value breaks the field's own rules", f"{where}.default_value"
            )
