"""This machine's processes, read from ``/proc``: liveness, parents, environments, and a
kill that checks whose process it is, and this process's memory. The one place Forge
parses ``/proc``.

Pids are reused (``pid_max`` may be 32768, and every thread takes one): a pid remembered
from a process that has since died may now be anyone's. So a process is told apart by
its start time (``start_time``) or by a tag in its environment (``has_env``), and
``kill_tagged`` only kills a pid whose environment proves it is still the process meant.
"""

from __future__ import annotations

import os
import signal


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 on), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (tells a reused pid apart), or None if it is
    gone or a zombie."""
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] == "Z" else fields[19]


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    try:
        return int(fields[1]) if fields is not None else None
    except (IndexError, ValueError):
        return None


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
    return [pid for pid in all_pids() if pid != me and has_env(pid, key, value) and pid_alive(pid)]


def descendants(root: int) -> list[int]:
    """Every process below ``root`` in the process tree (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        parent = parent_pid(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def kill_tagged(pids: "list[int] | tuple[int, ...]", key: str, value: str) -> list[int]:
    """SIGKILL those of ``pids`` whose environment still carries ``key=value``; the ones killed."""
    killed = []
    for pid in pids:
        if has_env(pid, key, value):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def current_rss() -> int:
    """This process's resident memory now, in bytes."""
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes."""
    return _status_kb("VmHWM") * 1024


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_large_frees_to_the_os(threshold: int = 1 << 20) -> bool:
    """Have glibc's malloc serve blocks above ``threshold`` bytes by ``mmap``, so freeing one
    returns it to the OS at once. By default the threshold grows to 32 MiB after a large
    free, and 1-32 MiB tensors freed by a CPU training step then stay in the heap: about
    0.2 GB of resident memory beyond what is live, for bench/trainer_memory.py's model.
    False where the C library is not glibc (nothing is changed then)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
