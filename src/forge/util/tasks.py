"""Where a suspended asyncio task is waiting: for reports of a run that stopped making progress."""

from __future__ import annotations

import asyncio
import linecache
from pathlib import Path


def await_chain(task: asyncio.Task) -> list[str]:
    """The awaits a task is suspended in, outermost first, as ``file:line  code``.

    Follows the coroutine each frame awaits (``cr_await``) down to the first object that
    is not a coroutine (a future, a Monarch call), so the last entry is the innermost
    line of Python that is waiting. Empty when the task is done.
    """
    if task.done():
        return []
    chain = []
    coro = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            break
        code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        chain.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}  {code}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return chain
