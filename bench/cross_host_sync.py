"""Weight sync between hosts: chunked pull into the host's store vs one Monarch message.

Two simulated hosts (Monarch ProcessJob workers on this machine, a Forge host pool): a
publisher on host ``train-0`` publishes an fp32 state dict to its host's weight store; a
generator on host ``gen-0`` gets it into its own preallocated weights, two ways, same run:

* message — the state dict as the result of one Monarch endpoint call (what a naive
            implementation does), then copied into the weights;
* pull    — ``WeightStore.fetch``: 64 MB chunks through Monarch, 4 in flight, into the
            generator host's shared memory, then mapped and copied (what ``Policy.update_weights``
            does for a generator on another host; other replicas on that host then read it
            from shared memory without another transfer).

On one machine both paths cross a local socket, so this measures Forge's protocol overhead,
not a network.

    .venv/bin/python bench/cross_host_sync.py [--sizes 10 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import torch
from monarch.actor import endpoint

from forge.controller import ForgeActor, init_hosts
from forge.weights import WeightStore

CHUNK = 4 * 1024 * 1024


class Publisher(ForgeActor):
    def __init__(self, store: str) -> None:
        self.store = WeightStore(store)
        self.state: dict[str, torch.Tensor] = {}

    @endpoint
    async def publish(self, num_params: int, version: int) -> dict[str, int]:
        sizes = [CHUNK] * (num_params // CHUNK) + ([num_params % CHUNK] if num_params % CHUNK else [])
        self.state = {f"layers.{i}.weight": torch.randn(n) for i, n in enumerate(sizes)}
        self.store.publish(self.state, version)
        return {k: v.numel() for k, v in self.state.items()}

    @endpoint
    async def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    @endpoint
    async def weights_size(self, version: int) -> int:
        return self.store.published_size(version)

    @endpoint
    async def weights_chunk(self, version: int, offset: int, length: int) -> bytes:
        return self.store.read_bytes(version, offset, length)

    async def __cleanup__(self, exc: object) -> None:
        self.store.close()


class Generator(ForgeActor):
    def __init__(self, store: str, chunk_mb: int) -> None:
        self.chunk_mb = chunk_mb
        self.store = WeightStore(store)
        self.weights: dict[str, torch.Tensor] = {}

    @endpoint
    async def allocate(self, shapes: dict[str, int]) -> None:
        self.weights = {k: torch.zeros(n) for k, n in shapes.items()}

    @endpoint
    async def via_message(self, source: object) -> float:
        started = time.perf_counter()
        state = await source.state_dict.call_one()
        for key, value in state.items():
            self.weights[key].copy_(value)
        return time.perf_counter() - started

    @endpoint
    async def via_pull(self, version: int, source: object) -> float:
        started = time.perf_counter()
        await self.store.fetch(version, source, chunk_bytes=self.chunk_mb << 20)
        with self.store.open(version) as published:
            for key, value in published.items():
                self.weights[key].copy_(value)
        return time.perf_counter() - started

    @endpoint
    async def checksum(self) -> float:
        return float(sum(w.sum() for w in self.weights.values()))

    async def __cleanup__(self, exc: object) -> None:
        self.store.close()


async def main(sizes_m: list[int], repeats: int, chunk_mb: int) -> None:
    pool = await init_hosts({"source": "process_job", "groups": {"train": 1, "gen": 1}})
    store = f"bench-{uuid.uuid4().hex[:8]}"
    rows = []
    try:
        publisher = await Publisher.options(host_group="train").as_actor(store)
        generator = await Generator.options(host_group="gen").as_actor(store, chunk_mb)
        version = 0
        for size_m in sizes_m:
            num_params = size_m * 1_000_000
            message_s, pull_s = [], []
            for _ in range(repeats):
                version += 1
                shapes = await publisher.publish.call_one(num_params, version)
                await generator.allocate.call_one(shapes)
                message_s.append(await generator.via_message.call_one(publisher))
                expected = await generator.checksum.call_one()
                await generator.allocate.call_one(shapes)
                pull_s.append(await generator.via_pull.call_one(version, publisher))
                assert abs(await generator.checksum.call_one() - expected) < 1e-3 * max(1.0, abs(expected))
            rows.append((size_m, 4 * num_params / 1e6, statistics.median(message_s), statistics.median(pull_s)))
        await Generator.shutdown(generator)
        await Publisher.shutdown(publisher)
    finally:
        await pool.shutdown()
    print(f"\ncross-host weight sync, 2 simulated hosts, {chunk_mb} MB chunks, median of {repeats}")
    print(f"{'params':>8} {'MB':>7} {'message s':>10} {'pull s':>8} {'pull/message':>13} {'pull GB/s':>10}")
    for size_m, mb, message, pull in rows:
        print(f"{size_m:>7}M {mb:>7.0f} {message:>10.3f} {pull:>8.3f} {pull / message:>12.2f}x {mb / 1e3 / pull:>10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="millions of fp32 parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mb", type=int, default=64, help="pull chunk size (Policy uses 64)")
    args = parser.parse_args()
    asyncio.run(main(args.sizes, args.repeats, args.chunk_mb))
