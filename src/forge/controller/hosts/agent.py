"""``HostAgent``: Forge's small process on every host of a pool, and this host's process helpers."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from monarch.actor import Actor, endpoint

from forge.controller.hosts.config import HOST_ADDR_ENV
from forge.util.procs import descendants, has_env, kill_tagged, pid_alive
from forge.util.reaper import JOB_ID_ENV
from forge.controller.provisioner import free_port, visible_gpus

logger = logging.getLogger("forge.hosts")


# ---- this host's processes -------------------------------------------------------------


def host_address() -> str:
    """How other hosts reach this one: ``$FORGE_HOST_ADDR``, else the hostname's address."""
    if os.environ.get(HOST_ADDR_ENV):
        return os.environ[HOST_ADDR_ENV]
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return "127.0.0.1" if address.startswith("127.") else address


def job_processes(job_id: str, root: int) -> list[int]:
    """Pids under process ``root`` (this host's worker) whose environment carries ``FORGE_JOB_ID=job_id``."""
    return [pid for pid in descendants(root) if has_env(pid, JOB_ID_ENV, job_id)]


def kill_pids(pids: list[int] | tuple[int, ...], job_id: str) -> None:
    """Kill those of ``pids`` that still belong to the job (a pid may have been reused)."""
    kill_tagged(pids, JOB_ID_ENV, job_id)


class HostAgent(Actor):
    """Forge's agent on one host. See the module docstring."""

    def __init__(self, job_id: str, lease_timeout_s: float, first_heartbeat_timeout_s: float,
                 owns_allocation: bool) -> None:
        self._job_id = job_id
        self._lease_timeout_s = lease_timeout_s
        self._owns_allocation = owns_allocation
        # The pool may still be connecting to other hosts: the first heartbeat gets longer.
        self._last_heard = time.monotonic() + first_heartbeat_timeout_s - lease_timeout_s
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
        kill_pids([p for p in pids if p != os.getpid()], self._job_id)

    @endpoint
    def alive(self, pids: list[int]) -> bool:
        return all(pid_alive(p) for p in pids)

    @endpoint
    def release(self) -> int:
        """The job is over: kill what is left of it on this host (not this agent); stop the lease."""
        self._released = True
        leftovers = [p for p in job_processes(self._job_id, os.getppid()) if p != os.getpid()]
        kill_pids(leftovers, self._job_id)
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
        kill_pids(mine, self._job_id)
        if self._owns_allocation:
            kill_pids([os.getppid()], self._job_id)  # a worker Forge started itself (ProcessJob)
        os._exit(0)
