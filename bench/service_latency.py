"""route() on a Forge service vs a raw Monarch choose() on the same actor, same machine, one run.

Prints p50/p99 latency with one call in flight, and throughput with 1, 10 and 100 calls
in flight, over 4 replicas of a no-op actor (raw: one ProcMesh of 4 processes, Monarch's
``choose()``; Forge: a service of 4 replicas, ``route()`` with the default router).

    .venv/bin/python bench/service_latency.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from monarch.actor import endpoint, this_host

from forge.controller import ForgeActor


class Noop(ForgeActor):
    @endpoint
    async def ping(self, x: int) -> int:
        return x


async def latencies(call, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        out.append(time.perf_counter() - t0)
    return out


async def throughput(call, total: int, in_flight: int) -> float:
    counter = iter(range(total))

    async def worker():
        for i in counter:
            await call(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return total / (time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def main(calls: int, rounds: int) -> None:
    procs = this_host().spawn_procs(per_host={"procs": 4})
    raw = procs.spawn("raw", Noop)
    service = await Noop.options(num_replicas=4).as_service()

    async def raw_call(i):
        return await raw.ping.choose(i)

    async def route_call(i):
        return await service.ping.route(i)

    try:
        for fn in (raw_call, route_call):  # warm up both paths
            await latencies(fn, 200)
        lat = {"raw choose()": [], "route()": []}
        for _ in range(rounds):  # interleave to share the machine's drift fairly
            lat["raw choose()"] += await latencies(raw_call, calls // rounds)
            lat["route()"] += await latencies(route_call, calls // rounds)
        tput = {}
        for in_flight in (1, 10, 100):
            tput[("raw choose()", in_flight)] = await throughput(raw_call, calls, in_flight)
            tput[("route()", in_flight)] = await throughput(route_call, calls, in_flight)
    finally:
        await service.shutdown()
        await procs.stop()

    raw_p50, raw_p99 = pct(lat["raw choose()"], 0.5), pct(lat["raw choose()"], 0.99)
    r_p50, r_p99 = pct(lat["route()"], 0.5), pct(lat["route()"], 0.99)
    print(f"\n4 replicas of a no-op actor, {calls} calls per measurement\n")
    print("| metric | raw Monarch choose() | Forge route() | ratio (route/raw) |")
    print("|---|---|---|---|")
    print(f"| latency p50 (ms) | {1e3*raw_p50:.3f} | {1e3*r_p50:.3f} | {r_p50/raw_p50:.2f}x |")
    print(f"| latency p99 (ms) | {1e3*raw_p99:.3f} | {1e3*r_p99:.3f} | {r_p99/raw_p99:.2f}x |")
    for in_flight in (1, 10, 100):
        a, b = tput[("raw choose()", in_flight)], tput[("route()", in_flight)]
        print(f"| throughput, {in_flight} in flight (calls/s) | {a:.0f} | {b:.0f} | {b/a:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rounds))
