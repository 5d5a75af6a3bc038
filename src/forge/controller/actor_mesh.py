"""``ForgeActorMesh``: what ``as_actor()`` returns — Monarch's ActorMesh, plus ``route()``.

Every endpoint keeps Monarch's adverbs unchanged (``call_one``, ``choose``, ``call``,
``broadcast``, ``stream``, ``rref``). Two things are added:

* ``route(*args, **kwargs)``: on an actor of one process it is the same call as
  ``call_one()``, so code written for a service (``ref_model.forward.route(...)``) runs on
  an actor too. On a mesh of several processes it raises ``ForgeUsageError`` naming
  ``.call()`` (every rank) and ``.choose()`` (any one rank).
* Caller-side checks: an endpoint marked ``@checked_in_caller(check)`` runs
  ``check(*args, **kwargs)`` in the calling process before the message is sent, so bad
  input raises its own ``ValueError`` there, not a Monarch ``ActorError`` later.

The mesh pickles as a ``ForgeActorMesh``, and slices of it are ``ForgeActorMesh`` too, so
an actor handed to another actor keeps ``route()``.
"""

from __future__ import annotations

from typing import Any, Callable

from monarch._src.actor.actor_mesh import ActorMesh
from monarch._src.actor.endpoint import EndpointProperty

from forge.controller.errors import ForgeUsageError

_CHECK_ATTRIBUTE = "_forge_caller_check"


def checked_in_caller(check: Callable[..., None]) -> Callable[[Any], Any]:
    """Mark an endpoint whose arguments ``check(*args, **kwargs)`` validates in the caller.

    ``check`` raises (``ValueError``, ``TypeError``) for bad arguments and must be a
    module-level function (service handles carry it when pickled). Apply it above or below
    ``@endpoint``; the endpoint should run the same check itself, for callers that reach it
    some other way.
    """

    def mark(method: Any) -> Any:
        target = method._method if isinstance(method, EndpointProperty) else method
        setattr(target, _CHECK_ATTRIBUTE, check)
        return method

    return mark


def caller_check(method: Any) -> Callable[..., None] | None:
    """The ``checked_in_caller`` function of an endpoint (property or method), if any."""
    target = method._method if isinstance(method, EndpointProperty) else method
    return getattr(target, _CHECK_ATTRIBUTE, None)


class ActorEndpoint:
    """One endpoint of a ``ForgeActorMesh``: Monarch's adverbs, ``route()`` and the caller check."""

    __slots__ = ("_endpoint", "_mesh", "_name", "_check")

    def __init__(self, endpoint: Any, mesh: "ForgeActorMesh", name: str, check: Callable[..., None] | None) -> None:
        self._endpoint = endpoint
        self._mesh = mesh
        self._name = name
        self._check = check

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._endpoint, attr)

    def __repr__(self) -> str:
        return f"<endpoint {self._mesh.__name__}.{self._name} of {self._mesh.size()} process(es)>"

    def _checked(self, args: tuple, kwargs: dict) -> None:
        if self._check is not None:
            self._check(*args, **kwargs)

    def route(self, *args: Any, **kwargs: Any) -> Any:
        """``call_one()`` on an actor of one process; an error naming the mesh adverbs otherwise."""
        size = self._mesh.size()
        if size != 1:
            raise ForgeUsageError(
                f"{self._mesh.__name__}.{self._name}.route() needs an actor of one process, but this one has "
                f"{size}; use .call() to run it on every rank (or .choose() for any one rank)"
            )
        return self.call_one(*args, **kwargs)

    def call_one(self, *args: Any, **kwargs: Any) -> Any:
        self._checked(args, kwargs)
        return self._endpoint.call_one(*args, **kwargs)

    def choose(self, *args: Any, **kwargs: Any) -> Any:
        self._checked(args, kwargs)
        return self._endpoint.choose(*args, **kwargs)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        self._checked(args, kwargs)
        return self._endpoint.call(*args, **kwargs)

    def broadcast(self, *args: Any, **kwargs: Any) -> Any:
        self._checked(args, kwargs)
        return self._endpoint.broadcast(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        self._checked(args, kwargs)
        return self._endpoint.stream(*args, **kwargs)


class ForgeActorMesh(ActorMesh):
    """Monarch's ActorMesh whose endpoints are ``ActorEndpoint`` (see the module docstring)."""

    @classmethod
    def wrap(cls, mesh: ActorMesh) -> "ForgeActorMesh":
        return cls(mesh._class, mesh._mesh_name, mesh._inner, mesh._shape, mesh._proc_mesh)

    def _endpoint(self, name: Any, impl: Any, propagator: Any) -> Any:
        endpoint = super()._endpoint(name, impl, propagator)
        return ActorEndpoint(endpoint, self, getattr(impl, "__name__", str(name)), caller_check(impl))

    def __reduce_ex__(self, protocol: Any) -> Any:
        return ForgeActorMesh, (self._class, self._mesh_name, self._inner, self._shape, self._proc_mesh)

    def _new_with_shape(self, shape: Any) -> "ForgeActorMesh":
        return ForgeActorMesh.wrap(super()._new_with_shape(shape))

    def __repr__(self) -> str:
        return f"ForgeActorMesh({self._class.__name__}, procs={self.size()})"
