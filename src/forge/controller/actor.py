"""``ForgeActor``: a Monarch ``Actor`` that can be spawned as one actor or as a service.

``Cls.options(...)`` returns a configured subclass (the original class is untouched) whose
``procs``, ``num_replicas``, ``with_gpus``, ``hosts`` and ``host_group`` attributes show the
placement; ``Cls.as_actor()`` / ``Cls.as_service()`` work on the class itself with the
defaults. ``as_actor`` spawns one ProcMesh with the actor on it and returns a
``ForgeActorMesh`` — Monarch's ActorMesh (``call_one``, ``choose``, ``call``,
``broadcast``, ``stream``) plus ``route()`` on a one-process actor; ``as_service`` spawns
a service controller that owns ``num_replicas`` replicas and returns a ``ServiceHandle``.

Two adaptations happen when a subclass is defined:

* Monarch refuses an actor whose endpoints mix ``def`` and ``async def``. A Forge actor
  may mix them: its sync endpoints are run as coroutines that never await, so each
  still runs to completion, one message at a time, with the actor's state — what a
  sync endpoint means.
* A ``_forge_ping`` endpoint (of the actor's kind) is added for health probes. It goes
  through the actor's mailbox, so a replica stuck in an endpoint does not answer it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from monarch._src.actor.endpoint import EndpointProperty
from monarch.actor import Actor, endpoint, this_host

from forge.controller.actor_mesh import ForgeActorMesh, caller_check
from forge.controller.errors import ForgeUsageError, ReplicaFailed
from forge.controller.hosts import (
    current_pool,
    pid_alive,
    place,
    release_placement,
    spawn_placed,
    placement_alive,
    supervision_env,
    wait_for_returns,
)
from forge.controller.options import PlacementOptions, ServiceOptions, parse_options
from forge.controller.provisioner import (
    CONTROLLER_ENV,
    ensure_runtime,
    gpu_allocator,
    rank_env,
    spawn_proc_mesh,
    stop_quietly,
)
from forge.util.failpoints import failpoint
from forge.util.reaper import kill_tagged

logger = logging.getLogger("forge.controller")

_PING = "_forge_ping"
_DRAIN = "_forge_drain_metrics"  # returns and resets the process's record_metric accumulators
_CONTROLLER = "_forge_controller"  # a service replica's current controller, for handles that lost theirs
_BUILT_IN = (_PING, _DRAIN, _CONTROLLER)
# Names a service handle or a Monarch ActorMesh uses itself; an endpoint may not take them.
_RESERVED_SERVICE_NAMES = {"session", "statistics", "shutdown"}
_actor_counter = itertools.count()


def _endpoints_of(cls: type) -> dict[str, EndpointProperty]:
    return {
        name: attr
        for name in dir(cls)
        if isinstance(attr := getattr(cls, name, None), EndpointProperty)
    }


def replay_on_rebuild(method: Any) -> Any:
    """Mark an endpoint whose latest ``fanout``/``rolling`` call sets replica state.

    A replica rebuilt after a failure starts from its constructor and ``setup``; before it
    serves again, the service controller sends it the latest fanned-out call of each
    marked endpoint (e.g. ``Policy.update_weights``, so a rebuilt generator does not serve
    the initial weights). Apply it above or below ``@endpoint``. Calls made with
    ``route()`` are not replayed.
    """
    target = method._method if isinstance(method, EndpointProperty) else method
    target._forge_replay_on_rebuild = True
    return method


def _replayed_endpoints(cls: type) -> tuple[str, ...]:
    return tuple(sorted(
        name for name, prop in _endpoints_of(cls).items() if getattr(prop._method, "_forge_replay_on_rebuild", False)
    ))


def _run_to_completion(method: Any) -> Any:
    @functools.wraps(method)
    async def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs)

    return run


def _adapt_endpoints(cls: type) -> None:
    """Make a mix of sync and async endpoints legal, and add the health-probe endpoint."""
    endpoints = {n: e for n, e in _endpoints_of(cls).items() if n not in _BUILT_IN}
    is_async = {n: inspect.iscoroutinefunction(e._method) for n, e in endpoints.items()}
    if any(is_async.values()) and not all(is_async.values()):
        for name, prop in endpoints.items():
            if not is_async[name]:
                setattr(
                    cls,
                    name,
                    EndpointProperty(
                        _run_to_completion(prop._method),
                        prop._propagator,
                        prop._explicit_response_port,
                        prop._instrument,
                    ),
                )
        cleanup = cls.__dict__.get("__cleanup__")
        if cleanup is not None and not inspect.iscoroutinefunction(cleanup):
            cls.__cleanup__ = _run_to_completion(cleanup)
    all_sync = bool(endpoints) and not any(is_async.values())
    from forge.observability.metrics import drain_local_metrics

    if all_sync:
        def ping(self: Any) -> int:
            return os.getpid()

        def controller(self: Any, update: Any = None) -> Any:
            return _current_controller(self, update)

        def drain(self: Any) -> dict:
            failpoint(f"{type(self).__name__}.drain_metrics")
            return drain_local_metrics()
    else:
        async def ping(self: Any) -> int:
            return os.getpid()

        async def controller(self: Any, update: Any = None) -> Any:
            return _current_controller(self, update)

        async def drain(self: Any) -> dict:
            failpoint(f"{type(self).__name__}.drain_metrics")
            return drain_local_metrics()
    for function, name in ((ping, _PING), (drain, _DRAIN), (controller, _CONTROLLER)):
        function.__name__ = function.__qualname__ = name
        setattr(cls, name, endpoint(function))


def _current_controller(actor: Any, update: Any) -> Any:
    """``(incarnation, controller)`` of the service this replica belongs to; ``update`` replaces it."""
    if update is not None:
        actor._forge_current_controller = update
    return getattr(actor, "_forge_current_controller", None)


_PLACEMENT_ATTRIBUTES = ("procs", "num_replicas", "with_gpus", "hosts", "host_group")


class ForgeActor(Actor):
    """Base class of Forge actors and services. See the module docstring."""

    _forge_placement: ClassVar[PlacementOptions]
    _forge_service_options: ClassVar[ServiceOptions]
    _forge_base: ClassVar[type | None] = None
    # The placement, readable as attributes (set by options(); these are the defaults).
    procs: ClassVar[int] = 1
    num_replicas: ClassVar[int] = 1
    with_gpus: ClassVar[bool] = False
    hosts: ClassVar[int | None] = None
    host_group: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_forge_base" not in cls.__dict__:
            cls._forge_base = cls
            _adapt_endpoints(cls)

    @classmethod
    def options(
        cls,
        *,
        procs: int = 1,
        num_replicas: int = 1,
        with_gpus: bool = False,
        hosts: int | None = None,
        host_group: str | None = None,
        **service_options: Any,
    ) -> "type[ForgeActor]":
        """A copy of this class configured with placement and service options.

        Raises ``ValueError`` for an unknown option or an invalid value, before anything
        is spawned. See ``forge.controller.options`` for the service options.
        """
        placement, options = parse_options(
            PlacementOptions(),
            ServiceOptions(),
            dict(procs=procs, num_replicas=num_replicas, with_gpus=with_gpus, hosts=hosts, host_group=host_group,
                 **service_options),
        )
        base = cls._forge_base or cls
        own = base.__mro__[: base.__mro__.index(ForgeActor)]  # a subclass's own attribute of these names wins
        shown = {name: getattr(placement, name) for name in _PLACEMENT_ATTRIBUTES
                 if not any(name in vars(k) for k in own)}
        return type(
            base.__name__,
            (base,),
            {
                "_forge_base": base,
                "_forge_placement": placement,
                "_forge_service_options": options,
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
                "__doc__": base.__doc__,
                **shown,
            },
        )

    @classmethod
    def _before_spawn(cls, args: tuple, kwargs: dict) -> None:
        """Checks that must pass before any process is spawned, then the runtime setup."""
        from monarch._src.actor.actor_mesh import ActorMesh

        base = cls._forge_base or cls
        clashes = sorted(n for n in _endpoints_of(base) if hasattr(ActorMesh, n))
        if clashes:
            raise ValueError(
                f"{base.__name__} has endpoint(s) {clashes} whose names Monarch's ActorMesh uses itself; rename them"
            )
        base.validate_arguments(*args, **kwargs)
        ensure_runtime()

    @classmethod
    def _host_request(cls, what: str) -> Any:
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

    @classmethod
    def validate_arguments(cls, *args: Any, **kwargs: Any) -> None:
        """Check constructor arguments in the caller, before any process is spawned.

        Override to raise ``ValueError`` for bad configuration early; the default
        accepts anything.
        """

    def _handle_undeliverable_message(self, message: Any) -> bool:
        """A reply whose caller has gone away is dropped; it must not take the actor down."""
        logger.debug("dropping an undeliverable message: %s", message)
        return True

    # ---- one actor -------------------------------------------------------------

    @classmethod
    async def as_actor(cls, *args: Any, **kwargs: Any) -> Any:
        """Spawn ``procs`` processes with one actor each; returns a ``ForgeActorMesh``.

        The ``setup`` endpoint, if the class has one, is awaited on every rank first.
        Stop it with ``await Cls.shutdown(actor)``.
        """
        placement = cls._forge_placement
        base = cls._forge_base or cls
        if placement.num_replicas != 1:
            raise ValueError(
                f"{base.__name__}.as_actor() spawns one actor mesh, but num_replicas="
                f"{placement.num_replicas}; use as_service() for replicas"
            )
        cls._before_spawn(args, kwargs)
        what = f"{base.__name__}.as_actor()"
        request = cls._host_request(what)
        name = f"{base.__name__}_{next(_actor_counter)}"
        res = _ActorResources(request=request)
        try:
            if request is not None:
                res.placement = await place(request, what)
                res.proc_mesh = spawn_placed(request, res.placement, name)
            else:
                res.gpus = gpu_allocator.allocate(placement.procs, what) if placement.with_gpus else None
                res.proc_mesh = spawn_proc_mesh(
                    this_host(), placement.procs, rank_env(placement.procs, res.gpus), name=name
                )
            actors = ForgeActorMesh.wrap(res.proc_mesh.spawn(name, base, *args, **kwargs))
            res.pids = await _start_actor(actors, base, cls._forge_service_options.spawn_timeout_s)
        except BaseException:
            await res.release()
            raise
        res.actors = actors  # holding actors keeps the id unique
        _actor_resources[id(actors)] = res
        if request is not None:  # the pool's shutdown stops it first, if the user has not
            res.pool = current_pool()
            res.pool.track(res, functools.partial(cls.shutdown, actors))
        return actors

    # ---- a service -------------------------------------------------------------

    @classmethod
    async def as_service(cls, *args: Any, **kwargs: Any) -> Any:
        """Spawn ``num_replicas`` replicas of ``procs`` processes each; returns a ServiceHandle."""
        from forge.controller.service.controller import ServiceSpec
        from forge.controller.service.handle import ServiceHandle

        placement, options = cls._forge_placement, cls._forge_service_options
        base = cls._forge_base or cls
        endpoints = tuple(sorted(n for n in _endpoints_of(base) if n not in _BUILT_IN))
        clashes = sorted(set(endpoints) & _RESERVED_SERVICE_NAMES)
        if clashes:
            raise ValueError(
                f"{base.__name__} has endpoint(s) {clashes} whose names a service handle uses "
                f"itself ({sorted(_RESERVED_SERVICE_NAMES)}); rename them"
            )
        cls._before_spawn(args, kwargs)
        what = f"{base.__name__}.as_service()"
        request = cls._host_request(what)
        name = f"{base.__name__}_{next(_actor_counter)}"
        service_id = uuid.uuid4().hex
        gpus = None
        if placement.with_gpus and request is None:
            flat = gpu_allocator.allocate(placement.procs * placement.num_replicas, what)
            gpus = tuple(
                tuple(flat[i * placement.procs : (i + 1) * placement.procs])
                for i in range(placement.num_replicas)
            )
        spec = ServiceSpec(
            name=name,
            actor_class=base,
            args=args,
            kwargs=kwargs,
            placement=placement,
            options=options,
            gpus_per_replica=gpus,
            has_setup="setup" in endpoints,
            hosts=request,
            service_id=service_id,
        )
        owner = _ServiceOwner(spec, gpus)
        try:
            controller, membership = await owner.start_controller()
        except BaseException as e:
            await owner.stop()
            if type(e).__name__ == "ActorError" and getattr(e, "exception", None) is not None:
                raise e.exception from None
            raise
        checks = {n: check for n, prop in _endpoints_of(base).items() if (check := caller_check(prop))}
        handle = ServiceHandle(
            name, service_id, endpoints, placement, options, controller, membership, owner,
            replayed=_replayed_endpoints(base), checks=checks,
        )
        handle._client().watch_as_owner(owner)  # replaces the controller if it dies
        if request is not None:  # the pool's shutdown stops it first, if the user has not
            owner.pool = current_pool()
            owner.pool.track(owner, handle.shutdown)
        return handle

    @classmethod
    async def shutdown(cls, actor: Any) -> None:
        """Stop an actor from ``as_actor`` or a service from ``as_service``."""
        from forge.controller.service.handle import ServiceHandle

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


# The options of a class used without options(): Cls.as_service() is Cls.options().as_service().
ForgeActor._forge_placement, ForgeActor._forge_service_options = parse_options(PlacementOptions(), ServiceOptions(), {})


async def _start_actor(actors: Any, base: type, timeout_s: float) -> tuple[int, ...]:
    """Wait until every rank of a new actor answers, then run its ``setup``; its pids.

    Each wait is bounded by ``timeout_s`` (the ``spawn_timeout_s`` option)."""
    what = f"{base.__name__}.as_actor()"
    try:
        pids = await asyncio.wait_for(actors._forge_ping.call(), timeout_s)
    except asyncio.TimeoutError:
        raise ReplicaFailed(f"{what}: its processes did not answer within {timeout_s:.0f} s "
                            "(spawn_timeout_s)") from None
    except Exception as e:
        raise ReplicaFailed(f"{base.__name__} failed to start: {e}") from None
    if "setup" in _endpoints_of(base):
        try:
            await asyncio.wait_for(actors.setup.call(), timeout_s)
        except asyncio.TimeoutError:
            raise ReplicaFailed(f"{what}: setup() did not finish within {timeout_s:.0f} s (spawn_timeout_s)") from None
    return tuple(pid for _, pid in pids.items())


async def actor_alive(actor: Any) -> bool:
    """Whether every process of an actor from ``as_actor`` is still running (on any host).

    Unlike a call, this does not wait behind the actor's current message, so a watchdog
    can tell a busy actor from a dead one.
    """
    resources = _actor_resources.get(id(actor))
    if resources is None:
        raise ForgeUsageError(f"actor_alive() got {actor!r}, which is not a running actor from as_actor()")
    if resources.placement is not None:
        resources.pool.check()  # a dead registry is not the actor's death: HostRegistryLost names it
        call = resources.request.registry.alive.call_one(resources.placement, list(resources.pids))
        try:
            return await asyncio.wait_for(call, 30)  # a registry silent this long raises TimeoutError
        except asyncio.TimeoutError:
            raise
        except Exception:  # the registry is gone: the pool is shutting down, or it died
            resources.pool.check()
            return False
    return all(pid_alive(p) for p in resources.pids)


@dataclass
class _ActorResources:
    """What ``as_actor`` spawned for one actor: its processes, and their GPUs or host placement."""

    actors: Any = None
    proc_mesh: Any = None
    gpus: list[str] | None = None
    pids: tuple[int, ...] = ()
    request: Any = None  # HostRequest when the actor is on the host pool
    placement: Any = None
    pool: Any = None

    async def release(self, graceful: bool = False) -> None:
        if self.pool is not None:
            self.pool.untrack(self)
        stopped = False
        try:
            if self.placement is not None and self.proc_mesh is not None:
                if await placement_alive(self.request, self.placement) is False:
                    await wait_for_returns(time.monotonic(), self.request.failure_timeout_s)
            if self.proc_mesh is not None:
                if graceful:
                    await asyncio.wait_for(self.proc_mesh.stop(), 30)
                    stopped = True
                else:
                    stopped = await stop_quietly(self.proc_mesh)
            else:
                stopped = True
        finally:
            if self.placement is not None:
                await release_placement(self.request, self.placement, () if stopped else self.pids)
            if self.gpus:
                gpu_allocator.release(self.gpus)
            self.proc_mesh = self.placement = self.gpus = None


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
        from forge.controller.service.controller import CONTROLLER_OF_ENV

        request = spec.hosts
        self._env = {**CONTROLLER_ENV, CONTROLLER_OF_ENV: spec.service_id,
                     **(supervision_env(request.failure_timeout_s) if request else {})}

    def controller_alive(self) -> bool:
        return self.controller_pid == 0 or pid_alive(self.controller_pid)

    async def start_controller(self, adopted: Any = None, replays: tuple = ()) -> tuple[Any, Any]:
        """Spawn a controller (the next incarnation when ``adopted`` is given); (controller, membership)."""
        from forge.controller.service.controller import ServiceController

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
        from forge.controller.service.controller import CONTROLLER_OF_ENV

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
