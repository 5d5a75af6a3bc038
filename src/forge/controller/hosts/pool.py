"""``HostPool`` and ``init_hosts``: the client side of a host pool (its Monarch job and registry)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from monarch.actor import this_host

from forge.controller.hosts.config import (
    JOB_ID_LEN,
    HostInfo,
    HostRequest,
    HostsConfig,
    HostStatus,
    delivery_timeout_s,
    supervision_env,
)
from forge.controller.errors import HostRegistryLost
from forge.controller.hosts.jobs import make_job, mesh_name
from forge.controller.hosts.registry import HostRegistry
from forge.util.procs import pid_alive
from forge.util.tmpdirs import job_tmpdir, owned_tmpdir_of_this_process
from forge.controller.provisioner import ensure_runtime, spawn_proc_mesh

logger = logging.getLogger("forge.hosts")


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
        self.registry_pid = 0
        self.hosts: list[HostInfo] = []
        self._running: dict[int, tuple[Any, Any]] = {}  # services and actors placed on it: id -> (owner, stop)
        self._reaper: subprocess.Popen | None = None  # process_job: kills the job if this client goes
        self._tmpdir: Path | None = None  # process_job: the workers' TMPDIR (their socket directories)

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
                           self.config.failure_timeout_s, self.registry_pid)

    async def statuses(self) -> list[HostStatus]:
        """Every host of the pool: alive or dead, placements, GPUs in use."""
        self.check()
        try:
            return await asyncio.wait_for(self.registry.statuses.call_one(), 30)
        except asyncio.TimeoutError:
            raise TimeoutError("the host pool's registry did not answer statuses() within 30 s") from None

    def check(self) -> None:
        """Raise ``HostRegistryLost`` if the pool's registry process has died.

        Forge does not replace a dead registry: the leases, placements and host states it
        held are gone with it, and a new one could not tell which processes on the hosts
        are still wanted. The job stops with this error instead (the agents' leases then
        run out and they clean their hosts up).
        """
        if self.registry is not None and self.registry_pid and not pid_alive(self.registry_pid):
            raise HostRegistryLost(
                f"the host pool's registry (pid {self.registry_pid}, the process that places replicas on hosts "
                f"and renews their leases) died; the pool {sorted(self._meshes)} cannot go on. Restart the job "
                f"(a GRPO run: --resume its run directory)")

    async def _start(self) -> None:
        env = supervision_env(self.config.failure_timeout_s)  # dies with this client: no job id, no lease
        self._registry_procs = spawn_proc_mesh(this_host(), 1, [env], name="forge_host_registry")
        self.registry = self._registry_procs.spawn(
            "forge_host_registry", HostRegistry, self.job_id, self.config, self._meshes,
            self.config.source != "workers",
        )
        try:
            self.registry_pid = await asyncio.wait_for(self.registry.pid.call_one(), 60)
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
            if self.registry is not None and pid_alive(self.registry_pid):
                try:
                    await asyncio.wait_for(self.registry.release_all.call_one(), 30)
                except Exception as e:  # the job's kill below still takes the workers down
                    logger.warning("host pool shutdown: releasing the hosts failed: %s", e)
            if self._registry_procs is not None:
                # Mesh references this process dropped may still send their last messages to
                # controllers in the registry's process when collected; collect them while it is
                # up (Monarch's client crashes on a message that comes back undeliverable).
                gc.collect()
                try:
                    await asyncio.wait_for(self._registry_procs.stop(), 15)
                except Exception as e:  # a local process: it dies with this client anyway
                    logger.info("host pool shutdown: stopping the registry: %s", e)
        finally:
            self.registry = self._registry_procs = None
            if self._job is not None:
                job, self._job = self._job, None
                await asyncio.get_running_loop().run_in_executor(None, job.kill)
            if self._reaper is not None:
                self._reaper.kill()
                self._reaper.wait()
                self._reaper = None
            if self._tmpdir is not None:  # the killed workers' socket directories
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                self._tmpdir = None
            if self._previous_delivery_timeout is not None:
                import monarch.config

                monarch.config.configure(message_delivery_timeout=self._previous_delivery_timeout)
                self._previous_delivery_timeout = None

    async def __aenter__(self) -> "HostPool":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()


_pool: HostPool | None = None


def current_pool() -> HostPool | None:
    """The pool ``init_hosts`` started in this process, if any."""
    return _pool


def start_reaper(job_id: str, tmpdir: Path) -> subprocess.Popen:
    """A detached process that kills this job's local processes once this client is gone,
    then deletes the job's temp directory (and this client's own, if it has one)."""
    import sys

    remove = [tmpdir, *filter(None, [owned_tmpdir_of_this_process()])]
    return subprocess.Popen(
        [sys.executable, "-m", "forge.util.reaper", "--client", str(os.getpid()), "--job", job_id,
         *(arg for path in remove for arg in ("--remove", str(path)))],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )


async def init_hosts(config: HostsConfig | dict[str, Any]) -> HostPool:
    """Start (or attach to) the hosts of ``config`` and make them this process's pool.

    Call it before spawning anything. ``await pool.shutdown()`` (or ``shutdown_hosts()``,
    or ``async with await init_hosts(...)``) stops every Forge process on every host.
    """
    global _pool
    config = HostsConfig.parse(config)
    if _pool is not None:
        raise RuntimeError("a host pool is already running in this process; shut it down first")
    _enable_transport(config.transport)
    import monarch.config

    # A message to a dead host comes back to its sender after this (Monarch's default is
    # 30 s); put back when the pool shuts down.
    previous_timeout = monarch.config.get_global_config().get("message_delivery_timeout")
    monarch.config.configure(message_delivery_timeout=f"{delivery_timeout_s(config.failure_timeout_s)}s")
    ensure_runtime()
    try:
        pool = await _start_pool(config, uuid.uuid4().hex[:JOB_ID_LEN], previous_timeout)
    except BaseException:
        if previous_timeout is not None:
            monarch.config.configure(message_delivery_timeout=previous_timeout)
        raise
    _pool = pool
    return pool


def _enable_transport(transport: str | None) -> None:
    if transport is None:
        return
    from monarch.actor import enable_transport

    try:
        enable_transport(transport)
    except Exception as e:
        raise RuntimeError(
            f"hosts.transport={transport!r} could not be enabled ({e}); Monarch takes it only before "
            "its first use in this process, so call init_hosts before spawning anything. On a host whose "
            "name resolves only to loopback use an explicit address, e.g. tcp://10.0.0.5:0"
        ) from None


async def _connect(config: HostsConfig, meshes: dict[str, Any], job: Any = None) -> None:
    """Wait until every group's hosts answer, each group within ``connect_timeout_s``.

    Before the registry is spawned with the meshes: spawning it would wait for them, and
    a process mesh stuck spawning cannot be stopped. A host whose ``ssh`` ends first
    (wrong key, host down, no Python or Forge at the paths given) fails it at once.
    """
    for group, mesh in meshes.items():
        connected = asyncio.ensure_future(asyncio.wait_for(mesh.initialized, config.connect_timeout_s))
        try:
            while not (await asyncio.wait({connected}, timeout=0.5))[0]:
                ended = job.exited() if hasattr(job, "exited") else {}  # ssh: each host's ssh process
                if ended:
                    group_of = {h: g for g, hosts in config.groups.items() for h in hosts}
                    raise RuntimeError(
                        "ssh to a host ended before its worker answered: "
                        + ", ".join(f"{h} (group {group_of[h]!r}): exit status {code}" for h, code in ended.items())
                        + "; ssh's and the worker's error output is above (exit status 255: ssh itself failed)")
            connected.result()
        except asyncio.TimeoutError:
            hint = ("; start each with `python -m forge.controller.worker --address tcp://0.0.0.0:PORT`"
                    if config.source == "workers" else "")
            raise TimeoutError(f"could not connect to the hosts of group {group!r} {config.groups[group]} in "
                               f"{config.connect_timeout_s} s (source {config.source!r}){hint}") from None
        finally:
            connected.cancel()


def _kill_job(job: Any) -> None:
    """Stop what ``job`` started, also when its start failed halfway: Monarch's ``kill()``
    does nothing until the job's ``apply()`` has finished, so e.g. the first of two ssh
    hosts, or Kubernetes resources made before an error, would be left running."""
    if job.active:
        job.kill()
        return
    try:
        job._kill()
    except Exception as e:  # noqa: BLE001  (nothing was started, or it is already gone)
        logger.info("stopping a job whose start failed: %r", e)


async def _start_pool(config: HostsConfig, job_id: str, previous_timeout: Any) -> HostPool:
    """The hosts (a Monarch job, or attached workers) and the pool's registry and agents on them.

    Until the pool owns them, what was started here (job, reaper, temp directory) is undone
    on a failure; after, a failure shuts the pool down."""
    job = reaper = tmpdir = starting = None
    loop = asyncio.get_running_loop()
    try:
        if config.source == "workers":
            from monarch.actor import attach_to_workers

            meshes = {g: attach_to_workers(name=g, workers=list(addrs), ca="trust_all_connections")
                      for g, addrs in config.groups.items()}
        else:
            if config.source == "process_job":
                tmpdir = job_tmpdir(job_id)
                reaper = start_reaper(job_id, tmpdir)
            job = make_job(config, job_id, tmpdir)
            if config.source == "kubernetes":
                logger.info("host pool %s: MonarchMesh resources %s in namespace %s", job_id,
                            [mesh_name(config, g, job_id) for g in config.groups], config.kubernetes.namespace)
            starting = loop.run_in_executor(None, lambda: job.state(cached_path=None))
            state = await asyncio.shield(starting)
            meshes = {g: getattr(state, mesh_name(config, g, job_id)) for g in config.groups}
        await _connect(config, meshes, job)
        pool = HostPool(config, job_id, job, meshes, previous_timeout)
        pool._reaper, reaper = reaper, None
        pool._tmpdir, tmpdir = tmpdir, None
        job = None  # the pool owns it now
    finally:
        if job is not None:
            if starting is not None and not starting.done():  # cancelled: the start goes on in its thread
                await asyncio.wait([starting])
            await loop.run_in_executor(None, _kill_job, job)
        if reaper is not None:
            reaper.kill()
            reaper.wait()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    try:
        await pool._start()
    except BaseException:
        await pool.shutdown()
        raise
    return pool


async def shutdown_hosts() -> None:
    """Shut down this process's pool, if there is one."""
    if _pool is not None:
        await _pool.shutdown()
