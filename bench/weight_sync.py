"""Weight sync cost: shared-memory store vs plain memcpy vs a Monarch endpoint, same run.

For fp32 models of ~10M, ~100M and ~500M parameters (tensors of 4M elements, like the
larger matrices of a real checkpoint), measures on one host:

* memcpy   — ``dst.copy_(src)`` of the same bytes in one process (the floor);
* store    — trainer side ``WeightStore.publish`` + a generator *process* mapping the
             version and copying it into its own preallocated weights;
* endpoint — sending the state dict as an argument of a Monarch endpoint to that process,
             which copies it into its weights (what the store avoids).

    .venv/bin/python bench/weight_sync.py [--sizes 10 100 500]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import torch
from monarch.actor import endpoint

from forge.controller import ForgeActor
from forge.weights import WeightStore

CHUNK = 4 * 1024 * 1024


def make_state(num_params: int) -> dict[str, torch.Tensor]:
    sizes = [CHUNK] * (num_params // CHUNK) + ([num_params % CHUNK] if num_params % CHUNK else [])
    return {f"layers.{i}.weight": torch.randn(n) for i, n in enumerate(sizes)}


class Generator(ForgeActor):
    def __init__(self, store: str) -> None:
        self.store = WeightStore(store)
        self.weights: dict[str, torch.Tensor] = {}

    @endpoint
    async def allocate(self, shapes: dict[str, int]) -> None:
        self.weights = {k: torch.empty(n) for k, n in shapes.items()}
        for w in self.weights.values():
            w.zero_()  # touch the pages, like a loaded model

    @endpoint
    async def load_from_store(self, version: int) -> None:
        with self.store.open(version) as published:
            for key, value in published.items():
                self.weights[key].copy_(value)

    @endpoint
    async def load_from_argument(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.weights[key].copy_(value)

    @endpoint
    async def checksum(self) -> float:
        return float(sum(w.sum() for w in self.weights.values()))


async def measure(num_params: int, repeats: int) -> dict[str, float]:
    state = make_state(num_params)
    store_name = f"bench-{uuid.uuid4().hex[:8]}"
    store = WeightStore(store_name)
    generator = await Generator.as_actor(store_name)
    try:
        await generator.allocate.call_one({k: v.numel() for k, v in state.items()})
        dst = {k: torch.empty_like(v).zero_() for k, v in state.items()}
        best = {"memcpy": float("inf"), "store": float("inf"), "endpoint": float("inf")}
        for version in range(1, repeats + 1):
            t0 = time.perf_counter()
            for key, value in state.items():
                dst[key].copy_(value)
            best["memcpy"] = min(best["memcpy"], time.perf_counter() - t0)

            t0 = time.perf_counter()
            store.publish(state, version)
            await generator.load_from_store.call_one(version)
            best["store"] = min(best["store"], time.perf_counter() - t0)

            if num_params <= 200_000_000 or version == 1:
                t0 = time.perf_counter()
                await generator.load_from_argument.call_one(state)
                best["endpoint"] = min(best["endpoint"], time.perf_counter() - t0)
        expected = float(sum(v.sum() for v in state.values()))
        assert abs(await generator.checksum.call_one() - expected) <= 1e-3 * abs(expected) + 1
        return best
    finally:
        store.close()
        await Generator.shutdown(generator)


def main(sizes: list[int], repeats: int) -> None:
    rows = []
    for millions in sizes:
        best = asyncio.run(measure(millions * 1_000_000, repeats))
        rows.append((millions, best))
    print("\n| params | bytes | memcpy (s) | store push+load (s) | Monarch endpoint (s) | store / memcpy | endpoint / store |")
    print("|---|---|---|---|---|---|---|")
    for millions, best in rows:
        gb = millions * 4e6 / 1e9
        print(f"| {millions}M | {gb:.2f} GB | {best['memcpy']:.3f} | {best['store']:.3f} | {best['endpoint']:.3f} | "
              f"{best['store'] / best['memcpy']:.2f}x | {best['endpoint'] / best['store']:.1f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    main(args.sizes, args.repeats)
