"""Actor classes shared by the actor tests (importable by the spawned processes)."""

from __future__ import annotations

import asyncio
import os

from monarch.actor import concurrent_endpoint, endpoint

from forge.controller import ForgeActor, replay_on_rebuild


class Worker(ForgeActor):
    """Knows who it is, can fail on purpose, can hang, can be slow."""

    def __init__(self, fail_init_if_exists: str | None = None) -> None:
        if fail_init_if_exists and os.path.exists(fail_init_if_exists):
            raise RuntimeError(f"refusing to start: {fail_init_if_exists} exists")
        self.is_set_up = False
        self.calls = 0
        self.weights_version = 0
        self.tunings: list[str] = []

    @endpoint
    async def setup(self) -> None:
        self.is_set_up = True

    @endpoint
    async def whoami(self) -> dict:
        self.calls += 1
        return {
            "replica": int(os.environ["FORGE_REPLICA_ID"]) if "FORGE_REPLICA_ID" in os.environ else None,
            "pid": os.getpid(),
            "rank": int(os.environ["RANK"]),
            "world_size": int(os.environ["WORLD_SIZE"]),
            "master_port": os.environ["MASTER_PORT"],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "is_set_up": self.is_set_up,
            "weights_version": self.weights_version,
            "tunings": self.tunings,
        }

    @replay_on_rebuild
    @endpoint
    async def load_weights(self, version: int, seconds: float = 0.0) -> int:
        await asyncio.sleep(seconds)
        self.weights_version = version
        return version

    @endpoint
    @replay_on_rebuild  # either order
    async def tune(self, knob: str) -> None:
        self.tunings.append(knob)

    @endpoint
    async def note(self, text: str) -> None:  # not replayed
        self.tunings.append(text)

    @endpoint
    async def work(self, x: int, seconds: float = 0.01) -> tuple[int, int]:
        await asyncio.sleep(seconds)
        return x, os.getpid()

    @endpoint
    async def fail(self, message: str) -> None:
        raise KeyError(message)

    @endpoint
    async def fail_on_replica(self, replica: int) -> int:
        me = int(os.environ["FORGE_REPLICA_ID"])
        if me == replica:
            raise ValueError(f"replica {me} refuses")
        return me

    @endpoint
    async def hang(self) -> None:
        await asyncio.sleep(3600)

    @endpoint
    async def die(self) -> None:
        os._exit(3)  # a request that crashes whatever process runs it


class Gauge(ForgeActor):
    """Counts how many calls run at once (its endpoint interleaves)."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0

    @concurrent_endpoint
    async def hold(self, seconds: float) -> int:
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(seconds)
        self.running -= 1
        return self.most

    @endpoint
    async def peak(self) -> int:
        return self.most


class Caller(ForgeActor):
    """Uses a service handle it was given, from inside its own process."""

    def __init__(self) -> None:
        self.held = None

    @endpoint
    async def hold(self, service) -> None:
        """Keep a handle (and use it once, so this process knows the service's replicas)."""
        self.held = service
        await service.whoami.route()

    @endpoint
    async def use_held(self) -> list[int]:
        return [(await self.held.whoami.route())["replica"] for _ in range(4)]

    @endpoint
    async def use(self, service) -> dict:
        routed = [(await service.whoami.route())["replica"] for _ in range(4)]
        async with service.session():
            pinned = {(await service.whoami.route())["replica"] for _ in range(4)}
        everyone = [r["replica"] for r in await service.whoami.fanout()]
        return {"routed": routed, "pinned": sorted(pinned), "fanout": everyone, "pid": os.getpid()}


class Tally(ForgeActor):
    """A light actor (for co-location): adds numbers up; its ``__cleanup__`` can leave a marker file."""

    def __init__(self, cleanup_marker: str | None = None) -> None:
        self.total = 0
        self.cleanup_marker = cleanup_marker

    @endpoint
    async def add(self, n: int) -> tuple[int, int]:
        self.total += n
        return self.total, os.getpid()

    async def __cleanup__(self, exc) -> None:
        if self.cleanup_marker:
            with open(self.cleanup_marker, "w") as f:
                f.write(str(self.total))
