"""Opening a connection of the SQLite store: pragmas, the progress-handler deadline and the
Python helpers the dialect's SQL calls."""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from proxy.backends.sqlite.ddl import create_private
from proxy.errors import InternalError, InvalidQuery, ProxyError
from proxy.query import sqlite as dialect
from proxy.query.spec import Keep, keep_protected
from proxy.query.sqlite import agg_functions

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]
_PROGRESS_STEPS = 4096  # VM instructions between two looks at the clock


@dataclass(slots=True)
class ConnState:
    """What the callbacks of one connection share with the code running its statements."""

    timeout: float
    deadline: float = math.inf
    failure: ProxyError | None = None

    def arm(self) -> None:
        self.deadline = time.monotonic() + self.timeout
        self.failure = None

    def disarm(self) -> None:
        self.deadline = math.inf


def _guarded(state: ConnState, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Keep the ProxyError a helper raises: SQLite only reports "function raised"."""

    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except ProxyError as err:
            state.failure = err
            raise
        except Exception as exc:
            name = getattr(fn, "__name__", "?")
            log.error("sqlite helper %s failed: %s", name, type(exc).__name__)
            state.failure = InternalError("unexpected error while evaluating the query")
            raise

    return call


def _fail(code: str, message: str) -> None:
    raise InvalidQuery(f"the update does not fit the stored document: {message}", code=code)


FN_KEEP = "dbp_keep"  # (stored json, body json, Keep as json) -> the replacement


def keep_text(keep: Keep) -> str:
    return orjson.dumps([sorted(keep.open), sorted(keep.partial)]).decode()


def _keep(stored: str | bytes, body: str | bytes, spec: str) -> str:
    """A full replacement that keeps what the caller may not write (``keep_protected``)."""
    open_paths, partial = orjson.loads(spec)
    keep = Keep(frozenset(open_paths), frozenset(partial))
    merged = keep_protected(dialect.loads(stored), dialect.loads(body), keep)
    return dialect.json_text(merged)


def connect(path: str, state: ConnState, *, writes: bool, busy_ms: int) -> sqlite3.Connection:
    create_private(path)
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=512
    )
    try:
        for name, n_args, fn in (
            (dialect.FN_REGEXP, 3, dialect.regex_search),
            (dialect.FN_CANON, 1, dialect.canonical_json),
            (dialect.FN_CMP, 2, dialect.compare_json_sql),
            (dialect.FN_ARITH, 3, dialect.arith),
        ):
            conn.create_function(name, n_args, _guarded(state, fn), deterministic=True)
        conn.create_function(dialect.FN_FAIL, 2, _guarded(state, _fail))  # never constant-folded
        conn.create_function(FN_KEEP, 3, _guarded(state, _keep), deterministic=True)
        for helper in agg_functions.HELPERS:
            conn.create_function(
                helper.name, helper.n_args, _guarded(state, helper.fn), deterministic=True
            )
        fail = _guarded(state, agg_functions.agg_fail)
        conn.create_function(agg_functions.FN_AGG_FAIL, 1, fail)  # never constant-folded
        too_large = _guarded(state, agg_functions.agg_too_large)
        conn.create_function(agg_functions.FN_AGG_TOO_LARGE, 1, too_large)
        conn.create_collation(dialect.COLLATION, dialect.compare_json)
        conn.set_progress_handler(lambda: time.monotonic() > state.deadline, _PROGRESS_STEPS)
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        if writes:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("sqlite store %s: WAL unavailable (journal_mode=%s)", path, mode)
            conn.execute("PRAGMA synchronous = FULL")  # per connection: every writer sets it
        else:
            conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA temp_store = MEMORY")
    except BaseException:
        conn.close()
        raise
    return conn
