"""The compiled policy decision: ONE ``Decision`` per (service, collection, operation) that
answers every question the pipeline asks — grant, row guard, readable and writable fields."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxy.errors import Forbidden
from proxy.policy import (
    GLOB_CACHE_SIZE,
    OPERATIONS,
    SERVICE_WIDE_PATTERN,
    FieldRule,
    RowRule,
    ServicePolicy,
    is_glob,
)
from proxy.query.ast import (
    And,
    ElemMatch,
    Eq,
    FieldCond,
    Filter,
    Nor,
    Not,
    Or,
    Path,
    Pred,
    SortKey,
    Update,
)
from proxy.query.spec import AuditScope, Keep

SYSTEM_FIELDS: Final = frozenset({"_id", "_version"})
READS: Final = frozenset({"read", "list", "count", "aggregate", "search"})


@dataclass(frozen=True, slots=True)
class Decision:
    """What one service may do with one operation on one collection, compiled once.

    ``plain`` means granted with nothing to filter or hide: the pipeline then asks nothing
    more (the common case, decided in one lookup)."""

    collection: str
    operation: str
    granted: bool
    in_transaction: bool  # "transaction" is granted on this collection too
    rows: tuple[RowRule, ...]
    readable: FieldRule | None  # None: every field is readable
    writable: FieldRule | None  # None: every field is writable
    keep: Keep | None  # what a full replacement keeps of the stored document
    plain: bool

    # -- grants ------------------------------------------------------------------------

    def authorize(self, in_transaction: bool = False) -> None:
        if not self.granted:
            raise denial(self.operation, self.collection)
        if in_transaction and not self.in_transaction:
            raise denial("transaction", self.collection)

    # -- rows --------------------------------------------------------------------------

    def row_values(self, headers: Mapping[str, str]) -> dict[str, Any]:
        return {r.field: r.resolve(headers) for r in self.rows}

    def row_filter(self, headers: Mapping[str, str]) -> Filter | None:
        """The row rules as a filter (equality on each field), or None."""
        if not self.rows:
            return None
        conds = tuple(
            FieldCond(Path(tuple(r.field.split("."))), (Eq(r.resolve(headers)),)) for r in self.rows
        )
        return conds[0] if len(conds) == 1 else And(conds)

    def check_document(self, doc: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        """A created or replacing document: writable fields only, carrying the row values."""
        if self.writable is not None:
            _check_tree(doc, self.writable, "")
        for name, value in self.row_values(headers).items():
            present, actual = _lookup(doc, name)
            if not present or not _same(actual, value):
                raise _outside(name)

    def check_update(self, update: Update, upsert: bool, headers: Mapping[str, str]) -> None:
        """Update operators: writable paths only; a row-rule field only ``$set`` to its value."""
        rule = self.writable
        if rule is not None:
            for op in update.ops:
                for path in [op.path.dotted] + ([op.value.dotted] if op.op == "rename" else []):
                    if not rule.can_write(path):
                        raise _not_writable(path)
        if self.rows:
            _check_row_update(self.row_values(headers), update, upsert)

    def check_patch(self, patch: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        """A merge patch: writable fields only; a row-rule field untouched or set to its value."""
        if self.writable is not None:
            _check_tree(patch, self.writable, "")
        for name, value in self.row_values(headers).items():
            node: Any = patch
            for seg in name.split("."):
                if not isinstance(node, dict):
                    raise _outside(name)  # a parent replaced by a non-object (or null)
                if seg not in node:
                    break  # untouched
                node = node[seg]
            else:
                if not _same(node, value):
                    raise _outside(name)

    # -- fields ------------------------------------------------------------------------

    def check_filter(self, flt: Filter | None) -> None:
        """Filtering on a hidden field is refused outright: no oracle by binary search."""
        rule = self.readable
        if rule is None or flt is None:
            return
        for path in filter_paths(flt, ""):
            if not rule.can_read(path):
                raise _hidden(path)

    def check_sort(self, sort: tuple[SortKey, ...]) -> None:
        rule = self.readable
        if rule is not None:
            for key in sort:
                if not rule.can_read(key.path.dotted):
                    raise _hidden(key.path.dotted)

    def check_fields(self, fields: tuple[Path, ...] | None) -> None:
        rule = self.readable
        if rule is not None and fields is not None:
            for path in fields:
                if not rule.can_read(path.dotted):
                    raise _hidden(path.dotted)

    def check_paths(self, paths: Iterable[str]) -> None:
        """Paths a request names (an aggregation's stages): every one readable, or 403."""
        rule = self.readable
        if rule is not None:
            for path in paths:
                if not rule.can_read(path):
                    raise _hidden(path)

    def visible(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The document as the caller may see it: only readable fields."""
        rule = self.readable
        return doc if rule is None else _project_readable(doc, rule, "")


def compile_decision(policy: ServicePolicy | None, collection: str, operation: str) -> Decision:
    """The decision for one (collection, operation) under ``policy`` (None: open mode)."""
    if policy is None:
        return Decision(collection, operation, True, True, (), None, None, None, True)
    entry = policy.entry(collection)
    rule = entry.fields
    readable = rule if rule is not None and rule.readable is not None else None
    writable = rule if rule is not None and rule.writable is not None else None
    keep = _keep_of(rule) if readable is not None or writable is not None else None
    granted = operation in entry.operations
    hides = readable is not None or (writable is not None and operation not in READS)
    plain = granted and not entry.rows and not hides
    in_tx = "transaction" in entry.operations
    return Decision(
        collection, operation, granted, in_tx, entry.rows, readable, writable, keep, plain
    )


class Decisions:
    """Every decision of one service, compiled when its policy loads (exact collection
    names) or at first use (names a glob matches; a bounded cache)."""

    __slots__ = ("_later", "_table", "policy")

    def __init__(self, policy: ServicePolicy | None) -> None:
        self.policy = policy
        self._table: dict[tuple[str, str], Decision] = {}  # every decision known: one lookup
        self._later: deque[tuple[str, str]] = deque()  # those compiled at first use, oldest first
        if policy is not None:
            names = {p for g in policy.grants for p in g.collections if not is_glob(p)}
            names |= {k for k in policy.fields if not is_glob(k)}
            names |= {k for k in policy.rows if not is_glob(k)}
            for name in names:
                for op in OPERATIONS:
                    self._table[(name, op)] = compile_decision(policy, name, op)

    def get(self, collection: str, operation: str) -> Decision:
        key = (collection, operation)
        found = self._table.get(key)
        if found is None:
            found = compile_decision(self.policy, collection, operation)
            later = self._later
            if len(later) >= GLOB_CACHE_SIZE:
                with contextlib.suppress(IndexError, KeyError):
                    del self._table[later.popleft()]  # the oldest goes first
            self._table[key] = found
            later.append(key)
        return found

    def service_wide(self, operation: str) -> bool:
        """Granted on ``*`` (monitor, migrate, ...): service-wide operations."""
        return self.policy is None or self.policy.allowed_service_wide(operation)

    def any_grant(self, operation: str) -> bool:
        """Granted on some collection (a transaction may begin)."""
        policy = self.policy
        return policy is None or any(operation in g.operations for g in policy.grants)

    def audit_scope(self, service: str) -> AuditScope | None:
        """The audit log this service may read: changes to the collections it may ``read``
        (None: all of it, when read is granted on every collection or nothing enforces)."""
        policy = self.policy
        if policy is None:
            return None
        patterns = {p for g in policy.grants if "read" in g.operations for p in g.collections}
        if SERVICE_WIDE_PATTERN in patterns:
            return None
        names = tuple(sorted(p for p in patterns if not is_glob(p)))
        return AuditScope(names, tuple(sorted(p for p in patterns if is_glob(p))), service)


OPEN_DECISIONS: Final = Decisions(None)

_COMPILED: dict[int, tuple[ServicePolicy, Decisions]] = {}


def decisions_for(policy: ServicePolicy | None) -> Decisions:
    """The compiled decisions of ``policy`` (compiled once per policy object)."""
    if policy is None:
        return OPEN_DECISIONS
    found = _COMPILED.get(id(policy))
    if found is not None and found[0] is policy:
        return found[1]
    decisions = Decisions(policy)
    if len(_COMPILED) >= 1024:  # policies of reloads long gone
        _COMPILED.clear()
    _COMPILED[id(policy)] = (policy, decisions)
    return decisions


def denial(operation: str, collection: str) -> Forbidden:
    return Forbidden(
        f"service may not {operation} on {collection!r}",
        code="permission_denied",
        details={"missing": {"operation": operation, "collection": collection}},
    )


def filter_paths(flt: Filter, prefix: str) -> Iterator[str]:
    if isinstance(flt, FieldCond):
        full = prefix + flt.path.dotted
        yield full
        for pred in flt.preds:
            yield from _pred_paths(pred, full + ".")
    elif isinstance(flt, And | Or | Nor):
        for child in flt.children:
            yield from filter_paths(child, prefix)


def _pred_paths(pred: Pred, prefix: str) -> Iterator[str]:
    if isinstance(pred, ElemMatch):
        if pred.filter is not None:
            yield from filter_paths(pred.filter, prefix)
        for p in pred.preds or ():
            yield from _pred_paths(p, prefix)
    elif isinstance(pred, Not):
        for p in pred.preds:
            yield from _pred_paths(p, prefix)


def _check_row_update(values: dict[str, Any], update: Update, upsert: bool) -> None:
    set_by_update: set[str] = set()
    for op in update.ops:
        touched = [op.path.dotted] + ([op.value.dotted] if op.op == "rename" else [])
        for name, value in values.items():
            for path in touched:
                if path == name or path.startswith(name + ".") or name.startswith(path + "."):
                    if op.op == "set" and path == name and _same(op.value, value):
                        set_by_update.add(name)
                        continue
                    raise _outside(name)
    if upsert:
        for name in values:
            if name not in set_by_update:
                raise Forbidden(
                    f"an upsert must $set {name} to the service's row value",
                    code="row_rule_violation",
                    details={"field": name},
                )


def _same(a: Any, b: Any) -> bool:
    return (type(a) is type(b) and a == b) or (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )


def _lookup(doc: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    cur: Any = doc
    for seg in dotted.split("."):
        if not isinstance(cur, dict) or seg not in cur:
            return False, None
        cur = cur[seg]
    return True, cur


def _outside(field_name: str) -> Forbidden:
    return Forbidden(
        f"the write would put the document outside the service's rows ({field_name})",
        code="row_rule_violation",
        details={"field": field_name},
    )


def _hidden(path: str) -> Forbidden:
    return Forbidden(
        f"the service may not read field {path!r}",
        code="field_not_readable",
        details={"field": path},
    )


def _not_writable(path: str) -> Forbidden:
    return Forbidden(
        f"the service may not write field {path!r}",
        code="field_not_writable",
        details={"field": path},
    )


def _project_readable(doc: dict[str, Any], rule: FieldRule, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = prefix + key
        if rule.can_read(path):
            out[key] = value
        elif isinstance(value, dict):
            inner = _project_readable(value, rule, path + ".")
            if inner:
                out[key] = inner
    return out


def _check_tree(doc: Mapping[str, Any], rule: FieldRule, prefix: str) -> None:
    assert rule.writable is not None
    for key, value in doc.items():
        path = prefix + key
        if (key in SYSTEM_FIELDS and not prefix) or rule.can_write(path):
            continue
        deeper = any(w.startswith(path + ".") for w in rule.writable)
        if deeper and isinstance(value, dict):
            _check_tree(value, rule, path + ".")
            continue
        raise _not_writable(path)


def _keep_of(rule: FieldRule | None) -> Keep | None:
    """A field rule's open paths (listed as writable and readable, by either list) and
    the paths above any listed one (replacement descends into those)."""
    if rule is None:
        return None
    open_paths = {p for p in rule.writable or () if rule.can_read(p)}
    open_paths |= {p for p in rule.readable or () if rule.can_write(p)}
    partial: set[str] = set()
    for path in (*(rule.writable or ()), *(rule.readable or ())):
        parts = path.split(".")
        partial.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return Keep(frozenset(open_paths), frozenset(partial - open_paths))
