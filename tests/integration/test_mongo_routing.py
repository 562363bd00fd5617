"""MongoDB read routing and consistency tokens, seen in the commands the driver sends: the read
preference each operation is given, writes and transactions on the primary, token reads with
``afterClusterTime`` and their fall back to the primary. SecantusDB is one node (a replica set
of one primary), so no read here is served by a secondary: what a secondary would answer is
not verified."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from bson import Timestamp
from pymongo import monitoring

from proxy import context
from proxy.backends.mongo import MongoBackend
from proxy.backends.mongo.routing import UNKNOWN_TOKEN, ReadRouting, after_of, token_of
from proxy.config import DatabaseConfig, Limits, PoolSettings
from proxy.context import RequestContext
from proxy.query.parse import parse_update
from proxy.query.spec import FindSpec, Modify
from proxy.resilience.routing import parse_lsn
from tests.mongo_server import mongo_url

pytestmark = pytest.mark.integration


class Commands(monitoring.CommandListener):
    """Every command the backend's client sends, as sent (the driver's own record)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in ("hello", "ismaster", "ping", "endSessions"):
            self.sent.append({"name": event.command_name, **dict(event.command)})

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def take(self) -> list[dict[str, Any]]:
        out, self.sent = self.sent, []
        return out


def mode_of(cmd: dict[str, Any]) -> str:
    """The read preference a command went with (none sent means primary)."""
    return str(cmd.get("$readPreference", {}).get("mode", "primary"))


class Watched(MongoBackend):
    """The backend with the test's listener on its client (nothing else differs)."""

    listener: Commands
    token_wait = 0.5

    def _client_options(self) -> dict[str, Any]:
        return {**super()._client_options(), "event_listeners": [self.listener]}


@contextmanager
def request(**kw: Any) -> Iterator[None]:
    token = context.current.set(dataclasses.replace(RequestContext(), **kw))
    context.write_token.set(None)
    try:
        yield
    finally:
        context.current.reset(token)


async def open_watched(
    preference: str, *, audit: bool = True, cached: frozenset[str] = frozenset()
) -> AsyncIterator[tuple[Watched, Commands]]:
    cfg = DatabaseConfig(
        name="main",
        type="mongodb",
        connection_string=mongo_url(),
        pool_settings=PoolSettings(1, 4, 5),
        read_preference=preference,
    )
    database = f"r_{uuid.uuid4().hex[:10]}"
    commands = Commands()
    backend = Watched(cfg, Limits(), database=database, audit=audit, primary_points=cached)
    backend.listener = commands
    await backend.start()
    try:
        yield backend, commands
    finally:
        assert backend.client is not None
        await backend.client.drop_database(database)
        await backend.close()


@pytest.fixture
async def secondary() -> AsyncIterator[tuple[Watched, Commands]]:
    async for pair in open_watched("secondary", cached=frozenset({"cached"})):
        yield pair


def test_modes_per_request_class() -> None:
    routing = ReadRouting("secondary", frozenset({"hot"}))
    with request():
        assert routing.mode("write").mongos_mode == "primary"
        assert routing.mode("transaction").mongos_mode == "primary"
        assert routing.mode("read", "c").document == {
            "mode": "secondaryPreferred",
            "maxStalenessSeconds": 90,
        }
        assert routing.mode("point", "hot").mongos_mode == "primary"  # the cache fills it
        assert routing.mode("read", "hot").mongos_mode == "secondaryPreferred"
    with request(read_preference="nearest"):
        assert routing.mode("count", "c").mongos_mode == "nearest"
    with request(read_preference="primary"):
        assert routing.mode("read", "c").mongos_mode == "primary"
    assert ReadRouting("primaryPreferred").mode("read").mongos_mode == "primaryPreferred"
    with pytest.raises(ValueError):
        ReadRouting("secondaryOnly")


def test_tokens_are_operation_times_written_like_an_lsn() -> None:
    ts = Timestamp(1796313326, 7)
    token = token_of(ts)
    assert token == "6B1190EE/7"
    assert after_of(parse_lsn(token)) == ts
    assert token_of(None) == UNKNOWN_TOKEN and after_of(parse_lsn(UNKNOWN_TOKEN)) is None


async def test_reads_follow_the_preference_and_writes_the_primary(
    secondary: tuple[Watched, Commands],
) -> None:
    backend, commands = secondary
    with request():
        await backend.insert_one("c", {"_id": "a", "n": 1})
        await backend.change("c", "a", Modify(parse_update({"$set": {"n": 2}}, Limits())))
        await backend.insert_one("cached", {"_id": "x"})
        writes = commands.take()
        assert {c["name"] for c in writes} >= {"insert", "findAndModify", "commitTransaction"}
        assert all(mode_of(c) == "primary" for c in writes)
        # the audited writes ran in transactions (every command of them carries a txnNumber)
        assert all("txnNumber" in c for c in writes)

        await backend.get("c", "a")
        await backend.find("c", FindSpec(limit=10))
        await backend.count("c", parse_filter_all())
        reads = commands.take()
        assert [c["name"] for c in reads] == ["find", "aggregate", "aggregate"]  # count too
        assert all(c["$readPreference"]["mode"] == "secondaryPreferred" for c in reads)
        assert all(c["$readPreference"]["maxStalenessSeconds"] == 90 for c in reads)

        await backend.get("cached", "x")  # a cached collection's by-id read: the primary
        await backend.find("cached", FindSpec(limit=10))  # its lists follow the preference
        assert [mode_of(c) for c in commands.take()] == ["primary", "secondaryPreferred"]

    with request(read_preference="primary"):
        await backend.get("c", "a")
        assert [mode_of(c) for c in commands.take()] == ["primary"]
    with request(read_preference="nearest"):
        await backend.get("c", "a")
        assert [mode_of(c) for c in commands.take()] == ["nearest"]


def parse_filter_all() -> Any:
    from proxy.query.parse import parse_filter

    return parse_filter({}, Limits())


async def test_transactions_run_on_the_primary(secondary: tuple[Watched, Commands]) -> None:
    backend, commands = secondary
    with request():
        await backend.insert_one("c", {"_id": "a"})
        commands.take()
        tx = await backend.begin()
        await tx.get("c", "a")
        await tx.find("c", FindSpec(limit=5))
        await tx.insert_one("c", {"_id": "b"})
        await tx.commit()
        sent = commands.take()
        assert [c["name"] for c in sent][:2] == ["find", "aggregate"]
        assert all(mode_of(c) == "primary" and "txnNumber" in c for c in sent), sent
        token = context.write_token.get()
        assert token is not None and token != UNKNOWN_TOKEN  # the commit's operation time


async def test_a_write_answers_its_operation_time_and_a_token_read_waits_for_it(
    secondary: tuple[Watched, Commands],
) -> None:
    backend, commands = secondary
    with request():
        await backend.insert_one("c", {"_id": "a", "n": 1})
        token = context.write_token.get()
    assert token is not None and token != UNKNOWN_TOKEN
    commit = [c for c in commands.take() if c["name"] == "commitTransaction"]
    assert commit, "the audited write committed a transaction"
    min_lsn = parse_lsn(token)
    with request(min_lsn=min_lsn):
        found = await backend.get("c", "a")
    assert found is not None and found.version == 1
    (read,) = commands.take()  # alone: not coalesced with other reads
    assert read["name"] == "find" and read["$readPreference"]["mode"] == "secondaryPreferred"
    assert read["readConcern"] == {"afterClusterTime": after_of(min_lsn)}
    assert "lsid" in read and "txnNumber" not in read
    assert backend.token_reads == 1 and backend.token_fallbacks == 0


async def test_a_token_read_on_the_primary_needs_no_session(
    secondary: tuple[Watched, Commands],
) -> None:
    backend, commands = secondary
    with request():
        await backend.insert_one("c", {"_id": "a"})
        token = context.write_token.get()
    assert token is not None
    commands.take()
    with request(min_lsn=parse_lsn(token), read_preference="primary"):
        assert await backend.get("c", "a") is not None
    (read,) = commands.take()
    assert mode_of(read) == "primary" and "readConcern" not in read


async def test_an_unknown_operation_time_degrades_to_a_primary_read() -> None:
    """Writes without a session of ours (audit off) cannot know their operation time: they
    answer ``0/0``, and a read carrying it goes to the primary (always current)."""
    async for backend, commands in open_watched("secondary", audit=False):
        with request():
            await backend.insert_one("c", {"_id": "a"})
            assert context.write_token.get() == UNKNOWN_TOKEN
        commands.take()
        with request(min_lsn=parse_lsn(UNKNOWN_TOKEN)):
            assert await backend.get("c", "a") is not None
        (read,) = commands.take()
        assert mode_of(read) == "primary" and "readConcern" not in read
        assert backend.token_reads == 0


async def test_a_token_read_that_cannot_wait_is_answered_by_the_primary() -> None:
    """A server that does not reach the token's time within the token wait (here: a wait too
    short for any answer) leaves the read to the primary, without the token."""

    class Impatient(Watched):
        token_wait = 1e-6

    async for backend, commands in open_watched("secondary"):
        backend.__class__ = Impatient
        with request():
            await backend.insert_one("c", {"_id": "a", "n": 1})
            token = context.write_token.get()
        assert token is not None
        commands.take()
        with request(min_lsn=parse_lsn(token)):
            found = await backend.get("c", "a")
        assert found is not None and found.version == 1
        sent = commands.take()
        assert [mode_of(c) for c in sent][-1] == "primary" and "readConcern" not in sent[-1]
        assert backend.token_fallbacks == 1
        assert backend.read_breaker.snapshot()["state"] == "closed"  # not the server's fault


async def test_replicas_are_seeds_of_the_driver() -> None:
    """``replicas`` entries join the URL's hosts as seeds; the driver discovers the set from
    them (here SecantusDB's one-member set, named once by the URL and once as a replica)."""
    from urllib.parse import urlsplit

    from proxy.config import ReplicaConfig

    url = mongo_url()
    where = urlsplit(url)
    if where.hostname is None or where.port is None or "," in where.netloc:
        pytest.skip("needs a single-host URL")
    cfg = DatabaseConfig(
        name="main",
        type="mongodb",
        connection_string=url,
        pool_settings=PoolSettings(1, 4, 5),
        read_preference="secondary",
        replicas=(ReplicaConfig(where.hostname, where.port),),
    )
    backend = MongoBackend(cfg, Limits(), database=f"r_{uuid.uuid4().hex[:10]}")
    await backend.start()
    try:
        with request():
            await backend.insert_one("c", {"_id": "a"})
            assert await backend.get("c", "a") is not None
        assert backend.client is not None
        servers = backend.client.topology_description.server_descriptions()
        assert list(servers) == [(where.hostname, where.port)]  # one member, seen once
        health = await backend.health()
        assert health["routing"]["modes"]["read"] == "secondaryPreferred"
    finally:
        assert backend.client is not None
        await backend.client.drop_database(backend.database)
        await backend.close()


def test_wiring_keeps_cached_collections_by_id_on_the_primary() -> None:
    from proxy.config import CacheConfig, CollectionCache, Config
    from proxy.wiring import build_backends

    db = DatabaseConfig(
        name="main",
        type="mongodb",
        connection_string="mongodb://127.0.0.1:1/x",
        read_preference="nearest",
    )
    caches = {"hot": CollectionCache(True, 60.0), "off": CollectionCache(False, 60.0)}
    config = Config(databases=(db,), cache=CacheConfig(collections=caches))
    backend = build_backends(config)["main"]
    assert isinstance(backend, MongoBackend)
    assert backend.routing.primary_points == frozenset({"hot"})
    with request():
        assert backend.routing.mode("point", "hot").mongos_mode == "primary"
        assert backend.routing.mode("point", "off").mongos_mode == "nearest"
