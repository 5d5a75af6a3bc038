"""Host pool configuration and the typed messages of placement (no processes, no Monarch)."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

from forge.util.checks import check_choice, check_seconds
from forge.util.config import build

SOURCES = ("process_job", "workers", "slurm")
HOST_ENV = "FORGE_HOST"  # "<group>-<index>": the host a process was placed on
HEARTBEAT_INTERVAL_S = 1.0
_GROUP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


# ---- configuration ----------------------------------------------------------------


@dataclass(frozen=True)
class HostsConfig:
    """Where a pool's hosts come from. See the module docstring."""

    source: str = "process_job"  # "process_job" | "workers" | "slurm"
    groups: dict[str, Any] = field(default_factory=dict)  # name -> host count, or a list of worker addresses
    # A host (or a process on it) silent this long is dead; its replicas move. Monarch declares a
    # process failed when it has not answered a state query for this long, so a shorter value
    # turns a busy machine's pauses into restarts (measured: a process stopped 8 s was taken
    # for dead at 5 s, and carried on at the Monarch default).
    failure_timeout_s: float = 15.0
    lease_timeout_s: float = 30.0  # a client silent this long is gone; its processes are killed
    connect_timeout_s: float = 60.0  # bound on reaching every host at start
    transport: str | None = None  # Monarch transport of this client (e.g. "tcp", "tcp://10.0.0.5:0")
    slurm: dict[str, Any] = field(default_factory=dict)  # monarch.job.SlurmJob keyword arguments

    @classmethod
    def parse(cls, value: "HostsConfig | dict[str, Any]") -> "HostsConfig":
        """A validated config from a ``HostsConfig`` or a mapping (YAML); ``ValueError`` names the bad field."""
        config = build(cls, value, "hosts")
        config._validate()
        return config

    def _validate(self) -> None:
        check_choice("hosts.source", self.source, SOURCES)
        if not isinstance(self.groups, dict) or not self.groups:
            raise ValueError(
                "hosts.groups must name at least one host group, e.g. {'gen': 2, 'train': 1}"
                + (" (lists of worker addresses for source 'workers')" if self.source == "workers" else "")
            )
        for name, hosts in self.groups.items():
            if not isinstance(name, str) or not _GROUP_NAME.match(name):
                raise ValueError(f"hosts.groups: group name {name!r} must be a letter then letters, digits or '_'")
            if self.source == "workers":
                if (not isinstance(hosts, (list, tuple)) or not hosts
                        or not all(isinstance(a, str) and "://" in a for a in hosts)):
                    raise ValueError(
                        f"hosts.groups.{name}: source 'workers' needs a list of worker addresses such as "
                        f"['tcp://node1:26600'], got {hosts!r}"
                    )
            elif isinstance(hosts, bool) or not isinstance(hosts, int) or hosts < 1:
                raise ValueError(f"hosts.groups.{name} must be a number of hosts >= 1, got {hosts!r}")
        for name in ("failure_timeout_s", "lease_timeout_s", "connect_timeout_s"):
            check_seconds(f"hosts.{name}", getattr(self, name))
        if self.lease_timeout_s <= self.failure_timeout_s + 2 * HEARTBEAT_INTERVAL_S:
            raise ValueError(
                f"hosts.lease_timeout_s must be > failure_timeout_s + {2 * HEARTBEAT_INTERVAL_S} s "
                f"(= {self.failure_timeout_s + 2 * HEARTBEAT_INTERVAL_S}: one heartbeat may take failure_timeout_s), "
                f"got {self.lease_timeout_s}"
            )
        if self.slurm and self.source != "slurm":
            raise ValueError(f"hosts.slurm is only used with source 'slurm', not {self.source!r}")
        if self.source == "slurm":
            from monarch.job import SlurmJob

            allowed = set(inspect.signature(SlurmJob.__init__).parameters) - {"self", "meshes"}
            unknown = sorted(set(self.slurm) - allowed)
            if unknown:
                raise ValueError(f"hosts.slurm: unknown SlurmJob option(s) {unknown}; valid: {sorted(allowed)}")

    def host_counts(self) -> dict[str, int]:
        return {name: (len(h) if isinstance(h, (list, tuple)) else int(h)) for name, h in self.groups.items()}


@dataclass(frozen=True)
class HostInfo:
    """One host of a pool, as its agent reported it at start."""

    key: str  # "<group>-<index>"
    group: str
    index: int
    hostname: str
    address: str  # what other hosts use to reach it (MASTER_ADDR)
    gpus: tuple[str, ...]


@dataclass(frozen=True)
class HostStatus:
    info: HostInfo
    alive: bool
    placements: int  # replicas and actors placed on it now
    gpus_in_use: tuple[str, ...]


@dataclass(frozen=True)
class HostRequest:
    """Where one replica (or actor) goes: picklable, it travels in a service's spec."""

    group: str
    hosts: int
    procs: int
    with_gpus: bool
    registry: Any  # the pool's HostRegistry ActorMesh
    mesh: Any  # the group's HostMesh
    failure_timeout_s: float
    registry_pid: int = 0  # on the client's host, like every service controller

    def registry_gone(self) -> bool:
        """Whether the registry's process has died (then asking it anything would only time out)."""
        from forge.util.procs import pid_alive

        return bool(self.registry_pid) and not pid_alive(self.registry_pid)


@dataclass(frozen=True)
class Placement:
    """Hosts chosen for one replica: a contiguous window of its group, and every rank's env."""

    placement_id: int
    group: str
    first: int
    count: int
    host_keys: tuple[str, ...]
    envs: tuple[dict[str, str], ...]

    def host_of_rank(self, rank: int) -> str:
        return self.host_keys[rank * self.count // len(self.envs)]


def delivery_timeout_s(failure_timeout_s: float) -> int:
    """Monarch's message delivery timeout for a pool: how long a message to a dead host waits."""
    return max(5, round(failure_timeout_s))


def drain_s(failure_timeout_s: float) -> float:
    """How long after its last message to a dead host a process must stay up.

    Monarch returns a message it could not deliver to its sender after the delivery
    timeout; if the sender has stopped by then, the return lands in the client, which
    Monarch 0.7.0 then crashes. So owners of host-placed processes wait this long after
    a host death before they stop.
    """
    return delivery_timeout_s(failure_timeout_s) + 2.0


def supervision_env(failure_timeout_s: float) -> dict[str, str]:
    """Monarch settings under which a silent host is declared failed after ``failure_timeout_s``."""
    return {
        "HYPERACTOR_MESH_GET_PROC_STATE_MAX_IDLE": f"{max(1, round(failure_timeout_s))}s",
        "HYPERACTOR_MESSAGE_DELIVERY_TIMEOUT": f"{delivery_timeout_s(failure_timeout_s)}s",
    }
