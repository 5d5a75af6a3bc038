"""Forge's controller layer: ``ForgeActor`` (actors and services), routers and errors."""

from forge.controller.actor import ForgeActor
from forge.controller.errors import (
    EndpointError,
    ForgeError,
    ForgeUsageError,
    ReplicaFailed,
    ServiceUnavailable,
)
from forge.controller.service.routers import (
    LeastLoadedRouter,
    ReplicaLoad,
    RoundRobinRouter,
    Router,
    StickyRouter,
)

__all__ = [
    "ForgeActor",
    "EndpointError",
    "ForgeError",
    "ForgeUsageError",
    "ReplicaFailed",
    "ServiceUnavailable",
    "Router",
    "ReplicaLoad",
    "RoundRobinRouter",
    "LeastLoadedRouter",
    "StickyRouter",
]
