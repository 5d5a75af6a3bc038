"""Processes for actors and replicas: GPU allocation, per-process environment, runtime setup.

Every Forge process gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and a
free ``MASTER_PORT`` so ``torch.distributed`` works inside a replica, with
``with_gpus=True`` its own ``CUDA_VISIBLE_DEVICES``, and ``OMP_NUM_THREADS=1`` unless the
caller's environment sets it (as torchrun does). The environment is passed through
Monarch's per-rank bootstrap command, never by mutating the caller's ``os.environ``.

``ensure_runtime()`` runs once per process on the first spawn (never at import): it
replaces Monarch's default fault hook, which would otherwise exit the client when any
child process dies.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import socket
import subprocess
import threading
from typing import Any

from forge.util.tmpdirs import sweep_dead_tmpdirs

logger = logging.getLogger("forge.controller")

# Environment Forge gives the service controller process: Monarch then notices a dead
# replica process within about a second instead of ten (see MONARCH_NOTES.md).
CONTROLLER_ENV = {
    "HYPERACTOR_MESH_SUPERVISION_POLL_FREQUENCY": "1s",
    "MONARCH_FILE_LOG": os.environ.get("MONARCH_FILE_LOG", "error"),
}

_runtime_lock = threading.Lock()
_swept = False  # this process swept the temp directories of dead Forge processes


def _forge_fault_hook(failure: Any) -> None:
    """Keep the client alive when a child mesh fails; Forge's owners deal with it.

    It must never raise: Monarch treats a hook that raises as an unhandled fault and
    exits the process (with code 1 when it cannot interrupt the main thread).
    """
    try:
        logger.warning("a Forge process failed and its owner was told: %s", str(failure)[:500])
    except BaseException:  # noqa: BLE001 - e.g. logging torn down at exit; the fault is handled either way
        pass


def ensure_runtime() -> None:
    """Install Forge's Monarch fault hook, unless the user installed their own.

    Checked on every spawn, not once: the default hook exits the client when any child
    process dies, so it must not come back (e.g. after a library or test restored it).
    """
    import monarch.actor
    from monarch._src.actor import supervision

    global _swept
    with _runtime_lock:
        if monarch.actor.unhandled_fault_hook is supervision.unhandled_fault_hook:
            monarch.actor.unhandled_fault_hook = _forge_fault_hook
        if not _swept:  # what killed Forge processes left in /tmp (see forge.util.tmpdirs)
            _swept = True
            sweep_dead_tmpdirs()


def free_port() -> int:
    """A TCP port that is free now on this host (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpus() -> list[str]:
    """Device ids this process may hand out: ``CUDA_VISIBLE_DEVICES`` when set, else all GPUs."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (subprocess.SubprocessError, OSError) as e:
        logger.warning("nvidia-smi failed (%s); treating this host as having no GPUs", e)
        return []
    return [str(i) for i, line in enumerate(l for l in listing.splitlines() if l.startswith("GPU "))]


SHARE_GPUS_ENV = "FORGE_SHARE_GPUS"


class GpuAllocator:
    """Hands out this host's GPUs to replicas, one device per process, never twice.

    With ``FORGE_SHARE_GPUS=1`` in the client's environment, processes share devices
    instead: each process still gets one device, the least shared one. That is for one
    GPU running every part (a smoke test, a small model); the parts must then fit in the
    device's memory together (vLLM: lower ``gpu_memory_utilization`` in engine ``extra``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: collections.Counter[str] = collections.Counter()

    def allocate(self, num_devices: int, what: str) -> list[str]:
        with self._lock:
            devices = visible_gpus()
            if os.environ.get(SHARE_GPUS_ENV) == "1" and devices:
                taken = []
                for _ in range(num_devices):
                    taken.append(min(devices, key=lambda d: self._users[d]))
                    self._users[taken[-1]] += 1
                return taken
            free = [d for d in devices if not self._users[d]]
            if num_devices > len(free):
                raise ValueError(
                    f"{what} needs {num_devices} GPU(s) (with_gpus=True gives each process one) "
                    f"but this host has {len(devices)} visible GPU(s) of which {len(free)} are "
                    f"free; lower procs or num_replicas, free GPUs, use with_gpus=False, or let "
                    f"processes share GPUs ({SHARE_GPUS_ENV}=1)"
                )
            taken = free[:num_devices]
            self._users.update(taken)
            return taken

    def release(self, devices: list[str]) -> None:
        with self._lock:
            self._users.subtract(devices)
            self._users += collections.Counter()  # drop the zeros


gpu_allocator = GpuAllocator()


def rank_env(
    num_procs: int,
    gpus: list[str] | None,
    extra: dict[str, str] | None = None,
    *,
    host_index: int = 0,
    num_hosts: int = 1,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
) -> list[dict[str, str]]:
    """The environment of the ``num_procs`` ranks one replica (or actor) runs on one host.

    A replica spanning ``num_hosts`` hosts calls this once per host: ranks are global
    (``RANK = host_index * num_procs + local rank``), ``LOCAL_*`` are per host, and every
    rank meets at ``master_addr:master_port`` (a free port here when not given).
    """
    master_port = str(master_port if master_port is not None else free_port())
    envs = []
    for rank in range(num_procs):
        env = {
            "RANK": str(host_index * num_procs + rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(num_hosts * num_procs),
            "LOCAL_WORLD_SIZE": str(num_procs),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": master_port,
        }
        if "OMP_NUM_THREADS" not in os.environ:
            # Like torchrun: many processes share the host's cores, and OpenMP threads that
            # spin-wait in every one of them starve the rest. Set OMP_NUM_THREADS to override.
            env["OMP_NUM_THREADS"] = "1"
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[rank]
        env.update(extra or {})
        envs.append(env)
    return envs


async def stop_quietly(proc_mesh: Any, timeout_s: float = 30.0) -> bool:
    """Stop a proc mesh that may be broken or hung; whether Monarch stopped it in time."""
    import asyncio

    try:
        await asyncio.wait_for(proc_mesh.stop(), timeout_s)
        return True
    except Exception as e:  # already broken: its processes are gone or going
        logger.info("stopping a proc mesh: %s", e)
        return False


def spawn_proc_mesh(host: Any, num_procs: int, envs: list[dict[str, str]], name: str) -> Any:
    """Spawn ``num_procs`` processes on ``host`` (a Monarch HostMesh), rank i with ``envs[i]``."""
    from monarch.actor import default_bootstrap_cmd

    from forge.util.secret import SECRET_ENV, run_secret

    base = default_bootstrap_cmd()
    secret = {SECRET_ENV: run_secret()}  # processes of one client agree on weight-store file names

    def command_for(point: Any) -> Any:
        return base.with_env({**secret, **envs[point.rank]})

    return host.spawn_procs(per_host={"procs": num_procs}, bootstrap_command=command_for, name=name)
