"""Temp directories with an owner, so nothing Monarch writes there outlives a run.

Every Monarch process that hosts others (a client's local host, each worker of a host
pool) binds its processes' Unix sockets in a fresh ``$TMPDIR/.tmpXXXXXX`` directory and
removes it only when it exits cleanly: a killed host (a ProcessJob worker at
``job.kill()``, a SIGKILLed client) leaves it behind for good. Whether such a directory
is still in use cannot be told from outside (its creator may just have no process
running at the moment), so Forge does not guess. Instead, the processes Forge starts get
a ``TMPDIR`` whose name says who owns it:

* ``forge-tmp-<pid>-<start>``: made by ``private_tmpdir()`` for one process (the GRPO
  app, a Forge worker, the test session) and everything it starts; removed when that
  process exits, or by the next Forge process on the machine once that pid is gone;
* ``forge-job-<pid>-<start>-<job>``: the workers of a ``process_job`` host pool of client
  ``<pid>``; removed by ``pool.shutdown()``, by the pool's reaper after a client death, or
  by the next sweep once the client is gone.

``<start>`` is the process's start time, so a reused pid is never taken for the owner.
They are made side by side in the system temp directory, never inside one another even
when a process with one starts another: Unix socket paths are limited to 107 bytes.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from forge.util.procs import start_time

logger = logging.getLogger("forge.util")

_OWNED = re.compile(r"^forge-(?:tmp|job)-(?P<pid>\d+)-(?P<start>\d+)(?:-[0-9a-f]+)?$")


def owner_tag(pid: int | None = None) -> str:
    """``<pid>-<start>`` of a live process (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{start_time(pid)}"


def tmp_root() -> Path:
    """The temp directory owned directories are made in: ``$TMPDIR``, or, when that is
    itself an owned one (inherited from the process that started this one), its parent."""
    path = Path(tempfile.gettempdir())
    while _OWNED.match(path.name):
        path = path.parent
    return path


def private_tmpdir() -> Path:
    """Make ``$TMPDIR`` a directory of this process's own, removed when it exits.

    For a program's entry point (the GRPO app, a worker): Monarch's socket directories of
    this process and of everything it starts then go there, and a kill leaves them only
    until the next Forge process's sweep. Idempotent.
    """
    existing = owned_tmpdir_of_this_process()
    if existing is not None:
        return existing
    sweep_dead_tmpdirs()
    path = tmp_root() / f"forge-tmp-{owner_tag()}"
    path.mkdir(mode=0o700, exist_ok=True)
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None  # Python's own cache of it
    atexit.register(sweep_dead_tmpdirs)  # runs last: what processes this one started left behind
    atexit.register(shutil.rmtree, path, True)
    return path


def job_tmpdir(job_id: str) -> Path:
    """A directory for the workers of host-pool job ``job_id`` of this client."""
    path = tmp_root() / f"forge-job-{owner_tag()}-{job_id}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _is_dead_owners(entry: os.DirEntry) -> bool:
    match = _OWNED.match(entry.name)
    if match is None:
        return False
    try:
        info = entry.stat(follow_symlinks=False)
    except FileNotFoundError:  # removed meanwhile
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return False
    return start_time(int(match["pid"])) != match["start"]


def owned_tmpdir_of_this_process() -> Path | None:
    """This process's ``private_tmpdir()``, if it made one."""
    current = Path(os.environ.get("TMPDIR", ""))
    return current if current.name == f"forge-tmp-{owner_tag()}" else None


def sweep_dead_tmpdirs() -> int:
    """Remove the owned temp directories (see the module docstring) whose owner is gone; how many."""
    root = tmp_root()
    try:
        entries = [e for e in os.scandir(root) if _is_dead_owners(e)]
    except OSError as e:
        logger.info("cannot look for leftover temp directories in %s: %s", root, e)
        return 0
    removed = 0
    for entry in entries:
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += not os.path.exists(entry.path)
    return removed
