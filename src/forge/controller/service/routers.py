"""Routers: which healthy replica takes the next ``route()`` call.

A router is a small class with one method, ``choose(replicas, key)``. It sees a
snapshot of the healthy replicas with their load in the calling process and a routing
key (the calling asyncio task), and returns one of them. It runs on the caller's hot
path, so it must be cheap and must not block. Routers hold no Monarch or torch state,
so they are unit-testable on their own and travel with a pickled service handle.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass(eq=False)
class ReplicaLoad:
    """What a router sees of one healthy replica."""

    replica_id: int
    in_flight: int  # calls sent and not yet answered, from this process
    queued: int  # calls waiting for the replica's concurrency limit, from this process


class Router:
    """Base class of routers. Subclass and implement ``choose``."""

    def choose(self, replicas: Sequence[ReplicaLoad], key: Any) -> ReplicaLoad:
        """Return one of ``replicas`` (never empty) for a call made by ``key``."""
        raise NotImplementedError


class RoundRobinRouter(Router):
    """Each call goes to the next replica in turn (the default)."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, replicas: Sequence[ReplicaLoad], key: Any) -> ReplicaLoad:
        replica = replicas[self._next % len(replicas)]
        self._next += 1
        return replica


class LeastLoadedRouter(Router):
    """The replica with the fewest calls in flight plus queued; ties go round robin."""

    def __init__(self) -> None:
        self._tie_break = 0

    def choose(self, replicas: Sequence[ReplicaLoad], key: Any) -> ReplicaLoad:
        lowest = min(r.in_flight + r.queued for r in replicas)
        candidates = [r for r in replicas if r.in_flight + r.queued == lowest]
        replica = candidates[self._tie_break % len(candidates)]
        self._tie_break += 1
        return replica


class StickyRouter(Router):
    """Every calling task keeps the replica it was first given, as long as that is healthy.

    An implicit session per asyncio task: useful when each task is one conversation.
    New tasks are spread least-loaded.
    """

    def __init__(self) -> None:
        self._pins: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
        self._fallback = LeastLoadedRouter()

    def choose(self, replicas: Sequence[ReplicaLoad], key: Any) -> ReplicaLoad:
        pinned = self._pins.get(key) if key is not None else None
        for replica in replicas:
            if replica.replica_id == pinned:
                return replica
        replica = self._fallback.choose(replicas, key)
        if key is not None:
            self._pins[key] = replica.replica_id
        return replica


ROUTERS: dict[str, type[Router]] = {
    "round_robin": RoundRobinRouter,
    "least_loaded": LeastLoadedRouter,
    "sticky": StickyRouter,
}


def make_router_factory(spec: Any) -> Callable[[], Router]:
    """Turn the ``router=`` option (a name, a Router subclass or an instance) into a factory.

    Every process that uses a service handle builds its own router from the factory,
    so an instance given here is copied, never shared between processes.
    """
    if isinstance(spec, str):
        if spec not in ROUTERS:
            raise ValueError(
                f"option 'router'={spec!r} is not a known router; use one of "
                f"{sorted(ROUTERS)}, a Router subclass or a Router instance"
            )
        return ROUTERS[spec]
    if isinstance(spec, type) and issubclass(spec, Router):
        return spec
    if isinstance(spec, Router):
        import copy

        return lambda: copy.deepcopy(spec)
    raise ValueError(
        f"option 'router' must be one of {sorted(ROUTERS)}, a Router subclass or a Router "
        f"instance, got {spec!r}"
    )
