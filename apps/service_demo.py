"""Forge service demo: routing, sticky sessions, and recovery of a killed replica.

Runs on any machine with no GPU and no network:

    ./run.sh                      # or: .venv/bin/python -m apps.service_demo

It starts a service of 4 replicas (each its own process), spreads calls over them,
pins a conversation to one replica with a session, then SIGKILLs a replica while 200
calls are in flight and shows that none of them fails and the replica comes back.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import time

from monarch.actor import endpoint

from forge.controller import EndpointError, ForgeActor


class Greeter(ForgeActor):
    """A tiny stateful actor: counts the greetings it has given."""

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting
        self.count = 0

    @endpoint
    def greet(self, name: str) -> dict:  # a sync endpoint ...
        self.count += 1
        return {"text": f"{self.greeting}, {name}!", "replica": int(os.environ["FORGE_REPLICA_ID"]),
                "pid": os.getpid(), "count": self.count}

    @endpoint
    async def slow_greet(self, name: str) -> dict:  # ... beside async ones, on one actor
        await asyncio.sleep(0.02)
        return {"text": f"{self.greeting}, {name}.", "replica": int(os.environ["FORGE_REPLICA_ID"])}

    @endpoint
    async def refuse(self) -> None:
        raise PermissionError("this replica does not do that")


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 60 - len(title)))


async def main(num_replicas: int, num_calls: int) -> None:
    started = time.monotonic()
    service = await Greeter.options(procs=1, num_replicas=num_replicas).as_service(greeting="Hello")
    try:
        print(f"started {num_replicas} replicas in {time.monotonic() - started:.1f} s")

        section("route(): calls spread over replicas (round robin)")
        answers = [await service.greet.route(f"user{i}") for i in range(2 * num_replicas)]
        print("replica per call:", [a["replica"] for a in answers])

        section("session(): one conversation stays on one replica")
        async with service.session():
            turns = [await service.greet.route("Ada") for _ in range(3)]
        print("replica per turn:", [t["replica"] for t in turns], "counts:", [t["count"] for t in turns])

        section("fanout(): every replica answers")
        print("greetings given per replica:", [a["count"] for a in await service.greet.fanout("all")])

        section("user errors come back as exceptions; the replica stays")
        try:
            await service.refuse.route()
        except EndpointError as e:
            print(f"caught EndpointError: {e.original_type}: {e.message}")

        section(f"SIGKILL one replica during {num_calls} concurrent calls")
        victim = (await service.greet.fanout("pid"))[1]["pid"]
        calls = [asyncio.ensure_future(service.slow_greet.route(f"c{i}")) for i in range(num_calls)]
        await asyncio.sleep(0.1)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        served = collections.Counter(r["replica"] for r in results if isinstance(r, dict))
        print(f"killed pid {victim}; {len(results) - len(failed)}/{len(results)} calls succeeded, "
              f"{len(failed)} failed; served by replica: {dict(sorted(served.items()))}")
        while (await service.statistics()).num_healthy < num_replicas:
            if time.monotonic() - killed_at > 60:
                raise RuntimeError("the killed replica did not come back within 60 s")
            await asyncio.sleep(0.1)
        print(f"replica rebuilt and back in service {time.monotonic() - killed_at:.1f} s after the kill")

        section("statistics()")
        print((await service.statistics()).table())
    finally:
        await service.shutdown()
    print("\nservice shut down; no process left behind.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.replicas, args.calls))
