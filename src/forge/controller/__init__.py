"""Forge's controller layer: ``ForgeActor`` (actors and services), host pools, routers and errors."""

from forge.controller.actor import ForgeActor, actor_alive, replay_on_rebuild
from forge.controller.actor_mesh import ForgeActorMesh, checked_in_caller
from forge.controller.drain import drain_metrics
from forge.controller.errors import (
    EndpointError,
    ForgeError,
    ForgeUsageError,
    HostRegistryLost,
    ReplicaFailed,
    ServiceUnavailable,
)
from forge.controller.hosts import HostPool, HostsConfig, current_pool, init_hosts, shutdown_hosts
from forge.controller.service.routers import (
    LeastLoadedRouter,
    ReplicaLoad,
    RoundRobinRouter,
    Router,
    StickyRouter,
)

__all__ = [
    "ForgeActor",
    "actor_alive",
    "replay_on_rebuild",
    "checked_in_caller",
    "ForgeActorMesh",
    "drain_metrics",
    "HostsConfig",
    "HostPool",
    "init_hosts",
    "shutdown_hosts",
    "current_pool",
    "EndpointError",
    "ForgeError",
    "ForgeUsageError",
    "HostRegistryLost",
    "ReplicaFailed",
    "ServiceUnavailable",
    "Router",
    "ReplicaLoad",
    "RoundRobinRouter",
    "LeastLoadedRouter",
    "StickyRouter",
]
