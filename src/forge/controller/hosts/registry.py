"""``HostRegistry``: watches a pool's hosts and places replicas on them; the placement helpers."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from monarch.actor import Actor, endpoint

from forge.controller.errors import HostRegistryLost
from forge.controller.hosts.agent import HostAgent
from forge.controller.hosts.config import (
    HEARTBEAT_INTERVAL_S,
    HOST_ENV,
    HostInfo,
    HostRequest,
    HostsConfig,
    HostStatus,
    Placement,
    drain_s,
    is_loopback,
)
from forge.util.reaper import JOB_ID_ENV
from forge.util.tasks import Nursery
from forge.controller.provisioner import rank_env, spawn_proc_mesh

logger = logging.getLogger("forge.hosts")

CHECK_TIMEOUT_S = 3.0  # bound on asking one agent anything


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
        self._tasks = Nursery("host registry")  # heartbeat loops and checks; cancelled by release_all
        self._lock = asyncio.Lock()
        self._last_host_death: float | None = None

    @endpoint
    async def pid(self) -> int:
        return os.getpid()

    @endpoint
    async def start(self) -> list[HostInfo]:
        """Start an agent on every host; returns what they report. Raises if a host is unreachable."""
        for group, mesh in self._meshes.items():
            count = self._config.host_counts()[group]
            hosts = await asyncio.gather(*(self._start_agent(group, i, mesh.slice(hosts=i)) for i in range(count)))
            self._hosts[group] = list(hosts)
            for host in hosts:  # each host's lease starts being renewed as soon as it is known
                self._own(self._heartbeat_loop(host))
        return [h.info for hosts in self._hosts.values() for h in hosts]

    async def _start_agent(self, group: str, index: int, host_mesh: Any) -> _Host:
        """One agent in a proc mesh of its own, so a dead host fails only its own mesh and
        Monarch stops watching it (a mesh spanning a dead and live hosts keeps messaging
        the dead one, and those messages come back after this registry may have stopped)."""
        key = f"{group}-{index}"
        procs = spawn_proc_mesh(host_mesh, 1, [{JOB_ID_ENV: self._job_id, HOST_ENV: key}], name=f"forge_agent_{key}")
        self._agent_meshes.append(procs)
        agent = procs.spawn(f"forge_agent_{key}", HostAgent, self._job_id, self._config.lease_timeout_s,
                            self._config.connect_timeout_s + self._config.lease_timeout_s, self._owns_allocation)
        hostname, address, gpus = await asyncio.wait_for(agent.info.call_one(), self._config.connect_timeout_s)
        return _Host(HostInfo(key, group, index, hostname, address, tuple(gpus)), agent)

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
            unreachable = unreachable_master(self._config.source, [h.info for h in window])
            if unreachable:
                raise RuntimeError(f"{owner}: {unreachable}")
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
            master_port = await asyncio.wait_for(window[0].agent.free_port.call_one(), CHECK_TIMEOUT_S)
        except BaseException:
            await self._release(placement_id)
            raise
        envs = [
            env
            for h, host in enumerate(window)
            for env in rank_env(
                request.procs, gpus.get(host.info.key), {JOB_ID_ENV: self._job_id, HOST_ENV: host.info.key},
                host_index=h, num_hosts=len(window), master_addr=window[0].info.address, master_port=master_port,
            )
        ]
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
        results = await asyncio.gather(*(self._ping(h) for h in window))
        return all(results)

    @endpoint
    async def kill(self, placement: Placement, pids: list[int]) -> None:
        """Kill a replica's processes on their hosts (a hung replica that will not stop)."""
        for host, host_pids in self._pids_by_host(placement, pids):
            if host is not None and host.alive:
                try:
                    await asyncio.wait_for(host.agent.kill.call_one(host_pids), CHECK_TIMEOUT_S)
                except Exception as e:  # a silent agent: its host is dying and takes the processes along
                    logger.warning("could not kill %s on host %s: %s", host_pids, host.info.key, e)

    @endpoint
    async def alive(self, placement: Placement, pids: list[int]) -> bool:
        """Whether every one of a replica's processes is still running (for watchdogs)."""
        for host, host_pids in self._pids_by_host(placement, pids):
            if host is None or not host.alive:
                return False
            try:
                if not await asyncio.wait_for(host.agent.alive.call_one(host_pids), CHECK_TIMEOUT_S):
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
        await self._tasks.close()
        await wait_for_returns(self._last_host_death, self._config.failure_timeout_s)
        live = [h for hosts in self._hosts.values() for h in hosts if h.alive]
        await asyncio.gather(
            *(asyncio.wait_for(h.agent.release.call_one(), CHECK_TIMEOUT_S) for h in live),
            return_exceptions=True,
        )
        for procs in self._agent_meshes:
            try:
                await asyncio.wait_for(procs.stop(), 10)
            except Exception as e:  # agents on a dead host; the others released the job above
                logger.info("stopping host agents: %s", e)

    def __supervise__(self, failure: Any) -> bool:
        """An agent's process died: its host is gone (a worker takes its processes with it)."""
        name = str(getattr(failure, "mesh_name", ""))
        for hosts in self._hosts.values():
            for host in hosts:
                mesh = f"forge_agent_{host.info.key}"
                if host.alive and (name == mesh or name.startswith(mesh + "-")):
                    self._mark_dead_if_silent(host)
        return True

    def _mark_dead_if_silent(self, host: _Host) -> None:
        self._own(self._ping(host))

    def _own(self, coro: Any) -> None:
        self._tasks.start(coro)

    def _pids_by_host(self, placement: Placement, pids: list[int]) -> list[tuple[_Host | None, list[int]]]:
        """A placement's pids (in rank order) grouped by the host each rank runs on."""
        by_key: dict[str, list[int]] = {}
        for rank, pid in enumerate(pids):
            by_key.setdefault(placement.host_of_rank(rank), []).append(pid)
        hosts = {h.info.key: h for group in self._hosts.values() for h in group}
        return [(hosts.get(key), host_pids) for key, host_pids in by_key.items()]

    async def _ping(self, host: _Host) -> bool:
        """Renew the host's lease; a host silent for ``failure_timeout_s`` is marked dead for good."""
        if not host.alive:
            return False
        try:
            await asyncio.wait_for(host.agent.heartbeat.call_one(), self._config.failure_timeout_s)
            return True
        except Exception as e:  # silent (TimeoutError has no message) or its process is gone
            if host.alive:
                host.alive = False
                self._last_host_death = time.monotonic()
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                logger.warning("host %s (%s) is dead: %s", host.info.key, host.info.hostname, reason)
            return False

    async def _heartbeat_loop(self, host: _Host) -> None:
        """Every second, until the host is dead: tell its agent the client is alive.

        One loop per host, so a slow host never delays the heartbeats of the others.
        """
        while await self._ping(host):
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)


def unreachable_master(source: str, window: list[HostInfo]) -> str | None:
    """Why ranks on the other hosts of a window could not reach its first host, their
    ``MASTER_ADDR``; None if they can. Simulated hosts (``process_job``) all are this
    machine. An ssh host's address is its name in ``hosts.groups``: a loopback one is this
    machine, reachable from the window's other hosts only if they are this machine too."""
    first = window[0]
    if len(window) == 1 or source == "process_job" or not is_loopback(first.address):
        return None
    if source == "ssh":
        remote = [h.key for h in window if not is_loopback(h.address)]
        return None if not remote else (
            f"host {first.key} is {first.address}, this machine's loopback, which hosts {remote} of the same "
            "placement cannot reach; name it by an address they can reach in hosts.groups")
    return (f"host {first.key} ({first.hostname}) resolves its own name to loopback, so ranks on other hosts "
            "could not reach it as MASTER_ADDR; set FORGE_HOST_ADDR to its cluster address in that worker's "
            "environment")


# ---- placing and spawning ------------------------------------------------------------


async def place(request: HostRequest, owner: str) -> Placement:
    """Ask the pool's registry for hosts for one replica (or actor) named ``owner``.

    If the caller is cancelled while the registry is placing, the placement is released
    when it arrives, so its hosts and GPUs are not lost.
    """
    if request.registry_gone():
        raise HostRegistryLost(f"{owner}: cannot be placed: the host pool's registry (pid {request.registry_pid}) died")
    call = asyncio.ensure_future(asyncio.wait_for(request.registry.place.call_one(request, owner), 60))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        call.add_done_callback(lambda done: _release_late(request, done))
        raise
    except Exception as e:
        cause = getattr(e, "exception", None)  # the registry's own error, not Monarch's wrapper
        raise RuntimeError(str(cause) if cause is not None else f"{owner}: placing it failed: {e!r}") from None


_late_releases = Nursery("late placement releases")  # of placements whose caller was cancelled


def _release_late(request: HostRequest, done: asyncio.Future) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    _late_releases.start(release_placement(request, done.result()))


def spawn_placed(request: HostRequest, placement: Placement, name: str, extra_env: dict[str, str] | None = None) -> Any:
    """Spawn a placement's processes: ``request.procs`` on each of its hosts, each rank with its env."""
    mesh = request.mesh.slice(hosts=slice(placement.first, placement.first + placement.count))
    envs = [{**env, **(extra_env or {})} for env in placement.envs]
    return spawn_proc_mesh(mesh, request.procs, envs, name=name)


async def release_placement(request: HostRequest, placement: Placement, kill: tuple[int, ...] | list[int] = ()) -> None:
    """Give a placement's hosts and GPUs back, first killing ``kill`` (pids of ranks that would not stop)."""
    if request.registry_gone():  # the pool is over; its agents' leases clean the hosts up
        return
    try:
        if kill:
            await asyncio.wait_for(request.registry.kill.call_one(placement, list(kill)), 2 * CHECK_TIMEOUT_S)
        await asyncio.wait_for(request.registry.release.call_one(placement.placement_id), CHECK_TIMEOUT_S)
    except Exception as e:  # the registry is gone: the pool is shutting down and cleans up itself
        logger.info("releasing placement %d: %s", placement.placement_id, e)


async def wait_for_returns(last_host_death: float | None, failure_timeout_s: float) -> None:
    """Stay up until messages sent to a host that died at ``last_host_death`` have come back."""
    if last_host_death is not None:
        await asyncio.sleep(max(0.0, last_host_death + drain_s(failure_timeout_s) - time.monotonic()))


async def placement_alive(request: HostRequest, placement: Placement, timeout_s: float = 2 * CHECK_TIMEOUT_S) -> bool | None:
    """Whether every host of a placement answers now; None when the registry is gone (pool shutting down)."""
    if request.registry_gone():
        return None
    try:
        return await asyncio.wait_for(request.registry.check.call_one(placement.placement_id), timeout_s)
    except Exception:
        return None