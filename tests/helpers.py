"""Helpers for actor tests: finding Monarch processes a test left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

BOOTSTRAP = b"monarch._src.actor.bootstrap_main"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _live_monarch_pids():
    """Pids of live (not zombie) Monarch worker processes on this machine."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            if BOOTSTRAP in _cmdline(pid) and _is_alive(pid):
                yield pid


def monarch_procs_with_env(key: str, value: str) -> list[int]:
    """Live Monarch worker processes whose environment has ``key=value``."""
    return [pid for pid in procs_with_env(key, value) if BOOTSTRAP in _cmdline(pid)]


def monarch_descendants(root: int | None = None) -> list[int]:
    """Live Monarch worker processes below ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    found = []
    for pid in _live_monarch_pids():
        parent = _ppid(pid)
        while parent not in (None, 0, 1):
            if parent == root:
                found.append(pid)
                break
            parent = _ppid(parent)
    return found


def wait_until(condition, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll ``condition`` until it is true or ``timeout_s`` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return bool(value)
        time.sleep(interval_s)


async def async_wait_until(condition, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Like ``wait_until`` but lets the event loop run; ``condition`` may be async."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value or time.monotonic() > deadline:
            return bool(value)
        await asyncio.sleep(interval_s)


def procs_with_env(key: str, value: str) -> list[int]:
    """Live processes of any kind (Monarch procs, host workers, clients) whose environment has ``key=value``."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in env and _is_alive(int(entry.name)):
                found.append(int(entry.name))
    return found
