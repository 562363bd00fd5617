"""Running statements on the endpoints: one statement on the endpoint the router chose, a
primary connection for housekeeping; every wait ends by the request's deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from proxy import context
from proxy.backends.postgres.deadline import GRACE_SECONDS, budget
from proxy.backends.postgres.errors import no_answer, translate
from proxy.backends.postgres.pool import (
    SESSION_LOST,
    Endpoint,
    EndpointSet,
    release,
    session_lost,
)
from proxy.config import Limits
from proxy.errors import CommitOutcomeUnknown, PoolExhausted, ProxyError, Timeout, Unavailable


class Executor:
    """Statements on an endpoint set, each fed to its endpoint's breaker."""

    def __init__(self, endpoints: EndpointSet, limits: Limits, acquire_timeout: float) -> None:
        self.endpoints = endpoints
        self.limits = limits
        self._acquire_timeout = acquire_timeout
        self._releasing: set[asyncio.Future[None]] = set()

    @asynccontextmanager
    async def conn(self, wait: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A primary connection for housekeeping and monitoring queries (and DDL). One
        that timed out is closed, not returned: waiting for the server to acknowledge the
        cancel would hang on a server that does not answer."""
        pool = self.endpoints.primary.pool
        if pool is None:
            raise Unavailable(
                self.endpoints.primary.down_reason or "the database pool is not open",
                retry_after=1,
            )
        try:
            conn = await pool.acquire(
                timeout=max(wait, 0.001) if wait is not None else self._acquire_timeout
            )
        except TimeoutError:
            raise PoolExhausted(
                "no database connection became free in time", retry_after=1
            ) from None
        except Exception as exc:
            raise translate(exc) from None
        try:
            yield conn
        except (TimeoutError, asyncio.CancelledError):
            conn.terminate()
            raise
        finally:
            await release(pool, conn)  # asyncpg shields the release from cancellation

    def timeout(self) -> tuple[float, bool]:
        """This statement's client-side timeout (what is left of the request's deadline;
        with the grace when it is the global timeout, so the server's own cancel comes
        first), and whether running into it means the server is unresponsive (a
        per-service cap below the global one is the client's own)."""
        left, hard = budget(self.limits)
        return (left + GRACE_SECONDS if hard else left), hard

    @staticmethod
    def _timed_out(hard: bool, sent: bool, write: bool) -> ProxyError:
        if write and sent:  # an autocommit statement is its own COMMIT
            return CommitOutcomeUnknown(
                "the database did not answer in time; the write may or may not have been applied"
            )
        if hard:
            return no_answer()
        return Timeout("the statement took longer than the service's statement timeout")

    async def run_on(
        self, ep: Endpoint, sql: str, args: tuple[Any, ...], write: bool = False
    ) -> list[asyncpg.Record]:
        """One statement on one endpoint, its outcome fed to the endpoint's breaker; every
        wait ends by the request's deadline. A timed-out statement is never retried here
        and its connection is closed (its state is unknown)."""
        eps = self.endpoints
        timeout, hard = self.timeout()
        if timeout <= 0:
            ep.breaker.release()
            raise self._timed_out(hard, False, write)
        conn = await eps.acquire(ep, min(self._acquire_timeout, timeout))
        losses = ep.losses
        timeout, hard = self.timeout()
        context.last_statement.set((sql, args))
        ep.statements += 1
        ep.state.outstanding += 1
        started = time.perf_counter()
        lost = False
        try:
            if timeout <= 0:
                eps.record(ep, None)
                raise self._timed_out(hard, False, write)
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args, timeout=timeout)
        except TimeoutError as exc:
            lost = True
            eps.record(ep, exc if hard else None)
            raise self._timed_out(hard, True, write) from None
        except asyncio.CancelledError:
            lost = True
            ep.breaker.release()
            raise
        except ProxyError:
            raise
        except BaseException as exc:
            if not isinstance(exc, SESSION_LOST) or await session_lost(ep, losses):
                eps.record(ep, exc)
            else:  # a connection taken before its pool was found dropped: counted already
                ep.breaker.release()
            raise
        else:
            eps.record(ep, None, (time.perf_counter() - started) * 1000.0)
            return rows
        finally:
            ep.state.outstanding -= 1
            if ep.pool is not None:
                if lost:  # asyncpg sent a cancel: the release waits for its answer
                    self._release_later(ep.pool, conn)
                else:
                    await release(ep.pool, conn)

    def _release_later(self, pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
        """Give back a connection whose statement was cancelled without making the request
        wait: asyncpg waits (at most the acquire timeout, then closes it) for the server to
        acknowledge the cancel, which a server that does not answer never does."""
        task = asyncio.ensure_future(pool.release(conn, timeout=self._acquire_timeout))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Future[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled():
            task.exception()  # a connection that could not be reset was closed: fine
