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
import shutil
import time

from forge.util.procs import kill_tagged, processes_with_env, start_time

JOB_ID_ENV = "FORGE_JOB_ID"


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
        killed += len(kill_tagged(pids, JOB_ID_ENV, job_id))
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
