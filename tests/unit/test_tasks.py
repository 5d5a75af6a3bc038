"""Where a suspended task waits: the lines a stalled run's report names."""

import asyncio

from forge.util.tasks import await_chain


async def test_the_chain_names_each_await_down_to_the_innermost_line():
    gate = asyncio.Event()

    async def fetch_weights():
        await gate.wait()

    async def train_loop():
        while True:
            await fetch_weights()

    task = asyncio.ensure_future(train_loop())
    await asyncio.sleep(0.01)
    chain = await_chain(task)
    assert [where.split("  ", 1)[1] for where in chain[:2]] == ["await fetch_weights()", "await gate.wait()"]
    assert chain[0].startswith("test_tasks.py:") and chain[2].startswith("locks.py:")  # into asyncio's Event
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await_chain(task) == []
