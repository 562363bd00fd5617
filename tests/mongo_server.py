"""The MongoDB-wire server of the tests: ``MONGODB_URL`` when set (a real MongoDB), else one
in-process SecantusDB server per test process, started on first use and stopped at exit."""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_lock = threading.Lock()
_server: Any = None
_url: str | None = None
STARTED_IN: list[float] = []  # seconds the server took to start (reported by the tests)


def mongo_url() -> str:
    """The URL of the test server (started here on first use)."""
    global _server, _url
    env = os.environ.get("MONGODB_URL")
    if env:
        return env
    with _lock:
        if _url is None:
            from secantus.server import SecantusDBServer

            path = tempfile.mkdtemp(prefix="dbproxy-secantus-")
            started = time.perf_counter()
            server = SecantusDBServer(
                host="127.0.0.1", port=0, storage_path=path, replica_set_name="secantus"
            )
            server.start()
            STARTED_IN.append(time.perf_counter() - started)
            _server, _url = server, str(server.uri)
            atexit.register(_stop, server, path)
        return _url


def server_name() -> str:
    return "mongodb" if os.environ.get("MONGODB_URL") else "secantus"


def _stop(server: Any, path: str) -> None:
    try:
        server.stop()
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def driver_sockets_collected() -> Iterator[None]:
    """The driver's sockets to a stopped or refusing server are closed by the garbage
    collector (a ``ResourceWarning``, and the selector losing their fd): collect them when
    the block ends, not in whichever test runs next, where pytest reports them."""
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
