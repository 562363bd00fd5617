"""Open-loop load generator: a fixed request rate, queueing charged from the INTENDED send time.

wrk (closed loop) waits for each answer before sending the next request, so when the server
stalls the load stalls with it and the queueing that real clients would have suffered is
never measured ("coordinated omission"). Here the schedule is fixed up front: request ``i`` is
due at ``t0 + i / rate``; connection ``c`` of ``C`` keep-alive connections sends the requests
``i = c, c + C, c + 2C, ...`` (each connection runs at ``rate / C``, like wrk2). When a
connection is still waiting for an earlier answer at a request's due time, that request is
sent as soon as the answer arrives and its latency counts from its DUE time: the wait is part
of the latency, as it would be for a real client. When the connection was idle at the due
time, the request is sent by a timer (uvloop: millisecond resolution, up to ~1 ms early or
late) and its latency counts from the actual send, so the generator's own timer jitter is
not charged to the server (wrk2 charges it).

Runs in its own process on uvloop and prints one ``BENCH_JSON`` line:

- latency percentiles (as above: the numbers to compare), ``strict`` percentiles (every
  request from its due time, or from its send when the timer fired early: the generator's
  jitter charged to the server, as wrk2 does) and ``service`` percentiles (from the actual
  send: what a closed-loop tool would report);
- ``achieved_rps`` (completed / the window, or until the last answer if later) against
  ``rate``; ``behind``: requests that waited for their connection;
- ``lag``: how late (negative: early) the generator sent requests whose connection was idle.
  If the achieved rate falls short by more than 2 %, the lag p99 exceeds ``--max-lag-ms``,
  or requests failed or were dropped, ``kept_up`` is false: the schedule was not held and the
  run says less than it seems.

    python -m benchmarks.openloop --url http://127.0.0.1:P --scenario get_uniform --rate 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

from benchmarks import workload
from benchmarks.load import MARKER, READ_ERRORS, check_loopback, read_response


class _Stats:
    def __init__(self) -> None:
        self.latency: list[float] = []  # done - (intended if the connection was busy else sent)
        self.strict: list[float] = []  # done - min(intended, sent): timer jitter charged too
        self.service: list[float] = []  # done - actual send
        self.lag: list[float] = []  # actual send - intended, when the connection was idle
        self.behind = 0  # sends that waited for the connection (server slower than schedule)
        self.errors = {"connect": 0, "read": 0, "timeout": 0}
        self.non2xx = 0
        self.dropped = 0  # scheduled within the window but not sent before the drain ended
        self.last_done = 0.0


async def _connection(
    a: argparse.Namespace, idx: int, t0: float, host: str, port: int, st: _Stats
) -> None:
    maker = workload.RequestMaker(
        a.scenario, a.collection, a.n_docs, a.seed * 1_000_003 + idx, host, port, tuple(a.header)
    )
    perf, sleep, timeout = time.perf_counter, asyncio.sleep, asyncio.timeout
    interval = a.connections / a.rate
    first = t0 + idx / a.rate
    end = t0 + a.duration
    hard_end = end + a.drain
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    k = 0
    while (intended := first + k * interval) < end:  # bounded by the window and the drain
        now = perf()
        if now > hard_end:
            st.dropped += int((end - intended) / interval) + 1
            break
        k += 1
        idle = now < intended
        if idle:  # uvloop timers: millisecond resolution, may fire up to ~1 ms early
            await sleep(intended - now)
        else:
            st.behind += 1
        if writer is None:
            try:
                async with timeout(a.timeout):
                    reader, writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError):
                st.errors["connect"] += 1
                continue
        assert reader is not None
        sent = perf()
        if idle:
            st.lag.append(sent - intended)
        # the clock starts at the intended time when the connection was still busy with an
        # earlier answer then (queueing the server caused), else at the actual send
        start = sent if idle else intended
        try:
            writer.write(maker.next())
            async with timeout(a.timeout):
                status, _, close = await read_response(reader)
        except TimeoutError:
            st.errors["timeout"] += 1
            close, status = True, 0
        except READ_ERRORS:
            st.errors["read"] += 1
            close, status = True, 0
        else:
            done = perf()
            st.last_done = max(st.last_done, done)
            st.latency.append(done - start)
            st.strict.append(done - min(intended, sent))
            st.service.append(done - sent)
            if not 200 <= status < 300:
                st.non2xx += 1
        if close:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def generate(a: argparse.Namespace) -> dict[str, object]:
    host, port = check_loopback(a.url)
    st = _Stats()
    t0 = time.perf_counter() + 0.2  # every connection task is scheduled before the first send
    tasks = [
        asyncio.create_task(_connection(a, i, t0, host, port, st)) for i in range(a.connections)
    ]
    await asyncio.wait_for(
        asyncio.gather(*tasks, return_exceptions=True), a.duration + a.drain + a.timeout + 10
    )
    elapsed = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    scheduled = int(a.rate * a.duration)
    lat, svc, lag = sorted(st.latency), sorted(st.service), sorted(st.lag)
    strict = sorted(st.strict)
    lag_p = workload.percentiles(lag)
    # completions per second over the window, or until the last answer when it drained later
    achieved = len(lat) / max(a.duration, st.last_done - t0)
    kept_up = achieved >= 0.98 * a.rate and lag_p["p99_ms"] <= a.max_lag_ms
    errors = sum(st.errors.values())
    return {
        "rate": a.rate,
        "connections": a.connections,
        "duration_s": a.duration,
        "elapsed_s": elapsed,
        "scheduled": scheduled,
        "requests": len(lat),
        "achieved_rps": achieved,
        "behind": st.behind,
        "dropped": st.dropped,
        "errors": errors,
        "error_kinds": st.errors,
        "non2xx": st.non2xx,
        **workload.percentiles(lat),
        "strict": workload.percentiles(strict),
        "service": workload.percentiles(svc),
        "lag": lag_p,
        "kept_up": kept_up and errors == 0 and st.dropped == 0,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        **({"latencies_ms": [round(x * 1e3, 4) for x in lat]} if a.raw else {}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.openloop", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--scenario", choices=list(workload.SCENARIOS), default="get_uniform")
    p.add_argument("--collection", default="bench")
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of scheduled sends")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    p.add_argument("--n-docs", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    p.add_argument("--drain", type=float, default=10.0, help="max seconds after the window")
    p.add_argument("--max-lag-ms", type=float, default=5.0, help="generator send lag p99 tolerated")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--raw", action="store_true", help="also print every latency (ms)")
    a = p.parse_args(argv)
    if not (0 < a.rate <= 100_000 and 0 < a.duration <= 3600 and 1 <= a.connections <= 4096):
        p.error("--rate, --duration or --connections out of range")
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out = runner.run(generate(a))
    print(MARKER + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
