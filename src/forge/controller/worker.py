"""A Forge worker: run one on every machine a job should use, then list the addresses.

    python -m forge.controller.worker --address tcp://0.0.0.0:26600

The worker is Monarch's ``run_worker_loop_forever``: it waits for a client (a Forge job
with ``hosts.source: workers``) to attach, runs the processes that client places on it,
and stays up for the next job. It executes whatever a connecting client sends, without
authentication or encryption (Monarch 0.7.0 accepts only ``trust_all_connections``):
bind it to a private network interface only (see README, "Several machines").
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forge.controller.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True,
                        help="where to listen, e.g. tcp://0.0.0.0:26600, or tcp://NAME:PORT@tcp://0.0.0.0:PORT "
                             "to advertise NAME while binding every interface")
    args = parser.parse_args(argv)
    if "://" not in args.address:
        parser.error(f"--address must be a URL such as tcp://0.0.0.0:26600, got {args.address!r}")
    os.environ.setdefault("MONARCH_FILE_LOG", "error")
    from forge.util.tmpdirs import private_tmpdir

    private_tmpdir()  # the socket directories of the processes it runs; swept after a kill
    from monarch.actor import run_worker_loop_forever

    run_worker_loop_forever(address=args.address, ca="trust_all_connections")


if __name__ == "__main__":
    main()
