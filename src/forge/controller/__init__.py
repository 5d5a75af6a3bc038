"""Forge's controller layer: ``ForgeActor`` (actors and services), process groups, host pools, routers and errors.

Everything an application needs comes from here; the submodules are the implementation.
"""

from forge.controller.actor import ForgeActor
from forge.controller.actor_mesh import ForgeActorMesh
from forge.controller.colocation import ProcGroup
from forge.controller.drain import drain_metrics
from forge.controller.endpoints import checked_in_caller, replay_on_rebuild
from forge.controller.errors import (
    EndpointError,
    ForgeError,
    ForgeUsageError,
    HostRegistryLost,
    ReplicaFailed,
    ServiceUnavailable,
    is_infrastructure_error,
)
from forge.controller.hosts import HostPool, HostsConfig, current_pool, init_hosts, shutdown_hosts
from forge.controller.service.routers import (
    LeastLoadedRouter,
    ReplicaLoad,
    RoundRobinRouter,
    Router,
    StickyRouter,
)
from forge.controller.service.handle import ServiceHandle
from forge.controller.service.types import ReplicaFailure, ServiceStats
from forge.controller.spawn import actor_alive, actor_answers, actor_pids

__all__ = [
    "ForgeActor",
    "ProcGroup",
    "ServiceHandle",
    "ServiceStats",
    "ReplicaFailure",
    "actor_alive",
    "actor_answers",
    "actor_pids",
    "is_infrastructure_error",
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
