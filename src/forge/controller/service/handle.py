"""``ServiceHandle``: what ``as_service()`` returns, a plain picklable value.

For every endpoint of the actor class, ``service.<endpoint>`` has the adverbs
``route``, ``fanout`` and ``call_one``; ``choose`` and ``call`` raise an error that
names the service adverbs. ``session()``, ``statistics()`` and ``shutdown()`` act on
the whole service. A handle can be sent to another actor's endpoint and used there with
the same semantics; each process builds its own ``ServiceClient`` on first use.
"""

from __future__ import annotations

import asyncio
import statistics as stats_lib
import weakref
from typing import Any

from forge.controller.endpoints import DRAIN
from forge.controller.errors import ForgeUsageError
from forge.controller.options import PlacementOptions, ServiceOptions
from forge.controller.service.client import ServiceClient
from forge.controller.service.types import Membership, ReplicaStats, ServiceStats

_STATS_TIMEOUT_S = 30.0

# event loop -> service_id -> the client all copies of that service's handle share there.
# Keyed by the loop object (weakly), so a later loop never inherits a dead loop's client.
_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, ServiceClient]]" = (
    weakref.WeakKeyDictionary()
)


def _clients_here() -> dict[str, ServiceClient]:
    loop = asyncio.get_running_loop()
    clients = _clients.get(loop)
    if clients is None:
        clients = _clients[loop] = {}
    return clients


class ServiceEndpoint:
    """The adverbs of one endpoint of a service."""

    def __init__(self, service: "ServiceHandle", name: str) -> None:
        self._service = service
        self._name = name

    def _checked(self, args: tuple, kwargs: dict) -> None:
        check = self._service._checks.get(self._name)
        if check is not None:  # @checked_in_caller: bad arguments raise here, before sending
            check(*args, **kwargs)

    async def route(self, *args: Any, **kwargs: Any) -> Any:
        """Run on one healthy replica (router's choice, or the session's replica)."""
        self._checked(args, kwargs)
        return await self._service._client().route(self._name, args, kwargs)

    async def fanout(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Run on every healthy replica; a list of results in replica order."""
        self._checked(args, kwargs)
        return await self._service._client().fanout(self._name, args, kwargs)

    async def rolling(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Like ``fanout`` but one replica at a time, each taken out of routing while it
        runs the call, so ``route()`` keeps being served (e.g. a rolling weight update)."""
        self._checked(args, kwargs)
        return await self._service._client().rolling(self._name, args, kwargs)

    async def call_one(self, *args: Any, **kwargs: Any) -> Any:
        """Only for a service of exactly one process (one replica, procs=1)."""
        placement = self._service._placement
        if placement.num_replicas != 1 or placement.procs != 1:
            raise ForgeUsageError(
                f"{self._service._name}.{self._name}.call_one() needs a service of one process, but "
                f"this one has num_replicas={placement.num_replicas}, procs={placement.procs}; "
                f"use .route() for one replica or .fanout() for all"
            )
        return await self.route(*args, **kwargs)

    def choose(self, *args: Any, **kwargs: Any) -> Any:
        raise ForgeUsageError(
            f"{self._service._name}.{self._name}.choose() is for Monarch actor meshes; on a service "
            "use .route() (one healthy replica, load balanced)"
        )

    def call(self, *args: Any, **kwargs: Any) -> Any:
        raise ForgeUsageError(
            f"{self._service._name}.{self._name}.call() is for Monarch actor meshes; on a service "
            "use .fanout() (every healthy replica)"
        )

    def broadcast(self, *args: Any, **kwargs: Any) -> Any:
        raise ForgeUsageError(
            f"{self._service._name}.{self._name}.broadcast() is not a service adverb; use "
            "`await ....fanout()`"
        )


class _SessionScope:
    def __init__(self, service: "ServiceHandle") -> None:
        self._service = service

    async def __aenter__(self) -> "ServiceHandle":
        self._service._client().enter_session()
        return self._service

    async def __aexit__(self, *exc: Any) -> None:
        self._service._client().exit_session()


class ServiceHandle:
    """A running service. See the module docstring for what it offers."""

    def __init__(
        self,
        name: str,
        service_id: str,
        endpoints: tuple[str, ...],
        placement: PlacementOptions,
        options: ServiceOptions,
        controller: Any,
        membership: Membership,
        owner: Any = None,
        replayed: tuple[str, ...] = (),
        checks: dict[str, Any] | None = None,
    ) -> None:
        self._name = name
        self._service_id = service_id
        self._endpoint_names = endpoints
        self._placement = placement
        self._options = options
        self._controller = controller
        self._membership = membership
        self._owner = owner  # only in the creating process: stops the controller's processes
        self._replayed = replayed  # endpoints marked @replay_on_rebuild
        self._checks = dict(checks or {})  # endpoint -> its @checked_in_caller function
        self._endpoints: dict[str, ServiceEndpoint] = {}

    def __getattr__(self, name: str) -> ServiceEndpoint:
        if name == DRAIN:  # built into every Forge actor
            return ServiceEndpoint(self, name)
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._endpoint_names:
            raise AttributeError(
                f"service {self._name!r} has no endpoint {name!r}; its endpoints are: "
                f"{', '.join(self._endpoint_names)}"
            )
        endpoint = self._endpoints.get(name)
        if endpoint is None:
            endpoint = self._endpoints[name] = ServiceEndpoint(self, name)
        return endpoint

    def __repr__(self) -> str:
        return f"ServiceHandle({self._name!r}, replicas={self._placement.num_replicas}, procs={self._placement.procs})"

    def __reduce__(self) -> Any:
        try:
            client = _clients_here().get(self._service_id)
        except RuntimeError:  # pickled outside an event loop
            client = None
        membership = client.membership if client is not None else self._membership
        controller = client.controller if client is not None else self._controller
        return (
            ServiceHandle,
            (self._name, self._service_id, self._endpoint_names, self._placement, self._options,
             controller, membership, None, self._replayed, self._checks),
        )

    def _client(self) -> ServiceClient:
        clients = _clients_here()
        client = clients.get(self._service_id)
        if client is None:
            client = clients[self._service_id] = ServiceClient(
                self._name, self._controller, self._options, self._membership, self._replayed
            )
        return client

    def session(self) -> _SessionScope:
        """``async with service.session():`` pins this task's calls to one replica.

        Calls made by the current asyncio task inside the block go to the same replica;
        other tasks have their own sessions. If that replica dies the session moves.
        """
        return _SessionScope(self)

    async def statistics(self) -> ServiceStats:
        """Per replica: state, restarts, and this process's in-flight, queued, completed,
        failed counts and latency percentiles."""
        client = self._client()
        health = await client.ask_controller("health", timeout_s=_STATS_TIMEOUT_S)
        counters = client.counters()
        rows = []
        for h in health:
            slot = counters.get(h.replica_id)
            latencies = sorted(slot.latencies_s) if slot else []
            rows.append(
                ReplicaStats(
                    replica_id=h.replica_id,
                    state=h.state.value,
                    generation=h.generation,
                    num_restarts=h.num_restarts,
                    last_failure=h.last_failure,
                    in_flight=slot.load.in_flight if slot else 0,
                    queued=slot.load.queued if slot else 0,
                    completed=slot.completed if slot else 0,
                    failed=slot.failed if slot else 0,
                    latency_p50_ms=1e3 * stats_lib.median(latencies) if latencies else None,
                    latency_p99_ms=1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
                    if latencies else None,
                    hosts=h.hosts,
                    pids=h.pids,
                )
            )
        membership = client.membership
        return ServiceStats(self._name, tuple(rows), membership.controller_pid, membership.incarnation)

    async def shutdown(self) -> None:
        """Stop every replica and the controller. Only the creating process may do this."""
        if self._owner is None:
            raise ForgeUsageError(
                f"service {self._name!r} can only be shut down by the process that created it"
            )
        # The closed client stays registered, so every copy of this handle in this
        # process raises ServiceUnavailable from now on instead of calling stopped actors.
        client = self._client()
        try:
            # A dead controller is replaced first: the replacement stops every replica.
            await client.ask_controller("shutdown_service", timeout_s=60)
        finally:
            await client.close()
            await self._owner.stop()

