"""Typed messages between a service's controller and the handles that call its replicas."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import cloudpickle


class ReplicaState(str, enum.Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    FAILED = "failed"  # found dead or hung; about to be rebuilt
    REBUILDING = "rebuilding"
    COOLING_DOWN = "cooling_down"  # circuit breaker: failed too often, held out for a while
    STOPPED = "stopped"


@dataclass(frozen=True)
class ReplicaRef:
    """A healthy replica as handles see it: where to send calls, and what a replacement
    controller needs to adopt it (its processes, host placement and history)."""

    replica_id: int
    generation: int  # bumped on every rebuild; a failure report names the generation it saw
    actors: Any  # Monarch ActorMesh of the replica's ``num_procs`` actors
    num_procs: int
    incarnation: int = 0  # of the controller that spawned it (generations restart per controller)
    pids: tuple[int, ...] = ()
    placement: Any = None  # hosts.Placement on a host pool, None on the controller's host
    num_restarts: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        """Tells apart every replica process set a service ever had."""
        return (self.replica_id, self.incarnation, self.generation)


@dataclass(frozen=True)
class Membership:
    """The healthy replicas of a service at one point of its history.

    Histories are ordered by ``(incarnation, epoch)``: a replacement controller (the
    next incarnation) starts a new history that supersedes every epoch of the old one.
    """

    epoch: int
    replicas: tuple[ReplicaRef, ...]
    is_shut_down: bool = False
    incarnation: int = 0
    controller_pid: int = 0

    @property
    def version(self) -> tuple[int, int]:
        return (self.incarnation, self.epoch)


@dataclass(frozen=True)
class ReplayedCall:
    """The latest ``fanout``/``rolling`` call of an endpoint marked ``@replay_on_rebuild``:
    the controller sends it to a rebuilt replica before the replica serves again.

    The arguments travel pickled and the controller keeps them so: opening them would import
    the modules of what they hold (a trainer's actor class, hence torch: about 2 s of CPU,
    measured on the first weight sync of the default run), and the controller only needs
    them when a replica is rebuilt.
    """

    method: str
    payload: bytes  # cloudpickle of (args, kwargs)

    @classmethod
    def of(cls, method: str, args: tuple, kwargs: dict) -> "ReplayedCall":
        return cls(method, cloudpickle.dumps((args, kwargs)))

    def arguments(self) -> tuple[tuple, dict]:
        return cloudpickle.loads(self.payload)


@dataclass(frozen=True)
class ReplicaHealth:
    """The controller's view of one replica, for ``statistics()``."""

    replica_id: int
    state: ReplicaState
    generation: int
    num_restarts: int
    last_failure: str | None
    pids: tuple[int, ...]
    hosts: tuple[str, ...] = ()  # host-pool hosts it runs on ("<group>-<index>"); () = the controller's host


@dataclass(frozen=True)
class ReplicaStats:
    """One replica's health plus the request counters of the calling process."""

    replica_id: int
    state: str
    generation: int
    num_restarts: int
    last_failure: str | None
    in_flight: int
    queued: int
    completed: int
    failed: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    pids: tuple[int, ...] = ()  # its processes, rank order
    hosts: tuple[str, ...] = ()  # host-pool hosts it runs on; () = this host


@dataclass(frozen=True)
class ServiceStats:
    """``await service.statistics()``: one row per replica, plus totals."""

    service: str
    replicas: tuple[ReplicaStats, ...]
    controller_pid: int = 0  # the service controller's process (on the creating process's host)
    controller_incarnation: int = 0  # how many times the controller was replaced

    @property
    def num_healthy(self) -> int:
        return sum(r.state == ReplicaState.HEALTHY.value for r in self.replicas)

    def table(self) -> str:
        """A plain-text table, one line per replica."""
        header = f"{'replica':>7} {'state':<12} {'gen':>3} {'restarts':>8} {'in_flight':>9} {'queued':>6} {'done':>7} {'failed':>6} {'p50 ms':>7} {'p99 ms':>7} hosts"
        rows = [header]
        for r in self.replicas:
            p50 = f"{r.latency_p50_ms:.2f}" if r.latency_p50_ms is not None else "-"
            p99 = f"{r.latency_p99_ms:.2f}" if r.latency_p99_ms is not None else "-"
            rows.append(
                f"{r.replica_id:>7} {r.state:<12} {r.generation:>3} {r.num_restarts:>8} {r.in_flight:>9} "
                f"{r.queued:>6} {r.completed:>7} {r.failed:>6} {p50:>7} {p99:>7} {','.join(r.hosts) or 'local'}"
            )
        return "\n".join(rows)


@dataclass(frozen=True)
class ReplicaFailure:
    """In ``fanout()`` results with ``fanout_partial=True``: this replica did not answer.

    ``error`` is an ``EndpointError`` when user code raised, or a ``ReplicaFailed`` when
    the replica's processes died or hung.
    """

    replica_id: int
    error: BaseException

    @property
    def is_infrastructure(self) -> bool:
        from forge.controller.errors import ReplicaFailed

        return isinstance(self.error, ReplicaFailed)
