"""Integration fixtures: a private PostgreSQL primary and a real streaming replica of it
(never the machine's server: tests must not change the machine's services)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.pgcluster import PgCluster
from tests.replica import Replica, binaries_missing, replicated_pair


@pytest.fixture(scope="session")
def replication() -> Iterator[tuple[PgCluster, Replica]]:
    """One private primary and one streaming replica of it for the session (initdb and a base
    backup cost seconds), both destroyed at the end (servers stopped, files removed), also on
    failure."""
    missing = binaries_missing()
    if missing is not None:
        pytest.skip(f"no streaming replica: {missing}")
    with replicated_pair() as pair:
        yield pair


@pytest.fixture(scope="session")
def primary_node(replication: tuple[PgCluster, Replica]) -> PgCluster:
    return replication[0]


@pytest.fixture(scope="session")
def replica_node(replication: tuple[PgCluster, Replica]) -> Replica:
    return replication[1]


@pytest.fixture(scope="session")
def primary_dsn(replica_node: Replica) -> str:
    """DSN of a fresh database on the private primary (the replica streams it too)."""
    name = f"dbproxy_test_{uuid.uuid4().hex[:10]}"
    replica_node.query_primary(f'CREATE DATABASE "{name}"')
    return replica_node.primary_dsn.rpartition("/")[0] + f"/{name}"


@pytest.fixture(scope="module")
def replica(replica_node: Replica) -> Replica:
    """The session's replica, handed to each module running, replaying and caught up, whatever
    the previous module did to it (stopped it, paused replay)."""
    replica_node.reset()
    return replica_node
