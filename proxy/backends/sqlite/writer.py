"""The writer thread of the SQLite store: group commit of plain writes, and the write gate a
transaction borrows."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from proxy.backends.sqlite.connection import ConnState, Job, T, connect
from proxy.backends.sqlite.errors import translate
from proxy.errors import InternalError, PoolExhausted, ProxyError, Unavailable

log = logging.getLogger(__name__)

_BATCH_MAX = 64


@dataclass(slots=True)
class WriteJob:
    """A write to run, or (``fn`` None) a loan of the writer to a transaction."""

    fn: Job[Any] | None
    future: concurrent.futures.Future[Any]
    start_by: float
    outcome: tuple[Any, ProxyError | None] = field(default=(None, None))


class WriterThread:
    """The thread (and connection) of plain writes, and the gate of all writes: a
    transaction borrows it (``lend``) for its first write and gives it back when it ends;
    meanwhile this thread waits, so no two connections of the process ever write at once."""

    def __init__(self, path: str, state: ConnState, busy_ms: int, max_loan: float) -> None:
        self.path = path
        self.state = state
        self.known_tables: set[str] = set()  # touched by this thread only
        self._busy_ms = busy_ms
        self._max_loan = max_loan
        self._queue: queue.SimpleQueue[WriteJob | None] = queue.SimpleQueue()
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="dbproxy-sqlite-writer", daemon=True)
        self._stopping = False

    def start(self) -> concurrent.futures.Future[None]:
        self._thread.start()
        return self._opened

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, fn: Job[T], start_by: float) -> concurrent.futures.Future[T]:
        return self._enqueue(fn, start_by)

    def lend(self, start_by: float) -> concurrent.futures.Future[threading.Event]:
        """The writer, once it gets there: the future's event gives it back."""
        return self._enqueue(None, start_by)

    def _enqueue(self, fn: Job[Any] | None, start_by: float) -> concurrent.futures.Future[Any]:
        if not self.alive():
            raise Unavailable("the embedded store is not open for writing", retry_after=1)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(WriteJob(fn, future, start_by))
        return future

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self) -> None:
        """Finish what is queued, then close the connection and end the thread."""
        if self._thread.is_alive():
            self._stopping = True
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        try:
            conn = connect(self.path, self.state, writes=True, busy_ms=self._busy_ms)
        except BaseException as exc:
            self._opened.set_exception(exc)
            return
        self._opened.set_result(None)
        try:
            self._loop(conn)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA optimize")
            conn.close()

    def _loop(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = [first]
            stop = False
            while len(items) < _BATCH_MAX:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            try:
                self._run_items(conn, items)
            except Exception as exc:  # a bug or a dying disk: nobody may wait forever
                log.error("sqlite writer failed: %s", type(exc).__name__)
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                err = translate(exc)
                for item in items:
                    if not item.future.done():
                        with contextlib.suppress(concurrent.futures.InvalidStateError):
                            item.future.set_exception(err)
            if stop:
                return

    def _run_items(self, conn: sqlite3.Connection, items: list[WriteJob]) -> None:
        """Consecutive writes run as one batch; a loan runs between two batches."""
        batch: list[WriteJob] = []
        for item in items:
            if item.fn is not None:
                batch.append(item)
                continue
            self._run_batch(conn, batch)
            batch = []
            self._lend(item)
        self._run_batch(conn, batch)

    def _lend(self, loan: WriteJob) -> None:
        if not loan.future.set_running_or_notify_cancel():
            return  # the transaction gave up waiting
        if time.monotonic() > loan.start_by:
            loan.future.set_exception(
                PoolExhausted("the embedded store's writer is busy; retry", retry_after=1)
            )
            return
        back = threading.Event()
        loan.future.set_result(back)
        if not back.wait(self._max_loan):  # the registry's reaper ends transactions sooner
            log.error("a transaction kept the sqlite writer for %.0f s", self._max_loan)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[WriteJob]) -> None:
        """Run the jobs in one transaction; answer them after COMMIT."""
        jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
        while jobs:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except Exception as exc:
                self._answer(jobs, translate(exc))
                return
            lost_at = self._run_jobs(conn, jobs)
            if lost_at is not None:  # an error rolled the whole transaction back: redo the rest
                failed = jobs[lost_at]
                failed.future.set_exception(failed.outcome[1] or InternalError("write failed"))
                jobs = jobs[:lost_at] + jobs[lost_at + 1 :]
                continue
            try:
                conn.execute("COMMIT")
            except Exception as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._answer(jobs, translate(exc))
                return
            self._answer(jobs, None)
            return

    def _run_jobs(self, conn: sqlite3.Connection, jobs: list[WriteJob]) -> int | None:
        """Each job under its own savepoint; the index of a job whose error ended the whole
        transaction (SQLite does that for an interrupt, a full disk...), else None."""
        state = self.state
        for i, job in enumerate(jobs):
            assert job.fn is not None
            if time.monotonic() > job.start_by:
                job.outcome = (None, PoolExhausted("the writer is busy; retry", retry_after=1))
                continue
            conn.execute("SAVEPOINT job")
            state.arm()
            try:
                result = job.fn(conn)
            except Exception as exc:
                job.outcome = (None, translate(exc, state))
                if not conn.in_transaction:
                    return i
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            else:
                job.outcome = (result, None)
                conn.execute("RELEASE job")
            finally:
                state.disarm()
        return None

    @staticmethod
    def _answer(jobs: list[WriteJob], commit_error: ProxyError | None) -> None:
        for job in jobs:
            result, error = job.outcome
            if error is None and commit_error is not None:
                error = commit_error
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
