"""Failpoints: stop a process at a named point of Forge's code, once, when a test asks.

Fault tests must kill a replica at an exact moment of the loop (mid-generation,
mid-weight-update, mid-metrics-drain), which a timer cannot hit reliably. A failpoint
is a named place in the code; it does nothing unless ``$FORGE_FAILPOINTS`` names a
directory. Then, when a process reaches point ``name`` and the file ``<dir>/<name>``
exists, the process claims it (renames it to ``<name>.<pid>``, so exactly one process
fires, and a rebuilt replica with the same environment does not fire again) and stops
itself with SIGSTOP. The test sees the claimed file, knows the pid, and kills or resumes
the process at that moment.

The cost when ``$FORGE_FAILPOINTS`` is unset is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "FORGE_FAILPOINTS"


def failpoint(name: str) -> None:
    """Stop this process here if the test armed ``name`` (see the module docstring)."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    armed = os.path.join(directory, name)
    try:
        os.rename(armed, f"{armed}.{os.getpid()}")
    except FileNotFoundError:  # not armed, or another process claimed it first
        return
    os.kill(os.getpid(), signal.SIGSTOP)


def arm(directory: str | os.PathLike, name: str) -> None:
    """Make the next process that reaches ``name`` stop there (used by tests)."""
    with open(os.path.join(directory, name), "w"):
        pass


def claimed_by(directory: str | os.PathLike, name: str) -> int | None:
    """The pid of the process that stopped at ``name``, once one has."""
    prefix = f"{name}."
    for entry in os.listdir(directory):
        if entry.startswith(prefix) and entry[len(prefix):].isdigit():
            return int(entry[len(prefix):])
    return None
