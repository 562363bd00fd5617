"""The collection schemas the databases declare, compiled once, looked up on every write:
the pipeline's validate step for documents (defaults, types, constraints, immutable
fields), and the declared scalar paths the query compilers may rely on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxy.backends.base import Backend
from proxy.errors import ProxyError
from proxy.policy.model import FieldRule
from proxy.query.spec import Change, Replace
from proxy.schema.model import MISSING, CollectionSchema, parse_schema
from proxy.schema.validate import SchemaValidator, compile_schema, redact, violation

log = logging.getLogger(__name__)

Kinds = tuple[tuple[tuple[str, ...], str], ...]
_NOT_CHECKED: Final = frozenset({"_version"})  # kept by dbproxy, never declared


@dataclass(frozen=True, slots=True)
class ActiveSchema:
    """One collection's schema as the pipeline uses it."""

    schema: CollectionSchema
    validator: SchemaValidator
    version: int
    kinds: Kinds  # the declared scalar paths (for FindSpec.kinds / count)
    defaults: bool  # some field has a default_value
    immutable: bool  # some field is immutable

    @property
    def warn_only(self) -> bool:
        return self.schema.validation.action == "warn"

    @property
    def moderate(self) -> bool:
        return self.schema.validation.level == "moderate"

    def needs_stored(self, change: Change, upsert: bool) -> bool:
        """Whether checking ``change`` needs the document as the database would make it
        (an update operator, a merge patch, a replace keeping hidden fields), the stored
        one (immutable fields, moderate level), or whether an upsert may create it (defaults).
        A plain replace of an open schema is checked from the body alone."""
        if not isinstance(change, Replace) or change.keep is not None:
            return True
        return self.immutable or self.moderate or (upsert and self.defaults)

    def new_document(self, doc: dict[str, Any], registry: SchemaRegistry) -> dict[str, Any]:
        """A document about to be created: defaults filled in, then checked."""
        if self.defaults:
            doc = self.validator.with_defaults(doc)
        self.enforce(doc, None, registry)
        return doc

    def enforce(
        self,
        new: Mapping[str, Any],
        old: Mapping[str, Any] | None,
        registry: SchemaRegistry,
        readable: FieldRule | None = None,
    ) -> None:
        """Refuse (400 schema_violation, every problem listed) or, with ``action: warn``,
        log and count; ``old`` is the stored document a change starts from. At the
        moderate level a stored document that is already invalid may change unchecked.
        Problems of a change on fields the caller may not read (``readable``) say only that."""
        body = _checked_part(new)
        if old is not None:
            if self.moderate and not self.validator.is_valid(_checked_part(old)):
                return
            if not self.immutable and self.validator.is_valid(body):
                return
            problems = self.validator.check(body, _checked_part(old))
        elif self.validator.is_valid(body):
            return
        else:
            problems = self.validator.problems(body)
        if not problems:
            return
        if self.warn_only:
            registry.warned(self.schema.name, problems)
            return
        registry.count(registry.violations, self.schema.name)
        if old is not None and readable is not None:
            problems = redact(problems, readable.can_read)
        raise violation(problems)


def _checked_part(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    if "_version" in doc:
        return {k: v for k, v in doc.items() if k not in _NOT_CHECKED}
    return doc


def activate(schema: CollectionSchema, version: int) -> ActiveSchema:
    return ActiveSchema(
        schema=schema,
        validator=compile_schema(schema),
        version=version,
        kinds=tuple(sorted(schema.scalar_kinds().items())),
        defaults=any(f.default is not MISSING for f in schema.fields),
        immutable=any(f.immutable for f in schema.fields),
    )


class SchemaRegistry:
    """The active schemas of every backend, by backend name and collection. Refreshed at
    start (or on first use), after a migration this process ran, and whenever a backend
    reports a change (``Backend.watch_schemas``: PostgreSQL LISTENs for the NOTIFY each
    migration sends; the embedded store polls its file every second)."""

    def __init__(self) -> None:
        self._active: dict[str, dict[str, ActiveSchema]] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self._locks: dict[tuple[str, str], list[Any]] = {}  # [lock, users] per document
        self.warnings: dict[str, int] = {}  # collection → writes let through by action: warn
        self.violations: dict[str, int] = {}  # collection → writes refused (schema_violation)

    @contextlib.asynccontextmanager
    async def document_lock(self, collection: str, doc_id: str) -> AsyncIterator[None]:
        """Held around one checked change of a document (single writes only: a
        transaction's row locks could otherwise wait on each other through it)."""
        key = (collection, doc_id)
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]

    def get(self, backend: str, collection: str) -> ActiveSchema | None:
        table = self._active.get(backend)
        return table.get(collection) if table else None

    async def of(self, backend: Backend, collection: str) -> ActiveSchema | None:
        """The collection's schema; the backend's schemas are loaded first if they never
        were (a write never runs unchecked because the schemas were not read yet)."""
        table = self._active.get(backend.name)
        if table is None:
            lock = self._loading.setdefault(backend.name, asyncio.Lock())
            async with lock:
                if backend.name not in self._active:
                    await self.refresh(backend)
            table = self._active.get(backend.name, {})
        return table.get(collection)

    async def refresh(self, backend: Backend) -> None:
        """Load ``backend``'s schemas; an unchanged version keeps its compiled form."""
        if not backend.capabilities.schemas:
            self._active[backend.name] = {}
            return
        loaded = await backend.load_schemas()
        current = self._active.get(backend.name, {})
        fresh: dict[str, ActiveSchema] = {}
        for collection, (version, raw) in loaded.items():
            old = current.get(collection)
            if old is not None and old.version == version:
                fresh[collection] = old
                continue
            try:
                fresh[collection] = activate(parse_schema(raw, collection), version)
            except ProxyError as err:  # written by a newer dbproxy, say: keep what we had
                log.error("the stored schema of %s cannot be read: %s", collection, err.message)
                if old is not None:
                    fresh[collection] = old
        self._active[backend.name] = fresh

    @staticmethod
    def count(counters: dict[str, int], collection: str) -> None:
        if collection in counters or len(counters) < 10_000:
            counters[collection] = counters.get(collection, 0) + 1

    def counters(self) -> dict[str, dict[str, int]]:
        """For /metrics: writes let through by ``action: warn`` and refused, by collection."""
        return {"warnings": dict(self.warnings), "violations": dict(self.violations)}

    def warned(self, collection: str, problems: list[dict[str, str]]) -> None:
        self.count(self.warnings, collection)
        log.warning(
            "schema of %s: write let through (action warn) with %d problem(s): %s",
            collection,
            len(problems),
            "; ".join(f"{p['path']}: {p['rule']}" for p in problems[:5]),
        )
