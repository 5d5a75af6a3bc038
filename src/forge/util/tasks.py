"""Background tasks with an owner (``Nursery``), and where a suspended task is waiting
(``await_chain``, for reports of a run that stopped making progress)."""

from __future__ import annotations

import asyncio
import linecache
import logging
from pathlib import Path
from typing import Any, Coroutine

logger = logging.getLogger("forge.tasks")


class Nursery:
    """The background tasks of one owner (a service client, a controller, a registry).

    ``start(coro)`` runs it as a task and keeps it referenced until it ends (asyncio holds
    tasks only weakly). A task that fails is logged at once with its traceback, naming
    the owner — never dropped silently. ``close()`` cancels what is still running and
    waits for it. Unlike ``asyncio.TaskGroup``, one failed task does not cancel the others:
    these are independent jobs (probes, rebuilds, heartbeats).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task] = set()

    def start(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("%s: background task %s failed", self.owner, task.get_coro().__qualname__,
                         exc_info=(type(error), error, error.__traceback__))

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every running task and wait until all have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
