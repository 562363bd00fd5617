"""Integration fixtures: a real streaming replica of the machine's PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.replica import Replica, binaries_missing


@pytest.fixture(scope="session")
def replica_node() -> Iterator[Replica]:
    """One streaming replica of 127.0.0.1:5432 for the session (a base backup costs seconds),
    destroyed at the end (server stopped, slot dropped, files removed), also on failure."""
    missing = binaries_missing()
    if missing is not None:
        pytest.skip(f"no streaming replica: {missing}")
    node = Replica()
    try:
        node.start()
        yield node
    finally:
        node.destroy()


@pytest.fixture(scope="module")
def replica(replica_node: Replica) -> Replica:
    """The session's replica, handed to each module running, replaying and caught up, whatever
    the previous module did to it (stopped it, paused replay)."""
    replica_node.reset()
    return replica_node
