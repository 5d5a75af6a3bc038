"""Host pool configuration and the typed messages of placement (no processes, no Monarch)."""

from __future__ import annotations

import inspect
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any

from forge.util.checks import check_choice, check_int, check_seconds
from forge.util.config import build
from forge.util.reaper import JOB_ID_ENV

SOURCES = ("process_job", "workers", "slurm", "ssh", "kubernetes")
HOST_ENV = "FORGE_HOST"  # "<group>-<index>": the host a process was placed on
HOST_ADDR_ENV = "FORGE_HOST_ADDR"  # how other hosts reach this one (MASTER_ADDR); see agent.host_address
HEARTBEAT_INTERVAL_S = 1.0
_GROUP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
JOB_ID_LEN = 12  # hex digits of a pool's job id (FORGE_JOB_ID)
GPU_RESOURCE = "nvidia.com/gpu"  # a Kubernetes pod's GPUs
_K8S_GROUP_MAX = 63 - len("-svc") - JOB_ID_LEN  # "<group><job id>-svc" is a DNS label
_RESOURCE_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")  # a Kubernetes quantity
# ssh options that detach the remote command from the connection's stdin, or give it a terminal
_SSH_ARGS_REFUSED = ("-n", "-f", "-N", "-t", "-tt", "-W")


# ---- configuration ----------------------------------------------------------------


@dataclass(frozen=True)
class SSHOptions:
    """How Forge starts the hosts of ``source: ssh``: one worker per host, over ``ssh``."""

    user: str | None = None  # ssh -l (default: ssh's own, i.e. your ~/.ssh/config or user name)
    port: int | None = None  # ssh -p
    identity_file: str | None = None  # ssh -i (on this machine)
    ssh_args: list[str] = field(default_factory=list)  # more ssh options, e.g. ["-o", "ConnectTimeout=10"]
    monarch_port: int = 22222  # where each host's worker listens (Monarch's SSHJob: one port for the job)
    cwd: str | None = None  # the workers' directory on the hosts (default: this client's)
    env: dict[str, Any] = field(default_factory=dict)  # added to the login environment of the workers


@dataclass(frozen=True)
class KubernetesOptions:
    """Monarch's ``KubernetesJob`` for ``source: kubernetes``: one MonarchMesh resource per group."""

    namespace: str = ""  # where the MonarchMesh resources and their pods go
    image: str = ""  # the worker pods' image: this client's Python environment and Forge, at the same paths
    gpus_per_pod: int = 0  # nvidia.com/gpu requested (and limited) per pod
    resources: dict[str, Any] = field(default_factory=dict)  # more requests = limits, e.g. {cpu: 16, memory: 64Gi}
    shared_memory_size: str | None = None  # a memory-backed /dev/shm of this size (NCCL, weight stores)
    kubeconfig: str | None = None  # a kubeconfig file when this client runs outside the cluster
    ready_timeout_s: float = 600.0  # bound on every pod being ready (scheduling, image pull)


@dataclass(frozen=True)
class HostsConfig:
    """Where a pool's hosts come from. See the module docstring."""

    source: str = "process_job"  # "process_job" | "workers" | "slurm" | "ssh" | "kubernetes"
    groups: dict[str, Any] = field(default_factory=dict)  # name -> host count, or a list of addresses / ssh hosts
    # A host (or a process on it) silent this long is dead; its replicas move. Monarch declares a
    # process failed when it has not answered a state query for this long, so a shorter value
    # turns a busy machine's pauses into restarts (measured: a process stopped 8 s was taken
    # for dead at 5 s, and carried on at the Monarch default).
    failure_timeout_s: float = 15.0
    lease_timeout_s: float = 30.0  # a client silent this long is gone; its processes are killed
    connect_timeout_s: float = 60.0  # bound on reaching every host at start
    transport: str | None = None  # Monarch transport of this client (e.g. "tcp", "tcp://10.0.0.5:0")
    slurm: dict[str, Any] = field(default_factory=dict)  # monarch.job.SlurmJob keyword arguments
    ssh: SSHOptions = field(default_factory=SSHOptions)
    kubernetes: KubernetesOptions = field(default_factory=KubernetesOptions)

    @classmethod
    def parse(cls, value: "HostsConfig | dict[str, Any]") -> "HostsConfig":
        """A validated config from a ``HostsConfig`` or a mapping (YAML); ``ValueError`` names the bad field."""
        config = build(cls, value, "hosts")
        config._validate()
        return config

    def _validate(self) -> None:
        check_choice("hosts.source", self.source, SOURCES)
        listed = self.source in ("workers", "ssh")  # groups list their hosts, not a count
        if not isinstance(self.groups, dict) or not self.groups:
            raise ValueError(
                "hosts.groups must name at least one host group, e.g. {'gen': 2, 'train': 1}"
                + (f" (lists of hosts for source {self.source!r})" if listed else "")
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
            elif self.source == "ssh":
                if not isinstance(hosts, (list, tuple)) or not hosts:
                    raise ValueError(f"hosts.groups.{name}: source 'ssh' needs a list of host names such as "
                                     f"['node1', 'node2'], got {hosts!r}")
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
        for section, default in (("slurm", {}), ("ssh", SSHOptions()), ("kubernetes", KubernetesOptions())):
            if getattr(self, section) != default and self.source != section:
                raise ValueError(f"hosts.{section} is only used with source {section!r}, not {self.source!r}")
        if self.source == "slurm":
            from monarch.job import SlurmJob

            allowed = set(inspect.signature(SlurmJob.__init__).parameters) - {"self", "meshes"}
            unknown = sorted(set(self.slurm) - allowed)
            if unknown:
                raise ValueError(f"hosts.slurm: unknown SlurmJob option(s) {unknown}; valid: {sorted(allowed)}")
        elif self.source == "ssh":
            self._validate_ssh()
        elif self.source == "kubernetes":
            self._validate_kubernetes()

    def _validate_ssh(self) -> None:
        seen: dict[str, str] = {}
        for group, hosts in self.groups.items():
            for host in hosts:
                where = f"hosts.groups.{group}"
                if isinstance(host, str) and "@" in host:
                    raise ValueError(f"{where}: {host!r}: give the user as hosts.ssh.user, not in the host name "
                                     "(Monarch's worker also binds the host name)")
                if isinstance(host, str) and ":" in host:
                    raise ValueError(f"{where}: {host!r}: give the ssh port as hosts.ssh.port "
                                     "(IPv6 addresses are not supported)")
                if not isinstance(host, str) or not _HOST_NAME.match(host) or ".." in host or host.endswith(("-", ".")):
                    raise ValueError(f"{where}: {host!r} is not a host name or address")
                same = {"localhost": "127.0.0.1", "127.0.0.1": "localhost"}.get(host)
                if same in seen:
                    raise ValueError(f"{where}: {host!r} and {same!r} are one address, and its workers would share "
                                     "hosts.ssh.monarch_port; name the second loopback host 127.0.0.2")
                if host in seen:
                    raise ValueError(
                        f"{where}: host {host!r} is also in group {seen[host]!r}; Monarch's SSHJob runs one worker "
                        "per host name, all on hosts.ssh.monarch_port. Two hosts on one machine need two of its "
                        "names (on this machine: 127.0.0.1 and 127.0.0.2)")
                seen[host] = group
        ssh = self.ssh
        if ssh.user is not None and (not ssh.user or any(c.isspace() or c in "@'\"" for c in ssh.user)):
            raise ValueError(f"hosts.ssh.user must be a user name, got {ssh.user!r}")
        if ssh.port is not None:
            _check_port("hosts.ssh.port", ssh.port)
        _check_port("hosts.ssh.monarch_port", ssh.monarch_port)
        if ssh.port is not None and ssh.port == ssh.monarch_port:
            raise ValueError(f"hosts.ssh.monarch_port {ssh.monarch_port} is also hosts.ssh.port: the workers "
                             "would listen on the port ssh logs in on; pick another")
        if not isinstance(ssh.ssh_args, list) or not all(isinstance(a, str) for a in ssh.ssh_args):
            raise ValueError(f"hosts.ssh.ssh_args must be a list of strings, got {ssh.ssh_args!r}")
        breaking = sorted(a for a in ssh.ssh_args if a in _SSH_ARGS_REFUSED)
        if breaking:
            raise ValueError(f"hosts.ssh.ssh_args: {breaking} would detach the worker from its ssh connection "
                             "(its stdin, which stops it with the client) or give it a terminal; leave them out")
        if ssh.identity_file is not None and not os.path.isfile(os.path.expanduser(ssh.identity_file)):
            raise ValueError(f"hosts.ssh.identity_file: no file {ssh.identity_file!r} on this machine")
        if ssh.cwd is not None and not (isinstance(ssh.cwd, str) and ssh.cwd.startswith("/")):
            raise ValueError(f"hosts.ssh.cwd must be an absolute path on the hosts, got {ssh.cwd!r}")
        for key, value in ssh.env.items():
            if not isinstance(key, str) or not _ENV_NAME.match(key):
                raise ValueError(f"hosts.ssh.env: {key!r} is not an environment variable name")
            if key in (JOB_ID_ENV, HOST_ADDR_ENV, *supervision_env(self.failure_timeout_s)):
                raise ValueError(f"hosts.ssh.env.{key} is set by Forge (the job's id, each host's name, Monarch's "
                                 "timeouts)")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError(f"hosts.ssh.env.{key} must be a string or a number, got {value!r}")
        remote = sorted(h for h in seen if not is_loopback(h))
        if remote and self.transport is None:
            raise ValueError(
                f"hosts.transport: the workers on {remote} must reach this client over the network; "
                "set transport: tcp (or tcp://<this machine's address>:0)")

    def _validate_kubernetes(self) -> None:
        for group in self.groups:
            if not (group.isalnum() and group.isascii() and group.islower() and len(group) <= _K8S_GROUP_MAX):
                raise ValueError(
                    f"hosts.groups: group name {group!r} must be lowercase letters and digits, at most "
                    f"{_K8S_GROUP_MAX} characters, for source 'kubernetes' (with the job id it names a MonarchMesh "
                    "resource and its '-svc' Service, a 63-character DNS label)")
        if self.transport not in (None, "tcp"):
            raise ValueError(f"hosts.transport: Monarch's KubernetesJob sets the transport itself (tcp by host name); "
                             f"leave it unset or 'tcp', got {self.transport!r}")
        k8s = self.kubernetes
        if not isinstance(k8s.namespace, str) or not _DNS_LABEL.match(k8s.namespace) or len(k8s.namespace) > 63:
            raise ValueError(f"hosts.kubernetes.namespace must name a Kubernetes namespace (lowercase letters, "
                             f"digits and '-'), got {k8s.namespace!r}")
        if not k8s.image or any(c.isspace() for c in k8s.image):
            raise ValueError(f"hosts.kubernetes.image must name the worker pods' container image, got {k8s.image!r}")
        check_int("hosts.kubernetes.gpus_per_pod", k8s.gpus_per_pod, 0)
        if not isinstance(k8s.resources, dict):
            raise ValueError(f"hosts.kubernetes.resources must be a mapping such as {{cpu: 16, memory: 64Gi}}, "
                             f"got {k8s.resources!r}")
        for key, value in k8s.resources.items():
            if not isinstance(key, str) or not _RESOURCE_NAME.match(key):
                raise ValueError(f"hosts.kubernetes.resources: {key!r} is not a resource name such as cpu, memory "
                                 "or example.com/device")
            if key == GPU_RESOURCE:
                raise ValueError(f"hosts.kubernetes.resources: give {GPU_RESOURCE} as hosts.kubernetes.gpus_per_pod")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ((isinstance(value, str) and _QUANTITY.match(value)) or (number and 0 < value < float("inf"))):
                raise ValueError(f"hosts.kubernetes.resources.{key} must be a quantity such as 16 or '64Gi', "
                                 f"got {value!r}")
        if k8s.shared_memory_size is not None and not (isinstance(k8s.shared_memory_size, str)
                                                       and _QUANTITY.match(k8s.shared_memory_size)):
            raise ValueError("hosts.kubernetes.shared_memory_size must be a size such as '16Gi'")
        if k8s.kubeconfig is not None and not os.path.isfile(os.path.expanduser(k8s.kubeconfig)):
            raise ValueError(f"hosts.kubernetes.kubeconfig: no file {k8s.kubeconfig!r} on this machine")
        check_seconds("hosts.kubernetes.ready_timeout_s", k8s.ready_timeout_s)

    def host_counts(self) -> dict[str, int]:
        return {name: (len(h) if isinstance(h, (list, tuple)) else int(h)) for name, h in self.groups.items()}


def _check_port(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{where} must be a port number (1-65535), got {value!r}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
