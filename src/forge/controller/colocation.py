"""``ProcGroup``: several actors from ``as_actor()`` sharing one set of processes.

Every process Forge spawns costs a Python interpreter, Monarch and usually torch — a few
hundred MB and a second or more to start. Light actors (a dataset, a replay buffer, a
reward function) need little more than a mailbox, so on a small machine they can share::

    light = ProcGroup("light")                         # nothing is spawned yet
    data = await DatasetActor.options(on=light).as_actor()
    buffer = await ReplayBuffer.options(on=light).as_actor()  # same processes

The first ``as_actor()`` on a group spawns its processes with that actor's placement
(``procs``, ``with_gpus``, ``hosts``, ``host_group``); a later one must ask for the same
placement, else ``ValueError`` before anything is spawned. Each actor holds a reference:
``Cls.shutdown(actor)`` stops that actor only (Monarch stops its actor mesh and runs its
``__cleanup__``), the last one stops the processes, and ``group.stop()`` stops them at
once. After the processes stopped, the next ``as_actor()`` on the group spawns new ones.

An actor spawned without ``on=`` gets a private group of its own, so there is one code
path for an actor's processes (here GPUs or a host-pool placement are held and given back).

Sharing processes shares their fate and environment: an actor that crashes its process
takes its neighbours down, they share the interpreter (a busy actor slows the others),
and they see the same ``RANK``, ``MASTER_PORT`` and ``CUDA_VISIBLE_DEVICES`` — two actors
that each start ``torch.distributed`` do not belong in one group. And Monarch (0.7) spawns
no more actors on processes where an actor has failed (raised in ``__init__``, crashed):
the group's other actors keep running, but a new ``as_actor()`` on it raises
``ReplicaFailed`` until they are shut down (or ``group.stop()``) and fresh processes spawn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from monarch.actor import this_host

from forge.controller.hosts import (
    current_pool,
    place,
    placement_alive,
    release_placement,
    spawn_placed,
    wait_for_returns,
)
from forge.controller.provisioner import gpu_allocator, rank_env, spawn_proc_mesh, stop_quietly
from forge.util.tasks import Nursery

logger = logging.getLogger("forge.controller")

_PLACEMENT_KEYS = ("procs", "with_gpus", "hosts", "host_group")

# Stops processes whose last waiter was cancelled while they were being spawned.
_background = Nursery("process groups")


def _describe(key: tuple) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in zip(_PLACEMENT_KEYS, key))


@dataclass(eq=False)
class Processes:
    """One incarnation of a group's processes: the proc mesh and its GPUs here or its host placement."""

    key: tuple  # the placement they were spawned with (see _PLACEMENT_KEYS)
    proc_mesh: Any = None
    gpus: list[str] | None = None
    request: Any = None  # HostRequest when they run on the host pool
    placement: Any = None
    pool: Any = None
    pids: tuple[int, ...] = ()  # known once an actor answered; what is killed when a stop fails
    users: int = 0  # actors running on them
    _stopping: asyncio.Future | None = None

    @property
    def stopping(self) -> bool:
        return self._stopping is not None

    async def stop(self, graceful: bool) -> None:
        """Stop the processes and give their GPUs or placement back; every caller awaits the one stop.

        ``graceful``: a stop Monarch does not finish within 30 s raises ``TimeoutError``
        (the ranks are then killed through the host pool, or left to die with their
        parent); otherwise a broken mesh is stopped quietly.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(graceful))
        await asyncio.shield(self._stopping)

    async def _stop(self, graceful: bool) -> None:
        stopped = False
        try:
            if self.placement is not None and self.proc_mesh is not None:
                if await placement_alive(self.request, self.placement) is False:
                    await wait_for_returns(time.monotonic(), self.request.failure_timeout_s)
            if self.proc_mesh is None:
                stopped = True
            elif graceful:
                await asyncio.wait_for(self.proc_mesh.stop(), 30)
                stopped = True
            else:
                stopped = await stop_quietly(self.proc_mesh)
        finally:
            if self.placement is not None:
                await release_placement(self.request, self.placement, () if stopped else self.pids)
            if self.gpus:
                gpu_allocator.release(self.gpus)
            self.proc_mesh = self.placement = self.gpus = None


async def _spawn(key: tuple, request: Any, name: str, what: str) -> Processes:
    """Spawn ``procs`` processes with their GPUs here, or on a placement of the host pool (``request``)."""
    num_procs, with_gpus = key[0], key[1]
    procs = Processes(key, request=request)
    try:
        if request is not None:
            procs.placement = await place(request, what)
            procs.proc_mesh = spawn_placed(request, procs.placement, name)
            procs.pool = current_pool()
        else:
            procs.gpus = gpu_allocator.allocate(num_procs, what) if with_gpus else None
            procs.proc_mesh = spawn_proc_mesh(this_host(), num_procs, rank_env(num_procs, procs.gpus), name=name)
    except BaseException:
        await procs.stop(graceful=False)
        raise
    return procs


class ProcGroup:
    """Processes that actors from ``as_actor()`` share: ``Cls.options(on=group).as_actor()``.

    Nothing is spawned until the first actor; see the module docstring. Not picklable on
    purpose: a group belongs to the process that spawns its actors.
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"ProcGroup name must be a non-empty str (it names the processes), got {name!r}")
        self.name = name
        self._spawning: asyncio.Future[Processes] | None = None  # the current processes, spawned or on the way
        self._key: tuple = ()  # the placement of self._spawning
        self._waiters = 0  # as_actor() calls awaiting self._spawning

    def __repr__(self) -> str:
        current = self._current()
        if current is None:
            state = "no processes"
        elif not current.done():
            state = "spawning"
        else:
            procs = current.result()
            state = f"{_describe(procs.key)}, {procs.users} actor(s)"
        return f"ProcGroup({self.name!r}: {state})"

    def __reduce__(self) -> Any:
        raise TypeError(f"{self!r} cannot be sent to another process; a group is used by the process that "
                        "spawns its actors")

    def __copy__(self) -> "ProcGroup":
        return self  # a group is one set of processes: a copy of options still points at it

    def __deepcopy__(self, memo: dict) -> "ProcGroup":
        return self

    def _current(self) -> asyncio.Future[Processes] | None:
        """The processes being spawned or running; None once they failed to spawn or were stopped."""
        f = self._spawning
        if f is not None and f.done() and (f.cancelled() or f.exception() is not None or f.result().stopping):
            self._spawning = None
        return self._spawning

    def _is_current(self, procs: Processes) -> bool:
        f = self._current()
        return f is not None and f.done() and f.result() is procs

    async def join(self, placement: Any, request: Any, what: str) -> Processes:
        """The group's processes for one more actor, spawning them first if there are none.

        Concurrent first calls share one spawn, and all get its error if it fails (the
        next call then tries again). A placement other than the group's raises
        ``ValueError`` before anything is spawned. The caller owes one ``leave()``.
        """
        key = tuple(getattr(placement, name) for name in _PLACEMENT_KEYS)
        spawning = self._current()
        if spawning is None:
            spawning = self._spawning = asyncio.ensure_future(_spawn(key, request, self.name, what))
            self._key = key
        elif key != self._key:
            raise ValueError(
                f"{what}: ProcGroup {self.name!r} runs its actors with {_describe(self._key)}, but this one asks "
                f"for {_describe(key)}; every actor on a group must ask for the group's placement (or use "
                "another group)"
            )
        self._waiters += 1
        try:
            procs = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            _background.start(self._drop_if_unused(spawning))
            raise
        finally:
            self._waiters -= 1
        if procs.stopping:
            raise RuntimeError(f"{what}: {self!r} was stopped while its processes were being spawned")
        procs.users += 1
        return procs

    async def leave(self, procs: Processes, graceful: bool) -> bool:
        """One actor is done with ``procs``; stops them when it was the last. Whether they stay up."""
        procs.users -= 1
        if procs.users > 0 or (self._waiters and self._is_current(procs)):
            return not procs.stopping
        if self._is_current(procs):
            self._spawning = None
        await procs.stop(graceful)
        return False

    async def stop(self) -> None:
        """Stop the group's processes now, with whatever actors still run on them; idempotent.

        Those actors stop answering (``actor_alive`` says False; ``Cls.shutdown`` of them
        is still fine). The next ``as_actor()`` on the group spawns new processes.
        """
        spawning, self._spawning = self._spawning, None
        if spawning is None:
            return
        try:
            procs = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            spawning.add_done_callback(_stop_when_spawned)
            raise
        except Exception:  # they never came up: nothing to stop
            return
        await procs.stop(graceful=True)

    async def _drop_if_unused(self, spawning: asyncio.Future[Processes]) -> None:
        """After a cancelled ``join``: stop the processes if nobody came to use them."""
        try:
            procs = await spawning
        except BaseException:  # noqa: BLE001 - the waiters that are left got the error
            return
        if procs.users == 0 and self._waiters == 0 and self._spawning is spawning:
            self._spawning = None
            await procs.stop(graceful=False)


def _stop_when_spawned(spawning: asyncio.Future[Processes]) -> None:
    if not spawning.cancelled() and spawning.exception() is None:
        _background.start(spawning.result().stop(graceful=False))


__all__ = ["ProcGroup", "Processes"]
