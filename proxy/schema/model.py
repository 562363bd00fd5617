"""The Collection Schema model: parsed from its JSON form into frozen values, every bad part
a 400 naming its place. Pure: no database, no I/O (``proxy.schema.validate`` compiles it)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.errors import BadRequest
from proxy.schema.partitioning import Partitioning, check_unique_indexes, parse_partitioning

FIELD_TYPES: Final = (
    "string",
    "integer",
    "number",
    "boolean",
    "object",
    "array",
    "null",
    "datetime",
    "any",
)
CONSTRAINT_KINDS: Final = (
    "min",
    "max",
    "min_length",
    "max_length",
    "pattern",
    "enum",
    "unique",
    "immutable",
)
LEVELS: Final = ("strict", "moderate")
ACTIONS: Final = ("error", "warn")
# A declared path's segments: plain names only, so a declared path may appear in index
# expressions as SQL text (it comes from a migration, checked here, never from a request).
SEGMENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
INDEX_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
MAX_FIELDS: Final = 200
MAX_INDEXES: Final = 32
MAX_INDEX_KEYS: Final = 8
MAX_PATH_DEPTH: Final = 8
MAX_ENUM: Final = 256
MAX_PATTERN: Final = 256
SYSTEM_FIELDS: Final = frozenset({"_id", "_version"})
_SCHEMA_KEYS: Final = frozenset(
    {"name", "database", "fields", "indexes", "partitioning", "security", "validation", "search"}
)
_FIELD_KEYS: Final = frozenset({"name", "type", "required", "default_value", "constraints"})
_INDEX_KEYS: Final = frozenset({"name", "fields", "unique", "partial_filter"})
# a declared type → the JSON kind a stored value has (what the query compiler relies on)
_SCALAR_KIND: Final = {
    "string": "string",
    "datetime": "string",
    "integer": "number",
    "number": "number",
    "boolean": "boolean",
}


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


def invalid(message: str, where: str, code: str = "invalid_schema") -> BadRequest:
    return BadRequest(
        f"{where}: {message}" if where else message,
        code=code,
        details={"at": where} if where else None,
    )


@dataclass(frozen=True, slots=True)
class Constraint:
    kind: str  # one of CONSTRAINT_KINDS
    value: Any  # a number (min, max), an int (lengths), a str (pattern), a tuple (enum), None
    text: str  # as declared ("min:0")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str  # dotted, as declared
    path: tuple[str, ...]
    types: tuple[str, ...]  # ("any",) accepts everything
    required: bool = False
    default: Any = MISSING
    constraints: tuple[Constraint, ...] = ()

    def constraint(self, kind: str) -> Constraint | None:
        for c in self.constraints:
            if c.kind == kind:
                return c
        return None

    @property
    def unique(self) -> bool:
        return self.constraint("unique") is not None

    @property
    def immutable(self) -> bool:
        return self.constraint("immutable") is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.types[0] if len(self.types) == 1 else list(self.types),
            "required": self.required,
        }
        if self.default is not MISSING:
            out["default_value"] = self.default
        out["constraints"] = [c.text for c in self.constraints]
        return out


@dataclass(frozen=True, slots=True)
class IndexKey:
    path: tuple[str, ...]
    descending: bool = False

    @property
    def text(self) -> str:
        return ("-" if self.descending else "") + ".".join(self.path)


@dataclass(frozen=True, slots=True)
class IndexSpec:
    name: str
    keys: tuple[IndexKey, ...]
    unique: bool = False
    partial_filter: Mapping[str, Any] | None = None  # a filter (query language), checked

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "fields": [k.text for k in self.keys],
            "unique": self.unique,
        }
        if self.partial_filter is not None:
            out["partial_filter"] = dict(self.partial_filter)
        return out


@dataclass(frozen=True, slots=True)
class Validation:
    level: str = "strict"  # strict: every write; moderate: not updates of invalid documents
    action: str = "error"  # error: refuse (400 schema_violation); warn: write, log, count

    @property
    def enforced(self) -> bool:
        """Every stored document is valid (what a compiler may rely on)."""
        return self.level == "strict" and self.action == "error"


@dataclass(frozen=True, slots=True)
class CollectionSchema:
    name: str
    database: str | None = None
    fields: tuple[FieldSpec, ...] = ()
    indexes: tuple[IndexSpec, ...] = ()
    validation: Validation = field(default_factory=Validation)
    security: Mapping[str, Any] | None = None
    search: SearchDeclaration | None = None  # set_search: what full-text search indexes
    partitioning: Partitioning | None = None  # split by a key (PostgreSQL only)

    def field(self, path: tuple[str, ...]) -> FieldSpec | None:
        for f in self.fields:
            if f.path == path:
                return f
        return None

    def all_indexes(self) -> tuple[IndexSpec, ...]:
        """The declared indexes and one unique index per ``unique`` constraint (named
        ``<field>_unique``, dots as underscores) that no declared index already covers."""
        out = list(self.indexes)
        for f in self.fields:
            if not f.unique:
                continue
            key = (IndexKey(f.path),)
            if any(ix.unique and ix.keys == key and ix.partial_filter is None for ix in out):
                continue
            out.append(IndexSpec("_".join(f.path) + "_unique", key, unique=True))
        return tuple(out)

    def scalar_kinds(self, enforced_only: bool = True) -> dict[tuple[str, ...], str]:
        """Declared paths whose stored value, when present and not null, is always one JSON
        scalar kind (``number``, ``string``, ``boolean``) and never sits under an array: the
        query compiler may test them without MongoDB's array fan-out. Only for an enforced
        schema (strict level, error action), whose documents were all checked, unless
        ``enforced_only`` is False (index DDL: the declared kinds whatever the enforcement)."""
        if enforced_only and not self.validation.enforced:
            return {}
        declared = {f.path: f for f in self.fields}
        out: dict[tuple[str, ...], str] = {}
        for f in self.fields:
            kinds = {_SCALAR_KIND.get(t, "") for t in f.types if t != "null"}
            if len(kinds) != 1 or "" in kinds:
                continue
            parents_ok = True
            for i in range(1, len(f.path)):
                parent = declared.get(f.path[:i])
                if parent is None or not set(parent.types) <= {"object", "null"}:
                    parents_ok = False
                    break
            if parents_ok:
                out[f.path] = kinds.pop()
        return out

    def never_null(self) -> frozenset[tuple[str, ...]]:
        """Declared paths whose value, when present, is never null (``null`` is not one of
        their types): with ``scalar_kinds``, a value the compilers may cast directly."""
        return frozenset(f.path for f in self.fields if "null" not in f.types)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "database": self.database,
            "fields": [f.to_dict() for f in self.fields],
            "indexes": [ix.to_dict() for ix in self.indexes],
            "partitioning": self.partitioning.to_dict() if self.partitioning else None,
            "security": dict(self.security) if self.security is not None else None,
            "validation": {"level": self.validation.level, "action": self.validation.action},
            "search": self.search.to_dict() if self.search is not None else None,
        }


# ---- parsing -----------------------------------------------------------------------------


def parse_schema(raw: Any, collection: str, where: str = "schema") -> CollectionSchema:
    """A Collection Schema from its JSON form (``collection`` names it when ``name`` is
    absent; a different ``name`` is a 400)."""
    if not isinstance(raw, dict):
        raise invalid("a schema must be a JSON object", where)
    unknown = sorted(set(raw) - _SCHEMA_KEYS)
    if unknown:
        raise invalid(f"unknown key {unknown[0]!r}", where)
    name = raw.get("name", collection)
    if name != collection:
        raise invalid(f"names {name!r} but is for collection {collection!r}", f"{where}.name")
    database = raw.get("database")
    if database is not None and not isinstance(database, str):
        raise invalid("must be a string", f"{where}.database")
    partitioning_raw = raw.get("partitioning")
    security = raw.get("security")
    if security is not None and not isinstance(security, dict):
        raise invalid("must be an object", f"{where}.security")
    search_raw = raw.get("search")
    search = None if search_raw is None else parse_search(search_raw, f"{where}.search")
    fields = _parse_fields(raw.get("fields", []), f"{where}.fields")
    indexes_raw = raw.get("indexes", [])
    if not isinstance(indexes_raw, list) or len(indexes_raw) > MAX_INDEXES:
        raise invalid(f"must be a list of at most {MAX_INDEXES} indexes", f"{where}.indexes")
    indexes = tuple(parse_index(ix, f"{where}.indexes[{i}]") for i, ix in enumerate(indexes_raw))
    names = [ix.name for ix in indexes]
    if len(set(names)) != len(names):
        raise invalid("two indexes have the same name", f"{where}.indexes")
    schema = CollectionSchema(
        name=collection,
        database=database,
        fields=fields,
        indexes=indexes,
        validation=_parse_validation(raw.get("validation"), f"{where}.validation"),
        security=security,
        search=search,
    )
    all_names = [ix.name for ix in schema.all_indexes()]
    if len(set(all_names)) != len(all_names):
        raise invalid("an index is named like a unique constraint's index", f"{where}.indexes")
    if partitioning_raw not in (None, {}):
        spec = parse_partitioning(partitioning_raw, f"{where}.partitioning")
        check_partitioned(schema, spec, where)
        schema = dataclasses.replace(schema, partitioning=spec)
    return schema


def check_partitioned(schema: CollectionSchema, spec: Partitioning, where: str) -> None:
    """A partitioned schema's rules: unique indexes include the key (PostgreSQL's rule),
    and the key, when declared, is of the kind the strategy partitions by."""
    check_unique_indexes(
        spec,
        [(ix.name, tuple(k.path for k in ix.keys)) for ix in schema.all_indexes() if ix.unique],
        f"{where}.indexes",
    )
    declared = schema.field(spec.key)
    if declared is None:
        return
    wanted = {"time": {"datetime", "string"}, "hash": {"string", "integer", "number"}}.get(
        spec.strategy
    )
    if wanted is None:
        sample = spec.bounds[0] if spec.strategy == "range" else spec.values[0][1][0]
        wanted = {"string", "datetime"} if isinstance(sample, str) else {"integer", "number"}
    if not set(declared.types) & wanted or "null" in declared.types:
        raise invalid(
            f"the partition key {spec.key_text!r} must be declared non-null and of a kind "
            f"the strategy partitions by ({', '.join(sorted(wanted))})",
            f"{where}.partitioning.key",
        )


# ---- full-text search (set_search) --------------------------------------------------------

SEARCH_WEIGHTS: Final = ("A", "B", "C", "D")
MAX_SEARCH_FIELDS: Final = 32
# PostgreSQL's built-in text-search configurations (a fixed list: the name may be written
# into DDL). The embedded store stems ``english`` (FTS5's porter) and no other language.
SEARCH_LANGUAGES: Final = frozenset(
    {
        "simple", "arabic", "armenian", "basque", "catalan", "danish", "dutch", "english",
        "finnish", "french", "german", "greek", "hindi", "hungarian", "indonesian", "irish",
        "italian", "lithuanian", "nepali", "norwegian", "portuguese", "romanian", "russian",
        "serbian", "spanish", "swedish", "tamil", "turkish", "yiddish",
    }
)  # fmt: skip
UNDECLARED_LANGUAGE: Final = "simple"  # collections without set_search: no stemming


@dataclass(frozen=True, slots=True)
class SearchDeclaration:
    """A collection's full-text declaration: the fields searched, each with its weight
    (``A`` counts most), in the order declared, and the text-search configuration."""

    fields: tuple[tuple[tuple[str, ...], str], ...]
    language: str = "english"

    def to_dict(self) -> dict[str, Any]:
        return {
            "fields": {".".join(path): weight for path, weight in self.fields},
            "language": self.language,
        }


def parse_search(raw: Any, where: str = "search") -> SearchDeclaration:
    """``{"fields": {"title": "A", "body": "C"}, "language": "english"?}``."""
    if not isinstance(raw, dict):
        raise invalid("must be an object", where)
    unknown = sorted(set(raw) - {"fields", "language"})
    if unknown:
        raise invalid(f"unknown key {unknown[0]!r}", where)
    fields = raw.get("fields")
    if not isinstance(fields, dict) or not fields or len(fields) > MAX_SEARCH_FIELDS:
        raise invalid(
            f"fields must map 1 to {MAX_SEARCH_FIELDS} field paths to a weight (A-D)",
            f"{where}.fields",
        )
    out: list[tuple[tuple[str, ...], str]] = []
    for name, weight in fields.items():
        path = parse_path(name, f"{where}.fields")
        if path[0] == "_id":
            raise invalid("_id is not searchable text", f"{where}.fields")
        if weight not in SEARCH_WEIGHTS:
            raise invalid(f"the weight of {name!r} must be one of A, B, C, D", f"{where}.fields")
        out.append((path, weight))
    paths = [p for p, _ in out]
    for p in paths:
        for q in paths:
            if p != q and q[: len(p)] == p:
                raise invalid(
                    f"{'.'.join(q)!r} is inside {'.'.join(p)!r}, declared already",
                    f"{where}.fields",
                )
    language = raw.get("language", "english")
    if language not in SEARCH_LANGUAGES:
        raise invalid(
            "language must be one of PostgreSQL's text-search configurations: "
            + ", ".join(sorted(SEARCH_LANGUAGES)),
            f"{where}.language",
        )
    return SearchDeclaration(tuple(out), language)


def parse_path(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, str) or not raw:
        raise invalid("a field path must be a non-empty string", where)
    segments = tuple(raw.split("."))
    if len(segments) > MAX_PATH_DEPTH:
        raise invalid(f"a field path has at most {MAX_PATH_DEPTH} segments", where)
    for seg in segments:
        if not SEGMENT_RE.fullmatch(seg):
            raise invalid(
                f"field path {raw[:80]!r}: each segment must match ^[A-Za-z_][A-Za-z0-9_]*$",
                where,
            )
    if segments[0] == "_version":
        raise invalid("_version is kept by dbproxy and cannot be declared", where)
    return segments


def parse_index(raw: Any, where: str = "index") -> IndexSpec:
    """``{"name", "fields": ["email", "-age"], "unique"?, "partial_filter"?}``."""
    if not isinstance(raw, dict):
        raise invalid("an index must be a JSON object", where)
    unknown = sorted(set(raw) - _INDEX_KEYS)
    if unknown:
        raise invalid(f"unknown key {unknown[0]!r}", where)
    name = raw.get("name")
    if not isinstance(name, str) or not INDEX_NAME_RE.fullmatch(name):
        raise invalid("an index name must match ^[A-Za-z][A-Za-z0-9_]{0,39}$", f"{where}.name")
    keys_raw = raw.get("fields")
    if not isinstance(keys_raw, list) or not 1 <= len(keys_raw) <= MAX_INDEX_KEYS:
        raise invalid(f"must list 1 to {MAX_INDEX_KEYS} field paths", f"{where}.fields")
    keys = []
    for i, key in enumerate(keys_raw):
        at = f"{where}.fields[{i}]"
        if not isinstance(key, str):
            raise invalid("must be a string", at)
        descending = key.startswith("-")
        keys.append(
            IndexKey(parse_path(key.lstrip("+-") if key[:1] in "+-" else key, at), descending)
        )
    if len({k.path for k in keys}) != len(keys):
        raise invalid("a field appears twice", f"{where}.fields")
    unique = raw.get("unique", False)
    if not isinstance(unique, bool):
        raise invalid("must be true or false", f"{where}.unique")
    partial = raw.get("partial_filter")
    if partial is not None:
        from proxy.config import Limits
        from proxy.query.parse import parse_filter

        if not isinstance(partial, dict):
            raise invalid("must be a filter object", f"{where}.partial_filter")
        try:
            parse_filter(partial, Limits())
        except BadRequest as err:
            raise invalid(err.message, f"{where}.partial_filter") from None
    return IndexSpec(name, tuple(keys), unique, partial)


def _parse_validation(raw: Any, where: str) -> Validation:
    if raw is None:
        return Validation()
    if not isinstance(raw, dict) or set(raw) - {"level", "action"}:
        raise invalid("must be an object of level and action", where)
    level = raw.get("level", "strict")
    action = raw.get("action", "error")
    if level not in LEVELS:
        raise invalid(f"level must be one of {', '.join(LEVELS)}", f"{where}.level")
    if action not in ACTIONS:
        raise invalid(f"action must be one of {', '.join(ACTIONS)}", f"{where}.action")
    return Validation(level, action)


def _parse_fields(raw: Any, where: str) -> tuple[FieldSpec, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_FIELDS:
        raise invalid(f"must be a list of at most {MAX_FIELDS} fields", where)
    out: list[FieldSpec] = []
    seen: set[tuple[str, ...]] = set()
    for i, item in enumerate(raw):
        spec = _parse_field(item, f"{where}[{i}]")
        if spec.path in seen:
            raise invalid(f"field {spec.name!r} is declared twice", f"{where}[{i}]")
        seen.add(spec.path)
        out.append(spec)
    for spec in out:  # a field under a declared scalar parent could never exist
        for j in range(1, len(spec.path)):
            parent = next((f for f in out if f.path == spec.path[:j]), None)
            if parent is not None and not {"object", "any"} & set(parent.types):
                raise invalid(
                    f"field {spec.name!r} sits under {parent.name!r}, which is not an object",
                    where,
                )
    return tuple(out)


def _parse_field(raw: Any, where: str) -> FieldSpec:
    if not isinstance(raw, dict):
        raise invalid("a field must be a JSON object", where)
    unknown = sorted(set(raw) - _FIELD_KEYS)
    if unknown:
        raise invalid(f"unknown key {unknown[0]!r}", where)
    name = raw.get("name")
    path = parse_path(name, f"{where}.name")
    assert isinstance(name, str)
    types = _parse_types(raw.get("type", "any"), f"{where}.type")
    required = raw.get("required", False)
    if not isinstance(required, bool):
        raise invalid("must be true or false", f"{where}.required")
    constraints = _parse_constraints(raw.get("constraints", []), types, f"{where}.constraints")
    default = raw.get("default_value", MISSING) if "default_value" in raw else MISSING
    if path[0] == "_id" and (default is not MISSING or len(path) > 1):
        raise invalid("_id takes no default (dbproxy generates one)", where)
    return FieldSpec(name, path, types, required, default, constraints)


def _parse_types(raw: Any, where: str) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise invalid("must be a type name or a non-empty list of them", where)
    for t in items:
        if t not in FIELD_TYPES:
            raise invalid(f"unknown type {t!r:.40} (one of {', '.join(FIELD_TYPES)})", where)
    if len(set(items)) != len(items):
        raise invalid("a type appears twice", where)
    if "any" in items:
        return ("any",)
    return tuple(items)


def _parse_constraints(raw: Any, types: tuple[str, ...], where: str) -> tuple[Constraint, ...]:
    if not isinstance(raw, list):
        raise invalid("must be a list of strings", where)
    out: list[Constraint] = []
    for i, text in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(text, str):
            raise invalid("a constraint must be a string", at)
        kind, sep, arg = text.partition(":")
        if kind not in CONSTRAINT_KINDS:
            raise invalid(
                f"unknown constraint {text[:60]!r} (one of {', '.join(CONSTRAINT_KINDS)})",
                at,
                code="unknown_constraint",
            )
        if any(c.kind == kind for c in out):
            raise invalid(f"constraint {kind!r} appears twice", at)
        out.append(Constraint(kind, _constraint_value(kind, sep, arg, types, at), text))
    return tuple(out)


def _constraint_value(kind: str, sep: str, arg: str, types: tuple[str, ...], at: str) -> Any:
    if kind in ("unique", "immutable"):
        if sep:
            raise invalid(f"{kind} takes no argument", at)
        return None
    if not sep or not arg:
        raise invalid(f"{kind} needs an argument ({kind}:…)", at)
    if kind in ("min", "max"):
        try:
            value = float(arg) if any(c in arg for c in ".eE") else int(arg)
        except ValueError:
            raise invalid(f"{kind} needs a number", at) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise invalid(f"{kind} needs a finite number", at)
        return value
    if kind in ("min_length", "max_length"):
        if not arg.isdigit() or len(arg) > 9:
            raise invalid(f"{kind} needs a non-negative integer", at)
        return int(arg)
    if kind == "pattern":
        if len(arg) > MAX_PATTERN:
            raise invalid(f"a pattern has at most {MAX_PATTERN} characters", at)
        return arg  # compiled (and refused when bad) by proxy.schema.validate
    assert kind == "enum"
    items = arg.split("|")
    if len(items) > MAX_ENUM:
        raise invalid(f"an enum has at most {MAX_ENUM} values", at)
    return tuple(_enum_value(item, types) for item in items)


def _enum_value(item: str, types: tuple[str, ...]) -> Any:
    """An enum item is text; for a field that cannot be a string, a number, ``true``,
    ``false`` or ``null`` is read as that JSON value (``enum:1|2|3`` on an integer)."""
    if "string" in types or "datetime" in types or "any" in types:
        return item
    if item in ("true", "false"):
        return item == "true"
    if item == "null":
        return None
    try:
        return float(item) if any(c in item for c in ".eE") else int(item)
    except ValueError:
        return item
