"""Hosts: where Forge's processes run when one machine is not enough.

A *host pool* is a set of named host groups, each a Monarch ``HostMesh``. Where the
hosts come from (``HostsConfig.source``):

* ``process_job`` — Monarch's ``ProcessJob``: every host is a worker process on this
  machine (tests, trying a multi-host layout out). Forge starts and stops the workers.
* ``workers`` — worker processes the user started on each machine with
  ``python -m forge.controller.worker --address tcp://0.0.0.0:26600``; ``groups`` lists
  their addresses. Forge attaches to them and leaves them running after the job.
* ``slurm`` — Monarch's ``SlurmJob``: one allocation with a node count per group,
  configured by ``HostsConfig.slurm`` (``partition``, ``time_limit``, ``gpus_per_node``...).

Without a pool every process runs on this host, as before. With one,
``Cls.options(hosts=N, host_group="gen")`` puts each replica (or the actor) on ``N``
hosts of group ``gen`` with ``procs`` processes on each.

Three kinds of Forge processes make it work:

* a ``HostAgent`` on every host (a small process without torch): reports the host's
  address and GPUs, picks free ports there, kills processes on request, and holds a
  *lease* — when the client has not been heard from for ``lease_timeout_s`` (client
  killed, machine lost), it kills every process of this job on its host, including a
  worker Forge started itself, so nothing is left running anywhere.
* one ``HostRegistry`` next to the client (its own process, so it dies with the client
  and the leases then run out): it owns the agents, heartbeats them every second,
  marks a host dead when its agent is silent for ``failure_timeout_s``, and places
  replicas — least-loaded live hosts first, GPUs allocated per host — for every
  service and actor of the pool.
* the service controllers (``forge.controller.service.controller``), which ask the
  registry where to build a replica, and where to rebuild it when its host died.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from monarch.actor import Actor, endpoint, this_host

from forge.controller.provisioner import free_port, rank_env, spawn_proc_mesh, visible_gpus
from forge.controller.reaper import JOB_ID_ENV, has_job_id  # every process of a pool's job carries JOB_ID_ENV

logger = logging.getLogger("forge.hosts")

SOURCES = ("process_job", "workers", "slurm")
HOST_ENV = "FORGE_HOST"  # "<group>-<index>": the host a process was placed on
_GROUP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_HEARTBEAT_INTERVAL_S = 1.0
_CHECK_TIMEOUT_S = 3.0


# ---- configuration ----------------------------------------------------------------


@dataclass(frozen=True)
class HostsConfig:
    """Where a pool's hosts come from. See the module docstring."""

    source: str = "process_job"  # "process_job" | "workers" | "slurm"
    groups: dict[str, Any] = field(default_factory=dict)  # name -> host count, or a list of worker addresses
    failure_timeout_s: float = 5.0  # a host silent this long is dead; its replicas move
    lease_timeout_s: float = 15.0  # a client silent this long is gone; its processes are killed
    connect_timeout_s: float = 60.0  # bound on reaching every host at start
    transport: str | None = None  # Monarch transport of this client (e.g. "tcp", "tcp://10.0.0.5:0")
    slurm: dict[str, Any] = field(default_factory=dict)  # monarch.job.SlurmJob keyword arguments

    @classmethod
    def parse(cls, value: "HostsConfig | dict[str, Any]") -> "HostsConfig":
        """A validated config from a ``HostsConfig`` or a mapping (YAML); ``ValueError`` names the bad field."""
        if isinstance(value, HostsConfig):
            fields = dataclasses.asdict(value)
        elif isinstance(value, dict):
            fields = dict(value)
        else:
            raise ValueError(f"hosts must be a HostsConfig or a mapping, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"hosts: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        config = cls(**fields)
        config._validate()
        return config

    def _validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"hosts.source must be one of {list(SOURCES)}, got {self.source!r}")
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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"hosts.{name} must be a positive number of seconds, got {value!r}")
        if self.lease_timeout_s <= 2 * _HEARTBEAT_INTERVAL_S:
            raise ValueError(f"hosts.lease_timeout_s must be > {2 * _HEARTBEAT_INTERVAL_S} s (heartbeats come every "
                             f"{_HEARTBEAT_INTERVAL_S} s), got {self.lease_timeout_s}")
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


# ---- this host's processes -------------------------------------------------------------


def host_address() -> str:
    """How other hosts reach this one: ``$FORGE_HOST_ADDR``, else the hostname's address."""
    if os.environ.get("FORGE_HOST_ADDR"):
        return os.environ["FORGE_HOST_ADDR"]
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return "127.0.0.1" if address.startswith("127.") else address


def job_processes(job_id: str, root: int) -> list[int]:
    """Pids under process ``root`` (this host's worker) whose environment carries ``FORGE_JOB_ID=job_id``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    pids, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        if has_job_id(pid, job_id):
            pids.append(pid)
    return pids


def kill_pids(pids: list[int] | tuple[int, ...]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class HostAgent(Actor):
    """Forge's agent on one host. See the module docstring."""

    def __init__(self, job_id: str, lease_timeout_s: float, owns_allocation: bool) -> None:
        self._job_id = job_id
        self._lease_timeout_s = lease_timeout_s
        self._owns_allocation = owns_allocation
        self._last_heard = time.monotonic()
        self._released = False
        threading.Thread(target=self._watch_lease, name="forge-lease", daemon=True).start()

    @endpoint
    def info(self) -> tuple[str, str, tuple[str, ...]]:
        return socket.gethostname(), host_address(), tuple(visible_gpus())

    @endpoint
    def heartbeat(self) -> None:
        self._last_heard = time.monotonic()

    @endpoint
    def free_port(self) -> int:
        return free_port()

    @endpoint
    def kill(self, pids: list[int]) -> None:
        kill_pids([p for p in pids if p != os.getpid()])

    @endpoint
    def alive(self, pids: list[int]) -> bool:
        return all(pid_alive(p) for p in pids)

    @endpoint
    def release(self) -> int:
        """The job is over: kill what is left of it on this host (not this agent); stop the lease."""
        self._released = True
        leftovers = [p for p in job_processes(self._job_id, os.getppid()) if p != os.getpid()]
        kill_pids(leftovers)
        return len(leftovers)

    def _watch_lease(self) -> None:
        while not self._released:
            time.sleep(0.5)
            if time.monotonic() - self._last_heard > self._lease_timeout_s and not self._released:
                self._expire()

    def _expire(self) -> None:
        """The client is gone: kill every process of the job here, then this one."""
        mine = [p for p in job_processes(self._job_id, os.getppid()) if p != os.getpid()]
        logger.warning("forge host agent: no heartbeat for %.0f s; killing %d process(es) of job %s",
                       self._lease_timeout_s, len(mine), self._job_id)
        kill_pids(mine)
        if self._owns_allocation and has_job_id(os.getppid(), self._job_id):
            kill_pids([os.getppid()])  # a worker Forge started itself (ProcessJob)
        if self._owns_allocation and os.environ.get("SLURM_JOB_ID"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["scancel", os.environ["SLURM_JOB_ID"]], timeout=30, check=False)
        os._exit(0)


# ---- the registry ------------------------------------------------------------------------


@dataclass
class _Host:
    info: HostInfo
    agent: Any
    alive: bool = True
    placements: int = 0
    gpus_in_use: set[str] = field(default_factory=set)


class HostRegistry(Actor):
    """Owns a pool's host agents, watches the hosts and places replicas. See the module docstring."""

    def __init__(self, job_id: str, config: HostsConfig, meshes: dict[str, Any], owns_allocation: bool) -> None:
        self._job_id = job_id
        self._config = config
        self._meshes = meshes
        self._owns_allocation = owns_allocation
        self._hosts: dict[str, list[_Host]] = {}
        self._agent_meshes: list[Any] = []
        self._placements: dict[int, tuple[list[_Host], dict[str, list[str]]]] = {}
        self._ids = itertools.count(1)
        self._heartbeats: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._last_host_death: float | None = None

    @endpoint
    async def start(self) -> list[HostInfo]:
        """Start an agent on every host; returns what they report. Raises if a host is unreachable."""
        for group, mesh in self._meshes.items():
            count = self._config.host_counts()[group]
            envs = [{JOB_ID_ENV: self._job_id, HOST_ENV: f"{group}-{i}"} for i in range(count)]
            procs = spawn_proc_mesh(mesh, 1, envs, name=f"forge_agent_{group}")
            self._agent_meshes.append(procs)
            agents = procs.spawn(f"forge_agent_{group}", HostAgent, self._job_id,
                                 self._config.lease_timeout_s, self._owns_allocation)
            infos = await asyncio.wait_for(agents.info.call(), self._config.connect_timeout_s)
            hosts = []
            for i, (_, (hostname, address, gpus)) in enumerate(infos.items()):
                info = HostInfo(f"{group}-{i}", group, i, hostname, address, tuple(gpus))
                hosts.append(_Host(info, agents.slice(hosts=i)))
            self._hosts[group] = hosts
        self._heartbeats = asyncio.ensure_future(self._heartbeat_loop())
        return [h.info for hosts in self._hosts.values() for h in hosts]

    @endpoint
    async def place(self, request: HostRequest, owner: str) -> Placement:
        """Choose ``request.hosts`` live hosts in a row (least loaded first) and allocate their GPUs."""
        async with self._lock:
            hosts = self._hosts[request.group]
            window = self._choose(hosts, request)
            if window is None:
                live = [h.info.key for h in hosts if h.alive]
                raise RuntimeError(
                    f"{owner}: no {request.hosts} live host(s) in a row in group {request.group!r}"
                    + (f" with {request.procs} free GPU(s) each" if request.with_gpus else "")
                    + f"; live hosts: {live or 'none'}, dead: {[h.info.key for h in hosts if not h.alive]}"
                )
            first = hosts.index(window[0])
            gpus = {}
            for host in window:
                if request.with_gpus:
                    free = [g for g in host.info.gpus if g not in host.gpus_in_use]
                    gpus[host.info.key] = free[: request.procs]
                    host.gpus_in_use.update(gpus[host.info.key])
                host.placements += 1
            placement_id = next(self._ids)
            self._placements[placement_id] = (window, gpus)
        try:
            master_port = await asyncio.wait_for(window[0].agent.free_port.call_one(), _CHECK_TIMEOUT_S)
        except BaseException:
            await self._release(placement_id)
            raise
        envs = []
        for h, host in enumerate(window):
            host_envs = rank_env(
                request.procs, gpus.get(host.info.key),
                {JOB_ID_ENV: self._job_id, HOST_ENV: host.info.key},
            )
            for local_rank, env in enumerate(host_envs):
                env.update(
                    RANK=str(h * request.procs + local_rank),
                    WORLD_SIZE=str(len(window) * request.procs),
                    MASTER_ADDR=window[0].info.address,
                    MASTER_PORT=str(master_port),
                )
                envs.append(env)
        logger.info("%s placed on %s", owner, [h.info.key for h in window])
        return Placement(placement_id, request.group, first, len(window),
                         tuple(h.info.key for h in window), tuple(envs))

    @staticmethod
    def _choose(hosts: list[_Host], request: HostRequest) -> list[_Host] | None:
        def fits(host: _Host) -> bool:
            if not host.alive:
                return False
            return not request.with_gpus or len(set(host.info.gpus) - host.gpus_in_use) >= request.procs

        windows = [hosts[i : i + request.hosts] for i in range(len(hosts) - request.hosts + 1)]
        windows = [w for w in windows if all(fits(h) for h in w)]
        return min(windows, key=lambda w: sum(h.placements for h in w), default=None)

    @endpoint
    async def release(self, placement_id: int) -> None:
        await self._release(placement_id)

    async def _release(self, placement_id: int) -> None:
        async with self._lock:
            window, gpus = self._placements.pop(placement_id, ([], {}))
            for host in window:
                host.placements -= 1
                host.gpus_in_use.difference_update(gpus.get(host.info.key, ()))

    @endpoint
    async def check(self, placement_id: int) -> bool:
        """Whether every host of a placement answers now (a dead one is marked dead for everyone)."""
        window, _ = self._placements.get(placement_id, ([], {}))
        results = await asyncio.gather(*(self._ping(h, _CHECK_TIMEOUT_S) for h in window))
        return all(results)

    @endpoint
    async def kill(self, placement: Placement, pids: list[int]) -> None:
        """Kill a replica's processes on their hosts (a hung replica that will not stop)."""
        for host, host_pids in self._pids_by_host(placement, pids):
            if host is not None and host.alive:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(host.agent.kill.call_one(host_pids), _CHECK_TIMEOUT_S)

    @endpoint
    async def alive(self, placement: Placement, pids: list[int]) -> bool:
        """Whether every one of a replica's processes is still running (for watchdogs)."""
        for host, host_pids in self._pids_by_host(placement, pids):
            if host is None or not host.alive:
                return False
            try:
                if not await asyncio.wait_for(host.agent.alive.call_one(host_pids), _CHECK_TIMEOUT_S):
                    return False
            except Exception:
                return False
        return True

    @endpoint
    async def statuses(self) -> list[HostStatus]:
        return [
            HostStatus(h.info, h.alive, h.placements, tuple(sorted(h.gpus_in_use)))
            for hosts in self._hosts.values() for h in hosts
        ]

    @endpoint
    async def release_all(self) -> None:
        """The job is over: agents kill what is left of it on their hosts, then stop."""
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            await asyncio.gather(self._heartbeats, return_exceptions=True)
        await wait_for_returns(self._last_host_death, self._config.failure_timeout_s)
        live = [h for hosts in self._hosts.values() for h in hosts if h.alive]
        await asyncio.gather(
            *(asyncio.wait_for(h.agent.release.call_one(), _CHECK_TIMEOUT_S) for h in live),
            return_exceptions=True,
        )
        for procs in self._agent_meshes:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(procs.stop(), 10)

    def __supervise__(self, failure: Any) -> bool:
        """An agent's process died: its host is gone (a worker takes its processes with it)."""
        name = str(getattr(failure, "mesh_name", ""))
        for group, hosts in self._hosts.items():
            if name.startswith(f"forge_agent_{group}"):
                for host in hosts:
                    if host.alive:
                        self._mark_dead_if_silent(host)
        return True

    def _mark_dead_if_silent(self, host: _Host) -> None:
        asyncio.ensure_future(self._ping(host, _CHECK_TIMEOUT_S))

    def _pids_by_host(self, placement: Placement, pids: list[int]) -> list[tuple[_Host | None, list[int]]]:
        """A placement's pids (in rank order) grouped by the host each rank runs on."""
        by_key: dict[str, list[int]] = {}
        for rank, pid in enumerate(pids):
            by_key.setdefault(placement.host_of_rank(rank), []).append(pid)
        hosts = {h.info.key: h for group in self._hosts.values() for h in group}
        return [(hosts.get(key), host_pids) for key, host_pids in by_key.items()]

    async def _ping(self, host: _Host, timeout_s: float) -> bool:
        if not host.alive:
            return False
        try:
            await asyncio.wait_for(host.agent.heartbeat.call_one(), timeout_s)
            return True
        except Exception as e:  # silent or its process is gone
            if host.alive:
                host.alive = False
                self._last_host_death = time.monotonic()
                logger.warning("host %s (%s) is dead: %s", host.info.key, host.info.hostname, str(e).splitlines()[0][:200])
            return False

    async def _heartbeat_loop(self) -> None:
        """Every second: tell each agent the client is alive, and notice hosts that went silent."""
        while True:
            hosts = [h for group in self._hosts.values() for h in group if h.alive]
            await asyncio.gather(*(self._ping(h, self._config.failure_timeout_s) for h in hosts))
            await asyncio.sleep(_HEARTBEAT_INTERVAL_S)


# ---- placing and spawning ------------------------------------------------------------


async def place(request: HostRequest, owner: str) -> Placement:
    """Ask the pool's registry for hosts for one replica (or actor) named ``owner``."""
    try:
        return await request.registry.place.call_one(request, owner)
    except Exception as e:
        cause = getattr(e, "exception", None)  # the registry's own error, not Monarch's wrapper
        raise RuntimeError(str(cause) if cause is not None else f"{owner}: placing it failed: {e}") from None


def spawn_placed(request: HostRequest, placement: Placement, name: str, extra_env: dict[str, str] | None = None) -> Any:
    """Spawn a placement's processes: ``request.procs`` on each of its hosts, each rank with its env."""
    mesh = request.mesh.slice(hosts=slice(placement.first, placement.first + placement.count))
    envs = [{**env, **(extra_env or {})} for env in placement.envs]
    return spawn_proc_mesh(mesh, request.procs, envs, name=name)


async def release_placement(request: HostRequest, placement: Placement, kill: tuple[int, ...] | list[int] = ()) -> None:
    """Give a placement's hosts and GPUs back, first killing ``kill`` (pids of ranks that would not stop)."""
    try:
        if kill:
            await asyncio.wait_for(request.registry.kill.call_one(placement, list(kill)), 2 * _CHECK_TIMEOUT_S)
        await asyncio.wait_for(request.registry.release.call_one(placement.placement_id), _CHECK_TIMEOUT_S)
    except Exception as e:  # the registry is gone: the pool is shutting down and cleans up itself
        logger.info("releasing placement %d: %s", placement.placement_id, e)


# ---- the pool (client side) ----------------------------------------------------------


class HostPool:
    """The client's view of a pool: its job, group meshes and registry. Made by ``init_hosts``."""

    def __init__(self, config: HostsConfig, job_id: str, job: Any, meshes: dict[str, Any],
                 previous_delivery_timeout: str | None = None) -> None:
        self.config = config
        self._previous_delivery_timeout = previous_delivery_timeout
        self.job_id = job_id
        self._job = job
        self._meshes = meshes
        self._registry_procs: Any = None
        self.registry: Any = None
        self.hosts: list[HostInfo] = []
        self._running: dict[int, tuple[Any, Any]] = {}  # services and actors placed on it: id -> (owner, stop)
        self._reaper: subprocess.Popen | None = None  # process_job: kills the job if this client goes

    def track(self, owner: Any, stop: Any) -> None:
        """Remember a service or actor on this pool; ``shutdown`` awaits ``stop()`` if it is still running."""
        self._running[id(owner)] = (owner, stop)

    def untrack(self, owner: Any) -> None:
        self._running.pop(id(owner), None)

    @property
    def groups(self) -> dict[str, list[HostInfo]]:
        return {g: [h for h in self.hosts if h.group == g] for g in self._meshes}

    def request(self, group: str | None, hosts: int | None, procs: int, with_gpus: bool, what: str) -> HostRequest:
        """Check a placement against the pool before anything is spawned; ``ValueError`` says why not."""
        groups = self.groups
        if group is None:
            if len(groups) != 1:
                raise ValueError(f"{what}: hosts={hosts} needs host_group= naming one of the pool's groups "
                                 f"{sorted(groups)}")
            group = next(iter(groups))
        if group not in groups:
            raise ValueError(f"{what}: host_group={group!r} is not a group of the host pool; groups: {sorted(groups)}")
        count = hosts or 1
        if count > len(groups[group]):
            raise ValueError(f"{what}: hosts={count} but group {group!r} has {len(groups[group])} host(s)")
        if with_gpus:
            short = [h.key for h in groups[group] if len(h.gpus) < procs]
            if len(short) > len(groups[group]) - count:
                raise ValueError(f"{what}: with_gpus=True and procs={procs} needs {procs} GPU(s) per host, but "
                                 f"hosts {short} of group {group!r} have fewer")
        return HostRequest(group, count, procs, with_gpus, self.registry, self._meshes[group],
                           self.config.failure_timeout_s)

    async def statuses(self) -> list[HostStatus]:
        return await self.registry.statuses.call_one()

    async def _start(self) -> None:
        env = supervision_env(self.config.failure_timeout_s)  # dies with this client: no job id, no lease
        self._registry_procs = spawn_proc_mesh(this_host(), 1, [env], name="forge_host_registry")
        self.registry = self._registry_procs.spawn(
            "forge_host_registry", HostRegistry, self.job_id, self.config, self._meshes,
            self.config.source != "workers",
        )
        try:
            self.hosts = await asyncio.wait_for(self.registry.start.call_one(), self.config.connect_timeout_s + 10)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"could not reach every host of the pool in {self.config.connect_timeout_s} s "
                f"(source {self.config.source!r}, groups {self.config.groups})"
            ) from None

    async def shutdown(self) -> None:
        """Stop every Forge process on every host, then the job's workers (unless the user runs them)."""
        global _pool
        if _pool is self:
            _pool = None
        try:
            running = [stop for _, stop in self._running.values()]
            self._running.clear()
            results = await asyncio.gather(*(asyncio.wait_for(stop(), 60) for stop in running), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    logger.info("host pool shutdown: stopping a service or actor: %s", result)
            if self.registry is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.registry.release_all.call_one(), 30)
            if self._registry_procs is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._registry_procs.stop(), 15)
        finally:
            self.registry = self._registry_procs = None
            if self._job is not None:
                job, self._job = self._job, None
                await asyncio.get_running_loop().run_in_executor(None, job.kill)
            if self._reaper is not None:
                self._reaper.kill()
                self._reaper.wait()
                self._reaper = None
            if self._previous_delivery_timeout is not None:
                import monarch.config

                monarch.config.configure(message_delivery_timeout=self._previous_delivery_timeout)
                self._previous_delivery_timeout = None

    async def __aenter__(self) -> "HostPool":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()


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


async def wait_for_returns(last_host_death: float | None, failure_timeout_s: float) -> None:
    """Stay up until messages sent to a host that died at ``last_host_death`` have come back."""
    if last_host_death is not None:
        await asyncio.sleep(max(0.0, last_host_death + drain_s(failure_timeout_s) - time.monotonic()))


async def wait_if_host_died(request: HostRequest, placement: Placement) -> None:
    """Before stopping a placement's processes: if a host of it died, wait out the returns."""
    try:
        alive = await asyncio.wait_for(request.registry.check.call_one(placement.placement_id), 2 * _CHECK_TIMEOUT_S)
    except Exception:  # the registry is gone: the pool is shutting down and waits itself
        return
    if not alive:
        await wait_for_returns(time.monotonic(), request.failure_timeout_s)


def supervision_env(failure_timeout_s: float) -> dict[str, str]:
    """Monarch settings under which a silent host is declared failed after ``failure_timeout_s``."""
    return {
        "HYPERACTOR_MESH_GET_PROC_STATE_MAX_IDLE": f"{max(1, round(failure_timeout_s))}s",
        "HYPERACTOR_MESSAGE_DELIVERY_TIMEOUT": f"{delivery_timeout_s(failure_timeout_s)}s",
    }


_pool: HostPool | None = None


def current_pool() -> HostPool | None:
    """The pool ``init_hosts`` started in this process, if any."""
    return _pool


def start_reaper(job_id: str) -> subprocess.Popen:
    """A detached process that kills this job's local processes once this client is gone."""
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "forge.controller.reaper", "--client", str(os.getpid()), "--job", job_id],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )


def make_job(config: HostsConfig, job_id: str) -> Any:
    """The Monarch job for a ``process_job`` or ``slurm`` config (not started yet)."""
    from monarch.job import ProcessJob, SlurmJob

    if config.source == "process_job":
        return ProcessJob(config.host_counts(), env={JOB_ID_ENV: job_id, **supervision_env(config.failure_timeout_s)})
    if config.source == "slurm":
        return SlurmJob(meshes=config.host_counts(), **config.slurm)
    raise ValueError(f"source {config.source!r} has no Monarch job")


async def init_hosts(config: HostsConfig | dict[str, Any]) -> HostPool:
    """Start (or attach to) the hosts of ``config`` and make them this process's pool.

    Call it before spawning anything. ``await pool.shutdown()`` (or ``shutdown_hosts()``,
    or ``async with await init_hosts(...)``) stops every Forge process on every host.
    """
    global _pool
    config = HostsConfig.parse(config)
    if _pool is not None:
        raise RuntimeError("a host pool is already running in this process; shut it down first")
    if config.transport is not None:
        from monarch.actor import enable_transport

        enable_transport(config.transport)
    import monarch.config

    # A message to a dead host comes back to its sender after this (Monarch's default is
    # 30 s); put back when the pool shuts down.
    previous_timeout = monarch.config.get_global_config().get("message_delivery_timeout")
    monarch.config.configure(message_delivery_timeout=f"{delivery_timeout_s(config.failure_timeout_s)}s")
    from forge.controller.provisioner import ensure_runtime

    ensure_runtime()
    job_id = uuid.uuid4().hex[:12]
    job = reaper = None
    loop = asyncio.get_running_loop()
    try:
        if config.source == "workers":
            from monarch.actor import attach_to_workers

            meshes = {g: attach_to_workers(name=g, workers=list(addrs), ca="trust_all_connections")
                      for g, addrs in config.groups.items()}
            for group, mesh in meshes.items():
                try:
                    await asyncio.wait_for(mesh.initialized, config.connect_timeout_s)
                except asyncio.TimeoutError:
                    raise TimeoutError(
                        f"could not connect to the workers of group {group!r} {config.groups[group]} in "
                        f"{config.connect_timeout_s} s; start each with "
                        "`python -m forge.controller.worker --address tcp://0.0.0.0:PORT`"
                    ) from None
        else:
            if config.source == "process_job":
                reaper = start_reaper(job_id)
            job = make_job(config, job_id)
            state = await loop.run_in_executor(None, lambda: job.state(cached_path=None))
            meshes = {g: getattr(state, g) for g in config.groups}
        pool = HostPool(config, job_id, job, meshes, previous_timeout)
        pool._reaper, reaper = reaper, None
        job = None  # the pool owns it now
        try:
            await pool._start()
        except BaseException:
            await pool.shutdown()
            raise
    except BaseException:
        if previous_timeout is not None:
            monarch.config.configure(message_delivery_timeout=previous_timeout)
        raise
    finally:
        if job is not None:
            await loop.run_in_executor(None, job.kill)
        if reaper is not None:
            reaper.kill()
            reaper.wait()
    _pool = pool
    return pool


async def shutdown_hosts() -> None:
    """Shut down this process's pool, if there is one."""
    if _pool is not None:
        await _pool.shutdown()


__all__ = [
    "HostsConfig", "HostInfo", "HostStatus", "HostPool", "HostRequest", "Placement",
    "init_hosts", "shutdown_hosts", "current_pool",
]
