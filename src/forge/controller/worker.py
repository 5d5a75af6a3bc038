"""A Forge worker: run one on every machine a job should use, then list the addresses.

    python -m forge.controller.worker --address tcp://0.0.0.0:26600

The worker is Monarch's ``run_worker_loop_forever``: it waits for a client (a Forge job
with ``hosts.source: workers``) to attach, runs the processes that client places on it,
and stays up for the next job. It executes whatever a connecting client sends, without
authentication or encryption (Monarch 0.7.0 accepts only ``trust_all_connections``):
bind it to a private network interface only (see README, "Several machines").

A host pool of ``source: ssh`` starts one per host itself, with ``--stop-on-stdin-eof``:
it then lives as long as the ssh connection of the client that started it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from pathlib import Path

from forge.util.reaper import JOB_ID_ENV


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forge.controller.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True,
                        help="where to listen, e.g. tcp://0.0.0.0:26600, or tcp://NAME:PORT@tcp://0.0.0.0:PORT "
                             "to advertise NAME while binding every interface")
    parser.add_argument("--stop-on-stdin-eof", action="store_true",
                        help="when stdin closes, kill the processes of the job named by $FORGE_JOB_ID and exit "
                             "(a worker a Forge client started over ssh: it goes with the connection)")
    args = parser.parse_args(argv)
    if "://" not in args.address:
        parser.error(f"--address must be a URL such as tcp://0.0.0.0:26600, got {args.address!r}")
    if args.stop_on_stdin_eof and not os.environ.get(JOB_ID_ENV):
        parser.error(f"--stop-on-stdin-eof needs ${JOB_ID_ENV}: the job whose processes go with this worker")
    os.environ.setdefault("MONARCH_FILE_LOG", "error")
    from forge.util.tmpdirs import private_tmpdir

    tmpdir = private_tmpdir()  # the socket directories of the processes it runs; swept after a kill
    if args.stop_on_stdin_eof:
        threading.Thread(target=_stop_on_stdin_eof, args=(os.environ[JOB_ID_ENV], tmpdir),
                         name="forge-stdin-eof", daemon=True).start()
    from monarch.actor import run_worker_loop_forever

    run_worker_loop_forever(address=args.address, ca="trust_all_connections")


def _stop_on_stdin_eof(job_id: str, tmpdir: Path) -> None:
    """Wait for stdin to close, then kill the job's processes under this worker and exit."""
    from forge.util.procs import descendants, kill_tagged

    try:
        while os.read(0, 65536):
            pass
    except OSError:  # stdin unreadable: as good as closed
        pass
    for _ in range(3):  # processes may still be spawning children while we kill
        if not kill_tagged(descendants(os.getpid()), JOB_ID_ENV, job_id):
            break
        time.sleep(0.2)
    shutil.rmtree(tmpdir, ignore_errors=True)  # os._exit skips the atexit that would
    os._exit(0)


if __name__ == "__main__":
    main()
