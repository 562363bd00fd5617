"""The request's deadline as seen by the database: seconds left, and the client's grace."""

from __future__ import annotations

import time

from proxy import context
from proxy.config import Limits

# how long past a request's deadline the client still waits for the server: long enough for
# PostgreSQL's own statement_timeout (same length, counted from the statement's start) to
# cancel the statement first when the server is alive, so a frozen server costs only this
GRACE_SECONDS = 0.5


def budget(limits: Limits) -> tuple[float, bool]:
    """Seconds left for the current request's database work (its deadline is its start plus
    its statement timeout), and whether that timeout is the global one, so running out of
    it means the server did not answer (False: a per-service cap below it ran out)."""
    ctx = context.current.get()
    cap = ctx.statement_timeout
    hard = cap is None or cap >= limits.statement_timeout_seconds
    limit = limits.statement_timeout_seconds if hard or cap is None else cap
    if ctx.started is None:
        return limit, hard
    return ctx.started + limit - time.monotonic(), hard
