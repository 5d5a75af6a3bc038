"""route() across the death of a service's controller vs the same load with no fault, one run.

8 callers keep routing a 10 ms call to a 2-replica service. Baseline: 10 s of that load.
Then the same again, but the service controller's process is SIGKILLed 3 s in (the
replacement adopts the replicas). Prints calls completed, failed calls, the longest gap
between two completions (the pause a caller sees) and the time until the replacement
controller reports the service healthy.

    .venv/bin/python bench/controller_failover.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time

from monarch.actor import endpoint

from forge.controller import ForgeActor


class Work(ForgeActor):
    @endpoint
    async def work(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return os.getpid()


async def load(service, seconds: float, kill_after_s: float | None) -> dict:
    completions: list[float] = []
    failures: list[BaseException] = []
    stop = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < stop:
            try:
                await service.work.route(0.01)
                completions.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - every failure is what this bench counts
                failures.append(e)

    started = time.monotonic()
    callers = [asyncio.ensure_future(caller()) for _ in range(8)]
    replaced_s = None
    if kill_after_s is not None:
        await asyncio.sleep(kill_after_s)
        old = await service.statistics()
        killed_at = time.monotonic()
        os.kill(old.controller_pid, signal.SIGKILL)
        while replaced_s is None:
            stats = await service.statistics()
            if stats.controller_incarnation > old.controller_incarnation and stats.num_healthy == 2:
                replaced_s = time.monotonic() - killed_at
            await asyncio.sleep(0.05)
    await asyncio.gather(*callers)
    times = [started, *sorted(completions)]
    return {"completed": len(completions), "failed": len(failures),
            "max_gap_s": max(b - a for a, b in zip(times, times[1:])), "replaced_s": replaced_s}


async def main(seconds: float) -> None:
    service = await Work.options(num_replicas=2).as_service()
    try:
        await load(service, 1.0, None)  # warm up
        baseline = await load(service, seconds, None)
        fault = await load(service, seconds, kill_after_s=3.0)
    finally:
        await service.shutdown()
    print(f"\n8 callers, 10 ms calls, 2 replicas, {seconds:.0f} s per measurement\n")
    print("| metric | no fault | controller SIGKILLed | ratio |")
    print("|---|---|---|---|")
    print(f"| calls completed | {baseline['completed']} | {fault['completed']} | "
          f"{fault['completed'] / baseline['completed']:.2f}x |")
    print(f"| failed calls | {baseline['failed']} | {fault['failed']} | — |")
    print(f"| longest pause between completions (s) | {baseline['max_gap_s']:.3f} | {fault['max_gap_s']:.3f} | "
          f"{fault['max_gap_s'] / baseline['max_gap_s']:.1f}x |")
    print(f"| kill → replacement controller serving (s) | — | {fault['replaced_s']:.2f} | — |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main(args.seconds))
