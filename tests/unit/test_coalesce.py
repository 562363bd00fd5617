"""The read coalescer's batching rules, with a fetch function the test controls."""

from __future__ import annotations

import asyncio

import pytest

from proxy.backends.coalesce import Coalescer


class Fetcher:
    """fetch_many that records each batch and answers when the test releases it."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gates: list[asyncio.Event] = []

    async def __call__(self, keys: list[str]) -> dict[str, str]:
        self.batches.append(list(keys))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return {k: k.upper() for k in keys if not k.startswith("missing")}


async def turns(n: int = 8) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_one_turn_one_batch_and_single_flight() -> None:
    fetch = Fetcher()
    co: Coalescer[str, str] = Coalescer(fetch)
    gets = [asyncio.ensure_future(co.get(k)) for k in ("a", "b", "a", "missing")]
    await turns()
    assert fetch.batches == [["a", "b", "missing"]]
    fetch.gates[0].set()
    assert await asyncio.gather(*gets) == ["A", "B", "A", None]
    assert (co.batches, co.keys) == (1, 4)


async def test_idle_coalescer_sends_each_turn_at_once() -> None:
    fetch = Fetcher()
    co: Coalescer[str, str] = Coalescer(fetch, max_in_flight=2)
    first = asyncio.ensure_future(co.get("a"))
    await turns()
    second = asyncio.ensure_future(co.get("b"))
    await turns()
    assert fetch.batches == [["a"], ["b"]]  # under the bound: no waiting
    for gate in fetch.gates:
        gate.set()
    assert await asyncio.gather(first, second) == ["A", "B"]


async def test_at_the_in_flight_bound_keys_wait_and_grow_one_batch() -> None:
    fetch = Fetcher()
    co: Coalescer[str, str] = Coalescer(fetch, max_in_flight=2)
    gets = [asyncio.ensure_future(co.get("a"))]
    await turns()
    gets.append(asyncio.ensure_future(co.get("b")))
    await turns()
    # two batches running: the next turns' keys wait, together
    gets += [asyncio.ensure_future(co.get("c")), asyncio.ensure_future(co.get("d"))]
    await turns()
    gets.append(asyncio.ensure_future(co.get("e")))
    await turns()
    assert fetch.batches == [["a"], ["b"]]
    fetch.gates[0].set()  # one finishes: the waiting keys go out as one batch
    await turns()
    assert fetch.batches == [["a"], ["b"], ["c", "d", "e"]]
    for gate in fetch.gates:
        gate.set()
    assert await asyncio.gather(*gets) == ["A", "B", "C", "D", "E"]


async def test_a_full_batch_goes_out_even_at_the_bound() -> None:
    fetch = Fetcher()
    co: Coalescer[str, str] = Coalescer(fetch, max_batch=3, max_in_flight=1)
    gets = [asyncio.ensure_future(co.get("a"))]
    await turns()
    gets += [asyncio.ensure_future(co.get(k)) for k in ("b", "c", "d", "e")]
    await turns()
    assert fetch.batches == [["a"], ["b", "c", "d"]]  # full: not held back
    for _ in range(3):
        for gate in fetch.gates:
            gate.set()
        await turns()
    assert fetch.batches[-1] == ["e"]
    assert await asyncio.gather(*gets) == ["A", "B", "C", "D", "E"]


async def test_a_failed_batch_fails_its_keys_and_releases_the_waiting_ones() -> None:
    calls: list[list[str]] = []

    async def fetch(keys: list[str]) -> dict[str, str]:
        calls.append(list(keys))
        await asyncio.sleep(0.01)
        if "bad" in keys:
            raise RuntimeError("database said no")
        return {k: k for k in keys}

    co: Coalescer[str, str] = Coalescer(fetch, max_in_flight=1)
    bad = asyncio.ensure_future(co.get("bad"))
    await turns()
    good = asyncio.ensure_future(co.get("good"))
    with pytest.raises(RuntimeError, match="said no"):
        await bad
    assert await good == "good"
    assert calls == [["bad"], ["good"]]
