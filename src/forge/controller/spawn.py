"""Spawning and stopping: what ``ForgeActor.as_actor``, ``as_service`` and ``shutdown`` do.

``spawn_actor`` puts one actor mesh on the processes of a ``ProcGroup`` — the one of
``options(on=...)``, or a private group that spawns processes for this actor alone (on
this host or a host pool) — waits for every rank and runs ``setup``; ``spawn_service``
starts a service controller (owned here by a ``_ServiceOwner``, which also replaces it
when it dies) and returns a ``ServiceHandle``;
``stop`` stops either. What was spawned for an actor is kept per process
(``_actor_resources``), so ``actor_alive`` and ``actor_pids`` answer without a message.

Imports flow one way: ``forge.controller.actor`` (the class) imports this module, and
this module imports the service layer; neither imports the class module.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from monarch._src.actor.actor_mesh import ActorMesh
from monarch.actor import this_host

from forge.controller.actor_mesh import ForgeActorMesh
from forge.controller.colocation import Processes, ProcGroup
from forge.controller.endpoints import (
    PING,
    RESERVED_SERVICE_NAMES,
    caller_checks,
    endpoints_of,
    replayed_endpoints,
    start_mesh,
    user_endpoints,
)
from forge.controller.errors import ForgeUsageError, ReplicaFailed
from forge.controller.hosts import current_pool, supervision_env
from forge.controller.provisioner import CONTROLLER_ENV, ensure_runtime, gpu_allocator, spawn_proc_mesh, stop_quietly
from forge.controller.service.controller import CONTROLLER_OF_ENV, ServiceController, ServiceSpec
from forge.controller.service.handle import ServiceHandle
from forge.util.procs import kill_tagged, pid_alive

logger = logging.getLogger("forge.controller")

_actor_counter = itertools.count()

# Monarch 0.7 refuses to spawn an actor on a ProcMesh where an actor has failed (a
# supervision event); its other actors keep running. A stopped actor does not count.
_REFUSED_AFTER_A_FAILURE = "Cannot spawn new actors on mesh with supervision events"


def check_before_spawn(cls: Any, args: tuple, kwargs: dict) -> None:
    """Checks that must pass before any process is spawned, then the runtime setup."""
    base = cls._forge_base or cls
    clashes = sorted(n for n in endpoints_of(base) if hasattr(ActorMesh, n))
    if clashes:
        raise ValueError(
            f"{base.__name__} has endpoint(s) {clashes} whose names Monarch's ActorMesh uses itself; rename them"
        )
    base.validate_arguments(*args, **kwargs)
    ensure_runtime()


def _prepare(cls: Any, args: tuple, kwargs: dict, adverb: str) -> tuple[type, str, Any, str]:
    """The checks before spawning; (base class, "Cls.adverb()", host request or None, mesh name)."""
    base = cls._forge_base or cls
    check_before_spawn(cls, args, kwargs)
    what = f"{base.__name__}.{adverb}()"
    return base, what, host_request(cls, what), f"{base.__name__}_{next(_actor_counter)}"


def host_request(cls: Any, what: str) -> Any:
    """Where on the host pool this class's replicas go, or None for this host."""
    p = cls._forge_placement
    if p.host_group is None and p.hosts is None:
        return None
    pool = current_pool()
    if pool is None:
        if p.host_group is None and p.hosts == 1:
            return None  # one host, and this is the only one there is
        raise ValueError(
            f"{what}: hosts={p.hosts}, host_group={p.host_group!r} needs a host pool: call "
            "`await forge.controller.init_hosts(...)` first, or leave hosts and host_group unset "
            "to run on this host"
        )
    return pool.request(p.host_group, p.hosts, p.procs, p.with_gpus, what)


async def spawn_actor(cls: Any, args: tuple, kwargs: dict) -> ForgeActorMesh:
    """``cls.as_actor(*args, **kwargs)``: see ``ForgeActor.as_actor``."""
    placement = cls._forge_placement
    if placement.num_replicas != 1:
        raise ValueError(
            f"{(cls._forge_base or cls).__name__}.as_actor() spawns one actor mesh, but num_replicas="
            f"{placement.num_replicas}; use as_service() for replicas"
        )
    base, what, request, name = _prepare(cls, args, kwargs, "as_actor")
    group = placement.on or ProcGroup(name)  # a private group's processes stop with its one actor
    res = _ActorResources(group=group, procs=await group.join(placement, request, what))
    try:
        res.actors = ForgeActorMesh.wrap(res.procs.proc_mesh.spawn(name, base, *args, **kwargs))
        res.pids = await start_mesh(res.actors, "setup" in endpoints_of(base),
                                    cls._forge_service_options.spawn_timeout_s, what)
    except BaseException as e:
        await res.release()
        if placement.on is not None and isinstance(e, ReplicaFailed) and _REFUSED_AFTER_A_FAILURE in str(e):
            raise ReplicaFailed(
                f"{what}: an actor on {placement.on!r} has failed (e.g. raised in __init__), and Monarch spawns "
                "no more actors on processes where one failed; its other actors keep running. Shut them down (or "
                f"call group.stop()) so the next as_actor() gets fresh processes. Monarch: {str(e)[:300]}"
            ) from None
        raise
    res.procs.pids = res.procs.pids or res.pids
    _actor_resources[id(res.actors)] = res  # res holds the actors, which keeps the id unique
    if res.procs.pool is not None:  # the pool's shutdown stops it first, if the user has not
        res.procs.pool.track(res, functools.partial(stop, cls, res.actors))
    return res.actors


async def spawn_service(cls: Any, args: tuple, kwargs: dict) -> ServiceHandle:
    """``cls.as_service(*args, **kwargs)``: see ``ForgeActor.as_service``."""
    base = cls._forge_base or cls
    endpoints = user_endpoints(base)
    clashes = sorted(set(endpoints) & RESERVED_SERVICE_NAMES)
    if clashes:
        raise ValueError(
            f"{base.__name__} has endpoint(s) {clashes} whose names a service handle uses "
            f"itself ({sorted(RESERVED_SERVICE_NAMES)}); rename them"
        )
    if cls._forge_placement.on is not None:
        raise ValueError(
            f"{base.__name__}.as_service(): option 'on' ({cls._forge_placement.on!r}) co-locates actors from "
            "as_actor(); a service's replicas each get their own processes (and are rebuilt on their own). "
            "Drop on=, or spawn the actor with as_actor()"
        )
    base, what, request, name = _prepare(cls, args, kwargs, "as_service")
    placement, options = cls._forge_placement, cls._forge_service_options
    gpus = _service_gpus(placement, what) if placement.with_gpus and request is None else None
    spec = ServiceSpec(name=name, actor_class=base, args=args, kwargs=kwargs, placement=placement, options=options,
                       gpus_per_replica=gpus, has_setup="setup" in endpoints, hosts=request,
                       service_id=uuid.uuid4().hex)
    owner = _ServiceOwner(spec, gpus)
    try:
        controller, membership = await owner.start_controller()
    except BaseException as e:
        await owner.stop()
        if type(e).__name__ == "ActorError" and getattr(e, "exception", None) is not None:
            raise e.exception from None
        raise
    handle = ServiceHandle(
        name, spec.service_id, endpoints, placement, options, controller, membership, owner,
        replayed=replayed_endpoints(base), checks=caller_checks(base),
    )
    handle._client().watch_as_owner(owner)  # replaces the controller if it dies
    if request is not None:  # the pool's shutdown stops it first, if the user has not
        owner.pool = current_pool()
        owner.pool.track(owner, handle.shutdown)
    return handle


def _service_gpus(placement: Any, what: str) -> tuple[tuple[str, ...], ...]:
    """The GPUs of each replica of a service on this host (``procs`` per replica)."""
    flat = gpu_allocator.allocate(placement.procs * placement.num_replicas, what)
    return tuple(tuple(flat[i * placement.procs:(i + 1) * placement.procs]) for i in range(placement.num_replicas))


async def stop(cls: Any, actor: Any) -> None:
    """``cls.shutdown(actor)``: stop an actor from ``as_actor`` or a service from ``as_service``.

    An actor on a ``ProcGroup`` shared with others is stopped on its own (its actor mesh);
    the group's processes stop with its last actor.
    """
    if isinstance(actor, ServiceHandle):
        await actor.shutdown()
        return
    resources = _actor_resources.pop(id(actor), None)
    if resources is None:
        raise ForgeUsageError(
            f"{cls.__name__}.shutdown() got {actor!r}, which is not an actor this process "
            "spawned with as_actor() (or it was shut down already)"
        )
    await resources.release(graceful=True)


async def actor_alive(actor: Any) -> bool:
    """Whether every process of an actor from ``as_actor`` is still running (on any host).

    Unlike a call, this does not wait behind the actor's current message, so a watchdog
    can tell a busy actor from a dead one.
    """
    resources = _actor_resources.get(id(actor))
    if resources is None:
        raise ForgeUsageError(f"actor_alive() got {actor!r}, which is not a running actor from as_actor()")
    procs = resources.procs
    if procs is None or procs.stopping:  # e.g. its ProcGroup was stopped
        return False
    if procs.placement is not None:
        procs.pool.check()  # a dead registry is not the actor's death: HostRegistryLost names it
        call = procs.request.registry.alive.call_one(procs.placement, list(resources.pids))
        try:
            return await asyncio.wait_for(call, 30)  # a registry silent this long raises TimeoutError
        except asyncio.TimeoutError:
            raise
        except Exception:  # the registry is gone: the pool is shutting down, or it died
            procs.pool.check()
            return False
    return all(pid_alive(p) for p in resources.pids)


async def actor_answers(actor: Any, timeout_s: float = 2.0) -> bool:
    """Whether every rank of an actor from ``as_actor`` answers a ping within ``timeout_s``.

    The ping waits behind the actor's current message, so ``False`` means hung, stopped,
    dead — or busy with a call longer than ``timeout_s``: a diagnosis for a stalled run,
    not a health check.
    """
    if id(actor) not in _actor_resources:
        raise ForgeUsageError(f"actor_answers() got {actor!r}, which is not a running actor from as_actor()")
    try:
        await asyncio.wait_for(getattr(actor, PING).call(), timeout_s)
        return True
    except asyncio.TimeoutError:
        return False
    except Exception:  # its process is gone
        return False


def actor_pids(actor: Any) -> tuple[int, ...]:
    """The pids of an actor's processes (from ``as_actor``), one per rank, without a message."""
    resources = _actor_resources.get(id(actor))
    if resources is None:
        raise ForgeUsageError(f"actor_pids() got {actor!r}, which is not a running actor from as_actor()")
    return resources.pids


@dataclass
class _ActorResources:
    """One actor from ``as_actor``: its actor mesh and the group processes it holds a reference to."""

    group: ProcGroup
    procs: Processes | None  # None once released
    actors: Any = None
    pids: tuple[int, ...] = ()

    async def release(self, graceful: bool = False) -> None:
        """Give the processes back; while other actors keep them up, stop this actor's mesh alone."""
        procs, self.procs = self.procs, None
        if procs is None:
            return
        if procs.pool is not None:
            procs.pool.untrack(self)
        if await self.group.leave(procs, graceful) and self.actors is not None:
            try:  # Monarch stops the actor mesh (runs its __cleanup__) and leaves its processes up
                await asyncio.wait_for(self.actors.stop(), 30)
            except Exception as e:  # noqa: BLE001 - it broke or its processes died: it is gone either way
                logger.info("stopping actor mesh %r on %r: %s", self.actors, self.group, e)


# id(ActorMesh) -> what as_actor spawned for it, for actors alive in this process.
_actor_resources: dict[int, _ActorResources] = {}


class _ServiceOwner:
    """What only the creating process holds of a service: the controller's processes and GPUs.

    It also replaces a dead (or hung) controller: the next incarnation adopts the replicas
    the creating process last saw serving (see ``ServiceController``).
    """

    def __init__(self, spec: Any, gpus: Any) -> None:
        self.spec = spec
        self.proc_mesh: Any = None
        self.controller_pid = 0
        self.incarnation = 0
        self.pool: Any = None  # the host pool its replicas run on
        self._gpus = [d for replica in gpus for d in replica] if gpus else []
        request = spec.hosts
        self._env = {**CONTROLLER_ENV, CONTROLLER_OF_ENV: spec.service_id,
                     **(supervision_env(request.failure_timeout_s) if request else {})}

    def controller_alive(self) -> bool:
        return self.controller_pid == 0 or pid_alive(self.controller_pid)

    async def start_controller(self, adopted: Any = None, replays: tuple = ()) -> tuple[Any, Any]:
        """Spawn a controller (the next incarnation when ``adopted`` is given); (controller, membership)."""
        name = f"{self.spec.name}_controller_{self.incarnation}"
        self.proc_mesh = spawn_proc_mesh(this_host(), 1, [self._env], name=name)
        controller = self.proc_mesh.spawn(name, ServiceController, self.spec, self.incarnation)
        # Starting runs every replica's spawn and setup (bounded by spawn_timeout_s) at once.
        bound = self.spec.options.spawn_timeout_s + 60
        try:
            membership = await asyncio.wait_for(controller.start.choose(controller, adopted, replays), bound)
        except asyncio.TimeoutError:
            raise TimeoutError(f"service {self.spec.name!r}: its controller did not start within {bound:.0f} s "
                               "(spawn_timeout_s + 60)") from None
        self.controller_pid = membership.controller_pid
        return controller, membership

    async def replace_controller(self, membership: Any, replays: tuple) -> tuple[Any, Any]:
        """Kill the current controller (dead or hung) and start the next one, adopting ``membership``."""
        old_mesh, old_pid = self.proc_mesh, self.controller_pid
        if old_pid:  # a hung controller; a pid that is no longer it is left alone
            kill_tagged([old_pid], CONTROLLER_OF_ENV, self.spec.service_id)
        if old_mesh is not None:
            await stop_quietly(old_mesh, 5.0)
        self.incarnation += 1
        logger.warning("service %s: its controller (pid %d) is gone; starting controller %d to take over",
                       self.spec.name, old_pid, self.incarnation)
        return await self.start_controller(membership, replays)

    async def stop(self) -> None:
        if self.pool is not None:
            self.pool.untrack(self)
        if self.proc_mesh is not None:
            mesh, self.proc_mesh = self.proc_mesh, None
            await stop_quietly(mesh)
        if self._gpus:
            gpu_allocator.release(self._gpus)
            self._gpus = []
