"""Helpers for actor tests: finding Monarch processes a test left behind (via forge.util.procs)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from forge.util.procs import descendants, pid_alive, processes_with_env

BOOTSTRAP = b"monarch._src.actor.bootstrap_main"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _is_monarch(pid: int) -> bool:
    return BOOTSTRAP in _cmdline(pid) and pid_alive(pid)


def procs_with_env(key: str, value: str) -> list[int]:
    """Live processes of any kind (Monarch procs, host workers, clients) whose environment has ``key=value``."""
    return processes_with_env(key, value)


def monarch_procs_with_env(key: str, value: str) -> list[int]:
    """Live Monarch worker processes whose environment has ``key=value``."""
    return [pid for pid in processes_with_env(key, value) if _is_monarch(pid)]


def monarch_descendants(root: int | None = None) -> list[int]:
    """Live Monarch worker processes below ``root`` (default: this process)."""
    return [pid for pid in descendants(os.getpid() if root is None else root) if _is_monarch(pid)]


def interruptible() -> None:
    """``preexec_fn`` for a child a test sends SIGINT (Ctrl-C) to: SIGINT at its default.

    A test session started in the background by a non-interactive shell (``cmd &``) runs
    with SIGINT ignored, and children inherit that, so a Ctrl-C test would see its child
    ignore the signal. The child is given the disposition of an interactive terminal."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
