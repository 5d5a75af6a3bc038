"""The seed's plain-Monarch Counter example, in the form README shows for Monarch 0.7.0."""

import pytest
from monarch.actor import Actor, Future, ProcMesh, endpoint, this_host, this_proc

pytestmark = pytest.mark.timeout(90)


class Counter(Actor):
    def __init__(self, initial_value: int):
        self.value = initial_value

    @endpoint
    def increment(self) -> None:
        self.value += 1

    @endpoint
    def get_value(self) -> int:
        return self.value


async def test_seed_monarch_counter_runs_on_monarch_0_7():
    counter: Counter = this_proc().spawn("counter", Counter, initial_value=0)
    fut: Future[int] = counter.get_value.call_one()
    assert await fut == 0

    procs: ProcMesh = this_host().spawn_procs(per_host={"gpus": 8})
    try:
        counters: Counter = procs.spawn("counters", Counter, 0)
        await counters.increment.call()
        # call_one() needs exactly one actor: slice the mesh down to one rank first
        assert await counters.slice(gpus=0).get_value.call_one() == 1
        assert await counters.get_value.choose() == 1
        values = await counters.get_value.call()
        assert [v for _, v in values.items()] == [1] * 8
        counters.increment.broadcast()  # fire and forget: not awaitable in 0.7.0
        values = await counters.get_value.call()  # messages from one sender arrive in order
        assert [v for _, v in values.items()] == [2] * 8
    finally:
        await procs.stop()
