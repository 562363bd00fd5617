"""Operation objects: what a request asks of a collection, decoded and validated, HTTP-free."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy import numbers
from proxy.config import Limits
from proxy.errors import BadRequest, Conflict, InvalidJson, LimitExceeded, Unprocessable
from proxy.query.ast import MATCH_ALL, Filter, Path, SortKey, Update
from proxy.query.parse import parse_fields, parse_filter, parse_sort

# A collection's declared scalar paths and their kinds (``CollectionSchema.scalar_kinds()``
# as a sorted tuple): the query compilers test and sort them on their declared expressions.
DeclaredKinds = tuple[tuple[tuple[str, ...], str], ...]


@dataclass(frozen=True, slots=True)
class FindSpec:
    filter: Filter = MATCH_ALL
    sort: tuple[SortKey, ...] = ()
    limit: int = 100
    skip: int = 0
    fields: tuple[Path, ...] | None = None
    cursor: str | None = None
    kinds: DeclaredKinds = ()


@dataclass(frozen=True, slots=True)
class Preview:
    """What a change would make of a stored document, computed by the database without
    writing: the stored document (None for an upsert's insert), the result, and the
    version it was computed from (a write with that If-Match applies exactly this)."""

    old: dict[str, Any] | None
    new: dict[str, Any]
    version: int | None


@dataclass(frozen=True, slots=True)
class WriteResult:
    """A stored document as JSON text (ready to send), its version, and whether it is new."""

    body: bytes
    version: int
    created: bool = False


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One item of a bulk create: status 201 with the id, or an error code and message."""

    status: int
    id: str | None
    version: int | None = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class StoredReply:
    """A reply kept under an idempotency key: status, body and the headers to repeat."""

    status: int
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Page:
    items: list[bytes]  # documents as JSON text
    next: str | None


@dataclass(frozen=True, slots=True)
class AuditScope:
    """The audit records a caller may see: changes to the collections named or matched
    by a glob (``*``, ``?``, ``[...]``, ``[!...]``), and its own service's commit rows."""

    names: tuple[str, ...]
    globs: tuple[str, ...]
    service: str

    def covers(self, collection: str) -> bool:
        """True if ``collection`` is named or matched by a glob (the monitoring views'
        filter; the same matching as the audit log's SQL ``GLOB``)."""
        return collection in self.names or any(
            fnmatch.fnmatchcase(collection, g) for g in self.globs
        )


@dataclass(frozen=True, slots=True)
class Keep:
    """What a full replacement must keep of the stored document: everything but the
    ``open`` paths (the caller may read and write them, so the body decides them),
    descending into the ``partial`` ones (something below them is open)."""

    open: frozenset[str]
    partial: frozenset[str]


@dataclass(frozen=True, slots=True)
class Replace:
    doc: dict[str, Any]
    keep: Keep | None = None  # None: the body is the whole new document


def keep_protected(
    stored: Any, body: dict[str, Any], keep: Keep, prefix: str = ""
) -> dict[str, Any]:
    """``body`` plus every part of ``stored`` that ``keep`` protects (top-level ``_id`` and
    ``_version`` aside: the backend sets them). The embedded store's twin of PostgreSQL's
    ``dbproxy_keep``: the two must agree."""
    if not isinstance(stored, dict):
        return body
    out = dict(body)
    for key, value in stored.items():
        path = prefix + key
        if (not prefix and key in ("_id", "_version")) or path in keep.open:
            continue
        if path in keep.partial:
            if key not in body:
                out[key] = (
                    keep_protected(value, {}, keep, path + ".")
                    if isinstance(value, dict)
                    else value
                )
            elif isinstance(value, dict) and isinstance(body[key], dict):
                out[key] = keep_protected(value, body[key], keep, path + ".")
        elif key not in body:
            out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class Modify:
    update: Update


@dataclass(frozen=True, slots=True)
class MergePatch:
    patch: dict[str, Any]


Change = Replace | Modify | MergePatch


MAX_ID_LENGTH = 512
MAX_VERSION = 2**63 - 1  # _version is a 64-bit integer (If-Match beyond it is 400)


def check_fingerprint(stored: str, presented: str) -> None:
    """An idempotency key's stored fingerprint against a retry's: ``<request>/<policy>``.
    The same request under a policy that changed since is 409, any other difference 422."""
    if stored == presented:
        return
    request, _, _ = stored.partition("/")
    if request == presented.partition("/")[0]:
        raise Conflict(
            "this Idempotency-Key was used under a policy that has changed since; the "
            "original request took effect: read the current state instead of retrying",
            code="idempotency_policy_changed",
        )
    raise Unprocessable(
        "this Idempotency-Key was used with a different request",
        code="idempotency_key_reused",
    )


def check_id(value: Any) -> str:
    """Document ids are non-empty strings of at most 512 characters, without NUL."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH or "\x00" in value:
        raise BadRequest(
            f"_id must be a non-empty string of at most {MAX_ID_LENGTH} characters",
            code="invalid_id",
        )
    return value


FIND_KEYS = frozenset({"filter", "sort", "limit", "skip", "fields", "next"})


def json_depth_ok(value: Any, max_depth: int) -> bool:
    """Iterative nesting check (no recursion, so a hostile body cannot blow the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                return False
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            if depth > max_depth:
                return False
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return True


def _shallow(text: str | bytes, max_depth: int) -> bool:
    """True when ``text`` cannot nest deeper than ``max_depth``: no value is deeper than
    the brackets and braces it has (counted in C; those inside strings only overcount), so
    the usual small body skips the walk."""
    if isinstance(text, str):
        return text.count("{") + text.count("[") <= max_depth
    return text.count(b"{") + text.count(b"[") <= max_depth


def parse_json_text(text: str | bytes, limits: Limits, what: str) -> Any:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        out_of_range = numbers.decode_failure(text)
        if out_of_range is not None:
            raise out_of_range from None
        raise InvalidJson(f"{what} is not valid JSON") from None
    if not _shallow(text, limits.max_json_depth) and not json_depth_ok(
        value, limits.max_json_depth
    ):
        raise LimitExceeded(
            f"{what} is nested deeper than {limits.max_json_depth} levels", code="too_deep"
        )
    numbers.check_request_text(text)  # orjson reads an integer past 64 bits as a float
    return value


def _int_param(raw: Any, name: str, lo: int, hi: int | None, code: str) -> int:
    if isinstance(raw, str):
        try:
            raw = int(raw, 10)
        except ValueError:
            raise BadRequest(f"{name} must be an integer", code="invalid_parameter") from None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < lo:
        raise BadRequest(f"{name} must be an integer >= {lo}", code="invalid_parameter")
    if hi is not None and raw > hi:
        raise LimitExceeded(f"{name} may be at most {hi}", code=code)
    return raw


def build_find_spec(raw: Mapping[str, Any], limits: Limits, *, from_url: bool) -> FindSpec:
    """One FindSpec from URL query parameters (strings) or a /query body (JSON values)."""
    unknown = set(raw) - FIND_KEYS
    if unknown:
        raise BadRequest(
            f"unknown parameter(s): {', '.join(sorted(unknown))[:200]}",
            code="unknown_parameter",
        )
    flt = raw.get("filter")
    if from_url and flt is not None:
        flt = parse_json_text(flt, limits, "filter")
    limit = raw.get("limit")
    skip = raw.get("skip")
    cursor = raw.get("next")
    if cursor is not None and not isinstance(cursor, str):
        raise BadRequest("next must be the cursor string of a previous page", code="invalid_cursor")
    sort = raw.get("sort")
    if from_url and isinstance(sort, str) and sort.lstrip()[:1] in ("{", "["):
        sort = parse_json_text(sort, limits, "sort")  # the /query body's object (or list) form
    return FindSpec(
        filter=parse_filter(flt, limits),
        sort=parse_sort(sort, limits),
        limit=limits.default_limit
        if limit is None
        else _int_param(limit, "limit", 1, limits.max_limit, "limit_too_large"),
        skip=0 if skip is None else _int_param(skip, "skip", 0, 1_000_000, "skip_too_large"),
        fields=parse_fields(raw.get("fields"), limits),
        cursor=cursor or None,
    )
