"""The request context: who is asking and under which request id, carried to the adapters."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestContext:
    service: str = "anonymous"
    request_id: str = ""
    statement_timeout: float | None = None  # a per-service cap below the global one
    read_preference: str | None = None  # X-Read-Preference: primary | secondary | nearest
    min_lsn: int | None = None  # X-Consistency-Token: read only what has replayed this far
    # when the request began (time.monotonic()): its database work must end by this plus its
    # statement timeout (None: no request deadline, each wait gets the whole timeout)
    started: float | None = None
    # ?partition_key= / X-Partition-Key: a GET by id on a partitioned collection reads the
    # one partition holding this key (issue 21)
    partition_key: str | None = None


ANONYMOUS = RequestContext()
current: ContextVar[RequestContext] = ContextVar("dbproxy_request", default=ANONYMOUS)
# set by a backend after a write commits: the WAL position a later read must have reached
write_token: ContextVar[str | None] = ContextVar("dbproxy_write_token", default=None)
# the last statement a backend ran in this request (SQL text, bound values), so a slow
# operation's plan can be looked at afterwards (EXPLAIN, sampled)
last_statement: ContextVar[tuple[str, tuple[object, ...]] | None] = ContextVar(
    "dbproxy_last_statement", default=None
)
