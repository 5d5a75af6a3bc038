"""Typed options of ``ForgeActor.options(...)``, validated before anything is spawned.

``procs``, ``num_replicas``, ``with_gpus``, ``hosts``, ``host_group`` and ``on`` say where an
actor runs (``PlacementOptions``); every other keyword configures the service layer
(``ServiceOptions``). A wrong name, type or value raises ``ValueError`` naming the
option and what would be valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from forge.controller.colocation import ProcGroup
from forge.controller.service.routers import Router, make_router_factory
from forge.util.checks import check_bool, check_int, check_seconds


@dataclass(frozen=True)
class PlacementOptions:
    """Where the processes of one actor or of each service replica run."""

    procs: int = 1  # processes per replica (per host when hosts > 1)
    num_replicas: int = 1  # replicas of a service; must be 1 for as_actor
    with_gpus: bool = False  # one CUDA device per process via CUDA_VISIBLE_DEVICES
    hosts: int | None = None  # hosts per replica (needs a host pool, except 1 = this host without one)
    host_group: str | None = None  # which group of the host pool (forge.controller.init_hosts)
    on: ProcGroup | None = None  # as_actor() only: share this group's processes (compared by identity)


@dataclass(frozen=True)
class ServiceOptions:
    """How a service routes calls, watches replica health and recovers.

    Request counters and the concurrency limit are kept per calling process: every
    copy of a service handle inside one process shares them.
    """

    router: Any = "round_robin"  # "round_robin" | "least_loaded" | "sticky" | Router class/instance
    max_concurrent_requests: int = 64  # per replica; further calls queue in the caller
    all_ranks: bool = False  # with procs > 1, route() returns every rank's result, not rank 0's
    fanout_partial: bool = False  # fanout() returns ReplicaFailure markers instead of raising
    health_probe_interval_s: float = 1.0  # how often the controller probes each replica
    health_probe_timeout_s: float = 30.0  # a replica silent this long is hung and is rebuilt
    unavailable_timeout_s: float = 60.0  # how long route() waits for a healthy replica
    max_retries: int = 3  # resends of one route() call after the replica running it failed
    poison_threshold: int = 2  # a route() call that took down this many different replicas fails, not resent
    spawn_timeout_s: float = 600.0  # bound on spawning a replica and running its setup
    max_restarts: int = 3  # restarts of one replica within restart_window_s before cool-down
    restart_window_s: float = 60.0
    restart_cooldown_s: float = 30.0  # circuit breaker: hold a flapping replica out this long
    router_factory: Any = field(default=None, repr=False, compare=False)


_PLACEMENT_FIELDS = {f.name for f in dataclasses.fields(PlacementOptions)}
_SERVICE_FIELDS = {f.name for f in dataclasses.fields(ServiceOptions)} - {"router_factory"}


def parse_options(
    base_placement: PlacementOptions, base_service: ServiceOptions, overrides: dict[str, Any]
) -> tuple[PlacementOptions, ServiceOptions]:
    """Merge ``overrides`` into the base options, validating every field."""
    unknown = sorted(set(overrides) - _PLACEMENT_FIELDS - _SERVICE_FIELDS)
    if unknown:
        valid = ", ".join(sorted(_PLACEMENT_FIELDS | _SERVICE_FIELDS))
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; valid options are: {valid}")
    placement = dataclasses.replace(
        base_placement, **{k: v for k, v in overrides.items() if k in _PLACEMENT_FIELDS}
    )
    service_kwargs = {k: v for k, v in overrides.items() if k in _SERVICE_FIELDS}
    service = dataclasses.replace(base_service, **service_kwargs)
    _validate_placement(placement)
    service = _validate_service(service)
    return placement, service


def _validate_placement(p: PlacementOptions) -> None:
    check_int("option 'procs'", p.procs, 1)
    check_int("option 'num_replicas'", p.num_replicas, 1)
    check_bool("option 'with_gpus'", p.with_gpus)
    if p.hosts is not None:
        check_int("option 'hosts'", p.hosts, 1)
    if p.host_group is not None and (not isinstance(p.host_group, str) or not p.host_group):
        raise ValueError(f"option 'host_group' must be the name of a host group (a str), got {p.host_group!r}")
    if p.on is not None and not isinstance(p.on, ProcGroup):
        raise ValueError(f"option 'on' must be a forge.controller.ProcGroup (processes shared by several actors) "
                         f"or None, got {p.on!r}")


def _validate_service(s: ServiceOptions) -> ServiceOptions:
    check_int("option 'max_concurrent_requests'", s.max_concurrent_requests, 1)
    check_int("option 'max_restarts'", s.max_restarts, 1)
    check_int("option 'max_retries'", s.max_retries, 0)
    check_int("option 'poison_threshold'", s.poison_threshold, 1)
    check_bool("option 'all_ranks'", s.all_ranks)
    check_bool("option 'fanout_partial'", s.fanout_partial)
    seconds = {
        name: check_seconds(f"option {name!r}", getattr(s, name))
        for name in (
            "health_probe_interval_s",
            "health_probe_timeout_s",
            "unavailable_timeout_s",
            "spawn_timeout_s",
            "restart_window_s",
            "restart_cooldown_s",
        )
    }
    factory = make_router_factory(s.router)  # raises ValueError naming the valid routers
    return dataclasses.replace(s, router_factory=factory, **seconds)


__all__ = ["PlacementOptions", "ServiceOptions", "Router", "parse_options"]
