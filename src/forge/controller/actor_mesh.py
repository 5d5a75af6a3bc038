"""``ForgeActorMesh``: what ``as_actor()`` returns — Monarch's ActorMesh, plus ``route()``.

Every endpoint keeps Monarch's adverbs unchanged (``call_one``, ``choose``, ``call``,
``broadcast``, ``stream``, ``rref``). Two things are added:

* ``route(*args, **kwargs)``: on an actor of one process it is the same call as
  ``call_one()``, so code written for a service (``ref_model.forward.route(...)``) runs on
  an actor too. On a mesh of several processes it raises ``ForgeUsageError`` naming
  ``.call()`` (every rank) and ``.choose()`` (any one rank).
* Caller-side checks: an endpoint marked ``@checked_in_caller(check)``
  (``forge.controller.endpoints``) runs
  ``check(*args, **kwargs)`` in the calling process before the message is sent, so bad
  input raises its own ``ValueError`` there, not a Monarch ``ActorError`` later.

The mesh pickles as a ``ForgeActorMesh``, and slices of it are ``ForgeActorMesh`` too, so
an actor handed to another actor keeps ``route()``.
"""

from __future__ import annotations

from typing import Any, Callable

from monarch._src.actor.actor_mesh import ActorMesh

from forge.controller.endpoints import caller_check
from forge.controller.errors import ForgeUsageError


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


def _adverb(name: str) -> Any:
    """Monarch's adverb ``name``, after the endpoint's caller check."""

    def send(self: ActorEndpoint, *args: Any, **kwargs: Any) -> Any:
        self._checked(args, kwargs)
        return getattr(self._endpoint, name)(*args, **kwargs)

    send.__name__ = send.__qualname__ = name
    return send


for _name in ("call_one", "choose", "call", "broadcast", "stream"):
    setattr(ActorEndpoint, _name, _adverb(_name))


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
