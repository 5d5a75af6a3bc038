"""``Slot``: one healthy replica generation as one calling process sees it.

It holds the replica's concurrency limit (``free_capacity``, with a FIFO queue of the
calls waiting for capacity), its load for the router, the tasks awaiting its replies
(cancelled when the replica leaves the service, so their calls are re-sent), and the
request counters and latencies that ``statistics()`` reports, which carry over to the
replica's next generation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

from forge.controller.service.routers import ReplicaLoad
from forge.controller.service.types import ReplicaRef

_LATENCY_WINDOW = 2048


class Slot:
    """One healthy replica generation as this process sees it."""

    def __init__(self, ref: ReplicaRef, max_concurrent: int, history: "Slot | None") -> None:
        self.ref = ref
        self.load = ReplicaLoad(ref.replica_id, 0, 0)
        self.free_capacity = max_concurrent  # calls this replica may still be sent now
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.callers: set[asyncio.Task] = set()  # tasks awaiting a reply from this replica
        self.evicted: set[asyncio.Task] = set()  # callers that leave() cancelled
        self.is_gone = False
        self._quiet: asyncio.Event | None = None  # set when no call is in flight or queued (see quiet())
        self._endpoints: dict[str, Any] = {}
        self.completed = history.completed if history else 0
        self.failed = history.failed if history else 0
        self.latencies_s: collections.deque[float] = (
            history.latencies_s if history else collections.deque(maxlen=_LATENCY_WINDOW)
        )

    def endpoint(self, name: str) -> Any:
        ep = self._endpoints.get(name)
        if ep is None:
            ep = self._endpoints[name] = getattr(self.ref.actors, name)
        return ep

    async def wait_for_capacity(self) -> None:
        """Queue until a call to this replica finishes (FIFO); capacity is handed over."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.load.queued += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release_capacity()  # handed over just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # release_capacity may have skipped it already
                    self.waiters.remove(waiter)
            raise
        finally:
            self.load.queued -= 1
            self._notify_if_quiet()

    def begin_call(self, caller: asyncio.Task) -> None:
        self.load.in_flight += 1
        self.callers.add(caller)

    def end_call(self, caller: asyncio.Task) -> None:
        self.callers.discard(caller)
        self.load.in_flight -= 1
        self._notify_if_quiet()

    def _notify_if_quiet(self) -> None:
        if self._quiet is not None and not self.load.in_flight and not self.load.queued:
            self._quiet.set()

    async def quiet(self, timeout_s: float) -> bool:
        """Wait until none of this process's calls is in flight or queued to this replica;
        False when that took longer than ``timeout_s``."""
        if self._quiet is None:
            self._quiet = asyncio.Event()

        async def until_quiet() -> None:
            while self.load.in_flight or self.load.queued:
                self._quiet.clear()
                await self._quiet.wait()

        try:
            await asyncio.wait_for(until_quiet(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def release_capacity(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free_capacity += 1

    def leave(self) -> None:
        """The replica left the service: cancel calls still waiting on it (they are resent)."""
        self.is_gone = True
        current = asyncio.current_task()  # a caller that found the failure itself is not cancelled
        self.evicted = {c for c in self.callers if c is not current}
        for caller in self.evicted:
            caller.cancel()
        for waiter in self.waiters:  # queued calls go on to find another replica
            if not waiter.done():
                waiter.set_result(None)
