"""The reaper of a local host pool: kills the job's processes when its client is gone.

``init_hosts`` starts one, detached, for a ``process_job`` pool (every host a worker
process on this machine). It watches the client's pid; when the client is gone — killed,
crashed, or exited without ``pool.shutdown()`` — it kills every process on this machine
whose environment carries the job's ``FORGE_JOB_ID`` (workers included), then exits.
Monarch alone would leave ProcessJob workers running: they live in sessions of their own.

    python -m forge.util.reaper --client PID --job JOB_ID
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import time


JOB_ID_ENV = "FORGE_JOB_ID"


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (tells a reused pid apart), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    return start_time(pid) is not None


def has_env(pid: int, key: str, value: str) -> bool:
    """Whether process ``pid``'s environment carries ``key=value``."""
    try:  # fails for a process that is gone or another user's
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{key}={value}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def processes_with_env(key: str, value: str) -> list[int]:
    """Every live process on this machine (but this one) whose environment has ``key=value``."""
    me = os.getpid()
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and int(e) != me and has_env(int(e), key, value) and pid_alive(int(e))]


def kill_tagged(pids: "list[int] | tuple[int, ...]", key: str, value: str) -> list[int]:
    """SIGKILL those of ``pids`` whose environment still carries ``key=value``; the ones killed.

    Pids are reused (``pid_max`` may be 32768, and every thread takes one): a pid remembered
    from a process that has since died may now be anyone's. Forge only kills a pid whose
    environment proves it is still the process it means.
    """
    killed = []
    for pid in pids:
        if has_env(pid, key, value):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def processes_of_job(job_id: str) -> list[int]:
    """Every process on this machine (but this one) that belongs to the job."""
    return processes_with_env(JOB_ID_ENV, job_id)


def reap(client_pid: int, job_id: str, interval_s: float = 0.5, remove: tuple[str, ...] = ()) -> int:
    """Wait for the client to go, kill the job's processes, then delete the ``remove``
    directories (the job's and the client's temp directories); returns how many were killed."""
    started = start_time(client_pid)
    while started is not None and start_time(client_pid) == started:
        time.sleep(interval_s)
    killed = 0
    for _ in range(3):  # processes may still be spawning children while we kill
        pids = processes_of_job(job_id)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        if not pids:
            break
        time.sleep(0.2)
    for path in remove:  # what Monarch left there (socket directories), now that nobody uses it
        shutil.rmtree(path, ignore_errors=True)
    return killed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forge.util.reaper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", type=int, required=True, help="pid of the client process to watch")
    parser.add_argument("--job", required=True, help="the pool's FORGE_JOB_ID")
    parser.add_argument("--remove", action="append", default=[], help="a directory to delete afterwards")
    args = parser.parse_args(argv)
    reap(args.client, args.job, remove=tuple(args.remove))


if __name__ == "__main__":
    main()
