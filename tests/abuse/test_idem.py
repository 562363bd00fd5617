"""Issue 13, items 1, 4 and 5: idempotent replays judged by the policy, keys scoped per
service, full replacements that keep protected fields, no existence oracle in upserts, and
an audit log limited to what the monitoring caller may read. Real ``dbproxy serve``
processes on PostgreSQL and on the embedded store, in token and sidecar mode."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.policy import hash_token
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

BACKENDS = ["postgresql", "embedded"]


def _tok(name: str) -> str:
    return hash_token(f"{name}-tok")


POLICIES: dict[str, str] = {
    "billing": f"""
service: billing
identity:
  tokens: [{_tok("billing")}]
grants:
  - collections: ["inv_*"]
    operations: [read, list, count, create, update, delete, transaction]
fields:
  "inv_*":
    readable: [_id, tenant_id, amount, note, address]
    writable: [tenant_id, amount, note, address.city]
rows:
  "inv_*":
    tenant_id: {{header: X-Tenant-Id}}
""",
    "other": f"""
service: other
identity:
  tokens: [{_tok("other")}]
grants:
  - collections: ["inv_*"]
    operations: [read, list, create, update, transaction]
""",
    "owner": f"""
service: owner
identity:
  tokens: [{_tok("owner")}]
grants:
  - collections: ["*"]
    operations: [read, list, count, create, update, delete, transaction]
""",
    "tiny": f"""
service: tiny
identity:
  tokens: [{_tok("tiny")}]
grants:
  - collections: ["inv_*"]
    operations: [read, create, update, transaction]
limits:
  rate: {{per_minute: 1, burst: 3}}
""",
    "watcher": f"""
service: watcher
identity:
  tokens: [{_tok("watcher")}]
grants:
  - collections: ["seen_*"]
    operations: [read]
  - collections: ["hidden_*"]
    operations: [count]
  - collections: ["*"]
    operations: [monitor]
""",
}


def auth(service: str, tenant: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {service}-tok", **extra}
    if tenant is not None:
        headers["X-Tenant-Id"] = tenant
    return headers


def write_policies(tmp_path: Path, **overrides: str) -> Path:
    d = tmp_path / f"policies-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    for name, text in {**POLICIES, **overrides}.items():
        (d / f"{name}.yaml").write_text(text)
    return d


def serve(
    launch: Callable[..., Server], kind: str, pg_dsn: str, tmp_path: Path, *args: str
) -> Server:
    if kind == "postgresql":
        return launch("--database", pg_dsn, *args)
    data = tmp_path / f"data-{uuid.uuid4().hex[:6]}"
    return launch("--data-dir", str(data), *args)


async def call(s: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any, Any]:
    async with s.request(method, url, **kw) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers.copy()


async def reload(s: aiohttp.ClientSession, server: Server) -> None:
    """SIGHUP, then wait until the health view counts one more successful reload."""
    _, health, _ = await call(s, "GET", f"{server.url}/api/db/health")
    before = health["policies"]["reloads"]
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        _, health, _ = await call(s, "GET", f"{server.url}/api/db/health")
        assert health["policies"]["reload_error"] is None
        if health["policies"]["reloads"] > before:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the policies were not reloaded")


def coll(prefix: str = "inv") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# ---- item 1: replays are judged by the policy -----------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("mode", ["token", "sidecar"])
async def test_replay_never_crosses_row_rules(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str, mode: str
) -> None:
    """The same key and the same request, sent for another tenant, never gets the first
    tenant's stored reply (the values of the row rules' headers are in the fingerprint)."""
    policies = write_policies(tmp_path)
    extra = ("--service", "billing") if mode == "sidecar" else ()
    server = serve(launch, kind, pg_dsn, tmp_path, "--policies", str(policies), *extra)
    url = f"{server.url}/api/db/{coll()}"

    def who(tenant: str, **more: str) -> dict[str, str]:
        if mode == "sidecar":
            return {"X-Tenant-Id": tenant, **more}
        return auth("billing", tenant, **more)

    key = str(uuid.uuid4())
    async with aiohttp.ClientSession() as s:
        st, doc, _ = await call(
            s,
            "PUT",
            f"{url}/a1?upsert=true",
            headers=who("t1"),
            json={"tenant_id": "t1", "amount": 7},
        )
        assert st == 201, doc
        body = {"$set": {"amount": 8}}
        st, first, _ = await call(
            s, "PUT", f"{url}/a1", headers=who("t1", **{"Idempotency-Key": key}), json=body
        )
        assert st == 200 and first["amount"] == 8 and first["tenant_id"] == "t1"
        st, again, headers = await call(
            s, "PUT", f"{url}/a1", headers=who("t1", **{"Idempotency-Key": key}), json=body
        )
        assert st == 200 and again == first and headers["Idempotent-Replayed"] == "true"
        # the attack: another tenant, the same key and request
        st, err, headers = await call(
            s, "PUT", f"{url}/a1", headers=who("t2", **{"Idempotency-Key": key}), json=body
        )
        assert st == 422, err
        assert err["error"]["code"] == "idempotency_key_reused"
        assert "Idempotent-Replayed" not in headers and "t1" not in str(err)
        # and a create: the second tenant's request is not answered with the first's document
        key2 = str(uuid.uuid4())
        st, _, _ = await call(
            s, "POST", url, headers=who("t1", **{"Idempotency-Key": key2}), json={"amount": 1}
        )
        assert st == 403  # the row rule: tenant_id must be given
        st, _created, _ = await call(
            s,
            "POST",
            url,
            headers=who("t1", **{"Idempotency-Key": key2}),
            json={"tenant_id": "t1", "amount": 1},
        )
        assert st == 201
        st, err, _ = await call(
            s,
            "POST",
            url,
            headers=who("t2", **{"Idempotency-Key": key2}),
            json={"tenant_id": "t1", "amount": 1},
        )
        assert st == 422 and err["error"]["code"] == "idempotency_key_reused"
        # a batch too
        key3 = str(uuid.uuid4())
        batch = {"operations": [{"op": "get", "collection": url.rsplit("/", 1)[1], "id": "a1"}]}
        st, res, _ = await call(
            s,
            "POST",
            f"{server.url}/api/db/transaction",
            headers=who("t1", **{"Idempotency-Key": key3}),
            json=batch,
        )
        assert st == 200 and res["results"][0]["document"]["tenant_id"] == "t1"
        st, err, _ = await call(
            s,
            "POST",
            f"{server.url}/api/db/transaction",
            headers=who("t2", **{"Idempotency-Key": key3}),
            json=batch,
        )
        assert st == 422 and err["error"]["code"] == "idempotency_key_reused"


@pytest.mark.parametrize("kind", BACKENDS)
async def test_keys_are_scoped_per_service(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    """The same key string from two services is two keys: no 422, no replay across."""
    server = serve(launch, kind, pg_dsn, tmp_path, "--policies", str(write_policies(tmp_path)))
    url = f"{server.url}/api/db/{coll()}"
    key = str(uuid.uuid4())
    async with aiohttp.ClientSession() as s:
        st, mine, _ = await call(
            s,
            "POST",
            url,
            headers=auth("billing", "t1", **{"Idempotency-Key": key}),
            json={"tenant_id": "t1", "amount": 1},
        )
        assert st == 201
        # another service, another request, the same key string: a fresh key
        st, theirs, headers = await call(
            s, "POST", url, headers=auth("other", **{"Idempotency-Key": key}), json={"x": 2}
        )
        assert st == 201, theirs
        assert "Idempotent-Replayed" not in headers and theirs["_id"] != mine["_id"]
        # another service, the very same request: still its own key, its own document
        st, same, headers = await call(
            s,
            "POST",
            url,
            headers=auth("other", **{"Idempotency-Key": str(key) + "b"}),
            json={"tenant_id": "t1", "amount": 1},
        )
        assert st == 201
        st, twin, headers = await call(
            s,
            "POST",
            url,
            headers=auth("owner", **{"Idempotency-Key": str(key) + "b"}),
            json={"tenant_id": "t1", "amount": 1},
        )
        assert st == 201 and "Idempotent-Replayed" not in headers and twin["_id"] != same["_id"]
        # and each service's own retry still replays its own reply
        st, again, headers = await call(
            s, "POST", url, headers=auth("other", **{"Idempotency-Key": key}), json={"x": 2}
        )
        assert st == 201 and again == theirs and headers["Idempotent-Replayed"] == "true"
        st, again, headers = await call(
            s,
            "POST",
            url,
            headers=auth("billing", "t1", **{"Idempotency-Key": key}),
            json={"tenant_id": "t1", "amount": 1},
        )
        assert st == 201 and again == mine and headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("kind", BACKENDS)
async def test_replay_after_policy_reload(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    """A reload that takes the grant away refuses the replay (403); one that changes what
    the service may see answers 409 idempotency_policy_changed; the stored reply of the old
    policy is never sent. Batches alike."""
    policies = write_policies(tmp_path)
    server = serve(launch, kind, pg_dsn, tmp_path, "--policies", str(policies))
    name = coll()
    url = f"{server.url}/api/db/{name}"
    k1, k2, k3 = (str(uuid.uuid4()) for _ in range(3))
    body = {"tenant_id": "t1", "amount": 1}
    batch = {"operations": [{"op": "create", "collection": name, "document": {"x": 1}}]}
    tx_url = f"{server.url}/api/db/transaction"
    async with aiohttp.ClientSession() as s:
        st, doc, _ = await call(
            s, "POST", url, headers=auth("billing", "t1", **{"Idempotency-Key": k1}), json=body
        )
        assert st == 201
        st, _res, _ = await call(
            s, "POST", tx_url, headers=auth("other", **{"Idempotency-Key": k2}), json=batch
        )
        assert st == 200
        st, _one, _ = await call(
            s, "POST", url, headers=auth("other", **{"Idempotency-Key": k3}), json={"x": 1}
        )
        assert st == 201
        # billing may now see less (note hidden); other loses create and transaction
        (policies / "billing.yaml").write_text(
            POLICIES["billing"]
            .replace("tenant_id, amount, note, address]", "tenant_id, amount, address]")
            .replace("amount, note, address.city]", "amount, address.city]")
        )
        (policies / "other.yaml").write_text(
            POLICIES["other"].replace("[read, list, create, update, transaction]", "[read, list]")
        )
        await reload(s, server)
        st, err, headers = await call(
            s, "POST", url, headers=auth("billing", "t1", **{"Idempotency-Key": k1}), json=body
        )
        assert st == 409, err
        assert err["error"]["code"] == "idempotency_policy_changed"
        assert "Idempotent-Replayed" not in headers and doc["_id"] not in str(err)
        st, err, _ = await call(
            s, "POST", tx_url, headers=auth("other", **{"Idempotency-Key": k2}), json=batch
        )
        assert st == 403 and err["error"]["code"] == "permission_denied", err
        st, err, _ = await call(
            s, "POST", url, headers=auth("other", **{"Idempotency-Key": k3}), json={"x": 1}
        )
        assert st == 403 and err["error"]["code"] == "permission_denied", err


@pytest.mark.parametrize("kind", BACKENDS)
async def test_replays_are_charged_to_the_rate_limit(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    """Burst 3, one a minute: the write and two replays pass, the next replay is 429."""
    server = serve(launch, kind, pg_dsn, tmp_path, "--policies", str(write_policies(tmp_path)))
    url = f"{server.url}/api/db/{coll()}"
    headers = auth("tiny", **{"Idempotency-Key": str(uuid.uuid4())})
    async with aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(5):
            st, _, _ = await call(s, "PUT", f"{url}/d1?upsert=true", headers=headers, json={"a": 1})
            statuses.append(st)
        assert statuses == [201, 201, 201, 429, 429]


# ---- item 4: a full replacement keeps what the caller may not write or read -----------


async def _replace_paths(
    s: aiohttp.ClientSession, server: Server, name: str, path: str, doc_id: str
) -> None:
    """Replace ``doc_id`` as billing (tenant t1) through one of four paths."""
    url = f"{server.url}/api/db"
    new = {"tenant_id": "t1", "amount": 2, "address": {"city": "Oslo"}}
    who = auth("billing", "t1")
    if path == "put":
        st, out, _ = await call(s, "PUT", f"{url}/{name}/{doc_id}", headers=who, json=new)
    elif path == "upsert":
        st, out, _ = await call(
            s, "PUT", f"{url}/{name}/{doc_id}?upsert=true", headers=who, json=new
        )
    elif path == "batch":
        op = {"op": "replace", "collection": name, "id": doc_id, "document": new}
        st, out, _ = await call(
            s, "POST", f"{url}/transaction", headers=who, json={"operations": [op]}
        )
    else:
        st, tx, _ = await call(
            s, "POST", f"{url}/transaction", headers=who, json={"action": "begin"}
        )
        assert st == 201
        tid = tx["transaction_id"]
        st, out, _ = await call(
            s,
            "PUT",
            f"{url}/{name}/{doc_id}",
            headers={**who, "X-Transaction-Id": tid},
            json=new,
        )
        assert st == 200, out
        st, out, _ = await call(
            s,
            "POST",
            f"{url}/transaction",
            headers=who,
            json={"action": "commit", "transaction_id": tid},
        )
    assert st == 200, out
    if path in ("put", "upsert"):
        # what the caller sees: no hidden field, and nothing says whether one exists
        assert "secret_note" not in out and out["address"] == {"city": "Oslo", "zip": "5003"}


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("path", ["put", "upsert", "batch", "interactive"])
async def test_replace_keeps_protected_fields(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str, path: str
) -> None:
    server = serve(launch, kind, pg_dsn, tmp_path, "--policies", str(write_policies(tmp_path)))
    name = coll()
    url = f"{server.url}/api/db/{name}"
    stored = {
        "_id": "d1",
        "tenant_id": "t1",
        "amount": 1,
        "note": "goes",
        "secret_note": "stays",
        "address": {"city": "Bergen", "zip": "5003"},
    }
    async with aiohttp.ClientSession() as s:
        st, _, _ = await call(s, "POST", url, headers=auth("owner"), json=stored)
        assert st == 201
        await _replace_paths(s, server, name, path, "d1")
        st, doc, _ = await call(s, "GET", f"{url}/d1", headers=auth("owner"))
        assert st == 200
        assert {k: v for k, v in doc.items() if k not in ("_version",)} == {
            "_id": "d1",
            "tenant_id": "t1",
            "amount": 2,
            "secret_note": "stays",  # neither readable nor writable: kept
            "address": {"city": "Oslo", "zip": "5003"},  # zip readable, not writable: kept
        }
        assert doc["_version"] == 2


@pytest.mark.parametrize("kind", BACKENDS)
async def test_replace_races_a_concurrent_write_of_a_protected_field(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    """The kept fields are taken from the row the replacement itself writes over (one
    statement): a concurrent acknowledged write of a protected field is never lost."""
    server = serve(launch, kind, pg_dsn, tmp_path, "--policies", str(write_policies(tmp_path)))
    url = f"{server.url}/api/db/{coll()}"
    async with aiohttp.ClientSession() as s:
        st, _, _ = await call(
            s, "POST", url, headers=auth("owner"), json={"_id": "r", "tenant_id": "t1", "n": 0}
        )
        assert st == 201

        async def owner_write(i: int) -> None:
            st, out, _ = await call(
                s, "PATCH", f"{url}/r", headers=auth("owner"), json={"secret_note": i}
            )
            assert st == 200, out

        async def billing_replace(i: int) -> None:
            st, out, _ = await call(
                s,
                "PUT",
                f"{url}/r",
                headers=auth("billing", "t1"),
                json={"tenant_id": "t1", "amount": i},
            )
            assert st == 200, out

        for i in range(30):
            await asyncio.gather(owner_write(i), billing_replace(i))
            st, doc, _ = await call(s, "GET", f"{url}/r", headers=auth("owner"))
            assert doc["secret_note"] == i and doc["amount"] == i


# ---- item 5: no existence oracle, no over-wide audit view -------------------------------


def _without_request_id(err: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in err["error"].items() if k != "request_id"}


@pytest.mark.parametrize("kind", BACKENDS)
async def test_upsert_onto_another_tenants_id_is_not_found(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    server = serve(launch, kind, pg_dsn, tmp_path, "--policies", str(write_policies(tmp_path)))
    name = coll()
    url = f"{server.url}/api/db/{name}"
    t1 = auth("billing", "t1")
    async with aiohttp.ClientSession() as s:
        st, _, _ = await call(
            s, "POST", url, headers=auth("owner"), json={"_id": "theirs", "tenant_id": "t2"}
        )
        assert st == 201
        whole = {"tenant_id": "t1", "amount": 1}
        ops = {"$set": {"tenant_id": "t1", "amount": 1}}
        answers = []
        for target in ("theirs", "nobody-has-this-id"):
            st, plain, _ = await call(s, "PUT", f"{url}/{target}", headers=t1, json=whole)
            answers.append((st, _without_request_id(plain)))
        for body in (whole, ops):
            st, err, _ = await call(s, "PUT", f"{url}/theirs?upsert=true", headers=t1, json=body)
            answers.append((st, _without_request_id(err)))
        assert answers[0][0] == 404
        assert all(a == answers[0] for a in answers[1:] if a[1]["details"]["_id"] == "theirs")
        assert answers[2] == answers[0] and answers[3] == answers[0], answers
        # in a batch: the same answer as a plain replace of it in a batch
        batch_answers = []
        for upsert in (False, True):
            op = {"op": "replace", "collection": name, "id": "theirs", "document": whole}
            if upsert:
                op["upsert"] = True
            st, err, _ = await call(
                s, "POST", f"{server.url}/api/db/transaction", headers=t1, json={"operations": [op]}
            )
            batch_answers.append((st, _without_request_id(err)))
        assert batch_answers[0][0] == 404 and batch_answers[1] == batch_answers[0], batch_answers
        # nothing was written
        st, doc, _ = await call(s, "GET", f"{url}/theirs", headers=auth("owner"))
        assert doc == {"_id": "theirs", "tenant_id": "t2", "_version": 1}


@pytest.mark.parametrize("kind", BACKENDS)
async def test_monitor_sees_only_the_audit_of_readable_collections(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path, kind: str
) -> None:
    server = serve(launch, kind, pg_dsn, tmp_path, "--policies", str(write_policies(tmp_path)))
    seen, hidden = coll("seen"), coll("hidden")
    api = f"{server.url}/api/db"
    async with aiohttp.ClientSession() as s:
        for name in (seen, hidden, seen, hidden):
            st, _, _ = await call(s, "POST", f"{api}/{name}", headers=auth("owner"), json={"a": 1})
            assert st == 201
        op = {"op": "create", "collection": hidden, "document": {"b": 1}}
        st, _, _ = await call(
            s, "POST", f"{api}/transaction", headers=auth("owner"), json={"operations": [op]}
        )
        assert st == 200
        st, page, _ = await call(s, "GET", f"{api}/audit?limit=1000", headers=auth("watcher"))
        assert st == 200, page
        collections = {row["collection"] for row in page["items"]}
        assert seen in collections
        assert collections == {seen}, collections  # no hidden_*, no '*' commit rows of others
        st, out, _ = await call(s, "GET", f"{api}/audit?service=owner", headers=auth("watcher"))
        assert st == 200 and {r["collection"] for r in out["items"]} == {seen}
        # naming a collection the caller may not read: refused by the policy alone, the
        # same answer whether the collection exists, has activity, or not
        answers = []
        st, out, _ = await call(s, "GET", f"{api}/audit?collection=%2A", headers=auth("watcher"))
        assert st == 200 and out["items"] == []  # commit rows: only the caller's own
        for name in (hidden, "hidden_nothing", "nosuch"):
            st, out, _ = await call(
                s, "GET", f"{api}/audit?collection={name}", headers=auth("watcher")
            )
            assert st == 403 and out["error"]["code"] == "permission_denied", out
            answers.append(out["error"]["message"].replace(name, "X"))
        assert len(set(answers)) == 1, answers
        # paging through the scoped view ends, and never shows a hidden row
        st, first, _ = await call(s, "GET", f"{api}/audit?limit=1", headers=auth("watcher"))
        assert st == 200 and len(first["items"]) == 1 and first["items"][0]["collection"] == seen
