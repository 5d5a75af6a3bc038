"""The endpoint protocol shared by actors, the service controller, handles and clients.

A leaf module (it imports only Monarch and Forge's errors): the names of the endpoints every Forge actor
gets, the names a service handle keeps for itself, and the markers an endpoint can carry
(``@replay_on_rebuild``, ``@checked_in_caller``) with the functions that read them; and
``start_mesh``, how a freshly spawned actor mesh or replica is brought up.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from monarch._src.actor.endpoint import EndpointProperty

from forge.controller.errors import ReplicaFailed

PING = "_forge_ping"  # answers with the process's pid; goes through the actor's mailbox
DRAIN = "_forge_drain_metrics"  # returns and resets the process's record_metric accumulators
CONTROLLER = "_forge_controller"  # a service replica's current controller, for handles that lost theirs
BUILT_IN = (PING, DRAIN, CONTROLLER)
# Names a service handle uses itself; an endpoint may not take them.
RESERVED_SERVICE_NAMES = frozenset({"session", "statistics", "shutdown"})

_REPLAY_ATTRIBUTE = "_forge_replay_on_rebuild"
_CHECK_ATTRIBUTE = "_forge_caller_check"


def endpoints_of(cls: type) -> dict[str, EndpointProperty]:
    """Every ``@endpoint`` of an actor class, built-in ones included, by name."""
    return {
        name: attr
        for name in dir(cls)
        if isinstance(attr := getattr(cls, name, None), EndpointProperty)
    }


def user_endpoints(cls: type) -> tuple[str, ...]:
    """The names of an actor class's own endpoints (not the built-in ones), sorted."""
    return tuple(sorted(n for n in endpoints_of(cls) if n not in BUILT_IN))


def _target(method: Any) -> Any:
    return method._method if isinstance(method, EndpointProperty) else method


def replay_on_rebuild(method: Any) -> Any:
    """Mark an endpoint whose latest ``fanout``/``rolling`` call sets replica state.

    A replica rebuilt after a failure starts from its constructor and ``setup``; before it
    serves again, the service controller sends it the latest fanned-out call of each
    marked endpoint (e.g. ``Policy.update_weights``, so a rebuilt generator does not serve
    the initial weights). Apply it above or below ``@endpoint``. Calls made with
    ``route()`` are not replayed.
    """
    setattr(_target(method), _REPLAY_ATTRIBUTE, True)
    return method


def replayed_endpoints(cls: type) -> tuple[str, ...]:
    """The names of an actor class's ``@replay_on_rebuild`` endpoints, sorted."""
    return tuple(sorted(
        name for name, prop in endpoints_of(cls).items() if getattr(prop._method, _REPLAY_ATTRIBUTE, False)
    ))


def checked_in_caller(check: Callable[..., None]) -> Callable[[Any], Any]:
    """Mark an endpoint whose arguments ``check(*args, **kwargs)`` validates in the caller.

    ``check`` raises (``ValueError``, ``TypeError``) for bad arguments and must be a
    module-level function (service handles carry it when pickled). Apply it above or below
    ``@endpoint``; the endpoint should run the same check itself, for callers that reach it
    some other way.
    """

    def mark(method: Any) -> Any:
        setattr(_target(method), _CHECK_ATTRIBUTE, check)
        return method

    return mark


def caller_check(method: Any) -> Callable[..., None] | None:
    """The ``checked_in_caller`` function of an endpoint (property or method), if any."""
    return getattr(_target(method), _CHECK_ATTRIBUTE, None)


def caller_checks(cls: type) -> dict[str, Callable[..., None]]:
    """Endpoint name -> its ``checked_in_caller`` function, for an actor class."""
    return {name: check for name, prop in endpoints_of(cls).items() if (check := caller_check(prop))}


async def start_mesh(actors: Any, has_setup: bool, timeout_s: float, what: str,
                     prepare: Callable[[], Awaitable[Any]] | None = None,
                     catch_up: Callable[[], Awaitable[Any]] | None = None) -> tuple[int, ...]:
    """Bring up a freshly spawned mesh; the pids of its ranks.

    Every rank answers ``PING``, then ``prepare()`` runs, ``setup`` on every rank (when the
    class has one) and ``catch_up()``, all within ``timeout_s`` (``spawn_timeout_s``).
    A rank that cannot answer, or a timeout, is ``ReplicaFailed``; an error raised by
    ``setup`` or the hooks propagates as it is.
    """

    async def run() -> tuple[int, ...]:
        try:
            pids = await getattr(actors, PING).call()
        except Exception as e:
            raise ReplicaFailed(f"{what} failed to start: {e}") from None
        if prepare is not None:
            await prepare()
        if has_setup:
            await actors.setup.call()
        if catch_up is not None:
            await catch_up()
        return tuple(pid for _, pid in pids.items())

    try:
        return await asyncio.wait_for(run(), timeout_s)
    except asyncio.TimeoutError:
        raise ReplicaFailed(f"{what}: did not start (answer and run setup) within {timeout_s:.0f} s "
                            "(spawn_timeout_s)") from None
