"""``ForgeActor``: a Monarch ``Actor`` that can be spawned as one actor or as a service.

``Cls.options(...)`` returns a configured subclass (the original class is untouched) whose
``procs``, ``num_replicas``, ``with_gpus``, ``hosts``, ``host_group`` and ``on`` attributes
show the placement; ``Cls.as_actor()`` / ``Cls.as_service()`` work on the class itself with
the defaults. ``as_actor`` spawns one ProcMesh with the actor on it (with
``on=ProcGroup(...)``, it shares the group's processes with other actors: see
``forge.controller.colocation``) and returns a ``ForgeActorMesh`` — Monarch's ActorMesh
(``call_one``, ``choose``, ``call``, ``broadcast``, ``stream``) plus ``route()`` on a
one-process actor; ``as_service`` spawns a service controller that owns ``num_replicas``
replicas and returns a ``ServiceHandle``.

Two adaptations happen when a subclass is defined:

* Monarch refuses an actor whose endpoints mix ``def`` and ``async def``. A Forge actor
  may mix them: its sync endpoints are run as coroutines that never await, so each
  still runs to completion, one message at a time, with the actor's state — what a
  sync endpoint means.
* The built-in endpoints of ``forge.controller.endpoints`` are added (of the actor's
  kind): a ping for health probes — it goes through the actor's mailbox, so a replica
  stuck in an endpoint does not answer it —, the metrics drain, and the controller a
  service replica answers to.

Spawning itself is in ``forge.controller.spawn``; this module only defines the class.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar

from monarch._src.actor.endpoint import EndpointProperty
from monarch.actor import Actor, endpoint

from forge.controller import spawn
from forge.controller.colocation import ProcGroup
from forge.controller.endpoints import BUILT_IN, CONTROLLER, DRAIN, PING, endpoints_of
from forge.controller.options import PlacementOptions, ServiceOptions, parse_options
from forge.observability.metrics import drain_local_metrics
from forge.util.failpoints import failpoint

if TYPE_CHECKING:
    from forge.controller.actor_mesh import ForgeActorMesh
    from forge.controller.service.handle import ServiceHandle

logger = logging.getLogger("forge.controller")


def _run_to_completion(method: Any) -> Any:
    @functools.wraps(method)
    async def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs)

    return run


def _adapt_endpoints(cls: type) -> None:
    """Make a mix of sync and async endpoints legal, and add the health-probe endpoint."""
    endpoints = {n: e for n, e in endpoints_of(cls).items() if n not in BUILT_IN}
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
    for function, name in ((ping, PING), (drain, DRAIN), (controller, CONTROLLER)):
        function.__name__ = function.__qualname__ = name
        setattr(cls, name, endpoint(function))


def _current_controller(actor: Any, update: Any) -> Any:
    """``(incarnation, controller)`` of the service this replica belongs to; ``update`` replaces it."""
    if update is not None:
        actor._forge_current_controller = update
    return getattr(actor, "_forge_current_controller", None)


_PLACEMENT_ATTRIBUTES = ("procs", "num_replicas", "with_gpus", "hosts", "host_group", "on")


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
    on: ClassVar[ProcGroup | None] = None

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
        on: ProcGroup | None = None,
        **service_options: Any,
    ) -> "type[ForgeActor]":
        """A copy of this class configured with placement and service options.

        ``on=ProcGroup(...)`` makes ``as_actor()`` share that group's processes with the
        group's other actors instead of spawning its own (``forge.controller.colocation``).
        Raises ``ValueError`` for an unknown option or an invalid value, before anything
        is spawned. See ``forge.controller.options`` for the service options.
        """
        placement, options = parse_options(
            PlacementOptions(),
            ServiceOptions(),
            dict(procs=procs, num_replicas=num_replicas, with_gpus=with_gpus, hosts=hosts, host_group=host_group,
                 on=on, **service_options),
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
    def validate_arguments(cls, *args: Any, **kwargs: Any) -> None:
        """Check constructor arguments in the caller, before any process is spawned.

        Override to raise ``ValueError`` for bad configuration early; the default
        accepts anything.
        """

    def _handle_undeliverable_message(self, message: Any) -> bool:
        """A reply whose caller has gone away is dropped; it must not take the actor down."""
        logger.debug("dropping an undeliverable message: %s", message)
        return True

    # ---- spawning (forge.controller.spawn) -------------------------------------

    @classmethod
    async def as_actor(cls, *args: Any, **kwargs: Any) -> ForgeActorMesh:
        """Spawn ``procs`` processes with one actor each; returns a ``ForgeActorMesh``.

        With ``options(on=group)`` the actor runs on the group's processes (spawned by the
        group's first actor). The ``setup`` endpoint, if the class has one, is awaited on
        every rank first. Stop it with ``await Cls.shutdown(actor)``.
        """
        return await spawn.spawn_actor(cls, args, kwargs)

    @classmethod
    async def as_service(cls, *args: Any, **kwargs: Any) -> ServiceHandle:
        """Spawn ``num_replicas`` replicas of ``procs`` processes each; returns a ServiceHandle."""
        return await spawn.spawn_service(cls, args, kwargs)

    @classmethod
    async def shutdown(cls, actor: Any) -> None:
        """Stop an actor from ``as_actor`` or a service from ``as_service``.

        An actor on a shared ``ProcGroup`` stops alone; the group's processes stop with its
        last actor (or ``group.stop()``).
        """
        await spawn.stop(cls, actor)


# The options of a class used without options(): Cls.as_service() is Cls.options().as_service().
ForgeActor._forge_placement, ForgeActor._forge_service_options = parse_options(PlacementOptions(), ServiceOptions(), {})
